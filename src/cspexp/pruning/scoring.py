"""Attention of chosen query tokens to the image tokens, without a full attention matrix.

PyramidDrop's trick: apply the layer's own input norm and q/k projections, RoPE at the positions
the layer itself uses (`state.rope_pos`: the original positions unless a method renumbered), and
compute only the query rows (q × Kᵀ over the keys each query may see, by original position). The
main path keeps SDPA / flash attention; the cost is a k-projection of the sequence plus a few rows,
reported as the method's overhead. Rows are softmax-normalised over all visible keys (as in
the real attention), then averaged over heads and over the query tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from cspexp.models.lisa import PAD, TEXT
from cspexp.utils.choices import check_value

#: Whose attention ranks the image tokens: seg (the token whose final state is the [SEG] embedding),
#: seg_token ([SEG] itself), last (the last token), text_mean (mean over the text tokens up to the
#: seg query).
Query = Literal["seg", "seg_token", "last", "text_mean"]


def query_mask(state, query: Query) -> torch.Tensor:
    """[B, n] bool: the query tokens of each row."""
    check_value(query, Query, "prune.query")  # the last branch below would take any other name for text_mean
    cols = torch.arange(state.pos.shape[1], device=state.pos.device)
    if query == "seg":
        return state.pos == state.query_pos[:, None]
    if query == "seg_token":
        return state.pos == state.seg_pos[:, None]
    if query == "last":
        last = ((state.kind != PAD) * (cols + 1)).argmax(1)  # last non-padding column
        return cols[None, :] == last[:, None]
    # text_mean: the prompt's text after the image, up to the token that produces [SEG]
    return (state.kind == TEXT) & (state.pos <= state.query_pos[:, None])


def query_attention(layer, rotary_emb, state, query: Query = "seg", head: int | None = None) -> torch.Tensor:
    """Mean attention [B, n_image] that the query tokens pay to each image token at `layer`,
    computed from `state` as the layer's input (query tokens averaged; heads averaged, or only
    `head`'s row when given — training supervises one head, see `cspexp.lit.attend`)."""
    attn = layer.self_attn
    x = layer.input_layernorm(state.hidden)  # [B, n, d]
    B, n, _ = x.shape
    head_dim = attn.head_dim
    qmask = query_mask(state, query)
    n_q = qmask.sum(1)  # query tokens per sample (text_mean: differs with the query's length)
    if int(n_q.min()) == 0:
        raise RuntimeError(f"prune.query={query!r} selects no token in some sample")
    width = int(n_q.max())
    # Query columns first (stable, in position order); rows beyond a sample's count get weight 0.
    q_cols = torch.sort((~qmask).to(torch.int8), dim=1, stable=True).indices[:, :width]  # [B, q]
    q_weight = (torch.arange(width, device=x.device)[None, :] < n_q[:, None]).float()  # [B, q]

    cos, sin = rotary_emb(x, position_ids=state.rope_pos)  # [B, n, head_dim]: RoPE positions
    xq = torch.gather(x, 1, q_cols[..., None].expand(-1, -1, x.shape[-1]))
    q = attn.q_proj(xq).view(B, -1, attn.config.num_attention_heads, head_dim).transpose(1, 2)  # [B, H, q, hd]
    k = attn.k_proj(x).view(B, n, -1, head_dim).transpose(1, 2)  # [B, Hkv, n, hd]
    q_cos = torch.gather(cos, 1, q_cols[..., None].expand(-1, -1, head_dim))
    q_sin = torch.gather(sin, 1, q_cols[..., None].expand(-1, -1, head_dim))
    q, _ = apply_rotary_pos_emb(q, q, q_cos, q_sin)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    k = repeat_kv(k, attn.num_key_value_groups)  # [B, H, n, hd]

    scores = torch.matmul(q, k.transpose(2, 3)).float() * attn.scaling  # [B, H, q, n]
    q_pos = torch.gather(state.pos, 1, q_cols)  # [B, q]
    visible = (state.pos[:, None, :] <= q_pos[:, :, None]) & (state.kind != PAD)[:, None, :]  # [B, q, n]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = scores.softmax(dim=-1)
    probs = probs.mean(dim=1) if head is None else probs[:, head]  # → [B, q, n]
    probs = (probs * q_weight[..., None]).sum(1) / q_weight.sum(1, keepdim=True)  # query tokens averaged
    img_cols = state.image_columns()
    return torch.gather(probs, 1, img_cols)
