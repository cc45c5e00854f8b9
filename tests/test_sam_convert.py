"""SAM weight conversion (cspexp.models.sam_convert) checked against Meta's original segment-anything.

The oracle is the `segment-anything==1.0` package (dev extra). Its package ``__init__`` imports
torchvision (for the predictor utilities), which has no CPU build here, so the `segment_anything`
fixture registers an empty stand-in for the parent package — a module whose ``__path__`` is the
installed package directory — and imports only ``segment_anything.modeling`` and
``segment_anything.build_sam``, which need nothing but torch. The stand-in is removed afterwards.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import types
from functools import partial

import pytest
import torch
from torch import nn
from transformers import SamModel

from cspexp.models.lisa import LisaModel
from cspexp.models.sam_convert import (
    convert_sam_state_dict,
    hf_keys_for,
    original_sam_state_dict,
    sam_config_from_weights,
)
from cspexp.utils.errors import ConfigError

TOL = dict(rtol=0.0, atol=1e-5)  # fp32 parity bound


@pytest.fixture(scope="module")
def segment_anything():
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("segment-anything==1.0 is not installed (it is in the dev extra: pip install -e '.[dev]')")
    saved = {k: m for k, m in sys.modules.items() if k == "segment_anything" or k.startswith("segment_anything.")}
    for k in saved:
        del sys.modules[k]
    parent = types.ModuleType("segment_anything")
    parent.__path__ = list(spec.submodule_search_locations)  # a package, without running its __init__
    sys.modules["segment_anything"] = parent
    try:
        yield types.SimpleNamespace(modeling=importlib.import_module("segment_anything.modeling"),
                                    build_sam=importlib.import_module("segment_anything.build_sam"))
    finally:
        for k in [k for k in sys.modules if k == "segment_anything" or k.startswith("segment_anything.")]:
            del sys.modules[k]
        sys.modules.update(saved)


# A small SAM in Meta's code: 64 px, patch 8 → 8×8 grid; window 3 (does not divide 8, so the windowed
# blocks pad) in blocks 0 and 2, global attention in block 1; prompt width 32; 2 decoder heads (the
# default for narrow widths); an IoU head of depth 4 and width 24 so that its layer renumbering and
# widths cannot be confused with the hypernetwork MLPs (depth 3, width 32).
TINY = dict(image_size=64, patch_size=8, grid=8, width=48, depth=3, heads=4, window=3, global_blocks=(1,),
            prompt_dim=32, decoder_mlp=64, decoder_heads=2, iou_depth=4, iou_hidden=24)


def tiny_original_sam(sa, seed: int = 0) -> nn.Module:
    """The tiny SAM with random weights of a size that keeps activations and mask logits of order 1:
    linear and convolution weights N(0, 1/fan_in), their biases N(0, 0.1²); every tensor that Meta's
    code initialises to a constant (pos_embed and rel_pos to 0, layer norms to 1 / 0) is perturbed,
    so that each one matters."""
    m = sa.modeling
    torch.manual_seed(seed)
    sam = m.Sam(
        image_encoder=m.ImageEncoderViT(
            img_size=TINY["image_size"], patch_size=TINY["patch_size"], in_chans=3, embed_dim=TINY["width"],
            depth=TINY["depth"], num_heads=TINY["heads"], mlp_ratio=4.0, out_chans=TINY["prompt_dim"], qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=TINY["window"],
            global_attn_indexes=TINY["global_blocks"]),
        prompt_encoder=m.PromptEncoder(
            embed_dim=TINY["prompt_dim"], image_embedding_size=(TINY["grid"], TINY["grid"]),
            input_image_size=(TINY["image_size"], TINY["image_size"]), mask_in_chans=16),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=TINY["prompt_dim"], mlp_dim=TINY["decoder_mlp"],
                                            num_heads=TINY["decoder_heads"]),
            transformer_dim=TINY["prompt_dim"], iou_head_depth=TINY["iou_depth"], iou_head_hidden_dim=TINY["iou_hidden"]),
    ).eval()
    with torch.no_grad():
        for module in sam.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                # a transposed convolution with stride = kernel feeds each output from in_channels inputs
                fan_in = module.weight.shape[0] if isinstance(module, nn.ConvTranspose2d) else module.weight[0].numel()
                module.weight.normal_(0.0, fan_in ** -0.5)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.1)
        for t in sam.state_dict().values():
            if t.numel() > 1 and torch.all(t == t.flatten()[0]):
                t.copy_(t + 0.3 * torch.randn_like(t))
    return sam


def converted(original: nn.Module) -> SamModel:
    state = original.state_dict()
    hf = SamModel(sam_config_from_weights(state)).eval()
    hf.load_state_dict(convert_sam_state_dict(state), strict=True)
    return hf


@pytest.fixture(scope="module")
def pair(segment_anything):
    original = tiny_original_sam(segment_anything)
    return original, converted(original)


# ---------------------------------------------------------------- 1. parity with Meta's implementation


def test_weights_are_nontrivial(pair):
    original, _ = pair
    for name, t in original.state_dict().items():
        assert t.numel() == 1 or t.std() > 0, f"{name} is constant: the parity tests would not see it"


def test_image_encoder_matches_original(pair):
    original, hf = pair
    pixels = torch.randn(2, 3, TINY["image_size"], TINY["image_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = original.image_encoder(pixels)
        got = hf.vision_encoder(pixels).last_hidden_state
    assert want.shape == (2, TINY["prompt_dim"], TINY["grid"], TINY["grid"])
    assert want.std() > 0.1
    torch.testing.assert_close(got, want, **TOL)


def test_dense_positional_encoding_matches_original(pair):
    original, hf = pair
    with torch.no_grad():
        want = original.prompt_encoder.get_dense_pe()
        got = hf.get_image_wide_positional_embeddings()
    assert want.shape == (1, TINY["prompt_dim"], TINY["grid"], TINY["grid"])
    torch.testing.assert_close(got, want, **TOL)


def _original_text_prompt(original, image_embedding, text, multimask=False):
    """LISA's mask decoding (model/LISA.py) in Meta's code: the [SEG] embeddings `text` [n, C] of one
    image are appended to the (empty) sparse prompt; the dense prompt is no_mask_embed."""
    sparse, dense = original.prompt_encoder(points=None, boxes=None, masks=None)
    sparse = torch.cat([sparse.expand(len(text), -1, -1), text[:, None, :]], dim=1)  # [n, 1, C]
    return original.mask_decoder(image_embeddings=image_embedding, image_pe=original.prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse,
                                 dense_prompt_embeddings=dense.expand(len(text), -1, -1, -1),
                                 multimask_output=multimask)


@pytest.mark.parametrize("multimask", [False, True])
def test_mask_decoder_with_text_embedding_matches_original(pair, multimask):
    """Two [SEG] embeddings for one image (point_batch = 2), dense = no_mask_embed: low-res masks and IoU."""
    original, hf = pair
    g = torch.Generator().manual_seed(2)
    embedding = torch.randn(1, TINY["prompt_dim"], TINY["grid"], TINY["grid"], generator=g)
    text = torch.randn(2, TINY["prompt_dim"], generator=g)
    with torch.no_grad():
        want_masks, want_iou = _original_text_prompt(original, embedding, text, multimask)
        got_masks, got_iou = hf.mask_decoder(
            image_embeddings=embedding, image_positional_embeddings=hf.get_image_wide_positional_embeddings(),
            sparse_prompt_embeddings=text[None, :, None, :],  # [image, point_batch, tokens, C]
            dense_prompt_embeddings=hf.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                1, -1, TINY["grid"], TINY["grid"]),
            multimask_output=multimask)
    n_masks = 3 if multimask else 1
    assert want_masks.shape == (2, n_masks, 4 * TINY["grid"], 4 * TINY["grid"])
    assert want_masks.std() > 0.1 and want_iou.std() > 0.01
    torch.testing.assert_close(got_masks[0], want_masks, **TOL)
    torch.testing.assert_close(got_iou[0], want_iou, **TOL)


def test_lisa_decode_masks_matches_original(pair):
    """The project's own glue (LisaModel.decode_masks, one [SEG] per image in a batch of 2) on the
    converted SAM gives Meta's single-mask logits."""
    original, hf = pair
    g = torch.Generator().manual_seed(3)
    embeddings = torch.randn(2, TINY["prompt_dim"], TINY["grid"], TINY["grid"], generator=g)
    seg = torch.randn(2, TINY["prompt_dim"], generator=g)
    with torch.no_grad():
        got = LisaModel.decode_masks(types.SimpleNamespace(sam=hf), embeddings, seg)
        for b in range(2):
            want, _ = _original_text_prompt(original, embeddings[b:b + 1], seg[b:b + 1])
            torch.testing.assert_close(got[b], want[0, 0], **TOL)


