"""`random_lisa`: a `LisaModel` of the configured sizes with random weights (conf/model/tiny_*.yaml).

For tests, development and training from scratch: no file is read and nothing is downloaded. Like
every loader it returns a `LoadedModel` (`cspexp.models.base`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, TypedDict

import torch
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, SamConfig
from transformers.models.sam.configuration_sam import SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

from cspexp.models.base import Dtype, LoadedModel, ModelShape, assemble, resolve_dtype
from cspexp.models.lisa import AttentionImplementation, ImageNorm, ImagePosition, LisaModel, SegQuery
from cspexp.models.processor import LisaProcessor
from cspexp.models.tokenizer import build_word_tokenizer
from cspexp.utils.choices import NonNegativeInt, PositiveInt, Range
from cspexp.utils.errors import require


class VisionSizes(TypedDict, total=False):
    """`model.vision` of a random model: a CLIP ViT."""

    image_size: PositiveInt
    patch_size: PositiveInt
    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_attention_heads: PositiveInt
    select_layer: int
    hidden_act: str


class LlmSizes(TypedDict, total=False):
    """`model.llm` of a random model: a LLaMA."""

    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_attention_heads: PositiveInt
    num_key_value_heads: PositiveInt
    max_position_embeddings: PositiveInt
    rms_norm_eps: Annotated[float, Range(0.0, lo_open=True)]


class SamSizes(TypedDict, total=False):
    """`model.sam` of a random model: SAM's image encoder, prompt encoder and mask decoder."""

    image_size: PositiveInt
    patch_size: PositiveInt
    hidden_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_attention_heads: PositiveInt
    window_size: NonNegativeInt
    global_attn_indexes: list[NonNegativeInt]
    prompt_dim: PositiveInt
    mlp_dim: PositiveInt | None
    mask_decoder_mlp_dim: PositiveInt
    mask_decoder_heads: PositiveInt
    iou_head_hidden_dim: PositiveInt
    initializer_range: Annotated[float, Range(0.0)]


def vision_config(vision: dict, attn_implementation: str) -> CLIPVisionConfig:
    cfg = CLIPVisionConfig(
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        hidden_size=vision["hidden_size"],
        intermediate_size=vision["intermediate_size"],
        num_hidden_layers=vision["num_hidden_layers"],
        num_attention_heads=vision["num_attention_heads"],
        hidden_act=vision.get("hidden_act", "quick_gelu"),
    )
    cfg._attn_implementation = attn_implementation
    return cfg


def llm_config(llm: dict, vocab_size: int, pad_token_id: int, attn_implementation: str) -> LlamaConfig:
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=llm["hidden_size"],
        intermediate_size=llm["intermediate_size"],
        num_hidden_layers=llm["num_hidden_layers"],
        num_attention_heads=llm["num_attention_heads"],
        num_key_value_heads=llm.get("num_key_value_heads", llm["num_attention_heads"]),
        max_position_embeddings=llm.get("max_position_embeddings", 2048),
        rms_norm_eps=llm.get("rms_norm_eps", 1e-6),
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
        use_cache=False,
    )
    cfg._attn_implementation = attn_implementation
    return cfg


def sam_config(sam: dict) -> SamConfig:
    """A SAM whose image embedding is (image_size / patch_size)² and whose prompt width is `prompt_dim`."""
    prompt_dim = sam["prompt_dim"]
    vision = SamVisionConfig(
        hidden_size=sam["hidden_size"],
        output_channels=prompt_dim,
        num_hidden_layers=sam["num_hidden_layers"],
        num_attention_heads=sam["num_attention_heads"],
        image_size=sam["image_size"],
        patch_size=sam["patch_size"],
        window_size=sam["window_size"],
        global_attn_indexes=list(sam["global_attn_indexes"]),
        num_pos_feats=prompt_dim // 2,
        mlp_dim=sam.get("mlp_dim"),
        # transformers' default (1e-10) is meant for loading SAM's pretrained weights; a model trained
        # from scratch needs a real init, or its image features start at ~0 and the masks never learn
        initializer_range=sam.get("initializer_range", 0.02),
    )
    prompt_encoder = SamPromptEncoderConfig(
        hidden_size=prompt_dim, image_size=sam["image_size"], patch_size=sam["patch_size"]
    )
    mask_decoder = SamMaskDecoderConfig(
        hidden_size=prompt_dim,
        mlp_dim=sam["mask_decoder_mlp_dim"],
        num_attention_heads=sam["mask_decoder_heads"],
        iou_head_hidden_dim=sam.get("iou_head_hidden_dim", prompt_dim),
    )
    return SamConfig(
        vision_config=vision.to_dict(),
        prompt_encoder_config=prompt_encoder.to_dict(),
        mask_decoder_config=mask_decoder.to_dict(),
    )


