"""Original LISA checkpoints (dvlab-research/LISA, e.g. ``xinlai/LISA-7B-v1``) → `LisaModel`.

A LISA checkpoint directory holds ``config.json`` (``model_type: llava``: the LLaMA dimensions plus
``mm_hidden_size``, ``mm_vision_select_layer``, ``out_dim`` …), the weights (sharded
``pytorch_model-*.bin`` + ``pytorch_model.bin.index.json`` as released, a single ``pytorch_model.bin``,
or safetensors, single or sharded with ``model.safetensors.index.json``) and the tokenizer files. The
CLIP tower is not in it (LISA's merge script drops every ``vision_tower`` key): it is read from its own
directory, a full CLIP checkpoint such as ``openai/clip-vit-large-patch14`` or a vision-only one.

Key mapping, checkpoint → LisaModel (the names of LISA's released checkpoints; why two are dropped or
changed: docs/pitfalls.md, "transformers: checkpoint names from transformers 4.31"):

    model.embed_tokens.* · model.layers.* · model.norm.*   → llm.model.*   (LLaMA names unchanged)
    lm_head.*                                              → llm.lm_head.*
    model.layers.N.self_attn.rotary_emb.inv_freq           → dropped (a persistent buffer in transformers
                                                             4.31; recomputed from config.json)
    model.mm_projector.*                                   → mm_projector.*
    model.text_hidden_fcs.*                                → text_hidden_fcs.*
    model.visual_model.<segment-anything name>             → sam.<SamModel name>  (cspexp.models.sam_convert;
                                                             pixel_mean / pixel_std dropped)
    model.vision_tower.vision_tower.vision_model.*         → vision_tower.*  — only in checkpoints that
                                                             kept the tower; then it must be complete and it
                                                             replaces the weights of the CLIP directory

The load is strict: after all shards, a checkpoint key that maps nowhere, a LisaModel key that no
checkpoint key filled, or a shape that disagrees with config.json is an error that lists them. The
SAM architecture is inferred from the SAM weight shapes (``sam_config_from_weights``), which are read
before any tensor: from the safetensors headers, or from the memory-mapped ``.bin`` shards.

Memory: the model is built on the meta device (no storage), then each shard is memory-mapped
(``torch.load(mmap=True)`` / ``safe_open``) and every tensor is copied once, converted to the target
dtype and device, into its final place. The shard files stay in the page cache, which the OS can
reclaim, never in process memory; so the peak resident memory is the finished model plus one tensor
being converted (≈ 15 GB for LISA-7B in bf16: LLaMA-7B, SAM ViT-H and CLIP-L; within a 24 GB
budget), never two copies (tests/test_lisa_checkpoint.py measures it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig

from cspexp.models.base import Dtype, LoadedModel, ModelShape, assemble, rebuild_buffers, resolve_dtype
from cspexp.models.lisa import AttentionImplementation, SegQuery
from cspexp.models.processor import LisaProcessor
from cspexp.utils.errors import ConfigError, CspexpError, MissingPathError, one_line, require

log = logging.getLogger(__name__)

SAM_PREFIX = "model.visual_model."
TOWER_PREFIX = "model.vision_tower.vision_tower."  # LLaVA's CLIPVisionTower wraps CLIPVisionModel as .vision_tower
LLAMA_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.")

# The weight layouts a checkpoint directory may have, in the order they are looked for:
# (index file, single file, format).
WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors", "safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin", "bin"),
)
CLIP_MODEL_TYPES = ("clip", "clip_vision_model")  # a full CLIPModel checkpoint, or a CLIPVisionModel one
# config.json keys that fix the LLaMA architecture; the expected dims of conf/model/lisa_*.yaml name them.
LLAMA_DIMS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# Further config.json entries the loader reads, when present, and what each must be.
OPTIONAL_TYPES = (
    ("num_key_value_heads", "a positive int"), ("max_position_embeddings", "a positive int"),
    ("rms_norm_eps", "a number"), ("rope_theta", "a number"), ("mm_hidden_size", "a positive int"),
    ("mm_vision_select_layer", "an int"), ("out_dim", "a positive int"),
)


# --------------------------------------------------------------------------- config.json
def read_lisa_config(path: str | Path, label: str = "model.path") -> dict:
    """The checkpoint's ``config.json``, checked for what `load_lisa` needs (`label`: how errors name the path)."""
    path = Path(path)
    if not path.is_dir():
        raise MissingPathError(f"{label}={str(path)!r} does not exist or is not a directory")
    file = path / "config.json"
    if not file.is_file():
        raise MissingPathError(f"{label}={str(path)!r} has no config.json (a LISA checkpoint directory has config.json, "
                               "pytorch_model-*.bin or *.safetensors weights and tokenizer files)")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file} is not valid JSON: {exc}") from None
    require(isinstance(config, dict), f"{file} must hold a JSON object")
    missing = [k for k in LLAMA_DIMS if k not in config]
    require(not missing, f"{file} lacks the LLaMA dimension(s) {', '.join(missing)}; is it a LISA checkpoint "
                         f"(model_type 'llava')? It has model_type {config.get('model_type')!r}")
    for key in LLAMA_DIMS:
        _require_type(config, key, "a positive int", file)
    for key, kind in OPTIONAL_TYPES:
        if config.get(key) is not None:
            _require_type(config, key, kind, file)
    require(config.get("mm_vision_select_feature", "patch") == "patch",
            f"{file}: mm_vision_select_feature={config.get('mm_vision_select_feature')!r} is not supported; "
            "LISA uses 'patch' (CLIP features without [CLS])")
    require(config.get("mm_use_im_start_end", True) is True,
            f"{file}: mm_use_im_start_end={config.get('mm_use_im_start_end')!r} is not supported; LISA's prompt wraps the "
            "image in <im_start> <im_end> (mm_use_im_start_end: true)")
    projector = config.get("mm_projector_type", "linear")
    require(projector == "linear", f"{file}: mm_projector_type={projector!r} is not supported; LISA v1 uses one Linear ('linear')")
    llama_config(config, "sdpa", file)  # values transformers refuses fail here, before any weight is read
    return config