def test_point_box_and_mask_prompts_match_original(pair):
    """Meta's prompt encoder vs SamModel's on points (positive, negative, and the padding point),
    box corners and a mask input, then the whole decoder through SamModel.forward."""
    original, hf = pair
    g = torch.Generator().manual_seed(4)
    embedding = torch.randn(1, TINY["prompt_dim"], TINY["grid"], TINY["grid"], generator=g)
    points = torch.tensor([[[10.0, 20.0], [40.5, 7.0]]])
    labels = torch.tensor([[1, 0]])
    box = torch.tensor([[5.0, 8.0, 50.0, 60.0]])
    mask = torch.randn(1, 1, 4 * TINY["grid"], 4 * TINY["grid"], generator=g)
    with torch.no_grad():
        # points alone (padded with a not-a-point), points + box, mask
        want_sparse, _ = original.prompt_encoder(points=(points, labels), boxes=None, masks=None)
        got_sparse, _ = hf.prompt_encoder(points[:, None], labels[:, None], None, None)
        torch.testing.assert_close(got_sparse[:, 0], want_sparse, **TOL)
        want_sparse, _ = original.prompt_encoder(points=(points, labels), boxes=box, masks=None)
        got_sparse, _ = hf.prompt_encoder(points[:, None], labels[:, None], box[:, None], None)
        torch.testing.assert_close(got_sparse[:, 0], want_sparse, **TOL)
        _, want_dense = original.prompt_encoder(points=None, boxes=None, masks=mask)
        _, got_dense = hf.prompt_encoder(None, None, None, mask)
        torch.testing.assert_close(got_dense, want_dense, **TOL)

        sparse, dense = original.prompt_encoder(points=(points, labels), boxes=box, masks=None)
        want_masks, want_iou = original.mask_decoder(
            image_embeddings=embedding, image_pe=original.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True)
        out = hf(image_embeddings=embedding, input_points=points[:, None], input_labels=labels[:, None],
                 input_boxes=box[:, None], multimask_output=True)
    torch.testing.assert_close(out.pred_masks[:, 0], want_masks, **TOL)
    torch.testing.assert_close(out.iou_scores[:, 0], want_iou, **TOL)


