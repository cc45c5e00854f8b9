"""Builders for `LisaModel`: each `conf/model/*.yaml` names one of these functions as its `_target_`.

Every builder returns a `LoadedModel` (the model, its processor and the facts the rest of the run
reports). `random_lisa` makes a small random-weight LISA from sizes in the config — for tests and
development; no file is read and nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, SamConfig, SamModel
from transformers.models.sam.configuration_sam import SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

from cspexp.models.lisa import IMAGE_NORMS, IMAGE_POSITIONS, LisaModel, text_hidden_fcs
from cspexp.models.processor import LisaProcessor
from cspexp.models.tokenizer import build_word_tokenizer
from cspexp.utils.errors import ConfigError, require

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: LisaModel
    processor: LisaProcessor
    name: str

    def dims(self) -> dict:
        cfg = self.model.llm.config
        return {
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "n_image_tokens": self.model.n_image_tokens,
        }


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not allowed; use one of {sorted(set(DTYPES))}")
    return DTYPES[name]


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


def assemble(
    *,
    vision_cfg: CLIPVisionConfig,
    llm_cfg: LlamaConfig,
    sam_cfg: SamConfig,
    tokenizer,
    vision_select_layer: int = -2,
    seg_query: str = "before",
    attn_implementation: str = "sdpa",
    image_position: str = "none",
    image_norm: str = "none",
) -> LisaModel:
    """A LisaModel with freshly initialised weights of the given architecture (loaders then fill them)."""
    require(attn_implementation in ("sdpa", "eager"),
            f"model.attn_implementation={attn_implementation!r} is not allowed; use 'sdpa' or 'eager'")
    require(seg_query in ("before", "at"), f"model.seg_query={seg_query!r} is not allowed; use 'before' (LISA) or 'at'")
    require(image_position in IMAGE_POSITIONS,
            f"model.image_position={image_position!r} is not allowed; use one of {list(IMAGE_POSITIONS)}")
    require(image_norm in IMAGE_NORMS, f"model.image_norm={image_norm!r} is not allowed; use one of {list(IMAGE_NORMS)}")
    vision_cfg._attn_implementation = attn_implementation
    llm_cfg._attn_implementation = attn_implementation
    sam_prompt_dim = sam_cfg.prompt_encoder_config.hidden_size
    return LisaModel(
        vision_tower=CLIPVisionModel(vision_cfg),
        mm_projector=nn.Linear(vision_cfg.hidden_size, llm_cfg.hidden_size),
        llm=LlamaForCausalLM(llm_cfg),
        sam=SamModel(sam_cfg),
        text_hidden_fcs=text_hidden_fcs(llm_cfg.hidden_size, sam_prompt_dim),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        seg_token_id=tokenizer.convert_tokens_to_ids("[SEG]"),
        vision_select_layer=vision_select_layer,
        seg_query=seg_query,
        image_position=image_position,
        image_norm=image_norm,
    ).eval()


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
    vision: dict,
    llm: dict,
    sam: dict,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    seg_query: str = "before",
    image_position: str = "none",
    image_norm: str = "none",
    words: Iterable[str] = (),
    **_ignored,
) -> LoadedModel:
    """A random-weight LISA of the configured sizes, with a word-level tokenizer over `words`
    (the dataset's query vocabulary; unknown words map to ``<unk>``)."""
    grid = vision["image_size"] // vision["patch_size"]
    require(grid * vision["patch_size"] == vision["image_size"], "model.vision.image_size must be a multiple of patch_size")
    require(sam["image_size"] % sam["patch_size"] == 0, "model.sam.image_size must be a multiple of patch_size")
    tokenizer = build_word_tokenizer(words)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _from_scratch(assemble(
            vision_cfg=vision_config(vision, attn_implementation),
            llm_cfg=llm_config(llm, len(tokenizer), tokenizer.pad_token_id, attn_implementation),
            sam_cfg=sam_config(sam),
            tokenizer=tokenizer,
            vision_select_layer=vision.get("select_layer", -2),
            seg_query=seg_query,
            attn_implementation=attn_implementation,
            image_position=image_position,
            image_norm=image_norm,
        )).to(resolve_dtype(dtype))
    processor = LisaProcessor(tokenizer=tokenizer, clip_size=vision["image_size"], sam_size=sam["image_size"])
    return LoadedModel(model=model, processor=processor, name=name)


def model_shape(cfg) -> tuple[int, int] | None:
    """(LLM layers, image tokens) read from a model config without loading weights, so that pruning
    schedules are validated before a slow load; None when only the checkpoint can tell."""
    if cfg.get("path") and cfg.get("vision_tower"):  # an original LISA checkpoint + its CLIP directory
        from cspexp.models.lisa_checkpoint import lisa_shape

        return lisa_shape(cfg["path"], cfg["vision_tower"])
    if cfg.get("path"):
        from cspexp.models.saved import saved_shape  # the saved format builds on this module

        return saved_shape(cfg["path"])
    try:
        vision, llm = cfg["vision"], cfg["llm"]
        side = int(vision["image_size"]) // int(vision["patch_size"])
        return int(llm["num_hidden_layers"]), side * side
    except (KeyError, TypeError):
        return None
