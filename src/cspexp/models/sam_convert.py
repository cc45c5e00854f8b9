"""SAM weights: Meta's original segment-anything names ↔ transformers `SamModel` names.

LISA checkpoints carry SAM under ``model.visual_model.*`` with the parameter names of Meta's
``segment_anything`` package (``image_encoder.blocks.N.attn.qkv.weight``, ...). transformers'
`SamModel` computes the same functions under other names (``vision_encoder.layers.N.attn.qkv.weight``).
This module owns that mapping, in both directions, and infers the SAM architecture (`SamConfig`)
from the original weight shapes alone, so a loader can build the model before reading any tensor.

The mapping is one table of name templates (`_RULES`) read in either direction, plus the small MLP
heads of the mask decoder, whose layer numbering shifts (`_mlp_head_hf`). It was written from
segment_anything 1.0 (``modeling/*.py``, ``build_sam.py``) and transformers 5.23's
``models/sam/modeling_sam.py``; LISA's copy of segment_anything has the same parameter names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import SamConfig, SamModel
from transformers.models.sam.configuration_sam import SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

from cspexp.utils.errors import ConfigError

# The mask decoder's head count leaves no trace in the weight shapes (its attention projections are
# full-width matrices that any head count splits), so `sam_config_from_weights` takes it from here
# unless the caller passes `mask_decoder_heads`: SAM's 8 (`TwoWayTransformer(num_heads=8)` in every
# released ViT-B/L/H checkpoint and in LISA) at SAM's prompt width of 256, and 2 for narrower widths,
# the value of this project's tiny models (conf/model/tiny_*.yaml, `mask_decoder_heads: 2`).
SAM_PROMPT_DIM = 256
SAM_MASK_DECODER_HEADS = 8
TINY_MASK_DECODER_HEADS = 2

# Facts of SAM's architecture that the weight shapes do not carry, taken from segment_anything 1.0:
# the ViT uses `partial(nn.LayerNorm, eps=1e-6)` (build_sam.py) and exact GELU; LayerNorm2d (neck,
# mask downscaling, output upscaling) uses eps 1e-6; the TwoWayTransformer's norm1..norm4 are plain
# `nn.LayerNorm` (eps 1e-5 — transformers' default of 1e-6 would differ slightly) and its MLP uses ReLU.
VISION_LAYER_NORM_EPS = 1e-6
PROMPT_LAYER_NORM_EPS = 1e-6
MASK_DECODER_LAYER_NORM_EPS = 1e-5

# Keys that original SAM checkpoints may carry but SamModel has no place for: the pixel normalisation
# constants (SamModel leaves normalisation to its image processor; LISA normalises in its dataset code).
DROPPED_KEYS = frozenset({"pixel_mean", "pixel_std"})

# The random-Fourier matrix of the prompt encoder is one tensor in segment_anything; SamModel keeps a
# tied copy of it in two places (the image-wide positional code and the prompt encoder's).
_GAUSSIAN_MATRIX = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
_TIED_POSITIONAL = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")

# Placeholders of the name templates: `{name}` uses one of these patterns, `{name:a|b}` lists its own.
_FIELDS = {"i": r"\d+", "wb": r"weight|bias"}
_PLACEHOLDER = re.compile(r"\{(\w+)(?::([^}]*))?\}")

# (original segment-anything name, SamModel name). Placeholders with the same name carry the same value.
_TEMPLATES = [
    # image encoder (ViTDet backbone)
    ("image_encoder.patch_embed.proj.{wb}", "vision_encoder.patch_embed.projection.{wb}"),
    ("image_encoder.pos_embed", "vision_encoder.pos_embed"),
    ("image_encoder.blocks.{i}.norm{n:1|2}.{wb}", "vision_encoder.layers.{i}.layer_norm{n}.{wb}"),
    ("image_encoder.blocks.{i}.attn.{lin:qkv|proj}.{wb}", "vision_encoder.layers.{i}.attn.{lin}.{wb}"),
    ("image_encoder.blocks.{i}.attn.rel_pos_{axis:h|w}", "vision_encoder.layers.{i}.attn.rel_pos_{axis}"),
    ("image_encoder.blocks.{i}.mlp.lin{n:1|2}.{wb}", "vision_encoder.layers.{i}.mlp.lin{n}.{wb}"),
    ("image_encoder.neck.0.weight", "vision_encoder.neck.conv1.weight"),
    ("image_encoder.neck.1.{wb}", "vision_encoder.neck.layer_norm1.{wb}"),
    ("image_encoder.neck.2.weight", "vision_encoder.neck.conv2.weight"),
    ("image_encoder.neck.3.{wb}", "vision_encoder.neck.layer_norm2.{wb}"),
    # prompt encoder (the mask_downscaling Sequential has GELUs at 2 and 5, which hold no weights)
    ("prompt_encoder.point_embeddings.{i}.weight", "prompt_encoder.point_embed.{i}.weight"),
    ("prompt_encoder.not_a_point_embed.weight", "prompt_encoder.not_a_point_embed.weight"),
    ("prompt_encoder.no_mask_embed.weight", "prompt_encoder.no_mask_embed.weight"),
    ("prompt_encoder.mask_downscaling.0.{wb}", "prompt_encoder.mask_embed.conv1.{wb}"),
    ("prompt_encoder.mask_downscaling.1.{wb}", "prompt_encoder.mask_embed.layer_norm1.{wb}"),
    ("prompt_encoder.mask_downscaling.3.{wb}", "prompt_encoder.mask_embed.conv2.{wb}"),
    ("prompt_encoder.mask_downscaling.4.{wb}", "prompt_encoder.mask_embed.layer_norm2.{wb}"),
    ("prompt_encoder.mask_downscaling.6.{wb}", "prompt_encoder.mask_embed.conv3.{wb}"),
    # mask decoder: two-way transformer, output tokens, upscaling (GELU at 2 and 4 hold no weights)
    ("mask_decoder.iou_token.weight", "mask_decoder.iou_token.weight"),
    ("mask_decoder.mask_tokens.weight", "mask_decoder.mask_tokens.weight"),
    ("mask_decoder.transformer.layers.{i}.{attn:self_attn|cross_attn_token_to_image|cross_attn_image_to_token}"
     ".{proj:q_proj|k_proj|v_proj|out_proj}.{wb}",
     "mask_decoder.transformer.layers.{i}.{attn}.{proj}.{wb}"),
    ("mask_decoder.transformer.layers.{i}.norm{n:1|2|3|4}.{wb}", "mask_decoder.transformer.layers.{i}.layer_norm{n}.{wb}"),
    ("mask_decoder.transformer.layers.{i}.mlp.lin{n:1|2}.{wb}", "mask_decoder.transformer.layers.{i}.mlp.lin{n}.{wb}"),
    ("mask_decoder.transformer.final_attn_token_to_image.{proj:q_proj|k_proj|v_proj|out_proj}.{wb}",
     "mask_decoder.transformer.final_attn_token_to_image.{proj}.{wb}"),
    ("mask_decoder.transformer.norm_final_attn.{wb}", "mask_decoder.transformer.layer_norm_final_attn.{wb}"),
    ("mask_decoder.output_upscaling.0.{wb}", "mask_decoder.upscale_conv1.{wb}"),
    ("mask_decoder.output_upscaling.1.{wb}", "mask_decoder.upscale_layer_norm.{wb}"),
    ("mask_decoder.output_upscaling.3.{wb}", "mask_decoder.upscale_conv2.{wb}"),
]

# The mask decoder's MLP heads. segment-anything numbers their linears layers.0 .. layers.{depth-1};
# SamFeedForward calls the first proj_in, the last proj_out and the ones between layers.0 .. layers.{depth-3}.
# The hypernetwork MLPs always have 3 layers; the IoU head has `iou_head_depth` (3 in SAM and LISA).
_MLP_HEAD_ORIGINAL = re.compile(
    r"mask_decoder\.(?P<head>output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.(?P<k>\d+)\.(?P<wb>weight|bias)")
_MLP_HEAD_HF = re.compile(
    r"mask_decoder\.(?P<head>output_hypernetworks_mlps\.\d+|iou_prediction_head)"
    r"\.(?:(?P<end>proj_in|proj_out)|layers\.(?P<k>\d+))\.(?P<wb>weight|bias)")
HYPERNETWORK_MLP_DEPTH = 3


def _field_patterns(*templates: str) -> dict[str, str]:
    """The pattern of each placeholder of a rule: its own `{name:a|b}` choices, or `_FIELDS[name]`."""
    patterns = {}
    for template in templates:
        for m in _PLACEHOLDER.finditer(template):
            if m.group(2) is not None:
                patterns[m.group(1)] = m.group(2)
            else:
                patterns.setdefault(m.group(1), _FIELDS.get(m.group(1)))
    return patterns


def _compile(template: str, patterns: Mapping[str, str]) -> re.Pattern:
    """A full-match regex for a name template; each placeholder becomes a named group."""
    out, last = [], 0
    for m in _PLACEHOLDER.finditer(template):
        out.append(re.escape(template[last:m.start()]))
        out.append(f"(?P<{m.group(1)}>{patterns[m.group(1)]})")
        last = m.end()
    out.append(re.escape(template[last:]))
    return re.compile("".join(out))


def _fill(template: str, values: Mapping[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


@dataclass(frozen=True)
class _Rule:
    """One template pair, compiled for matching in either direction."""

    original: str
    hf: str
    original_re: re.Pattern
    hf_re: re.Pattern

    @classmethod
    def of(cls, original: str, hf: str) -> _Rule:
        patterns = _field_patterns(original, hf)
        return cls(original, hf, _compile(original, patterns), _compile(hf, patterns))


_RULES = [_Rule.of(original, hf) for original, hf in _TEMPLATES]


def _mlp_head_hf(head: str, k: int, wb: str, depth: int) -> str | None:
    """SamFeedForward name of linear `k` of a `depth`-layer segment-anything MLP (None if k is out of range)."""
    if k == 0:
        return f"mask_decoder.{head}.proj_in.{wb}"
    if k == depth - 1:
        return f"mask_decoder.{head}.proj_out.{wb}"
    if 0 < k < depth - 1:
        return f"mask_decoder.{head}.layers.{k - 1}.{wb}"
    return None


def _unknown(key: str, naming: str) -> ConfigError:
    if naming == "original":
        allowed = ("segment-anything parameter names under image_encoder.*, prompt_encoder.* or mask_decoder.* "
                   "(e.g. 'image_encoder.blocks.0.attn.qkv.weight'), or pixel_mean / pixel_std")
    else:
        allowed = ("transformers SamModel parameter names under vision_encoder.*, prompt_encoder.*, mask_decoder.* "
                   "or shared_image_embedding.* (e.g. 'vision_encoder.layers.0.attn.qkv.weight')")
    return ConfigError(f"unknown SAM weight {key!r}: allowed are {allowed}")


def hf_keys_for(original_key: str, *, iou_head_depth: int = 3) -> list[str]:
    """transformers SamModel state-dict key(s) for one original segment-anything key, e.g.
    'image_encoder.blocks.3.attn.qkv.weight' -> ['vision_encoder.layers.3.attn.qkv.weight'].
    The prompt encoder's 'pe_layer.positional_encoding_gaussian_matrix' maps to TWO keys
    (shared_image_embedding.positional_embedding and prompt_encoder.shared_embedding.positional_embedding).
    Keys that segment-anything checkpoints carry but SamModel has no place for (pixel_mean, pixel_std)
    map to []. An unknown key raises ConfigError naming it.

    `iou_head_depth` (number of linears of the IoU head, 3 in SAM and LISA) places the head's last
    linear, which SamModel names proj_out; `convert_sam_state_dict` reads it from the keys."""
    if original_key in DROPPED_KEYS:
        return []
    if original_key == _GAUSSIAN_MATRIX:
        return list(_TIED_POSITIONAL)
    m = _MLP_HEAD_ORIGINAL.fullmatch(original_key)
    if m:
        depth = iou_head_depth if m["head"] == "iou_prediction_head" else HYPERNETWORK_MLP_DEPTH
        hf = _mlp_head_hf(m["head"], int(m["k"]), m["wb"], depth)
        if hf is None:
            raise ConfigError(f"unknown SAM weight {original_key!r}: {m['head']} has {depth} linear layers "
                              f"(layers.0 .. layers.{depth - 1})")
        return [hf]
    for rule in _RULES:
        m = rule.original_re.fullmatch(original_key)
        if m:
            return [_fill(rule.hf, m.groupdict())]
    raise _unknown(original_key, "original")


def original_key_for(hf_key: str, *, iou_head_depth: int = 3) -> str:
    """The segment-anything name of one SamModel key (both tied positional keys give the Gaussian matrix)."""
    if hf_key in _TIED_POSITIONAL:
        return _GAUSSIAN_MATRIX
    m = _MLP_HEAD_HF.fullmatch(hf_key)
    if m:
        depth = iou_head_depth if m["head"] == "iou_prediction_head" else HYPERNETWORK_MLP_DEPTH
        if m["end"] == "proj_in":
            k = 0
        elif m["end"] == "proj_out":
            k = depth - 1
        else:
            k = int(m["k"]) + 1
            if k >= depth - 1:
                raise ConfigError(f"unknown SAM weight {hf_key!r}: {m['head']} has {depth - 2} middle layer(s)")
        return f"mask_decoder.{m['head']}.layers.{k}.{m['wb']}"
    for rule in _RULES:
        m = rule.hf_re.fullmatch(hf_key)
        if m:
            return _fill(rule.original, m.groupdict())
    raise _unknown(hf_key, "hf")


def convert_sam_state_dict(state: Mapping[str, Tensor], config: SamConfig | None = None) -> dict[str, Tensor]:
    """Whole original SAM state dict -> SamModel state dict (uses hf_keys_for; strict).

    Strict: an unknown key, and any key or shape that differs from `SamModel(config)` — `config`
    inferred from the shapes when None — raises ConfigError naming the original keys. Tensors are not
    copied; the Gaussian matrix appears under both tied SamModel keys."""
    if config is None:
        config = sam_config_from_weights(state)
    depth = config.mask_decoder_config.iou_head_depth
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for hf_key in hf_keys_for(key, iou_head_depth=depth):
            out[hf_key] = value
    _check_against_model(out, config, iou_head_depth=depth)
    return out


def _check_against_model(hf_state: Mapping[str, Tensor], config: SamConfig, *, iou_head_depth: int) -> None:
    """Raise ConfigError unless `hf_state` has exactly the keys and shapes of `SamModel(config)`."""
    with torch.device("meta"):  # shapes only: nothing is allocated, even for ViT-H
        expected = {k: tuple(v.shape) for k, v in SamModel(config).state_dict().items()}

    def original(keys):
        return sorted({original_key_for(k, iou_head_depth=iou_head_depth) for k in keys})

    missing = original(expected.keys() - hf_state.keys())
    unexpected = original(hf_state.keys() - expected.keys())
    wrong = sorted(f"{original_key_for(k, iou_head_depth=iou_head_depth)} {tuple(hf_state[k].shape)} "
                   f"(expected {expected[k]})"
                   for k in expected.keys() & hf_state.keys() if tuple(hf_state[k].shape) != expected[k])
    problems = [f"{what}: {', '.join(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
    if problems:
        raise ConfigError("SAM weights do not fit the SAM architecture inferred from them — " + "; ".join(problems))


def original_sam_state_dict(hf_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse (SamModel -> original names), so tests can write checkpoints in LISA's layout.

    The two tied positional keys become one Gaussian matrix; they must both be present and equal.
    An unknown key raises ConfigError naming it."""
    depth = 2 + len({m["k"] for key in hf_state
                     if (m := _MLP_HEAD_HF.fullmatch(key)) and m["head"] == "iou_prediction_head" and m["k"] is not None})
    missing = [k for k in _TIED_POSITIONAL if k not in hf_state]
    if missing:
        raise ConfigError(f"SamModel state dict lacks {', '.join(missing)}")
    first, second = (hf_state[k] for k in _TIED_POSITIONAL)
    if first.shape != second.shape or not torch.equal(first, second):
        raise ConfigError(f"SamModel state dict: {_TIED_POSITIONAL[0]} and {_TIED_POSITIONAL[1]} differ; "
                          "SamModel ties them, so they must be equal")
    return {original_key_for(k, iou_head_depth=depth): v for k, v in hf_state.items() if k != _TIED_POSITIONAL[1]}


