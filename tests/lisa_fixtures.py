"""Tiny checkpoints in the ORIGINAL LISA layout, written by the tests themselves (no downloads).

`write_tiny_lisa(root)` writes what ``xinlai/LISA-7B-v1`` looks like, at toy sizes:

    root/lisa/   config.json (LISA's keys: model_type llava, mm_hidden_size, out_dim, …)
                 pytorch_model-00001-of-00002.bin, pytorch_model-00002-of-00002.bin,
                 pytorch_model.bin.index.json   (or one .bin, or safetensors: `layout`)
                 tokenizer.model, tokenizer_config.json, special_tokens_map.json, added_tokens.json
    root/clip/   a CLIP checkpoint (a full CLIPModel, or a CLIPVisionModel with ``clip="vision"``)

The weights use LISA's names — LLaMA's as they are plus ``rotary_emb.inv_freq`` buffers,
``model.mm_projector.*``, ``model.text_hidden_fcs.0.{0,2}.*``, SAM under ``model.visual_model.*``
with segment-anything's names — and LISA's mixed dtypes (bf16 LLM, fp32 SAM and ``inv_freq``). The
modules they come from are returned, so tests compare loaded weights with their source. The tokenizer
files are the tiny LLaMA-style sentencepiece model of tests/fixtures/lisa_tokenizer/v1 (LISA-7B-v1's
layout: ``<im_patch>``, ``<im_start>``, ``<im_end>``, ``[SEG]`` after the pieces).

    python tests/lisa_fixtures.py OUT_DIR     # writes OUT_DIR/lisa and OUT_DIR/clip, for trying the CLI
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, SamModel

TESTS = Path(__file__).resolve().parent
TOKENIZER_FILES = TESTS / "fixtures" / "lisa_tokenizer" / "v1"
VOCAB_SIZE = 704  # the 700 sentencepiece pieces + <im_patch>, <im_start>, <im_end>, [SEG] (added_tokens.json)

# Toy sizes with LISA's structure.
LLM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
           max_position_embeddings=512, rms_norm_eps=1e-6)
CLIP_VISION = dict(image_size=56, patch_size=14, hidden_size=24, intermediate_size=48, num_hidden_layers=3,
                   num_attention_heads=2, projection_dim=16)  # 4×4 = 16 image tokens
CLIP_TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=16, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=2)
SAM = dict(image_size=64, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, window_size=4,
           global_attn_indexes=[1], prompt_dim=32, mask_decoder_mlp_dim=64, mask_decoder_heads=2)

LAYOUTS = ("bin_sharded", "bin", "safetensors", "safetensors_sharded")


@dataclass
class TinyLisa:
    path: Path  # the LISA checkpoint directory
    clip_path: Path  # the CLIP directory
    state: dict  # checkpoint key → tensor, exactly as written
    config: dict  # config.json
    llm: LlamaForCausalLM  # the sources of the weights (fp32; the checkpoint holds the LLM parts in bf16)
    projector: nn.Linear
    text_fcs: nn.ModuleList
    sam: SamModel
    clip: CLIPVisionModel


def _perturb(module: nn.Module, generator: torch.Generator) -> None:
    """Give every weight a distinct random value (transformers zero-initialises some, e.g. SAM's
    position tables, and a test comparing zeros with zeros could not fail)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)


def write_tiny_clip(path: Path, *, full: bool = True, seed: int = 1) -> CLIPVisionModel:
    """A CLIP checkpoint at `path`: a whole CLIPModel (as openai/clip-vit-large-patch14) or a
    CLIPVisionModel. Returns the vision tower it holds."""
    torch.manual_seed(seed)
    vision_cfg = CLIPVisionConfig(**CLIP_VISION)
    if full:
        model = CLIPModel(CLIPConfig(text_config=CLIP_TEXT, vision_config=vision_cfg.to_dict(), projection_dim=16))
    else:
        model = CLIPVisionModel(vision_cfg)
    _perturb(model, torch.Generator().manual_seed(seed))
    model.save_pretrained(path)
    if not full:
        return model.eval()
    tower = CLIPVisionModel(vision_cfg).eval()
    tower.load_state_dict(model.vision_model.state_dict())
    return tower


