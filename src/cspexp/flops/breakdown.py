"""Per-module FLOPs of the whole pipeline for one sample, counted by fvcore.

fvcore traces the forward with ``torch.jit.trace`` and counts one fused multiply-add as one "flop";
this module reports FLOPs (×2) to match the rest of cspexp. fvcore has no counter for
``aten::scaled_dot_product_attention`` and silently counts it as 0 (docs/pitfalls.md, "fvcore: SDPA
counted as zero"), so a handle is registered for it here: QKᵀ plus A·V, Lq·Lk·(E + Ev) per head.
The pruned LLM runs in the trace exactly as in evaluation (the shapes of *this* sample's schedule
become constants), so the LLM row includes the projections of the method's scoring; its q·Kᵀ rows,
computed outside any module, appear under "other".
"""

from __future__ import annotations

import warnings
from math import prod

import torch
from torch import nn

from cspexp.pruning.pipeline import segment

# (label, module-name prefix in LisaModel) — the stages of the pipeline, in data-flow order.
STAGES = (
    ("vision tower (CLIP)", "vision_tower"),
    ("projector", "mm_projector"),
    ("LLM (decoder layers)", "llm"),
    ("text_hidden_fcs", "text_hidden_fcs"),
    ("SAM image encoder", "sam.vision_encoder"),
    ("SAM prompt encoder + positional", ("sam.prompt_encoder", "sam.shared_image_embedding")),
    ("SAM mask decoder", "sam.mask_decoder"),
)


OTHER = "other (outside these modules, e.g. scoring rows)"


def sdpa_flop_handle(inputs, outputs) -> int:
    """MACs of ``scaled_dot_product_attention(q, k, v, ...)``: B·H·Lq·Lk·(E + Ev)."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    batch_heads = prod(q[:-2])
    return batch_heads * q[-2] * k[-2] * (q[-1] + v[-1])


class _Pipeline(nn.Module):
    """Tensor-in, tensor-out wrapper of `segment` for jit tracing (one sample)."""

    def __init__(self, model, method, batch: dict) -> None:
        super().__init__()
        self.model, self.method = model, method
        self.static = {k: v for k, v in batch.items() if k not in ("clip_pixels", "sam_pixels", "input_ids", "attention_mask")}

    def forward(self, clip_pixels, sam_pixels, input_ids, attention_mask):
        batch = {**self.static, "clip_pixels": clip_pixels, "sam_pixels": sam_pixels, "input_ids": input_ids,
                 "attention_mask": attention_mask}
        return segment(self.model, batch, self.method).logits[0]


def breakdown(model, method, batch: dict) -> dict:
    """FLOPs per stage for the first sample of `batch` ({label: FLOPs}, plus "total" and "unsupported")."""
    from fvcore.nn import FlopCountAnalysis

    one = {k: (v[:1] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
    wrapper = _Pipeline(model, method, one)
    inputs = (one["clip_pixels"], one["sam_pixels"], one["input_ids"], one["attention_mask"])
    analysis = FlopCountAnalysis(wrapper, inputs).set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_handle)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        by_module = analysis.by_module()
        total = analysis.total()
    stages = {}
    for label, prefixes in STAGES:
        prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
        stages[label] = 2 * sum(by_module.get(f"model.{p}", 0) for p in prefixes)
    # Work done by functions rather than modules, e.g. a method's q·Kᵀ scoring rows.
    stages[OTHER] = 2 * total - sum(stages.values())
    return {"unit": "FLOPs", "stages": stages, "total": 2 * total,
            "unsupported_ops": dict(analysis.unsupported_ops())}


def breakdown_table(result: dict, title: str):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("stage")
    table.add_column("GFLOPs", justify="right")
    table.add_column("share", justify="right")
    total = result["total"] or 1
    for label, flops in result["stages"].items():
        table.add_row(label, f"{flops / 1e9:.3f}", f"{100 * flops / total:.1f} %")
    table.add_row("total", f"{result['total'] / 1e9:.3f}", "100.0 %")
    return table
