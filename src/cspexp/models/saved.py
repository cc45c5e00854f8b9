"""cspexp's own model directory: ``config.json`` + ``model.safetensors`` + the tokenizer.

The format of packaged and converted models: the three transformers sub-configs (CLIP vision,
LLaMA, SAM) are stored as their own ``to_dict()``, so the architecture is rebuilt exactly, and the
state dict of `LisaModel` is loaded strictly (a missing or unexpected key is an error that lists it).
config.json's ``tokenizer`` says which tokenizer the directory holds: ``word_level`` (the tiny
models: ``tokenizer.json``) or ``lisa`` (a converted LISA checkpoint: LISA's tokenizer files in
``tokenizer/``, read by `cspexp.models.lisa_tokenizer`). Directories written before the field
existed are word-level.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, LlamaConfig, SamConfig

from cspexp.models.base import Dtype, LoadedModel, ModelShape, assemble, rebuild_buffers, resolve_dtype
from cspexp.models.lisa import AttentionImplementation, SegQuery
from cspexp.models.processor import LisaProcessor
from cspexp.models.tokenizer import load_word_tokenizer, save_word_tokenizer
from cspexp.utils.errors import ConfigError, CspexpError, MissingPathError, one_line

FORMAT = "cspexp-lisa"
VERSION = 1
FILES = ("config.json", "model.safetensors")
# config.json "tokenizer" → the file or directory holding it
TOKENIZER_FILES = {"word_level": "tokenizer.json", "lisa": "tokenizer"}


def state_for_safetensors(model) -> dict:
    """The state dict with no two tensors sharing storage, which safetensors refuses (SAM ties its
    prompt encoder's positional matrix to shared_image_embedding; loading gives each key its own
    copy). Only those tensors are copied, so saving a 7B model needs no second copy of it."""
    state, seen = {}, set()
    for key, value in model.state_dict().items():
        value = value.detach()
        ptr = (value.device, value.untyped_storage().data_ptr())
        state[key] = value.clone() if ptr in seen else value.contiguous()
        seen.add(ptr)
    return state


def save_model(loaded: LoadedModel, path: str | Path) -> Path:
    """Write `loaded` as a model directory that `load_saved` reads back."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    tokenizer = loaded.processor.tokenizer
    kind = loaded.processor.tokenizer_kind
    config = {
        "format": FORMAT,
        "version": VERSION,
        "name": loaded.name,
        "vision_select_layer": model.vision_select_layer,
        "seg_query": model.seg_query,
        "image_position": model.image_position,
        "image_norm": model.image_norm,
        "tokenizer": kind,
        "vision_config": model.vision_tower.config.to_dict(),
        "llm_config": model.llm.config.to_dict(),
        "sam_config": model.sam.config.to_dict(),
    }
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state_for_safetensors(model), str(path / "model.safetensors"), metadata={"format": FORMAT})
    if kind == "lisa":
        tokenizer.save(path / TOKENIZER_FILES[kind])
    else:
        save_word_tokenizer(tokenizer, path / TOKENIZER_FILES[kind])
    return path


# config.json entries a model directory must have, as (dotted key, what it must be); checked in this
# order, so the first one that is wrong is the one an error names. Everything `saved_shape` and
# `load_saved` read from config.json is here.
_POSITIVE_INT = "a positive int"
REQUIRED = (
    ("vision_config", "an object"),
    ("llm_config", "an object"),
    ("sam_config", "an object"),
    ("vision_config.image_size", _POSITIVE_INT),
    ("vision_config.patch_size", _POSITIVE_INT),
    ("vision_config.hidden_size", _POSITIVE_INT),
    ("llm_config.num_hidden_layers", _POSITIVE_INT),
    ("llm_config.hidden_size", _POSITIVE_INT),
    ("llm_config.vocab_size", _POSITIVE_INT),
    ("sam_config.vision_config", "an object"),
    ("sam_config.vision_config.image_size", _POSITIVE_INT),
    ("vision_select_layer", "an int"),
    ("seg_query", "a string"),
)
OPTIONAL = (("name", "a string"), ("tokenizer", "a string"), ("image_position", "a string"), ("image_norm", "a string"))
_MISSING = object()


def _is(value, kind: str) -> bool:
    if kind == "an object":
        return isinstance(value, dict)
    if kind == "a string":
        return isinstance(value, str)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    return is_int and (kind == "an int" or value > 0)


