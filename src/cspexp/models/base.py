"""What every model loader shares: the `LoadedModel` it returns, its `ModelShape`, dtypes, the
assembly of a `LisaModel` from transformers configs, and the buffers a meta-device build must
recompute.

The loaders (`factory.random_lisa`, `saved.load_saved`, `lisa_checkpoint.load_lisa`) import this
module and nothing of each other; `cspexp.models.loaders` ties them to their configs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, SamConfig, SamModel

from cspexp.models.lisa import (
    AttentionImplementation,
    ImageNorm,
    ImagePosition,
    LisaModel,
    SegQuery,
    text_hidden_fcs,
)
from cspexp.models.processor import LisaProcessor
from cspexp.utils.choices import check_call, check_value

Dtype = Literal["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class ModelShape(NamedTuple):
    """What a pruning schedule is checked against: the LLM's depth and the image tokens per image."""

    num_layers: int
    n_image_tokens: int


@dataclass
class LoadedModel:
    """A built model with what the rest of a run needs of it: its processor (tokenizer, image sizes,
    collate) and the name results report it under."""

    model: LisaModel
    processor: LisaProcessor
    name: str

    @property
    def shape(self) -> ModelShape:
        return ModelShape(self.model.num_layers, self.model.n_image_tokens)

    def dims(self) -> dict:
        cfg = self.model.llm.config
        return {
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "n_image_tokens": self.model.n_image_tokens,
        }


def resolve_dtype(name: Dtype) -> torch.dtype:
    check_value(name, Dtype, "model.dtype")
    return getattr(torch, _DTYPE_ALIASES.get(name, name))


def assemble(
    *,
    vision_cfg: CLIPVisionConfig,
    llm_cfg: LlamaConfig,
    sam_cfg: SamConfig,
    processor: LisaProcessor,
    vision_select_layer: int = -2,
    seg_query: SegQuery = "before",
    attn_implementation: AttentionImplementation = "sdpa",
    image_position: ImagePosition = "none",
    image_norm: ImageNorm = "none",
) -> LisaModel:
    """A LisaModel with freshly initialised weights of the given architecture (loaders then fill
    them). The ``<image>`` and ``[SEG]`` ids come from the processor, the one place that asks the
    tokenizer for them (LISA's tokenizer answers −200 for ``<image>``: a placeholder, no vocabulary row)."""
    # Before the (possibly large) modules are built.
    check_call(assemble, {"seg_query": seg_query, "attn_implementation": attn_implementation,
                          "image_position": image_position, "image_norm": image_norm}, "model")
    vision_cfg._attn_implementation = attn_implementation
    llm_cfg._attn_implementation = attn_implementation
    sam_prompt_dim = sam_cfg.prompt_encoder_config.hidden_size
    return LisaModel(
        vision_tower=CLIPVisionModel(vision_cfg),
        mm_projector=nn.Linear(vision_cfg.hidden_size, llm_cfg.hidden_size),
        llm=LlamaForCausalLM(llm_cfg),
        sam=SamModel(sam_cfg),
        text_hidden_fcs=text_hidden_fcs(llm_cfg.hidden_size, sam_prompt_dim),
        image_token_id=processor.image_token_id,
        seg_token_id=processor.seg_token_id,
        vision_select_layer=vision_select_layer,
        seg_query=seg_query,
        image_position=image_position,
        image_norm=image_norm,
    ).eval()


def rebuild_buffers(model: nn.Module) -> None:
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
