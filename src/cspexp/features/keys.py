"""What cached vision features depend on, as digests.

An entry is one *batch* of features, keyed by (namespace, the batch's images in order):
- the namespace names everything about the model and the code that makes features from pixels:
  a content hash of the vision modules' tensors (computed once per loaded model), the model's vision
  settings, the preprocessing sizes, the dtypes, the device type, the source of the functions that
  turn an image into features, and the torch/transformers versions;
- each image is named by a hash of its decoded pixels — stronger than a dataset name and an idx: an
  edited file gets a new entry, and the same image in two datasets shares one.
Why batches and not samples: on CPU, CLIP's and SAM's outputs for a sample differ in the last bits
with the batch it was computed in (measured on the embedded model: batch of 8 vs alone), and a cache
must never change a result. Jobs of one sweep see the same batches, so they share every entry.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import weakref
from importlib import metadata

import numpy as np
import torch

#: Bump when the layout of a stored entry changes.
FORMAT = "cspexp-features/1"

_weights_digests: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # vision module → digest


def _hash_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, t in named:
        t = t.detach().reshape(-1).contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_digest(model) -> str:
    """Content hash of the tensors (parameters and buffers) of the modules that make the features:
    the CLIP tower, the projector, SAM's image encoder. Computed once per loaded model: evaluation
    never changes weights (tests/test_model_reuse.py)."""
    modules = {"vision_tower": model.vision_tower, "mm_projector": model.mm_projector,
               "sam.vision_encoder": model.sam.vision_encoder}
    key = model.vision_tower
    if key not in _weights_digests:
        named = [(f"{prefix}.{n}", t) for prefix, m in modules.items()
                 for n, t in [*m.named_parameters(), *m.named_buffers()]]
        _weights_digests[key] = _hash_tensors(named)
    return _weights_digests[key]


def _code_digest() -> str:
    """The source of what turns an image into features: editing it invalidates every entry."""
    from cspexp.features import vision
    from cspexp.models import lisa, processor

    parts = [inspect.getsource(f) for f in (processor.clip_preprocess, processor.sam_preprocess,
                                            processor.sam_resized_shape, lisa.clip_cls_attention, lisa.clip_patch_keys,
                                            lisa.grid_sincos,
                                            lisa.LisaModel.encode_image, lisa.LisaModel.image_embeddings,
                                            vision.encode_vision)]
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=8).hexdigest()


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def namespace(model, processor, device: torch.device) -> dict:
    """Everything an entry depends on besides the images (see the module docstring)."""
    return {
        "format": FORMAT,
        "weights": weights_digest(model),
        "vision_select_layer": model.vision_select_layer,
        "image_norm": model.image_norm,
        "image_position": model.image_position,
        "clip_size": processor.clip_size,
        "sam_size": processor.sam_size,
        "dtypes": {"vision_tower": str(model.vision_tower.dtype), "sam": str(model.sam.dtype)},
        "device": torch.device(device).type,
        "code": _code_digest(),
        "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
    }


def digest_of(obj) -> str:
    """16 hex digits naming a JSON-able value."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def image_digest(image: np.ndarray) -> str:
    """Hash of a decoded image's pixels (shape and dtype included)."""
    arr = np.ascontiguousarray(image)
    h = hashlib.blake2b(f"{arr.shape}|{arr.dtype}|".encode(), digest_size=16)
    h.update(arr.tobytes())
    return h.hexdigest()


def batch_key(namespace_digest: str, images: list[str], vision: dict | None = None) -> str:
    """The entry name of a batch: its namespace and its images' digests, in order, and — for a pruning
    method that changes the vision stage (tome) — that method's `vision_description()`, so the dense
    tower and every such setting get entries of their own."""
    name = f"{namespace_digest}|{','.join(images)}" + ("" if vision is None else f"|{digest_of(vision)}")
    return hashlib.blake2b(name.encode(), digest_size=16).hexdigest()
