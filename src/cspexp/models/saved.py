"""cspexp's own model directory: ``config.json`` + ``model.safetensors`` + ``tokenizer.json``.

The format of packaged and converted models: the three transformers sub-configs (CLIP vision,
LLaMA, SAM) are stored as their own ``to_dict()``, so the architecture is rebuilt exactly, and the
state dict of `LisaModel` is loaded strictly (a missing or unexpected key is an error that lists it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, LlamaConfig, SamConfig

from cspexp.models.factory import LoadedModel, assemble, resolve_dtype
from cspexp.models.processor import LisaProcessor
from cspexp.models.tokenizer import load_word_tokenizer, save_word_tokenizer
from cspexp.utils.errors import ConfigError, MissingPathError

FORMAT = "cspexp-lisa"
VERSION = 1
FILES = ("config.json", "model.safetensors", "tokenizer.json")


def save_model(loaded: LoadedModel, path: str | Path) -> Path:
    """Write `loaded` as a model directory that `load_saved` reads back."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    config = {
        "format": FORMAT,
        "version": VERSION,
        "name": loaded.name,
        "vision_select_layer": model.vision_select_layer,
        "seg_query": model.seg_query,
        "tokenizer": "word_level",
        "vision_config": model.vision_tower.config.to_dict(),
        "llm_config": model.llm.config.to_dict(),
        "sam_config": model.sam.config.to_dict(),
    }
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # SAM ties its prompt encoder's positional embedding to shared_image_embedding; safetensors
    # refuses shared storage, so tensors are saved as independent copies (loading re-ties them).
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": FORMAT})
    save_word_tokenizer(loaded.processor.tokenizer, path / "tokenizer.json")
    return path


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise MissingPathError(f"model.path={str(path)!r} does not exist or is not a directory")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise MissingPathError(f"model.path={str(path)!r} lacks {', '.join(missing)} (a cspexp model directory has {', '.join(FILES)})")
    config = json.loads((path / "config.json").read_text())
    if config.get("format") != FORMAT:
        raise ConfigError(f"{path / 'config.json'} is not a cspexp model config (format {config.get('format')!r})")
    return config


def saved_shape(path: str | Path) -> tuple[int, int]:
    """(LLM layers, image tokens) from the directory's config.json, without loading weights."""
    config = read_config(path)
    vision = config["vision_config"]
    side = vision["image_size"] // vision["patch_size"]
    return config["llm_config"]["num_hidden_layers"], side * side


def load_saved(
    *,
    path: str,
    name: str | None = None,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    seg_query: str | None = None,
    **_ignored,
) -> LoadedModel:
    """Load a model directory written by `save_model` (strict: every key must match)."""
    config = read_config(path)
    path = Path(path)
    tokenizer = load_word_tokenizer(path / "tokenizer.json")
    with torch.device("meta"):
        # Built on the meta device: no memory for random init, weights come from the file below.
        model = assemble(
            vision_cfg=CLIPVisionConfig.from_dict(config["vision_config"]),
            llm_cfg=LlamaConfig.from_dict(config["llm_config"]),
            sam_cfg=SamConfig.from_dict(config["sam_config"]),
            tokenizer=tokenizer,
            vision_select_layer=config["vision_select_layer"],
            seg_query=seg_query or config["seg_query"],
            attn_implementation=attn_implementation,
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
    _rebuild_buffers(model)
    model = model.to(resolve_dtype(dtype)).eval()
    processor = LisaProcessor(
        tokenizer=tokenizer,
        clip_size=config["vision_config"]["image_size"],
        sam_size=config["sam_config"]["vision_config"]["image_size"],
    )
    return LoadedModel(model=model, processor=processor, name=name or config.get("name") or path.name)


def _rebuild_buffers(model) -> None:
    """Non-persistent buffers (RoPE inverse frequencies, CLIP position ids) are not in the state
    dict, so after a meta-device build they must be recomputed on the CPU."""
    for module in model.modules():
        for buf_name, buf in list(module.named_buffers(recurse=False)):
            if buf.device.type != "meta":
                continue
            if buf_name in ("inv_freq", "original_inv_freq"):
                inv_freq, _ = module.rope_init_fn(module.config) if hasattr(module, "rope_init_fn") else \
                    module.compute_default_rope_parameters(module.config)
                module.register_buffer(buf_name, inv_freq, persistent=False)
            elif buf_name == "position_ids":
                module.register_buffer(buf_name, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
            else:
                raise RuntimeError(f"cannot rebuild buffer {buf_name} of {type(module).__name__} after a meta-device build")