# ---------------------------------------------------------------- 2. architecture from shapes

# segment_anything/build_sam.py: build_sam_vit_{b,l,h} (LISA uses ViT-H); all share the rest below.
VIT = {
    "vit_b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=[2, 5, 8, 11]),
    "vit_l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, global_attn_indexes=[5, 11, 17, 23]),
    "vit_h": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31]),
}
SAM_VISION = dict(image_size=1024, patch_size=16, num_channels=3, window_size=14, output_channels=256, mlp_ratio=4.0,
                  qkv_bias=True, use_abs_pos=True, use_rel_pos=True, layer_norm_eps=1e-6, hidden_act="gelu",
                  num_pos_feats=128)
SAM_PROMPT = dict(hidden_size=256, image_size=1024, patch_size=16, image_embedding_size=64, mask_input_channels=16,
                  num_point_embeddings=4, hidden_act="gelu", layer_norm_eps=1e-6)
SAM_DECODER = dict(hidden_size=256, num_hidden_layers=2, mlp_dim=2048, num_attention_heads=8,
                   attention_downsample_rate=2, num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=256,
                   hidden_act="relu", layer_norm_eps=1e-5)


@pytest.mark.parametrize("name", sorted(VIT))
def test_config_of_released_sam_architectures(segment_anything, name):
    with torch.device("meta"):  # Meta's own builder, no weights allocated
        state = segment_anything.build_sam.sam_model_registry[name]().state_dict()
    shapes = {k: v.shape for k, v in state.items()}
    config = sam_config_from_weights(shapes)
    want_vision = {**SAM_VISION, **VIT[name], "mlp_dim": 4 * VIT[name]["hidden_size"]}
    for sub, want in (("vision_config", want_vision), ("prompt_encoder_config", SAM_PROMPT),
                      ("mask_decoder_config", SAM_DECODER)):
        got = getattr(config, sub)
        assert {k: getattr(got, k) for k in want} == want, sub
    # shapes given as plain tuples (as read from a checkpoint index) give the same config
    assert sam_config_from_weights({k: tuple(s) for k, s in shapes.items()}).to_dict() == config.to_dict()
    # and the converted names and shapes are exactly those of transformers' SamModel for it
    assert len(convert_sam_state_dict(state, config)) == len(state) + 1  # + the tied positional copy