def _require_type(config: Mapping, key: str, kind: str, file: Path) -> None:
    value = config[key]
    is_int = isinstance(value, int) and not isinstance(value, bool)
    ok = {"a positive int": is_int and value > 0, "an int": is_int,
          "a number": (is_int or isinstance(value, float)) and value > 0}[kind]
    require(ok, f"{file}: {key} is {value!r} ({type(value).__name__}); it must be {kind}")


def check_expected(config: Mapping, expect: Mapping | None, config_file: Path, name: str | None) -> None:
    """A named model config (``model=lisa_7b``) pointed at another checkpoint fails here, in one line."""
    if not expect:
        return
    wrong = {k: v for k, v in expect.items() if config.get(k) != v}
    if wrong:
        want = ", ".join(f"{k} {v}" for k, v in expect.items())
        got = ", ".join(f"{k} {config.get(k)}" for k in wrong)
        raise ConfigError(
            f"model={name or 'lisa'} expects {want}, but {config_file} has {got}: this checkpoint is another model; "
            "use the model config that matches it, or model=lisa (reads everything from config.json)")


def llama_config(config: Mapping, attn_implementation: str, file: Path | str = "config.json") -> LlamaConfig:
    """The LLaMA of the checkpoint, from config.json (LISA-7B: LLaMA-1 7B; LISA-13B-llama2: Llama-2 13B);
    values transformers refuses are a ConfigError naming `file`."""
    try:
        cfg = _llama_config(config)
    except Exception as exc:  # noqa: BLE001 — transformers' config validation raises several types
        raise ConfigError(f"{file} describes a LLaMA that cannot be built: {one_line(exc)}") from None
    cfg._attn_implementation = attn_implementation
    return cfg


