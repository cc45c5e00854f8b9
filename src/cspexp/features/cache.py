"""`FeatureCache`: a batch's vision features computed once, then reused — in memory within a process
(least recently used first out, bounded by ``cache.max_memory_gb``), on disk across processes
(``cache.dir``: one safetensors shard per batch, written atomically, so two processes writing the
same shard at once is harmless). A missing, stale or corrupt shard is recomputed; an unreadable one
gets one warning line. A cache never changes a result: keys name everything the features depend on
(`cspexp.features.keys`), and tests/test_feature_cache.py compares cached runs with uncached ones bit
for bit.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from cspexp.features import keys
from cspexp.features.vision import FIELDS, VisionFeatures
from cspexp.outputs.files import write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

Source = Literal["computed", "memory", "disk"]
#: Fields a shard may lack. Every shard `EvalModule` writes has them (it computes every optional output
#: on a miss), and a shard from before a field existed has another namespace (the code digest covers
#: `encode_image` / `encode_vision`), so only a caller that stores features without them writes such a
#: shard; a method that needs the missing field then fails in `run_llm` with one line.
OPTIONAL = frozenset({"clip_keys"})


@dataclass
class Entry:
    """One batch's features (on the CPU) and the vision time of each of its samples, measured where
    the features were computed."""

    features: VisionFeatures
    vision_ms: list[float]


class MemoryStore:
    """Entries of this process, least recently used evicted first once `max_bytes` is exceeded."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._bytes = 0

    def get(self, key: str) -> Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: Entry) -> None:
        size = entry.features.nbytes
        if size > self.max_bytes:
            return  # one batch larger than the whole budget: not kept
        if key in self._entries:
            self._bytes -= self._entries.pop(key).features.nbytes
        self._entries[key] = entry
        self._bytes += size
        self._evict()

    def resize(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._evict()

    def _evict(self) -> None:
        while self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.features.nbytes

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)


_memory = MemoryStore(0)  # the process's store: every job of a multirun process uses it


def memory_store(max_bytes: int) -> MemoryStore:
    """The process's memory store, resized to `max_bytes` (entries beyond it are evicted)."""
    _memory.resize(max_bytes)
    return _memory


class DiskStore:
    """Shards under ``<root>/<namespace digest>/<key[:2]>/<key>.safetensors``, with a ``namespace.json``
    per namespace that says, for people, what its entries were computed with."""

    def __init__(self, root: Path, namespace: dict, namespace_digest: str, model_name: str) -> None:
        self.dir = Path(root) / namespace_digest
        self.namespace_digest = namespace_digest
        self._namespace = {"model": model_name, **namespace}
        self.writable = True

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, key: str, images: list[str], expected: dict[str, tuple[tuple, torch.dtype]],
            vision: dict | None = None) -> Entry | None:
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("feature cache: cannot read %s (%s); recomputing", path, exc.strerror or exc)
            return None
        try:
            return self._decode(data, images, expected, vision)
        except Exception as exc:  # noqa: BLE001 — any damage to a shard means: recompute it
            log.warning("feature cache: %s is corrupt or stale (%s); recomputing", path, str(exc).splitlines()[0][:200])
            return None

    def _decode(self, data: bytes, images: list[str], expected: dict, vision: dict | None = None) -> Entry:
        # safetensors' layout: 8 bytes of header length, the JSON header (its metadata included), data.
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        if meta.get("format") != keys.FORMAT or meta.get("namespace") != self.namespace_digest:
            raise ValueError(f"written for {meta.get('format')}/{meta.get('namespace')}")
        if json.loads(meta.get("images", "null")) != images:
            raise ValueError("its images are not this batch's")
        if json.loads(meta.get("vision", "null")) != vision:
            raise ValueError("its vision stage is another method's")
        tensors = load_safetensors(data)
        for name, (shape, dtype) in expected.items():
            t = tensors.get(name)
            if t is None and name in OPTIONAL:
                continue
            if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                got = None if t is None else (tuple(t.shape), t.dtype)
                raise ValueError(f"{name} is {got}, expected {(shape, dtype)}")
        vision_ms = [float(x) for x in json.loads(meta["vision_ms"])]
        if len(vision_ms) != len(images):
            raise ValueError("vision_ms has the wrong length")
        return Entry(VisionFeatures(**{k: tensors[k] for k in FIELDS if k in tensors}), vision_ms)

    def put(self, key: str, images: list[str], idx: list, entry: Entry, vision: dict | None = None) -> int:
        """Write the shard; returns its size in bytes (0 when the disk refused: one warning, then the
        store stops writing for this run). `vision`: the method's vision stage (`batch_key`), if not CLIP's own."""
        if not self.writable:
            return 0
        meta = {"format": keys.FORMAT, "namespace": self.namespace_digest, "images": json.dumps(images),
                "idx": json.dumps(idx), "vision_ms": json.dumps(entry.vision_ms)}
        if vision is not None:
            meta["vision"] = json.dumps(vision, sort_keys=True)
        data = save_safetensors({k: v.contiguous() for k, v in entry.features.tensors().items()}, metadata=meta)
        try:
            if not (self.dir / "namespace.json").is_file():
                write_json_atomic(self.dir / "namespace.json", self._namespace)
            write_bytes_atomic(self.path(key), data)
        except OSError as exc:
            self.writable = False
            log.warning("feature cache: cannot write under %s (%s); this run keeps its features in memory only",
                        self.dir, exc)
            return 0
        return len(data)


