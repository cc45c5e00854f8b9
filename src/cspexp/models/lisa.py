"""LisaModel: LISA (Lai et al., CVPR 2024) assembled from maintained transformers classes.

    image ──CLIPVisionModel (layer −2, patch tokens)──► mm_projector ──► N image tokens ─┐
    prompt ids ──embed_tokens──► [system …, <image>, text …] ──splice─────────────────────┴─► LLaMA layers
    LLaMA final hidden state of the query token (the one before [SEG]) ──text_hidden_fcs──► SAM prompt
    image ──SAM vision encoder──► image embedding ──SAM mask decoder(prompt)──► mask logits

The decoder layers are *not* run here: `cspexp.pruning.engine` owns the layer loop so that pruning
methods can act between layers. This module only provides the pieces before and after that loop,
with the module names of LISA's checkpoints (``mm_projector``, ``text_hidden_fcs.0.{0,2}``) so that
real weights map onto it one to one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel, LlamaForCausalLM, SamModel

from cspexp.utils.choices import check_call

# Token kinds in the LLM sequence (TokenState.kind). Padding is a kind so that one tensor says
# both what a token is and whether it takes part.
SYSTEM, IMAGE, TEXT, PAD = 0, 1, 2, 3
KIND_NAMES = {SYSTEM: "system", IMAGE: "image", TEXT: "text", PAD: "pad"}
SegQuery = Literal["before", "at"]  # see `LisaModel`
ImagePosition = Literal["none", "sincos"]
ImageNorm = Literal["none", "rms"]
#: What the pruning engine's decoder loop builds attention masks for.
AttentionImplementation = Literal["sdpa", "eager"]


@dataclass
class PromptEmbeds:
    """The LLM input after the image tokens replaced the ``<image>`` placeholder. All [B, n]."""

    embeds: torch.Tensor  # [B, n, d]
    pos: torch.Tensor  # [B, n] position ids (0..n-1, padding included, as LlamaModel numbers them)
    kind: torch.Tensor  # [B, n] SYSTEM / IMAGE / TEXT / PAD
    grid: torch.Tensor  # [B, n] raster index in the image-token grid, −1 for non-image tokens
    query_pos: torch.Tensor  # [B] position of the token whose final state becomes the [SEG] embedding
    seg_pos: torch.Tensor  # [B] position of the [SEG] token itself


def text_hidden_fcs(in_dim: int, out_dim: int) -> nn.ModuleList:
    """LISA's projection of the LLM state into SAM's prompt space (keys ``text_hidden_fcs.0.{0,2}``)."""
    return nn.ModuleList(
        [nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim), nn.Dropout(0.0))]
    )


def grid_sincos(rows: int, cols: int, dim: int) -> torch.Tensor:
    """A fixed 2-D sine-cosine code of each cell of a rows×cols grid (raster order), [rows·cols, dim]:
    the first half of the channels codes the row, the second the column, each with dim/4 frequencies
    as sin/cos pairs (MAE's 2-D code), periods geometric from 2 cells to 4× the grid side, so every
    frequency varies across the grid and the lowest is near-linear in the coordinate."""
    if dim % 4:
        raise ValueError(f"the grid position code needs a width divisible by 4, got {dim}")
    k = dim // 4
    periods = 2.0 * (2.0 * max(rows, cols)) ** (torch.arange(k, dtype=torch.float64) / max(k - 1, 1))
    omega = 2 * torch.pi / periods  # [k]

    def code(n: int) -> torch.Tensor:  # [n, 2k]
        angles = torch.arange(n, dtype=torch.float64)[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    r, c = code(rows), code(cols)
    return torch.cat([r[:, None].expand(rows, cols, 2 * k), c[None].expand(rows, cols, 2 * k)], dim=2).reshape(rows * cols, dim).float()


def clip_cls_attention(layer, layer_input: torch.Tensor) -> torch.Tensor:
    """Attention of [CLS] (token 0) to the patch tokens in one CLIP encoder layer, heads averaged:
    softmax over all keys (CLS included), then the patch part. [B, 1 + N, d] → [B, N]."""
    attn = layer.self_attn
    x = layer.layer_norm1(layer_input)
    B, n, _ = x.shape
    q = attn.q_proj(x[:, :1]).view(B, 1, attn.num_heads, attn.head_dim).transpose(1, 2)  # [B, H, 1, hd]
    k = attn.k_proj(x).view(B, n, attn.num_heads, attn.head_dim).transpose(1, 2)  # [B, H, n, hd]
    probs = (torch.matmul(q, k.transpose(2, 3)).float() * attn.scale).softmax(-1)  # [B, H, 1, n]
    return probs[:, :, 0, 1:].mean(1)


def clip_patch_keys(layer, layer_input: torch.Tensor) -> torch.Tensor:
    """Attention keys of the patch tokens in one CLIP encoder layer, heads averaged (VisionZip's merge
    metric: the raw k_proj output, bias included, before any scaling): [B, 1 + N, d] → [B, N, head_dim]
    in float32."""
    attn = layer.self_attn
    x = layer.layer_norm1(layer_input[:, 1:])  # layer_norm1 is per token: the patch rows alone suffice
    B, N, _ = x.shape
    return attn.k_proj(x).view(B, N, attn.num_heads, attn.head_dim).float().mean(2)


class LisaModel(nn.Module):
    """LISA's modules; see the module docstring for the data flow.

    Args:
        vision_tower: CLIP vision encoder; features are read from ``hidden_states[vision_select_layer]``.
        mm_projector: vision width → LLM width (LISA v1: one Linear).
        llm: the LLaMA language model; its decoder layers are run by the pruning engine.
        sam: SAM; its vision encoder, prompt encoder and mask decoder are used.
        text_hidden_fcs: LLM width → SAM prompt width.
        image_token_id: id of the ``<image>`` placeholder in the prompt ids.
        seg_token_id: id of ``[SEG]``.
        seg_query: ``before`` (LISA: the state of the token just before ``[SEG]``) or ``at`` (``[SEG]`` itself).
        image_position: ``none`` (LISA: position comes from CLIP's features) or ``sincos`` (a fixed 2-D
            sine-cosine code of the grid cell added to each projected image token; see `grid_sincos`).
            For models trained from scratch: a CLIP tower trained only through the LLM loses what little
            position its learned embeddings carry (measured: linear-probe R² of a token's row 0.02), and
            an LLM whose image tokens carry no position cannot say *where* the target is.
        image_norm: ``none`` (LISA) or ``rms`` (each projected image token scaled to unit RMS, before the
            position code: the scale of N(0, 1) word embeddings). For models trained from scratch:
            unchecked, the projected tokens grew from norm 6 to 170 in 1 000 steps while words stay
            near 10, so a fixed position code shrank to 4 % of a token.
    """

    def __init__(
        self,
        vision_tower: CLIPVisionModel,
        mm_projector: nn.Module,
        llm: LlamaForCausalLM,
        sam: SamModel,
        text_hidden_fcs: nn.ModuleList,
        *,
        image_token_id: int,
        seg_token_id: int,
        vision_select_layer: int = -2,
        seg_query: SegQuery = "before",
        image_position: ImagePosition = "none",
        image_norm: ImageNorm = "none",
    ) -> None:
        super().__init__()
        check_call(LisaModel, {"seg_query": seg_query, "image_position": image_position, "image_norm": image_norm},
                   "model")
        self.vision_tower = vision_tower
        self.mm_projector = mm_projector
        self.llm = llm
        self.sam = sam
        self.text_hidden_fcs = text_hidden_fcs
        self.image_token_id = image_token_id
        self.seg_token_id = seg_token_id
        self.vision_select_layer = vision_select_layer
        self.seg_query = seg_query
        self.image_position = image_position
        self.image_norm = image_norm

    # ------------------------------------------------------------------ sizes
    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, cols) of the image-token grid (16×16 for CLIP-L/14 at 224 px)."""
        cfg = self.vision_tower.config
        side = cfg.image_size // cfg.patch_size
        return side, side

    @property
    def n_image_tokens(self) -> int:
        rows, cols = self.grid_size
        return rows * cols

    @property
    def num_layers(self) -> int:
        return self.llm.config.num_hidden_layers

    @property
    def decoder(self):
        """The LlamaModel (embeddings, layers, final norm, rotary embedding)."""
        return self.llm.model

    # ------------------------------------------------------------------ vision
    def encode_image(self, clip_pixels: torch.Tensor, output_cls_attention: bool = False, output_keys: bool = False):
        """CLIP patch features at the select layer, projected to the LLM width.

        Returns ``(tokens [B, N, d_llm], cls_attention [B, N] or None)``, and with `output_keys`
        ``(tokens, cls_attention, keys [B, N, head_dim])``. The CLS attention is the
        attention of the [CLS] query to the patch tokens in the layer that produced the features,
        averaged over heads (csp's ``cls_attn`` clustering); the keys are that layer's attention keys
        of the patch tokens, averaged over heads (VisionZip's merge metric, `clip_patch_keys`). Both are
        computed from that layer's own norm and q/k projections, so the tower keeps its SDPA attention.
        """
        out = self.vision_tower(pixel_values=clip_pixels.to(self.vision_tower.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.vision_select_layer][:, 1:]  # drop CLS: [B, N, d_vis]
        tokens = self.project_image(feats)
        cls_attn = keys = None
        # hidden_states[k] is the output of encoder layer k-1 (hidden_states[0] = embeddings).
        n_layers = len(out.hidden_states) - 1
        s = self.vision_select_layer % (n_layers + 1)  # index into hidden_states
        if output_cls_attention:
            cls_attn = clip_cls_attention(self.vision_tower.encoder.layers[s - 1], out.hidden_states[s - 1])
        if output_keys:
            keys = clip_patch_keys(self.vision_tower.encoder.layers[s - 1], out.hidden_states[s - 1])
            return tokens, cls_attn, keys
        return tokens, cls_attn

    def project_image(self, feats: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """CLIP patch features [B, n, d_vis] → the LLM's image tokens [B, n, d_llm]: the projector, then
        `image_norm` and `image_position`. `source` [B, N] (optional) says which of the n tokens holds
        each grid cell, for tokens that merged several cells (tome): each then gets the mean position
        code of its cells, as merging the tokens after adding the codes would give; None: token k is cell k."""
        tokens = self.mm_projector(feats)
        if self.image_norm == "rms":
            tokens = F.rms_norm(tokens, (tokens.shape[-1],))
        if self.image_position == "sincos":
            rows, cols = self.grid_size
            code = grid_sincos(rows, cols, tokens.shape[-1]).to(tokens.device, tokens.dtype)
            if source is not None:
                # the mean over the cells each token holds, by scatter-adds (no matmul: no FLOPs to count)
                per_cell = code.expand(*source.shape, -1)  # [B, N, d]
                summed = torch.zeros_like(tokens).scatter_add_(1, source[..., None].expand_as(per_cell), per_cell)
                held = torch.zeros_like(tokens[..., 0]).scatter_add_(1, source, torch.ones_like(per_cell[..., 0]))
                code = summed / held[..., None]
            tokens = tokens + code
        return tokens

    # ------------------------------------------------------------------ prompt
    def splice(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor) -> PromptEmbeds:
        """Replace each row's single ``<image>`` placeholder by its N image tokens.

        Rows are right-padded (LISA's collate); the result has n = L − 1 + N columns for every row.
        """
        B, L = input_ids.shape
        N = image_tokens.shape[1]
        is_img = input_ids == self.image_token_id
        if not torch.all(is_img.sum(1) == 1):
            raise ValueError("every prompt must contain exactly one <image> placeholder")
        img_at = is_img.float().argmax(1)  # [B]
        safe_ids = input_ids.masked_fill(is_img, 0)
        text_embeds = self.decoder.embed_tokens(safe_ids)  # [B, L, d]
        n = L - 1 + N
        device = input_ids.device
        col = torch.arange(n, device=device).expand(B, n)  # column in the spliced sequence
        start = img_at[:, None]
        in_img = (col >= start) & (col < start + N)
        # Source column in the text row for non-image columns (skips the placeholder).
        src = torch.where(col < start, col, col - N + 1).clamp(0, L - 1)
        embeds = torch.gather(text_embeds, 1, src[..., None].expand(B, n, text_embeds.shape[-1]))
        img_idx = (col - start).clamp(0, N - 1)
        img_embeds = torch.gather(image_tokens.to(embeds.dtype), 1, img_idx[..., None].expand(B, n, embeds.shape[-1]))
        embeds = torch.where(in_img[..., None], img_embeds, embeds)

        valid = torch.gather(attention_mask.bool(), 1, src) | in_img
        kind = torch.full((B, n), TEXT, dtype=torch.long, device=device)
        kind = kind.masked_fill(col < start, SYSTEM).masked_fill(in_img, IMAGE).masked_fill(~valid, PAD)
        grid = torch.where(in_img, img_idx, torch.full_like(img_idx, -1))

        has_seg = (input_ids == self.seg_token_id).any(1)
        # first [SEG] in the text row; a generation prompt (no answer, ends at "ASSISTANT:") has none:
        # its answer would start right after the last real token (right padding)
        seg_col_text = torch.where(has_seg, (input_ids == self.seg_token_id).float().argmax(1), attention_mask.sum(1))
        seg_col = seg_col_text + N - 1
        query_pos = seg_col - 1 if self.seg_query == "before" else seg_col
        # without [SEG] the query is the last prompt token, whose state emits the first answer token
        query_pos = torch.where(has_seg, query_pos, seg_col - 1)
        return PromptEmbeds(embeds=embeds, pos=col.clone(), kind=kind, grid=grid, query_pos=query_pos, seg_pos=seg_col)

    # ------------------------------------------------------------------ SAM
    def image_embeddings(self, sam_pixels: torch.Tensor) -> torch.Tensor:
        """SAM image embedding [B, C, h, w] (gradients flow only where the encoder is trainable:
        LISA freezes it; the small models train it from scratch)."""
        return self.sam.vision_encoder(sam_pixels.to(self.sam.dtype))[0]

    def seg_embedding(self, query_hidden: torch.Tensor) -> torch.Tensor:
        """Final LLM state of the query token [B, d] → SAM prompt embedding [B, C]."""
        return self.text_hidden_fcs[0](query_hidden)

    def decode_masks(self, image_embeddings: torch.Tensor, seg_embeds: torch.Tensor) -> torch.Tensor:
        """SAM's mask decoder with the [SEG] embedding as its only sparse prompt (LISA's ``text_embeds``),
        or with any sparse prompt tokens [B, n, C].

        ``SamModel.forward`` has no argument for a custom sparse embedding, so the decoder is called
        directly. Returns low-resolution logits [B, h', w'] (single-mask output).
        """
        B, _, h, w = image_embeddings.shape
        # [B, C] (one [SEG]) or [B, n, C] (any sparse tokens, e.g. SAM's point embeddings)
        tokens = seg_embeds[:, None, :] if seg_embeds.dim() == 2 else seg_embeds
        sparse = tokens[:, None].to(image_embeddings.dtype)  # [B, point_batch=1, tokens, C]
        dense = self.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(B, -1, h, w)
        pe = self.sam.get_image_wide_positional_embeddings().expand(B, -1, -1, -1)
        masks, _iou = self.sam.mask_decoder(
            image_embeddings=image_embeddings,
            image_positional_embeddings=pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return masks[:, 0, 0]

    def postprocess_masks(self, low_res: torch.Tensor, resized_hw, original_hw) -> torch.Tensor:
        """LISA's ``postprocess_masks`` for one sample: upsample to SAM's input size, crop the padding,
        resize to the original image size. float32 as in LISA. Returns logits [H, W]."""
        size = self.sam.config.vision_config.image_size
        x = F.interpolate(low_res[None, None].float(), (size, size), mode="bilinear", align_corners=False)
        x = x[..., : int(resized_hw[0]), : int(resized_hw[1])]
        x = F.interpolate(x, (int(original_hw[0]), int(original_hw[1])), mode="bilinear", align_corners=False)
        return x[0, 0]
