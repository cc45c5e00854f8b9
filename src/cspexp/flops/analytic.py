"""Analytic LLM prefill FLOPs from the per-layer token trace (docs/method.md, "FLOPs accounting").

Per decoder layer with n tokens (n_img of them image tokens), hidden d, key/value width d_kv
(= d without grouped-query attention) and SwiGLU width m, in multiply-adds (MACs):

    projections  n·(2·d² + 2·d·d_kv)        q, o: d→d;  k, v: d→d_kv
    attention    2·n²·d                     QKᵀ and A·V over all heads (no causal discount,
                                            like FlopCounterMode and FastV's formula)
    FFN          3·n·d·m                    gate, up, down

With d_kv = d this is FastV's 4nd² + 2n²d + 3ndm (SwiGLU-corrected). FLOPs = 2 · MACs. Norms, RoPE,
softmax and residual additions are not counted (neither are they by FlopCounterMode), nor is the
lm_head: LISA's teacher-forced pass needs hidden states only.

Image-token FLOPs restrict the same terms to image-token rows: n_img·(2d² + 2d·d_kv + 3dm) for the
linear layers plus 2·n_img·n·d for the attention of image queries. Reductions compare with the dense
run of the same sample (all N image tokens in every layer). A method's own work — query-attention
rows and feature assignment — is its *overhead*, reported separately.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

UNIT = "FLOPs"  # 2 per multiply-add


@dataclass(frozen=True)
class LlmDims:
    hidden_size: int  # d
    intermediate_size: int  # m
    num_layers: int
    kv_size: int  # d_kv = num_key_value_heads · head_dim

    @classmethod
    def from_config(cls, cfg) -> "LlmDims":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_key_value_heads * head_dim)


def layer_macs(n: int, dims: LlmDims) -> int:
    d, dkv, m = dims.hidden_size, dims.kv_size, dims.intermediate_size
    return n * (2 * d * d + 2 * d * dkv) + 2 * n * n * d + 3 * n * d * m


def image_layer_macs(n: int, n_img: int, dims: LlmDims) -> int:
    d, dkv, m = dims.hidden_size, dims.kv_size, dims.intermediate_size
    return n_img * (2 * d * d + 2 * d * dkv + 3 * d * m) + 2 * n_img * n * d


def overhead_macs(events: Sequence[dict], dims: LlmDims) -> int:
    """MACs of a method's own work for one sample, from its overhead events (`Trace.sample_overhead`)."""
    d, dkv = dims.hidden_size, dims.kv_size
    total = 0
    for e in events:
        if e["kind"] == "query_attention":
            n, q = e["tokens"], e["queries"]
            total += n * d * dkv + q * d * d + q * n * d  # k of every token, q of the queries, q·Kᵀ rows
        elif e["kind"] == "assign_feature":
            total += e["members"] * e["reps"] * e["dim"]  # cosine similarities
        elif e["kind"] == "matmul":
            # any product of an [m, k] and a [k, n] matrix a method computes (similarities, merges);
            # `what` names it for people; `widths` ({"m"|"n"|"k": "hidden"|"kv"|"clip_head"}) says which
            # sizes are a model's widths rather than token counts, so that `cspexp.flops.sweep_cost`
            # can price the event at another model's width
            total += e["m"] * e["n"] * e["k"]
        else:
            raise ValueError(f"unknown overhead event {e['kind']!r}")
    return total


def sample_flops(tokens_per_layer: Sequence[int], image_per_layer: Sequence[int], n_image: int, dims: LlmDims,
                 overhead_events: Sequence[dict] = ()) -> dict:
    """FLOPs of one sample's prefill, its dense reference, and the reductions."""
    if len(tokens_per_layer) != dims.num_layers or len(image_per_layer) != dims.num_layers:
        raise ValueError("the trace must have one entry per layer")
    llm = sum(layer_macs(n, dims) for n in tokens_per_layer)
    image = sum(image_layer_macs(n, k, dims) for n, k in zip(tokens_per_layer, image_per_layer))
    # The dense run of the same sample: its non-image tokens plus all N image tokens, every layer.
    n_text = tokens_per_layer[0] - image_per_layer[0]
    n_dense = n_text + n_image
    llm_dense = dims.num_layers * layer_macs(n_dense, dims)
    image_dense = dims.num_layers * image_layer_macs(n_dense, n_image, dims)
    overhead = overhead_macs(overhead_events, dims)
    return {
        "llm": 2 * llm,
        "llm_dense": 2 * llm_dense,
        "image": 2 * image,
        "image_dense": 2 * image_dense,
        "overhead": 2 * overhead,
    }


def summarize(rows: Sequence[dict]) -> dict:
    """Means over samples (the `flops` block of results.json) and both reductions."""
    if not rows:
        return {"unit": UNIT, "llm": None, "llm_dense": None, "image": None, "image_dense": None,
                "reduction_llm": None, "reduction_image": None, "overhead": None}
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("llm", "llm_dense", "image", "image_dense", "overhead")}
    return {
        "unit": UNIT,
        **mean,
        "reduction_llm": 1.0 - mean["llm"] / mean["llm_dense"],
        "reduction_image": 1.0 - mean["image"] / mean["image_dense"] if mean["image_dense"] else None,
    }


def decode_macs(context: int, dims: LlmDims) -> int:
    """MACs of one decoded token in one layer whose KV cache holds `context` tokens (itself included):
    its projections and FFN, and one attention row over the cache (q·Kᵀ and A·V)."""
    d, dkv, m = dims.hidden_size, dims.kv_size, dims.intermediate_size
    return 2 * d * d + 2 * d * dkv + 2 * context * d + 3 * d * m


def decode_flops(prompt_per_layer: Sequence[int], steps: int, dims: LlmDims, vocab_size: int = 0) -> float | None:
    """Mean FLOPs per decoding step of one sample (generation, `cspexp.pruning.generate`): step t = 1..steps
    runs one token through every layer against a cache of that layer's prompt tokens
    (`prompt_per_layer`, what the pruned prefill left there) plus t tokens, then the lm_head (d·vocab).
    None when nothing was decoded. The prefill's FLOPs are `sample_flops`'."""
    if steps <= 0:
        return None
    # Σ_t decode_macs(n + t) over t = 1..steps, in closed form: the context grows by one per step
    d = dims.hidden_size
    total = sum(steps * decode_macs(n, dims) + 2 * d * steps * (steps + 1) // 2 for n in prompt_per_layer)
    return 2 * (total / steps + d * vocab_size)