# --- architecture from shapes ------------------------------------------------------------------


def _shape_of(value) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def _need(shapes: Mapping[str, tuple], key: str, ndim: int) -> tuple[int, ...]:
    """The shape of `key`, which must exist and have `ndim` dimensions."""
    if key not in shapes:
        raise ConfigError(f"SAM weights lack {key!r}, which is needed to infer the SAM architecture")
    if len(shapes[key]) != ndim:
        raise ConfigError(f"SAM weight {key!r} has shape {shapes[key]}; a {ndim}-d tensor was expected")
    return shapes[key]


def _count(shapes: Mapping[str, tuple], pattern: str, what: str) -> int:
    """Number of indexed sub-modules (`pattern` has one group: the index); they must be 0 .. n-1."""
    regex = re.compile(pattern)
    found = sorted({int(m.group(1)) for key in shapes if (m := regex.fullmatch(key))})
    if found != list(range(len(found))):
        gap = min(set(range(max(found) + 1)) - set(found))
        raise ConfigError(f"SAM weights have {what} {found} — number {gap} is missing")
    return len(found)


def sam_config_from_weights(shapes: Mapping[str, torch.Size | tuple], *,
                            mask_decoder_heads: int | None = None) -> SamConfig:
    """Infer the SAM architecture from the ORIGINAL-named weight shapes alone (works on shapes read
    from a checkpoint index without loading tensors): ViT-H / ViT-L / ViT-B of LISA and the tiny sizes
    tests use. `shapes` maps original keys to shapes (tensors are accepted too).

    From the shapes: patch size, channels and width (patch_embed.proj), image size = grid × patch
    (pos_embed), depth (blocks), heads = width / head dim (rel_pos_*), global blocks (rel_pos of length
    2·grid−1) and window size (2·window−1 in the other blocks), MLP width (mlp.lin1), qkv bias, output
    channels (neck), the prompt width, Fourier features, mask-input channels and point embeddings, and
    the mask decoder's depth, MLP width, attention downsampling, number of masks (mask_tokens − 1)
    and IoU head depth / width. Not from the shapes: layer-norm eps and activations (SAM's own, see
    the constants above) and the mask decoder's heads — `mask_decoder_heads`, or by default 8 at
    SAM's prompt width 256 and 2 at narrower (tiny) widths."""
    shapes = {k: _shape_of(v) for k, v in shapes.items()}
    vision = _vision_config(shapes)
    prompt_dim = _need(shapes, "prompt_encoder.no_mask_embed.weight", 2)[1]
    prompt_encoder = SamPromptEncoderConfig(
        hidden_size=prompt_dim,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        # mask_downscaling.3 is Conv2d(mask_in_chans // 4 → mask_in_chans)
        mask_input_channels=_need(shapes, "prompt_encoder.mask_downscaling.3.weight", 4)[0],
        num_point_embeddings=_count(shapes, r"prompt_encoder\.point_embeddings\.(\d+)\.weight", "point_embeddings"),
        hidden_act="gelu",
        layer_norm_eps=PROMPT_LAYER_NORM_EPS,
    )
    mask_decoder = _mask_decoder_config(shapes, mask_decoder_heads)
    if mask_decoder.hidden_size != prompt_dim or vision.output_channels != prompt_dim:
        raise ConfigError(f"SAM weights disagree on the prompt width: prompt encoder {prompt_dim}, "
                          f"mask decoder {mask_decoder.hidden_size}, image encoder neck {vision.output_channels}")
    return SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt_encoder.to_dict(),
                     mask_decoder_config=mask_decoder.to_dict())