def _from_scratch(model: LisaModel) -> LisaModel:
    """Initialisation fixes for training SAM from scratch (transformers' SAM init is only meant to be
    overwritten by pretrained weights):

    - every SAM layer gets PyTorch's default init, as in Meta's own SAM code. transformers draws them
      from N(0, 0.02): at our widths that makes the mask decoder's outputs ~1e-4, the bias of its
      hypernetwork MLP then learns the mask alone, and the decoder ignores its prompt — measured: a
      click moved 0.03 % of the mask pixels after 150 steps, so no prompt (click or [SEG]) could ever
      select a shape. Its learned tokens are ``nn.Embedding`` → N(0, 1), also as in Meta's code;
    - the random-Fourier positional matrix: std 1 (SAM's) instead of hidden_size/2, without which the
      mask decoder's position code is aliased noise;
    - the LLM's token embeddings: N(0, 1) instead of N(0, 0.02), so that a word arrives at the scale of
      the projected image tokens (norm ≈ √d both). With 0.02 a word had norm 0.4 against the image
      tokens' 6–16: after one layer each text token's residual was the average of the image tokens it
      attended to, its own identity gone — measured: swapping "the red shape" for "the leftmost shape"
      moved the query token's state by 0.5 % (a different image: by 90 %), and after 400 steps
      "blue shape", "green circle" and "leftmost shape" still gave the same state."""
    with torch.no_grad():
        for module in model.sam.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)):
                module.reset_parameters()
        for emb in (model.sam.shared_image_embedding, model.sam.prompt_encoder.shared_embedding):
            emb.positional_embedding.normal_(0.0, 1.0)
        model.sam.prompt_encoder.shared_embedding.positional_embedding.copy_(
            model.sam.shared_image_embedding.positional_embedding)
        model.llm.get_input_embeddings().weight.normal_(0.0, 1.0)
    return model


def random_lisa(
    *,
    name: str = "tiny_random",
    seed: int = 0,
    vision: VisionSizes,
    llm: LlmSizes,
    sam: SamSizes,
    dtype: Dtype = "float32",
    attn_implementation: AttentionImplementation = "sdpa",
    seg_query: SegQuery = "before",
    image_position: ImagePosition = "none",
    image_norm: ImageNorm = "none",
    words: Iterable[str] = (),
) -> LoadedModel:
    """A random-weight LISA of the configured sizes, with a word-level tokenizer over `words`
    (the dataset's query vocabulary; unknown words map to ``<unk>``)."""
    grid = vision["image_size"] // vision["patch_size"]
    require(grid * vision["patch_size"] == vision["image_size"], "model.vision.image_size must be a multiple of patch_size")
    require(sam["image_size"] % sam["patch_size"] == 0, "model.sam.image_size must be a multiple of patch_size")
    tokenizer = build_word_tokenizer(words)
    processor = LisaProcessor(tokenizer=tokenizer, tokenizer_kind="word_level", clip_size=vision["image_size"],
                              sam_size=sam["image_size"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _from_scratch(assemble(
            vision_cfg=vision_config(vision, attn_implementation),
            llm_cfg=llm_config(llm, len(tokenizer), tokenizer.pad_token_id, attn_implementation),
            sam_cfg=sam_config(sam),
            processor=processor,
            vision_select_layer=vision.get("select_layer", -2),
            seg_query=seg_query,
            attn_implementation=attn_implementation,
            image_position=image_position,
            image_norm=image_norm,
        )).to(resolve_dtype(dtype))
    return LoadedModel(model=model, processor=processor, name=name)


def random_shape(cfg: Mapping) -> ModelShape:
    """The shape `random_lisa` builds from the model config `cfg`, computed without building it."""
    vision, llm = cfg["vision"], cfg["llm"]
    side = int(vision["image_size"]) // int(vision["patch_size"])
    return ModelShape(int(llm["num_hidden_layers"]), side * side)