def _lookup(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def check_config(config: dict, file: Path) -> None:
    """Every entry `saved_shape` and `load_saved` read is present and of its type; the first that is
    not is named in one line (a ConfigError), before any weight is read."""
    for key, kind in REQUIRED:
        value = _lookup(config, key)
        if value is _MISSING:
            raise ConfigError(f"{file}: {key} is missing; it must be {kind} (a cspexp model config.json has "
                              f"vision_config, llm_config and sam_config, as save_model and python -m cspexp.convert write it)")
        if not _is(value, kind):
            raise ConfigError(f"{file}: {key} is {value!r} ({type(value).__name__}); it must be {kind}")
    for key, kind in OPTIONAL:
        value = config.get(key)
        if value is not None and not _is(value, kind):
            raise ConfigError(f"{file}: {key} is {value!r} ({type(value).__name__}); it must be {kind}")


def read_config(path: str | Path) -> dict:
    """The directory's config.json, checked (`check_config`) before anything else reads it."""
    path = Path(path)
    if not path.is_dir():
        raise MissingPathError(f"model.path={str(path)!r} does not exist or is not a directory")
    file = path / "config.json"
    config = {}
    if file.is_file():  # else: named with the other missing files below
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file} is not valid JSON: {exc}") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            found = config.get("format") if isinstance(config, dict) else None
            hint = " (an original LISA checkpoint? load it with model=lisa, or convert it with python -m cspexp.convert)" \
                if isinstance(config, dict) and config.get("model_type") == "llava" else ""
            raise ConfigError(f"{file} is not a cspexp model config (format {found!r}, expected {FORMAT!r}){hint}")
    kind = config.get("tokenizer", "word_level")
    if kind not in TOKENIZER_FILES:
        raise ConfigError(f"{file}: tokenizer {kind!r} is not one of {sorted(TOKENIZER_FILES)}")
    files = (*FILES, TOKENIZER_FILES[kind])
    missing = [f for f in files if not (path / f).exists()]
    if missing:
        raise MissingPathError(f"model.path={str(path)!r} lacks {', '.join(missing)} (a cspexp model directory has {', '.join(files)})")
    check_config(config, file)
    return config


def stored_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a safetensors file, from its header (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as exc:  # noqa: BLE001 — safetensors raises its own error types; any of them means a bad file
        raise ConfigError(f"cannot read {file}: {one_line(exc)}") from None


def check_weights(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], file: Path) -> None:
    """The weights in `file` (`found`: name → shape) fill exactly the model that config.json describes
    (`expected`): the same names, the same shapes. One line names the first mismatch."""
    missing = [k for k in expected if k not in found]
    unexpected = sorted(k for k in found if k not in expected)
    if missing or unexpected:
        raise ConfigError(f"{file} does not match the architecture in config.json: missing keys {_listing(missing)}, "
                          f"unexpected keys {_listing(unexpected)}; were config.json and the weights written together?")
    wrong = [k for k in expected if tuple(found[k]) != tuple(expected[k])]
    if wrong:
        first = wrong[0]
        more = f" ({len(wrong)} weights differ)" if len(wrong) > 1 else ""
        raise ConfigError(
            f"{file}: weight {first!r} has the wrong shape: expected {list(expected[first])} (the architecture in "
            f"config.json), found {list(found[first])}{more}; were config.json and the weights written together?")


def _listing(keys: list[str], limit: int = 5) -> str:
    return f"{keys[:limit]}{f' … and {len(keys) - limit} more' if len(keys) > limit else ''}"


def saved_shape(cfg: Mapping) -> ModelShape:
    """The shape of the model directory ``cfg.path``, from its config.json, without loading weights."""
    config = read_config(cfg["path"])
    vision = config["vision_config"]
    side = vision["image_size"] // vision["patch_size"]
    return ModelShape(config["llm_config"]["num_hidden_layers"], side * side)


def load_saved(
    *,
    path: str,
    name: str | None = None,
    dtype: Dtype | None = "float32",
    attn_implementation: AttentionImplementation = "sdpa",
    seg_query: SegQuery | None = None,
) -> LoadedModel:
    """Load a model directory written by `save_model` (strict: every key must match); `dtype` None
    keeps the stored dtype."""
    config = read_config(path)
    path = Path(path)
    kind = config.get("tokenizer", "word_level")
    if kind == "lisa":
        from cspexp.models.lisa_tokenizer import load_lisa_tokenizer

        tokenizer = load_lisa_tokenizer(path / TOKENIZER_FILES[kind])
    else:
        tokenizer = load_word_tokenizer(path / TOKENIZER_FILES[kind])
    processor = LisaProcessor(
        tokenizer=tokenizer,
        tokenizer_kind=kind,
        clip_size=config["vision_config"]["image_size"],
        sam_size=config["sam_config"]["vision_config"]["image_size"],
    )
    file = path / "config.json"
    try:
        with torch.device("meta"):
            # Built on the meta device: no memory for random init, weights come from the file below.
            model = assemble(
                vision_cfg=CLIPVisionConfig.from_dict(config["vision_config"]),
                llm_cfg=LlamaConfig.from_dict(config["llm_config"]),
                sam_cfg=SamConfig.from_dict(config["sam_config"]),
                processor=processor,
                vision_select_layer=config["vision_select_layer"],
                seg_query=seg_query or config["seg_query"],
                attn_implementation=attn_implementation,
                image_position=config.get("image_position", "none"),
                image_norm=config.get("image_norm", "none"),
            )
    except CspexpError:
        raise
    except Exception as exc:  # noqa: BLE001 — transformers' config validation raises several types
        # Only config.json's values reach here: one transformers cannot build (hidden_size not a
        # multiple of the heads, a string for an int, …) is the file's fault, named in one line.
        raise ConfigError(f"{file} describes a model that cannot be built: {one_line(exc)}") from None
    weights = path / "model.safetensors"
    # Names and shapes from the file's header, against the architecture: before any tensor is read.
    check_weights(stored_shapes(weights), {k: tuple(v.shape) for k, v in model.state_dict().items()}, weights)
    state = load_file(str(weights))
    model.load_state_dict(state, strict=True, assign=True)
    rebuild_buffers(model)
    if dtype is not None:  # None: as stored (a converted LISA-7B is bf16; float32 would double it)
        model = model.to(resolve_dtype(dtype))
    model = model.eval()
    return LoadedModel(model=model, processor=processor, name=name or config.get("name") or path.name)