def test_config_of_tiny_sam(pair):
    original, hf = pair
    vision, decoder = hf.config.vision_config, hf.config.mask_decoder_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (64, 8, 48, 3)
    assert (vision.num_attention_heads, vision.window_size, list(vision.global_attn_indexes)) == (4, 3, [1])
    assert (vision.mlp_dim, vision.output_channels, vision.num_pos_feats) == (192, 32, 16)
    assert hf.config.prompt_encoder_config.image_embedding_size == 8
    assert (decoder.hidden_size, decoder.mlp_dim, decoder.num_attention_heads) == (32, 64, 2)
    assert (decoder.iou_head_depth, decoder.iou_head_hidden_dim, decoder.num_multimask_outputs) == (4, 24, 3)


def test_mask_decoder_heads_override(pair):
    original, _ = pair
    shapes = {k: v.shape for k, v in original.state_dict().items()}
    assert sam_config_from_weights(shapes, mask_decoder_heads=4).mask_decoder_config.num_attention_heads == 4
    # cross attention is 32 / 2 = 16 wide: 3 heads cannot split it
    with pytest.raises(ConfigError, match=r"mask_decoder_heads=3 .*\[1, 2, 4, 8, 16\]"):
        sam_config_from_weights(shapes, mask_decoder_heads=3)


# ---------------------------------------------------------------- 3. names, round trip, strictness

# Hand-mapped pairs (read off segment_anything/modeling and transformers/models/sam/modeling_sam.py),
# one per kind of name.
HAND_MAPPED = {
    "image_encoder.patch_embed.proj.weight": ["vision_encoder.patch_embed.projection.weight"],
    "image_encoder.pos_embed": ["vision_encoder.pos_embed"],
    "image_encoder.blocks.3.attn.qkv.weight": ["vision_encoder.layers.3.attn.qkv.weight"],
    "image_encoder.blocks.31.norm2.bias": ["vision_encoder.layers.31.layer_norm2.bias"],
    "image_encoder.blocks.7.attn.rel_pos_w": ["vision_encoder.layers.7.attn.rel_pos_w"],
    "image_encoder.blocks.0.mlp.lin1.weight": ["vision_encoder.layers.0.mlp.lin1.weight"],
    "image_encoder.neck.0.weight": ["vision_encoder.neck.conv1.weight"],
    "image_encoder.neck.1.bias": ["vision_encoder.neck.layer_norm1.bias"],
    "image_encoder.neck.2.weight": ["vision_encoder.neck.conv2.weight"],
    "image_encoder.neck.3.weight": ["vision_encoder.neck.layer_norm2.weight"],
    "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": [
        "shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding"],
    "prompt_encoder.point_embeddings.2.weight": ["prompt_encoder.point_embed.2.weight"],
    "prompt_encoder.not_a_point_embed.weight": ["prompt_encoder.not_a_point_embed.weight"],
    "prompt_encoder.no_mask_embed.weight": ["prompt_encoder.no_mask_embed.weight"],
    "prompt_encoder.mask_downscaling.0.weight": ["prompt_encoder.mask_embed.conv1.weight"],
    "prompt_encoder.mask_downscaling.1.bias": ["prompt_encoder.mask_embed.layer_norm1.bias"],
    "prompt_encoder.mask_downscaling.3.weight": ["prompt_encoder.mask_embed.conv2.weight"],
    "prompt_encoder.mask_downscaling.4.weight": ["prompt_encoder.mask_embed.layer_norm2.weight"],
    "prompt_encoder.mask_downscaling.6.bias": ["prompt_encoder.mask_embed.conv3.bias"],
    "mask_decoder.iou_token.weight": ["mask_decoder.iou_token.weight"],
    "mask_decoder.mask_tokens.weight": ["mask_decoder.mask_tokens.weight"],
    "mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.bias": [
        "mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.bias"],
    "mask_decoder.transformer.layers.0.norm4.weight": ["mask_decoder.transformer.layers.0.layer_norm4.weight"],
    "mask_decoder.transformer.layers.0.mlp.lin2.weight": ["mask_decoder.transformer.layers.0.mlp.lin2.weight"],
    "mask_decoder.transformer.final_attn_token_to_image.k_proj.weight": [
        "mask_decoder.transformer.final_attn_token_to_image.k_proj.weight"],
    "mask_decoder.transformer.norm_final_attn.bias": ["mask_decoder.transformer.layer_norm_final_attn.bias"],
    "mask_decoder.output_upscaling.0.weight": ["mask_decoder.upscale_conv1.weight"],
    "mask_decoder.output_upscaling.1.bias": ["mask_decoder.upscale_layer_norm.bias"],
    "mask_decoder.output_upscaling.3.weight": ["mask_decoder.upscale_conv2.weight"],
    "mask_decoder.output_hypernetworks_mlps.3.layers.0.weight": ["mask_decoder.output_hypernetworks_mlps.3.proj_in.weight"],
    "mask_decoder.output_hypernetworks_mlps.0.layers.1.bias": ["mask_decoder.output_hypernetworks_mlps.0.layers.0.bias"],
    "mask_decoder.output_hypernetworks_mlps.2.layers.2.weight": ["mask_decoder.output_hypernetworks_mlps.2.proj_out.weight"],
    "mask_decoder.iou_prediction_head.layers.0.bias": ["mask_decoder.iou_prediction_head.proj_in.bias"],
    "mask_decoder.iou_prediction_head.layers.1.weight": ["mask_decoder.iou_prediction_head.layers.0.weight"],
    "mask_decoder.iou_prediction_head.layers.2.weight": ["mask_decoder.iou_prediction_head.proj_out.weight"],
    "pixel_mean": [],
    "pixel_std": [],
}


