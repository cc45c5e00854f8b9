"""Analytic FLOPs of LISA's vision stage: CLIP tower, projector and SAM image encoder, per image.

Why: pruning acts on the LLM only. The vision stage — CLIP → projector (the LLM's image tokens) and
SAM's image encoder (the mask decoder's image embedding) — depends on the image alone, so a sweep
that caches it per sample pays it once instead of once per point (`cspexp.flops.sweep_cost`).
These functions say how much that is.

Counted like `cspexp.flops.analytic` and `torch.utils.flop_counter.FlopCounterMode`: multiply-adds
of convolutions, linear layers and attention matmuls, FLOPs = 2 · MACs; norms, softmax, GELU, biases,
position-embedding additions and the rel-pos interpolation are not counted. Every count equals
FlopCounterMode's on transformers' modules (tests/test_vision_flops.py) with eager attention:
FlopCounterMode has no formula for CPU's SDPA kernel (`_scaled_dot_product_flash_attention_for_cpu`)
and counts it as 0, which would hide the QKᵀ and A·V terms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from transformers import CLIPVisionConfig
from transformers.models.sam.configuration_sam import SamMaskDecoderConfig, SamVisionConfig


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------- CLIP and projector

def clip_layers_run(num_layers: int, select_layer: int = -2) -> int:
    """Encoder layers needed for ``hidden_states[select_layer]`` (hidden_states[0] is the embedding,
    hidden_states[k] the output of layer k−1): -2 of 24 layers → 23."""
    if not -(num_layers + 1) <= select_layer <= num_layers:
        raise ValueError(f"select_layer={select_layer} is outside hidden_states of a {num_layers}-layer tower")
    return select_layer % (num_layers + 1)


def clip_vision_flops(config: CLIPVisionConfig, select_layer: int = -2, merges: Sequence[int] = ()) -> int:
    """FLOPs of one image through a CLIP vision tower up to ``hidden_states[select_layer]``.

    LISA (like LLaVA) reads layer -2, so the last layer is not counted: a feature cache needs only the
    layers up to it (cspexp's `LisaModel` does run the whole tower, as transformers does: +1/24 at L/14).
    Per layer, T = patches + [CLS], width d, MLP width m: 4·T·d² (q, k, v, o) + 2·T²·d (QKᵀ, A·V) + 2·T·d·m.

    `merges` (ToMe's schedule, `cspexp.pruning.methods.tome`): r_l tokens merged away after the attention
    of layer l, so that layer's MLP runs on T_l − r_l tokens and the next layer starts with them. The
    merging itself (similarities, weighted sums) is the method's overhead, not counted here.
    """
    h, w = _pair(config.image_size)
    p = _pair(config.patch_size)
    patches = (h // p[0]) * (w // p[1])
    d, m, tokens = config.hidden_size, config.intermediate_size, patches + 1
    embed = patches * d * config.num_channels * p[0] * p[1]  # patch conv, no bias
    run = clip_layers_run(config.num_hidden_layers, select_layer)
    if len(merges) > run:
        raise ValueError(f"{len(merges)} merge counts for a tower that runs {run} layers")
    macs = embed
    for r in [*merges, *[0] * (run - len(merges))]:
        macs += 4 * tokens * d * d + 2 * tokens * tokens * d + 2 * (tokens - r) * d * m
        tokens -= r
    return 2 * macs


def projector_flops(in_dim: int, out_dim: int, n_tokens: int) -> int:
    """FLOPs of LISA v1's projector, one Linear(in_dim → out_dim) over the image tokens ([CLS] dropped)."""
    return 2 * n_tokens * in_dim * out_dim


def lisa_vision_flops(model, method=None) -> dict[str, int]:
    """Per-image FLOPs of what makes a `LisaModel`'s image tokens — the CLIP tower up to its feature
    layer and the projector (one Linear) — under `method` (``vision``: ToMe's merges shorten both) and
    dense (``vision_dense``). SAM's image encoder is the same for every method and is left out."""
    from cspexp.models.clip_loop import ClipShape

    config, select = model.vision_tower.config, model.vision_select_layer
    n = model.n_image_tokens
    out_dim = model.llm.config.hidden_size
    dense = clip_vision_flops(config, select) + projector_flops(config.hidden_size, out_dim, n)
    if method is None or not method.changes_vision:
        return {"vision": dense, "vision_dense": dense}
    merges = method.schedule(ClipShape.of(config, select))
    n_out = n - sum(merges)
    return {"vision": clip_vision_flops(config, select, merges) + projector_flops(config.hidden_size, out_dim, n_out),
            "vision_dense": dense}


def summarize_vision(rows: Sequence[dict]) -> dict | None:
    """results.json's ``flops.vision``: mean FLOPs per sample of CLIP + projector under the method and
    dense, and the reduction; None when no row has them (no sample, or records from before the field)."""
    if not rows or any("flops_vision" not in r for r in rows):
        return None
    method = sum(r["flops_vision"] for r in rows) / len(rows)
    dense = sum(r["flops_vision_dense"] for r in rows) / len(rows)
    return {"method": method, "dense": dense, "reduction": 1.0 - method / dense}


# ---------------------------------------------------------------- SAM image encoder

def _sam_attention_macs(rows: int, cols: int, config: SamVisionConfig) -> int:
    """One attention call on a rows × cols block (a window, or the whole grid for a global layer):
    QKᵀ and A·V over all heads, plus the decomposed rel-pos terms. transformers computes those as two
    einsums, q·R_hᵀ and q·R_wᵀ, which run as bmm: T·rows·head_dim and T·cols·head_dim per head."""
    t, c = rows * cols, config.hidden_size
    rel_pos = t * (rows + cols) * c if config.use_rel_pos else 0
    return 2 * t * t * c + rel_pos


def _sam_layer_macs(grid: tuple[int, int], window: int, config: SamVisionConfig) -> int:
    """One SamVisionLayer. A windowed layer pads the grid to a multiple of the window first, so q/k/v
    and proj run on the padded tokens; the MLP runs after the padding is cropped."""
    h, w = grid
    c, m = config.hidden_size, config.mlp_dim
    if window > 0:
        hp, wp = _round_up(h, window), _round_up(w, window)
        attn_tokens = hp * wp
        attention = (hp // window) * (wp // window) * _sam_attention_macs(window, window, config)
    else:
        attn_tokens = h * w
        attention = _sam_attention_macs(h, w, config)
    return attn_tokens * 4 * c * c + attention + h * w * 2 * c * m


def sam_vision_flops(config: SamVisionConfig) -> int:
    """FLOPs of one image through transformers' `SamVisionEncoder`: patch conv, the layers (windowed
    or global, per ``global_attn_indexes``) and the neck (1×1 conv, then 3×3 conv with padding 1)."""
    h_img, w_img = _pair(config.image_size)
    p = _pair(config.patch_size)
    grid = (h_img // p[0], w_img // p[1])
    tokens, c, out = grid[0] * grid[1], config.hidden_size, config.output_channels
    macs = tokens * c * config.num_channels * p[0] * p[1]
    for i in range(config.num_hidden_layers):
        window = 0 if i in config.global_attn_indexes else config.window_size
        macs += _sam_layer_macs(grid, window, config)
    macs += tokens * c * out + tokens * out * out * 9
    return 2 * macs


def sam_mask_decoder_flops(config: SamMaskDecoderConfig, grid: tuple[int, int] = (64, 64), n_prompts: int = 1) -> int:
    """FLOPs of one SAM mask-decoder call as LISA makes it (the [SEG] embedding as the only sparse
    prompt, single-mask output), *measured* with FlopCounterMode on a random decoder — not analytic:
    it is a small fixed cost per point (~0.1 % of a prefill), not worth a hand formula of its ~25 matmuls."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers.models.sam.modeling_sam import SamMaskDecoder

    config = SamMaskDecoderConfig(**config.to_dict())
    config._attn_implementation = "eager"  # see the module docstring: CPU SDPA counts as 0
    decoder = SamMaskDecoder(config).eval()
    c, (h, w) = config.hidden_size, grid
    image = torch.zeros(1, c, h, w)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        decoder(image_embeddings=image, image_positional_embeddings=image,
                sparse_prompt_embeddings=torch.zeros(1, 1, n_prompts, c), dense_prompt_embeddings=image,
                multimask_output=False)
    return counter.get_total_flops()


# ---------------------------------------------------------------- LISA's vision stage

@dataclass(frozen=True)
class VisionStage:
    """A LISA model's vision stage as transformers configs."""

    clip: CLIPVisionConfig
    sam: SamVisionConfig
    mask_decoder: SamMaskDecoderConfig
    projector_out: int  # the LLM's hidden size
    select_layer: int = -2  # LISA's vision_select_layer

    @property
    def n_image_tokens(self) -> int:
        h, w = _pair(self.clip.image_size)
        p = _pair(self.clip.patch_size)
        return (h // p[0]) * (w // p[1])

    def flops(self) -> dict[str, int]:
        """Per-image FLOPs of each part; "total" is what a feature cache saves per point."""
        parts = {
            "clip": clip_vision_flops(self.clip, self.select_layer),
            "projector": projector_flops(self.clip.hidden_size, self.projector_out, self.n_image_tokens),
            "sam": sam_vision_flops(self.sam),
        }
        return {**parts, "total": sum(parts.values())}


# Sources (offline): CLIP ViT-L/14 — the vision_config of openai/clip-vit-large-patch14's config.json
# (hidden 1024, intermediate 4096, 24 layers, 16 heads, patch 14, image 224, quick_gelu; the tower
# LISA loads, see README "LISA checkpoints" and cspexp.models.processor). transformers' own
# CLIPVisionConfig defaults are ViT-B/32, so every size is set here. SAM ViT-H — segment_anything's
# build_sam_vit_h (embed 1280, depth 32, 16 heads, global attention at 7, 15, 23, 31; shared by all
# sizes: image 1024, patch 16, window 14, mlp_ratio 4, rel-pos, neck 256 channels), the same table as
# tests/test_sam_convert.py's VIT["vit_h"]; transformers' SamVisionConfig defaults are ViT-B's sizes.
# The mask decoder's defaults in transformers are SAM's (one decoder for every encoder size).
LISA_7B_VISION = VisionStage(
    clip=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
    sam=SamVisionConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, mlp_ratio=4.0,
                        image_size=1024, patch_size=16, window_size=14, global_attn_indexes=[7, 15, 23, 31],
                        use_rel_pos=True, use_abs_pos=True, output_channels=256),
    mask_decoder=SamMaskDecoderConfig(),
    projector_out=4096,  # LLaVA-7B (LLaMA-7B) width
)
LISA_13B_VISION = replace(LISA_7B_VISION, projector_out=5120)  # the same towers; LLaMA-2-13B width