def _llama_config(config: Mapping) -> LlamaConfig:
    rope = {k: config[k] for k in ("rope_theta", "rope_scaling") if config.get(k) is not None}
    return LlamaConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        hidden_act=config.get("hidden_act", "silu"),
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        attention_bias=bool(config.get("attention_bias", False)),
        pad_token_id=config.get("pad_token_id", 0),
        bos_token_id=config.get("bos_token_id", 1),
        eos_token_id=config.get("eos_token_id", 2),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        use_cache=False,
        **rope,
    )


# --------------------------------------------------------------------------- CLIP
def read_vision_config(vision_tower: str | Path, label: str = "model.vision_tower") -> CLIPVisionConfig:
    """The CLIP vision config of a CLIP directory (a full CLIPModel's vision part, or a vision-only one)."""
    path = Path(vision_tower)
    if not path.is_dir():
        raise MissingPathError(f"{label}={str(path)!r} does not exist or is not a directory "
                               "(a local copy of openai/clip-vit-large-patch14, or any CLIP checkpoint directory)")
    try:
        # transformers would build a default CLIP from any other model's config, with a warning only
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        require(model_type in CLIP_MODEL_TYPES, f"{label}={str(path)!r} holds a {model_type!r} model, not CLIP "
                                                f"(config.json model_type must be one of {list(CLIP_MODEL_TYPES)})")
        vision = CLIPVisionConfig.from_pretrained(str(path), local_files_only=True)
    except CspexpError:
        raise
    except Exception as exc:  # noqa: BLE001 — json, transformers and its config validation raise several types
        raise ConfigError(f"{label}={str(path)!r} is not a CLIP checkpoint directory: {one_line(exc)}") from None
    for key in ("image_size", "patch_size", "hidden_size"):
        value = getattr(vision, key, None)
        require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"{path / 'config.json'}: the vision {key} is {value!r}; it must be a positive int")
    return vision