@pytest.mark.parametrize("key", sorted(HAND_MAPPED))
def test_hf_keys_for_hand_mapped(key):
    assert hf_keys_for(key) == HAND_MAPPED[key]


def test_hf_keys_for_deeper_iou_head():
    assert hf_keys_for("mask_decoder.iou_prediction_head.layers.2.bias", iou_head_depth=4) == [
        "mask_decoder.iou_prediction_head.layers.1.bias"]
    assert hf_keys_for("mask_decoder.iou_prediction_head.layers.3.bias", iou_head_depth=4) == [
        "mask_decoder.iou_prediction_head.proj_out.bias"]


@pytest.mark.parametrize("key", [
    "image_encoder.blocks.0.norm3.weight",      # a ViT block has norm1 and norm2 only
    "image_encoder.neck.0.bias",                # the neck convolutions have no bias
    "mask_decoder.iou_prediction_head.layers.3.weight",  # depth 3 by default
    "model.visual_model.image_encoder.pos_embed",        # the LISA prefix must be stripped first
    "vision_encoder.layers.0.attn.qkv.weight",  # already a SamModel name
])
def test_hf_keys_for_unknown_key(key):
    with pytest.raises(ConfigError, match=re.escape(repr(key))):
        hf_keys_for(key)


def test_round_trip_is_identity(pair):
    original, _ = pair
    state = original.state_dict()
    back = original_sam_state_dict(convert_sam_state_dict(state))
    assert list(back) == list(state)
    for key, value in state.items():
        assert torch.equal(back[key], value), key
    # and SamModel's own state dict comes out under exactly Meta's names
    hf = SamModel(sam_config_from_weights(state))
    assert sorted(original_sam_state_dict(hf.state_dict())) == sorted(state)


def test_pixel_constants_are_dropped(pair):
    original, _ = pair
    state = {**original.state_dict(), "pixel_mean": torch.zeros(3, 1, 1), "pixel_std": torch.ones(3, 1, 1)}
    assert not any("pixel" in k for k in convert_sam_state_dict(state))


def test_unknown_key_is_named(pair):
    original, _ = pair
    state = {**original.state_dict(), "mask_decoder.stray.weight": torch.zeros(1)}
    with pytest.raises(ConfigError, match=re.escape("'mask_decoder.stray.weight'")):
        convert_sam_state_dict(state)


@pytest.mark.parametrize("key", [
    "mask_decoder.transformer.layers.1.norm3.bias",   # not needed to infer the architecture
    "image_encoder.blocks.2.attn.proj.weight",
    "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    "image_encoder.pos_embed",                        # needed to infer the image size
])
def test_missing_key_is_named(pair, key):
    original, _ = pair
    state = dict(original.state_dict())
    del state[key]
    with pytest.raises(ConfigError, match=re.escape(key)):
        convert_sam_state_dict(state)


def test_wrong_shape_is_named(pair):
    original, _ = pair
    state = dict(original.state_dict())
    state["mask_decoder.transformer.layers.0.mlp.lin2.bias"] = torch.zeros(7)
    with pytest.raises(ConfigError, match=r"wrong shape: mask_decoder\.transformer\.layers\.0\.mlp\.lin2\.bias \(7,\)"):
        convert_sam_state_dict(state)


def test_inverse_rejects_untied_positional_embedding(pair):
    _, hf = pair
    state = dict(hf.state_dict())
    state["shared_image_embedding.positional_embedding"] = state["shared_image_embedding.positional_embedding"] + 1
    with pytest.raises(ConfigError, match="shared_image_embedding.positional_embedding"):
        original_sam_state_dict(state)
