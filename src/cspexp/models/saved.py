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
from cspexp.utils.errors import ConfigError, MissingPathError

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


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise MissingPathError(f"model.path={str(path)!r} does not exist or is not a directory")
    config = {}
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path / 'config.json'} is not valid JSON: {exc}") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            found = config.get("format") if isinstance(config, dict) else None
            hint = " (an original LISA checkpoint? load it with model=lisa, or convert it with python -m cspexp.convert)" \
                if isinstance(config, dict) and config.get("model_type") == "llava" else ""
            raise ConfigError(f"{path / 'config.json'} is not a cspexp model config (format {found!r}){hint}")
    kind = config.get("tokenizer", "word_level")
    if kind not in TOKENIZER_FILES:
        raise ConfigError(f"{path / 'config.json'}: tokenizer {kind!r} is not one of {sorted(TOKENIZER_FILES)}")
    files = (*FILES, TOKENIZER_FILES[kind])
    missing = [f for f in files if not (path / f).exists()]
    if missing:
        raise MissingPathError(f"model.path={str(path)!r} lacks {', '.join(missing)} (a cspexp model directory has {', '.join(files)})")
    return config


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
    state = load_file(str(path / "model.safetensors"))
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ConfigError(
            f"{path / 'model.safetensors'} does not match the architecture in config.json: "
            f"missing keys {missing[:20]}{' …' if len(missing) > 20 else ''}, "
            f"unexpected keys {unexpected[:20]}{' …' if len(unexpected) > 20 else ''}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    rebuild_buffers(model)
    if dtype is not None:  # None: as stored (a converted LISA-7B is bf16; float32 would double it)
        model = model.to(resolve_dtype(dtype))
    model = model.eval()
    return LoadedModel(model=model, processor=processor, name=name or config.get("name") or path.name)