def lisa_config(*, vocab_size: int = VOCAB_SIZE) -> dict:
    """config.json with the keys of LISA-7B-v1's (xinlai/LISA-7B-v1 on the Hugging Face Hub), at the toy
    sizes."""
    return {
        "_name_or_path": "ckpt/LISA-7B-v1", "architectures": ["LISAForCausalLM"], "model_type": "llava",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu", "initializer_range": 0.02,
        **LLM, "vocab_size": vocab_size, "pretraining_tp": 1, "rope_scaling": None, "tie_word_embeddings": False,
        "freeze_mm_mlp_adapter": True, "image_aspect_ratio": "square", "mm_hidden_size": CLIP_VISION["hidden_size"],
        "mm_use_im_patch_token": False, "mm_use_im_start_end": True, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14", "out_dim": SAM["prompt_dim"],
        "pretrain_mm_mlp_adapter": None, "torch_dtype": "bfloat16", "train_mask_decoder": True,
        "transformers_version": "4.31.0", "tune_mm_mlp_adapter": False, "use_cache": False, "use_mm_proj": True,
        "vision_tower": "openai/clip-vit-large-patch14",
    }


def lisa_state(llm, projector, text_fcs, sam) -> dict:
    """The state dict under LISA's names and dtypes."""
    from cspexp.models.sam_convert import original_sam_state_dict

    bf16 = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in llm.state_dict().items()}  # model.*, lm_head.*
    inv_freq = 1.0 / (10000 ** (torch.arange(0, LLM["hidden_size"] // LLM["num_attention_heads"], 2).float()
                                / (LLM["hidden_size"] // LLM["num_attention_heads"])))
    for i in range(LLM["num_hidden_layers"]):  # transformers 4.31 saved RoPE frequencies as fp32 buffers
        bf16[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    for k, v in projector.state_dict().items():
        bf16[f"model.mm_projector.{k}"] = v.detach().to(torch.bfloat16).contiguous()
    for k, v in text_fcs.state_dict().items():
        bf16[f"model.text_hidden_fcs.{k}"] = v.detach().to(torch.bfloat16).contiguous()
    sam_state = original_sam_state_dict({k: v.detach() for k, v in sam.state_dict().items()})
    for k, v in sam_state.items():  # SAM stays fp32, as the FloatStorage in LISA's pickles
        bf16[f"model.visual_model.{k}"] = v.clone().contiguous()
    return bf16


def write_weights(path: Path, state: dict, layout: str = "bin_sharded") -> None:
    """`state` in one of LISA's / transformers' weight layouts."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: one of {LAYOUTS}")
    keys = list(state)
    fmt = "safetensors" if layout.startswith("safetensors") else "bin"
    if not layout.endswith("sharded"):
        if fmt == "bin":
            torch.save(state, path / "pytorch_model.bin")
        else:
            from safetensors.torch import save_file

            save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    half = len(keys) // 2
    weight_map, total = {}, 0
    for n, part in enumerate((keys[:half], keys[half:]), start=1):
        name = f"pytorch_model-0000{n}-of-00002.bin" if fmt == "bin" else f"model-0000{n}-of-00002.safetensors"
        shard = {k: state[k] for k in part}
        if fmt == "bin":
            torch.save(shard, path / name)
        else:
            from safetensors.torch import save_file

            save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(v.numel() * v.element_size() for v in shard.values())
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (path / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_tiny_lisa(
    root: Path,
    *,
    layout: str = "bin_sharded",
    clip: str = "full",
    seed: int = 0,
    edit: Callable[[dict], None] | None = None,
    config_edit: Callable[[dict], None] | None = None,
) -> TinyLisa:
    """A tiny LISA checkpoint in root/lisa and its CLIP tower in root/clip (see the module docstring).

    `edit` may change the state dict before it is written (drop a key, add a stray one);
    `config_edit` the config.json dict."""
    from cspexp.models.factory import sam_config
    from cspexp.models.lisa import text_hidden_fcs

    root = Path(root)
    path, clip_path = root / "lisa", root / "clip"
    path.mkdir(parents=True)
    tower = write_tiny_clip(clip_path, full=clip == "full", seed=seed + 1)

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB_SIZE, **LLM, tie_word_embeddings=False)).eval()
    projector = nn.Linear(CLIP_VISION["hidden_size"], LLM["hidden_size"])
    text_fcs = text_hidden_fcs(LLM["hidden_size"], SAM["prompt_dim"])
    sam = SamModel(sam_config(SAM)).eval()
    for module in (llm, projector, text_fcs, sam):
        _perturb(module, generator)

    state = lisa_state(llm, projector, text_fcs, sam)
    if edit is not None:
        edit(state)
    write_weights(path, state, layout)
    config = lisa_config()
    if config_edit is not None:
        config_edit(config)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    for f in TOKENIZER_FILES.iterdir():
        shutil.copy(f, path / f.name)
    return TinyLisa(path=path, clip_path=clip_path, state=state, config=config, llm=llm, projector=projector,
                    text_fcs=text_fcs, sam=sam, clip=tower)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/lisa_fixtures.py OUT_DIR")
    sys.path.insert(0, str(TESTS.parent / "src"))
    tiny = write_tiny_lisa(Path(sys.argv[1]))
    print(f"model.path={tiny.path} model.vision_tower={tiny.clip_path}")