@dataclass
class CacheStats:
    """What a run's cache did, per sample: the counts of results.json's ``cache`` block."""

    hits_memory: int = 0
    hits_disk: int = 0
    misses: int = 0
    bytes: int = 0  # size of the features this run used (hits and misses)
    bytes_written: int = 0  # shards written to disk

    def as_dict(self) -> dict:
        return {"hits": self.hits_memory + self.hits_disk, "misses": self.misses, "bytes": self.bytes,
                "hits_memory": self.hits_memory, "hits_disk": self.hits_disk, "bytes_written": self.bytes_written}


@dataclass
class Lookup:
    """A batch's features as the cache gave them; `source` says where from."""

    features: VisionFeatures
    vision_ms: list[float]
    source: Source


class FeatureCache:
    """The vision features of a loaded model's batches (see the module docstring).

    `lookup` gives a batch's features from memory or disk (None: compute them, then `store`).
    Features come back on `device`, as copies: a pass may not change the cache by changing them.
    Both take the pruning `method`: one that `changes_vision` (tome) has entries of its own, keyed by
    its `vision_description()`; every other method shares the dense tower's.
    """

    def __init__(self, loaded, device: torch.device, max_memory_bytes: int, directory: Path | str | None) -> None:
        self.model = loaded.model
        self.device = torch.device(device)
        self.namespace = keys.namespace(loaded.model, loaded.processor, self.device)
        self.namespace_digest = keys.digest_of(self.namespace)
        self.memory = memory_store(max_memory_bytes)
        self.disk = None if directory is None else DiskStore(Path(directory), self.namespace,
                                                             self.namespace_digest, loaded.name)
        self.stats = CacheStats()
        self._expected_per_sample = self._expected_shapes(loaded.model)  # the dense tower's entries

    @property
    def mode(self) -> str:
        return "memory" if self.disk is None else "memory+disk"

    @staticmethod
    def _expected_shapes(model) -> dict[str, tuple[tuple, torch.dtype]]:
        sam = model.sam.config.vision_config
        side = sam.image_size // sam.patch_size
        clip = model.vision_tower.config
        return {
            "image_tokens": ((model.n_image_tokens, model.llm.config.hidden_size),
                             next(model.mm_projector.parameters()).dtype),
            "sam_embeddings": ((sam.output_channels, side, side), model.sam.dtype),
            "cls_attention": ((model.n_image_tokens,), torch.float32),
            "clip_keys": ((model.n_image_tokens, clip.hidden_size // clip.num_attention_heads), torch.float32),
        }

    def _expected(self, method) -> dict[str, tuple[tuple, torch.dtype]]:
        """Per-sample shapes and dtypes of an entry: the dense tower's, or a merging method's (its n
        tokens, their cells and sizes, each cell's token; no [CLS] attention or keys)."""
        if _vision_of(method) is None:
            return self._expected_per_sample
        n, dense = method.count, self._expected_per_sample
        return {"image_tokens": ((n, dense["image_tokens"][0][1]), dense["image_tokens"][1]),
                "sam_embeddings": dense["sam_embeddings"], "image_grid": ((n,), torch.int64),
                "image_size": ((n,), torch.float32), "image_source": ((self.model.n_image_tokens,), torch.int64)}

    def _names(self, batch: dict, vision: dict | None = None) -> tuple[str, list[str]]:
        images = [keys.image_digest(img) for img in batch["images"]]
        return keys.batch_key(self.namespace_digest, images, vision), images

    def lookup(self, batch: dict, count: bool = True, method=None) -> Lookup | None:
        """The batch's features if some store has them; `count=False` for passes outside the
        measurement (warm-up), which leave the statistics alone."""
        vision = _vision_of(method)
        key, images = self._names(batch, vision)
        source: Source = "memory"
        entry = self.memory.get(key)
        if entry is None and self.disk is not None:
            B = len(images)
            expected = {k: ((B, *shape), dtype) for k, (shape, dtype) in self._expected(method).items()}
            entry = self.disk.get(key, images, expected, vision)
            source = "disk"
            if entry is not None and count:  # a warm-up read leaves the stores as they were
                self.memory.put(key, entry)
        if entry is None:
            return None
        if count:
            n = len(images)
            if source == "memory":
                self.stats.hits_memory += n
            else:
                self.stats.hits_disk += n
            self.stats.bytes += entry.features.nbytes
        copies = VisionFeatures(**{k: v.to(self.device, copy=True) for k, v in entry.features.tensors().items()})
        return Lookup(copies, list(entry.vision_ms), source)

    def store(self, batch: dict, features: VisionFeatures, vision_ms: list[float], method=None) -> None:
        """Keep a batch's computed features (a miss): in memory, and on disk when the cache has a dir."""
        vision = _vision_of(method)
        key, images = self._names(batch, vision)
        entry = Entry(VisionFeatures(**{k: v.detach().to("cpu", copy=True) for k, v in features.tensors().items()}),
                      [float(x) for x in vision_ms])
        self.stats.misses += len(images)
        self.stats.bytes += entry.features.nbytes
        self.memory.put(key, entry)
        if self.disk is not None:
            idx = [int(i) for i in batch["idx"]] if "idx" in batch else []
            self.stats.bytes_written += self.disk.put(key, images, idx, entry, vision)


def _vision_of(method) -> dict | None:
    """The vision stage `method` makes itself (`PruningMethod.vision_description`), None for CLIP's own."""
    return method.vision_description() if method is not None and method.changes_vision else None


FeaturesSetting = bool | Literal["auto"]


def feature_cache_mode(setting, directory, multirun: bool, sweep_agent: bool, dense_reference: bool) -> str:
    """``off``, ``memory`` or ``memory+disk`` for ``cache.features`` = `setting`:
    true: memory, and disk when `directory` is set; false: off; auto: like true in a multirun or a
    W&B sweep agent's run (jobs share features across processes), memory only for a single run whose
    dense reference re-reads the same batches, off otherwise."""
    if setting is False:
        return "off"
    if setting is True or multirun or sweep_agent:
        return "memory" if directory in (None, "") else "memory+disk"
    return "memory" if dense_reference else "off"


def in_sweep_agent() -> bool:
    """A W&B sweep agent started this process (it sets WANDB_SWEEP_ID)."""
    return bool(os.environ.get("WANDB_SWEEP_ID"))