def _vision_config(shapes: Mapping[str, tuple]) -> SamVisionConfig:
    hidden, channels, patch_h, patch_w = _need(shapes, "image_encoder.patch_embed.proj.weight", 4)
    _, grid_h, grid_w, _ = _need(shapes, "image_encoder.pos_embed", 4)
    if patch_h != patch_w or grid_h != grid_w:
        raise ConfigError(f"SAM image encoder with non-square patches ({patch_h}×{patch_w}) or position grid "
                          f"({grid_h}×{grid_w}) is not supported")
    grid = grid_h
    depth = _count(shapes, r"image_encoder\.blocks\.(\d+)\.attn\.qkv\.weight", "image_encoder.blocks")
    if "image_encoder.blocks.0.attn.rel_pos_h" not in shapes:
        raise ConfigError("SAM weights have no image_encoder.blocks.N.attn.rel_pos_h: image encoders without "
                          "relative positions (use_rel_pos=False) are not supported, their window size cannot be inferred")
    global_blocks, windows, head_dims = [], set(), set()
    for i in range(depth):
        length, head_dim = _need(shapes, f"image_encoder.blocks.{i}.attn.rel_pos_h", 2)
        if _need(shapes, f"image_encoder.blocks.{i}.attn.rel_pos_w", 2) != (length, head_dim):
            raise ConfigError(f"SAM block {i}: rel_pos_h and rel_pos_w differ in shape (only square windows are supported)")
        head_dims.add(head_dim)
        # a window as large as the grid is one window over the whole grid: the same as global attention
        if length == 2 * grid - 1:
            global_blocks.append(i)
        elif length % 2 == 1:
            windows.add((length + 1) // 2)
        else:
            raise ConfigError(f"SAM block {i}: rel_pos_h has even length {length}; it must be 2·window−1")
    if len(windows) > 1 or len(head_dims) > 1:
        raise ConfigError(f"SAM blocks disagree on window size {sorted(windows)} or head dim {sorted(head_dims)}")
    (head_dim,) = head_dims
    if hidden % head_dim:
        raise ConfigError(f"SAM image encoder: head dim {head_dim} (rel_pos_h) does not divide the width {hidden}")
    mlp_dim = _need(shapes, "image_encoder.blocks.0.mlp.lin1.weight", 2)[0]
    return SamVisionConfig(
        hidden_size=hidden,
        output_channels=_need(shapes, "image_encoder.neck.0.weight", 4)[0],
        num_hidden_layers=depth,
        num_attention_heads=hidden // head_dim,
        num_channels=channels,
        image_size=grid * patch_h,
        patch_size=patch_h,
        hidden_act="gelu",
        layer_norm_eps=VISION_LAYER_NORM_EPS,
        qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in shapes,
        mlp_ratio=mlp_dim / hidden,
        mlp_dim=mlp_dim,
        use_abs_pos=True,
        use_rel_pos=True,
        window_size=windows.pop() if windows else 0,  # 0: every block is global
        global_attn_indexes=global_blocks,
        num_pos_feats=_need(shapes, _GAUSSIAN_MATRIX, 2)[1],
    )


def _mask_decoder_config(shapes: Mapping[str, tuple], heads: int | None) -> SamMaskDecoderConfig:
    width = _need(shapes, "mask_decoder.iou_token.weight", 2)[1]
    # cross attention projects width → width / attention_downsample_rate
    internal = _need(shapes, "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight", 2)[0]
    if width % internal:
        raise ConfigError(f"SAM mask decoder: cross-attention width {internal} does not divide the width {width}")
    if heads is None:
        heads = SAM_MASK_DECODER_HEADS if width >= SAM_PROMPT_DIM else TINY_MASK_DECODER_HEADS
    if not isinstance(heads, int) or heads < 1 or internal % heads or width % heads:
        divisors = [d for d in range(1, internal + 1) if internal % d == 0]
        raise ConfigError(f"mask_decoder_heads={heads!r} does not divide the SAM mask decoder's attention widths "
                          f"({width}, {internal}); use one of {divisors}")
    iou_depth = _count(shapes, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.weight", "iou_prediction_head.layers")
    if iou_depth < 2:
        raise ConfigError(f"SAM IoU head with {iou_depth} layer(s) is not supported: SamModel's needs at least 2")
    return SamMaskDecoderConfig(
        hidden_size=width,
        hidden_act="relu",
        mlp_dim=_need(shapes, "mask_decoder.transformer.layers.0.mlp.lin1.weight", 2)[0],
        num_hidden_layers=_count(shapes, r"mask_decoder\.transformer\.layers\.(\d+)\.norm1\.weight",
                                 "mask_decoder.transformer.layers"),
        num_attention_heads=heads,
        attention_downsample_rate=width // internal,
        num_multimask_outputs=_need(shapes, "mask_decoder.mask_tokens.weight", 2)[0] - 1,
        iou_head_depth=iou_depth,
        iou_head_hidden_dim=_need(shapes, "mask_decoder.iou_prediction_head.layers.0.weight", 2)[0],
        layer_norm_eps=MASK_DECODER_LAYER_NORM_EPS,
    )