def load_vision_tower(vision_tower: str | Path, dtype: torch.dtype, attn_implementation: str) -> CLIPVisionModel:
    """CLIPVisionModel from a CLIP directory; transformers takes the vision part of a full CLIPModel.
    Strict for the vision part: a missing or misshapen vision weight is an error (the text part of a
    full CLIP checkpoint is what transformers reports as unexpected, and is left out on purpose)."""
    import transformers

    read_vision_config(vision_tower)  # the clear errors for a missing or foreign directory
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report would list every text-tower key
    bar = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a second's load: a bar would only clutter stderr
    try:
        clip, info = CLIPVisionModel.from_pretrained(str(vision_tower), local_files_only=True, dtype=dtype,
                                                     attn_implementation=attn_implementation, output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.vision_tower={str(vision_tower)!r}: cannot load CLIP weights: {_first_line(exc)}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bar:
            transformers.utils.logging.enable_progress_bar()
    bad = sorted(info["missing_keys"]) + sorted(str(k[0] if isinstance(k, tuple) else k) for k in info["mismatched_keys"])
    if bad:
        raise ConfigError(f"model.vision_tower={str(vision_tower)!r}: the CLIP weights lack or misshape {_listing(bad)}")
    return clip


def lisa_shape(cfg: Mapping) -> ModelShape:
    """The shape of the checkpoint ``cfg.path`` with the CLIP tower ``cfg.vision_tower``, from their
    config.json files, without reading any weight."""
    config = read_lisa_config(cfg["path"])
    vision = read_vision_config(cfg["vision_tower"])
    side = vision.image_size // vision.patch_size
    return ModelShape(config["num_hidden_layers"], side * side)


# --------------------------------------------------------------------------- weight files
@dataclass
class WeightShards:
    """The weight files of a checkpoint, opened lazily and memory-mapped: shapes first, tensors later."""

    files: list[Path]
    format: str  # "safetensors" | "bin"

    @classmethod
    def find(cls, path: Path) -> "WeightShards":
        for index_name, single_name, fmt in WEIGHT_LAYOUTS:
            if (path / index_name).is_file():
                return cls(_files_of_index(path / index_name), fmt)
            if (path / single_name).is_file():
                return cls([path / single_name], fmt)
        raise MissingPathError(
            f"{path} has no weights: expected pytorch_model.bin.index.json with its "
            "pytorch_model-*.bin shards, pytorch_model.bin, model.safetensors.index.json with its shards, or model.safetensors")

    def __post_init__(self) -> None:
        self._bin: dict[Path, dict] = {}
        self.where: dict[str, Path] = {}  # tensor name → its file (filled by `shapes`)

    def _open_bin(self, file: Path) -> dict:
        if file not in self._bin:
            try:
                # mmap: tensors are views of the file (page cache), so the shapes pass and the copy pass
                # share them and no shard is ever read into process memory whole.
                state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except Exception as exc:  # noqa: BLE001 — any unreadable pickle is the user's file, reported in one line
                raise ConfigError(f"cannot read the weight shard {file}: {_first_line(exc)}") from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ConfigError(f"{file} is not a state dict of tensors")
            self._bin[file] = state
        return self._bin[file]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name → shape, over all files; a name in two files is an error."""
        shapes: dict[str, tuple[int, ...]] = {}
        where = self.where
        for file in self.files:
            for key, shape in self._shapes_of(file):
                if key in shapes:
                    raise ConfigError(f"weight {key!r} is in both {where[key].name} and {file.name}")
                shapes[key], where[key] = shape, file
        return shapes

    def _shapes_of(self, file: Path) -> Iterator[tuple[str, tuple[int, ...]]]:
        if self.format == "bin":
            for key, tensor in self._open_bin(file).items():
                yield key, tuple(tensor.shape)
            return
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, tuple(f.get_slice(key).get_shape())
        except (OSError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot read the weight shard {file}: {_first_line(exc)}") from None

    def tensors(self, file: Path) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors of one file, one at a time (memory-mapped; copy what you keep)."""
        if self.format == "bin":
            yield from self._open_bin(file).items()
            self._bin.pop(file, None)  # done with this shard: unmap it
            return
        from safetensors import safe_open

        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def _files_of_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{index} is not a weight index (a JSON object with a 'weight_map'): {_first_line(exc)}") from None
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        raise MissingPathError(f"{index.name} lists shard(s) {', '.join(missing)} that are not in {index.parent}")
    return [index.parent / f for f in files]


# --------------------------------------------------------------------------- key mapping
def lisa_key_targets(key: str) -> list[str] | None:
    """The LisaModel key(s) that checkpoint key `key` fills: [] when it is dropped on purpose, None
    when it belongs to nothing (an unexpected key)."""
    from cspexp.models.sam_convert import hf_keys_for

    if key.endswith("rotary_emb.inv_freq"):
        return []
    if key.startswith(SAM_PREFIX):
        try:
            return [f"sam.{k}" for k in hf_keys_for(key[len(SAM_PREFIX):])]
        except ConfigError:
            return None
    if key.startswith(TOWER_PREFIX):
        rest = key[len(TOWER_PREFIX):]
        rest = rest.removeprefix("vision_model.")  # transformers 5's CLIPVisionModel has no vision_model level
        return [] if rest.endswith("position_ids") else [f"vision_tower.{rest}"]  # position_ids: a buffer in 4.31
    for prefix, target in (("model.mm_projector.", "mm_projector."), ("model.text_hidden_fcs.", "text_hidden_fcs.")):
        if key.startswith(prefix):
            return [target + key[len(prefix):]]
    if key.startswith(LLAMA_PREFIXES) or key.startswith("lm_head."):
        return [f"llm.{key}"]
    return None


@dataclass
class KeyPlan:
    """Where each checkpoint tensor goes, and what does not fit (checked before any tensor is read)."""

    targets: dict[str, list[str]]  # checkpoint key → LisaModel keys
    unexpected: list[str]  # checkpoint keys
    missing: list[str]  # LisaModel keys
    wrong_shapes: list[str]  # "name: checkpoint [..], model [..]"
    first_wrong: tuple[str, tuple, tuple] | None = None  # (checkpoint key, its shape, the model's)

    @classmethod
    def make(cls, shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> "KeyPlan":
        targets, unexpected, wrong, filled, first = {}, [], [], set(), None
        for key in sorted(shapes):
            mapped = lisa_key_targets(key)
            if mapped is None or any(t not in expected for t in mapped):
                unexpected.append(key)
                continue
            targets[key] = mapped
            for t in mapped:
                filled.add(t)
                if tuple(expected[t]) != tuple(shapes[key]):
                    wrong.append(f"{key}: checkpoint {list(shapes[key])}, model {list(expected[t])}")
                    first = first or (key, tuple(shapes[key]), tuple(expected[t]))
        missing = sorted(set(expected) - filled)
        return cls(targets, unexpected, missing, wrong, first)

    def check(self, path: Path, where: Mapping[str, Path] | None = None) -> None:
        """One ConfigError listing every problem; a wrong shape leads with its file, key and shapes."""
        if self.first_wrong is not None:
            key, found, want = self.first_wrong
            file = (where or {}).get(key, path)
            more = f"; {len(self.wrong_shapes)} weights differ" if len(self.wrong_shapes) > 1 else ""
            lead = [f"{file}: weight {key!r} has the wrong shape: expected {list(want)} (from {path / 'config.json'}, "
                    f"the CLIP tower and the SAM weights), found {list(found)}{more}"]
        else:
            lead = []
        problems = []
        if self.missing:
            problems.append(f"missing {_listing(self.missing)} (LisaModel names)")
        if self.unexpected:
            problems.append(f"unexpected {_listing(self.unexpected)}")
        if self.wrong_shapes:
            problems.append(f"wrong shapes {_listing(self.wrong_shapes)} (is config.json from this checkpoint?)")
        if problems:
            raise ConfigError("; ".join(lead + [f"the weights in {path} do not match a LISA model: " + "; ".join(problems)]))


def _listing(items: list[str], limit: int = 20) -> str:
    more = f" … and {len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)} key{'s' if len(items) != 1 else ''} {items[:limit]}{more}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"model.device={name!r} is not a device; use cpu, cuda or cuda:N") from None
    require(device.type != "cuda" or torch.cuda.is_available(), f"model.device={name!r}: no CUDA device is available")
    return device


def _progress(items: list, description: str, enabled: bool):
    from rich.progress import track

    return track(items, description=description, disable=not enabled or len(items) < 2, transient=True)


# --------------------------------------------------------------------------- the loader
def load_lisa(
    *,
    path: str,
    vision_tower: str,
    dtype: Dtype = "bfloat16",
    device: str = "cpu",
    name: str | None = None,
    attn_implementation: AttentionImplementation = "sdpa",
    seg_query: SegQuery = "before",
    vision_select_layer: int | None = None,
    expect: Mapping | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Load an original LISA checkpoint directory `path` with the CLIP tower of `vision_tower`.

    Args:
        dtype: bfloat16 | float16 | float32; every tensor is converted as it is copied.
        device: where the weights go (cpu, cuda, cuda:N), tensor by tensor.
        vision_select_layer: CLIP layer of the image features; None: ``mm_vision_select_layer`` of
            config.json (−2 in LISA).
        expect: config.json values this model config requires (``hidden_size`` …), so that a named
            config (``model=lisa_7b``) pointed at another checkpoint fails before the load.
        progress: show a progress bar over the shards.
    """
    from cspexp.models.lisa_tokenizer import load_lisa_tokenizer
    from cspexp.models.sam_convert import sam_config_from_weights

    ckpt = Path(path)
    config = read_lisa_config(ckpt)
    check_expected(config, expect, ckpt / "config.json", name)
    torch_dtype, target = resolve_dtype(dtype), _device(device)
    shards = WeightShards.find(ckpt)
    shapes = shards.shapes()
    tokenizer = load_lisa_tokenizer(ckpt)
    require(0 <= tokenizer.seg_token_id < config["vocab_size"],
            f"{ckpt}: the tokenizer's [SEG] id {tokenizer.seg_token_id} is outside config.json's vocab_size {config['vocab_size']}")

    clip = load_vision_tower(vision_tower, torch_dtype, attn_implementation)
    mm_hidden = config.get("mm_hidden_size", clip.config.hidden_size)
    require(mm_hidden == clip.config.hidden_size,
            f"model.vision_tower={str(vision_tower)!r} has width {clip.config.hidden_size}, but the checkpoint's projector "
            f"expects mm_hidden_size {mm_hidden} (LISA uses CLIP ViT-L/14: 1024)")
    select = config.get("mm_vision_select_layer", -2) if vision_select_layer is None else vision_select_layer
    n_clip = clip.config.num_hidden_layers
    require(isinstance(select, int) and -n_clip - 1 <= select <= n_clip,
            f"vision select layer {select!r} is outside the CLIP tower's hidden states {-n_clip - 1}..{n_clip} "
            "(model.vision_select_layer, or config.json's mm_vision_select_layer)")
    sam_shapes = {k[len(SAM_PREFIX):]: s for k, s in shapes.items() if k.startswith(SAM_PREFIX)}
    require(bool(sam_shapes), f"the weights in {ckpt} have no SAM ({SAM_PREFIX}*) keys; is it a LISA checkpoint?")
    sam_cfg = sam_config_from_weights(sam_shapes)
    out_dim = config.get("out_dim", sam_cfg.prompt_encoder_config.hidden_size)
    require(out_dim == sam_cfg.prompt_encoder_config.hidden_size,
            f"{ckpt / 'config.json'}: out_dim {out_dim} differs from the SAM prompt width "
            f"{sam_cfg.prompt_encoder_config.hidden_size} of its weights")

    processor = LisaProcessor(tokenizer=tokenizer, tokenizer_kind="lisa", clip_size=clip.config.image_size,
                              sam_size=sam_cfg.vision_config.image_size)
    llm_cfg = llama_config(config, attn_implementation, ckpt / "config.json")
    try:
        with torch.device("meta"):
            # No storage and no random init: every tensor is assigned from the checkpoint below.
            model = assemble(
                vision_cfg=clip.config,
                llm_cfg=llm_cfg,
                sam_cfg=sam_cfg,
                processor=processor,
                vision_select_layer=select,
                seg_query=seg_query,
                attn_implementation=attn_implementation,
            )
    except CspexpError:
        raise
    except Exception as exc:  # noqa: BLE001 — only configs reach here (e.g. an unknown rope_scaling type)
        raise ConfigError(f"{ckpt / 'config.json'} describes a model that cannot be built: {one_line(exc)}") from None
    model.vision_tower = clip
    has_tower = any(k.startswith(TOWER_PREFIX) for k in shapes)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if has_tower or not k.startswith("vision_tower.")}
    plan = KeyPlan.make(shapes, expected)
    plan.check(ckpt, shards.where)
    if has_tower:
        log.info("%s carries its own CLIP tower (%s*): it replaces the weights of %s", ckpt, TOWER_PREFIX, vision_tower)

    for file in _progress(shards.files, f"loading {ckpt.name}", progress):
        chunk = {}
        for key, tensor in shards.tensors(file):
            if not plan.targets.get(key):
                continue
            value = tensor.to(device=target, dtype=torch_dtype if tensor.is_floating_point() else tensor.dtype, copy=True)
            for t in plan.targets[key]:
                chunk[t] = value  # one copy, even where two LisaModel keys share it (SAM's positional matrix)
        model.load_state_dict(chunk, strict=False, assign=True)
        del chunk

    rebuild_buffers(model)  # RoPE frequencies: not in the state dict, computed from config.json
    model = model.to(target).eval()
    return LoadedModel(model=model, processor=processor, name=name or ckpt.name)
