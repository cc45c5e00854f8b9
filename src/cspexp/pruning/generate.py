"""Image + prompt → generated answer → one mask per generated ``[SEG]``: LISA's chat path, with the
pruning method in the prefill and decoding on a pruned KV cache (``evaluate.mode=generate``).

What LISA does (github.com/dvlab-research/LISA at 3cb2d43, ``model/LISA.py`` `evaluate`, L345-427,
and ``chat.py`` L150-224): the prompt is the llava_v1 conversation without an answer, ending at
``ASSISTANT:``; the model generates greedily (``num_beams=1``, up to ``max_new_tokens``, stopping
at ``</s>``); every ``[SEG]`` in the output ids selects a final (normed) hidden state with a
one-token offset, ``output_ids[:, 1:] == seg_token_idx`` (L367) — the state of the token *before*
each ``[SEG]``, the one whose logits emitted it — and each selected state goes through
``text_hidden_fcs`` and SAM's mask decoder to one mask at the original size (L379-425). An output
without ``[SEG]`` gives zero masks (a [0, H, W] tensor; chat.py skips it, L227). LISA's model sets
``use_cache=False`` (L112), so each of its steps recomputes the whole sequence; here the prefill
fills a KV cache and each step runs one token, which is the same computation (tested against
transformers' own ``generate`` and against a recomputation without cache).

cspexp's version:

- **Prefill** through `DecoderLoop` with the pruning method, filling a transformers `DynamicCache`
  through the decoder layers' own cache support: each layer caches the keys and values of exactly
  the tokens it ran. A pruned image token is absent from the layers after its drop; a token csp
  parked is absent from the clustering layers and present from its restoration on. Layers hold
  different lengths, which `DynamicCache` (one `DynamicLayer` per layer) allows as it is.
- **Decoding** (`KVDecoder`): each generated token is embedded and run through every layer against
  that layer's cache (the method does not act: text is never pruned). Its RoPE position continues
  the numbering each layer used (`CacheLayout`): with original positions (every method's default) it
  is the last prompt position + 1, + 1 per step; after ``pdrop prune.positions=renumber`` (or any
  method that renumbers) the tokens present at a layer were numbered 0..n_l − 1, so the new token
  gets n_l (+ 1 per step) there — what PyramidDrop's code does when it decodes
  (github.com/Cooperx521/PyramidDrop, ``llava/model/modeling_llama_pdrop.py`` L1259-1268: the
  decoding position ids shrink by the tokens dropped at each stage). Either way a recomputation of
  prompt + generated tokens through the loop gives the same states (tests/test_generate.py).
- **Batches** stay right-padded, as the teacher-forced pass: each layer's cache keeps the prompt's
  padding columns, and a decoded token's attention mask hides them (per layer, from `CacheLayout`).
  Positions of real tokens are then those of the sample alone, so a batch generates the same ids as
  its samples one by one (unless the method's count adapts per sample: a batch then keeps its
  samples' largest count, as in the teacher-forced pass). A row that has emitted ``</s>`` keeps
  running until the batch is done; its ids end at ``</s>``.
- **[SEG]**: LISA's offset (`seg_positions`): the state of the token before each ``[SEG]``
  (``model.seg_query=at``: of ``[SEG]`` itself, fed once more when it is the last token).

Decode FLOPs and the KV-cache size are computed from the cached lengths (docs/method.md, "FLOPs
accounting"; docs/outputs.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from cspexp.features.vision import VisionFeatures, encode_vision
from cspexp.models.lisa import PAD, AttentionImplementation, LisaModel, SegQuery
from cspexp.pruning.engine import Observer, TokenState, Trace, cache_keyword
from cspexp.pruning.methods.base import PruningMethod
from cspexp.pruning.pipeline import run_llm
from cspexp.utils.choices import check_value
from cspexp.utils.errors import ConfigError, require
from cspexp.utils.timing import NullStopwatch, Stopwatch


@dataclass
class GeneratedSample:
    """One sample's generation. Lengths: n generated ids, k = number of ``[SEG]`` among them."""

    ids: list[int]  # the generated ids, ending at </s> when it was emitted (at most max_new_tokens)
    text: str | None  # the ids decoded (special tokens kept, as LISA's chat.py); None without a tokenizer
    seg_embeds: torch.Tensor  # [k, C] SAM prompt embeddings, one per [SEG] in order
    logits: torch.Tensor  # [k, H, W] float32 mask logits at the original image size ([0, H, W]: no [SEG])
    masks: torch.Tensor  # [k, H, W] bool (logits > 0)
    hidden: torch.Tensor  # [n_fed + 1, d] final (normed) LLM states: the last prompt token, then each fed generated token
    finished: bool  # </s> was emitted
    fed_tokens: int  # generated tokens run through the LLM (decoding steps of this sample): the cache holds them
    cached_tokens: list[int]  # per layer: real tokens in the KV cache at the end (prompt tokens present + fed tokens)
    cached_tokens_dense: list[int]  # the same without pruning: every prompt token in every layer + fed tokens
    kv_cache_mb: float  # Σ_l cached_tokens[l] · 2 · n_kv_heads · head_dim · bytes, MiB
    kv_cache_dense_mb: float  # the same from cached_tokens_dense

    @property
    def n_seg(self) -> int:
        return int(self.masks.shape[0])

    @property
    def decode_tokens(self) -> int:
        """Tokens produced by decoding steps (the first one comes from the prefill)."""
        return max(len(self.ids) - 1, 0)

    @property
    def mask(self) -> torch.Tensor:
        """The first [SEG]'s mask [H, W], or an empty (all-False) mask when no [SEG] was generated:
        what the evaluation scores (an empty prediction, as LISA's zero masks)."""
        return self.masks[0] if self.n_seg else torch.zeros(self.masks.shape[1:], dtype=torch.bool,
                                                            device=self.masks.device)


@dataclass
class GenerateOutput:
    """A batch's generation (`generate`): per sample a `GeneratedSample`, and what the batch shares."""

    samples: list[GeneratedSample]
    trace: Trace  # the prefill's token trace (per layer, per sample), as `segment`'s
    state: TokenState  # the prefill's final state (normed hidden states of the tokens still present)
    cache: DynamicCache  # the KV cache at the end: per layer the prefill's columns (padding included), then one per step
    prefill_ms: float  # the batch's splice + pruned prefill + first token (lm_head), ms
    decode_ms: float  # the batch's decoding steps, ms
    decode_tokens: int  # Σ over samples of the tokens their decoding steps produced (up to their own </s>)
    image_embeddings: torch.Tensor  # [B, C, h, w] SAM image embeddings

    @property
    def tokens_per_s(self) -> float | None:
        """Decoding throughput of the batch: `decode_tokens` / decode time (None when nothing was decoded)."""
        return self.decode_tokens / (self.decode_ms / 1000.0) if self.decode_tokens and self.decode_ms > 0 else None


class CacheLayout(Observer):
    """Watches the prefill and records, for each layer, what that layer runs — hence caches: which
    columns are padding (a decoded token must not see them) and the RoPE position that continues
    the layer's own numbering (1 + the largest RoPE position of a real token present)."""

    def on_setup(self, state, ctx) -> None:
        self.pad: list[torch.Tensor] = []  # per layer [B, n_l]
        self.next_rope: list[torch.Tensor] = []  # per layer [B]

    def before_layer(self, layer: int, state, ctx) -> None:
        pad = state.kind == PAD
        self.pad.append(pad)
        self.next_rope.append(state.rope_pos.masked_fill(pad, -1).amax(1) + 1)


class KVDecoder:
    """Runs one new token per sample through every decoder layer against that layer's cache (the
    layers' own cache support appends its keys and values). Mask and RoPE positions come from the
    prefill's `CacheLayout`."""

    def __init__(self, decoder, cache: DynamicCache, layout: CacheLayout) -> None:
        self.decoder, self.cache = decoder, cache
        self.caching = {cache_keyword(decoder.layers[0]): cache, "use_cache": True}
        implementation = decoder.config._attn_implementation or "sdpa"
        check_value(implementation, AttentionImplementation, "model.attn_implementation")
        self.eager = implementation == "eager"
        # Keys a new token may see among each layer's cached prefill columns; None: all of them (no
        # padding), so SDPA needs no mask (one query attends to every key, no causal part left).
        self.visible = [None if not bool(pad.any()) else ~pad for pad in layout.pad]
        self.next_rope = layout.next_rope
        # layers whose numbering continues at the same positions share one rotary table per step
        self.same_rope = [l > 0 and torch.equal(layout.next_rope[l], layout.next_rope[l - 1])
                          for l in range(len(layout.next_rope))]
        self.steps = 0  # tokens fed so far

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed `tokens` [B]; returns their final (normed) hidden states [B, d]."""
        h = self.decoder.embed_tokens(tokens[:, None])  # [B, 1, d]
        t = self.steps
        position_embeddings = pos = None
        for l, layer in enumerate(self.decoder.layers):
            if not self.same_rope[l]:
                pos = (self.next_rope[l] + t)[:, None]  # [B, 1]
                position_embeddings = self.decoder.rotary_emb(h, position_ids=pos)
            h = layer(h, attention_mask=self._mask(l, t, h), position_ids=pos,
                      position_embeddings=position_embeddings, **self.caching)
        self.steps += 1
        return self.decoder.norm(h)[:, 0]

    def _mask(self, layer: int, t: int, h: torch.Tensor) -> torch.Tensor | None:
        visible = self.visible[layer]
        if visible is None:
            return None
        # the cached prefill columns (padding hidden), the t tokens fed before, and the token itself
        allowed = torch.cat([visible, visible.new_ones(visible.shape[0], t + 1)], dim=1)[:, None, None, :]
        if not self.eager:
            return allowed
        return torch.zeros(allowed.shape, dtype=h.dtype, device=h.device).masked_fill(~allowed, torch.finfo(h.dtype).min)


def greedy_decode(kv: KVDecoder, lm_head, first_hidden: torch.Tensor, first_tokens: torch.Tensor, max_new_tokens: int,
                  eos_token_id: int | None, feed_last_if: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy decoding (argmax, ties to the lower id, as transformers). `first_hidden` [B, d]: the
    final state of each row's last prompt token; `first_tokens` [B]: the token it emitted (the
    prefill's). Stops when every row has emitted `eos_token_id` or after `max_new_tokens` tokens.
    With `feed_last_if`, a row whose last token is that id is fed once more (its own state is
    needed: ``seg_query=at``).

    Returns (tokens [B, T], lengths [B] — up to and including </s> —, hidden [B, 1 + F, d] — the
    states of the last prompt token and of the F tokens fed —, extra [B] bool — the row's last token
    was fed too)."""
    B = first_hidden.shape[0]
    hidden = [first_hidden]
    tokens = [first_tokens]
    no_eos = torch.zeros(B, dtype=torch.bool, device=first_hidden.device)
    done = no_eos if eos_token_id is None else tokens[0] == eos_token_id
    while len(tokens) < max_new_tokens and not bool(done.all()):
        h = kv.step(tokens[-1])
        hidden.append(h)
        nxt = torch.where(done, tokens[-1], lm_head(h).argmax(-1))  # a finished row repeats its </s>
        done = done | (nxt == eos_token_id if eos_token_id is not None else no_eos)
        tokens.append(nxt)
    out = torch.stack(tokens, dim=1)  # [B, T]
    T = out.shape[1]
    if eos_token_id is None:
        lengths = torch.full((B,), T, dtype=torch.long, device=out.device)
    else:
        is_eos = out == eos_token_id
        lengths = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(is_eos[:, 0], T, dtype=torch.long))
    extra = torch.zeros(B, dtype=torch.bool, device=out.device)
    if feed_last_if is not None:
        extra = (lengths == T) & (out[:, -1] == feed_last_if)
        if bool(extra.any()):
            hidden.append(kv.step(out[:, -1]))
    return out, lengths, torch.stack(hidden, dim=1), extra


def seg_positions(ids: torch.Tensor, seg_token_id: int, seg_query: SegQuery = "before") -> torch.Tensor:
    """Indices k into `ids` [T] (a token sequence) whose token's final state becomes a [SEG]
    embedding, in order. ``before`` (LISA): k such that ids[k + 1] is [SEG] — LISA's
    ``output_ids[:, 1:] == seg_token_idx`` (model/LISA.py L367), the token before each [SEG], whose
    state emitted it; ``at``: k such that ids[k] is [SEG]."""
    check_value(seg_query, SegQuery, "model.seg_query")
    hit = ids[1:] == seg_token_id if seg_query == "before" else ids == seg_token_id
    return hit.nonzero()[:, 0]


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes one token occupies in one layer's KV cache: keys and values, n_kv_heads · head_dim each."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_key_value_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def decode_text(tokenizer, ids: list[int]) -> str:
    """`ids` as text, special tokens kept (LISA's chat.py decodes with ``skip_special_tokens=False``)."""
    return tokenizer.decode(ids, skip_special_tokens=False)


@contextmanager
def _sections(name: str, *watches):
    with ExitStack() as stack:
        for w in watches:
            stack.enter_context(w.section(name))
        yield


class _Both:
    """A stopwatch that times each section on two stopwatches (the caller's and generate's own)."""

    def __init__(self, *watches) -> None:
        self.watches = watches

    def section(self, name: str):
        return _sections(name, *self.watches)


def generate(model: LisaModel, batch: dict, method: PruningMethod, *, max_new_tokens: int,
             eos_token_id: int | None, stopwatch=None, observers: Sequence[Observer] = (),
             features: VisionFeatures | None = None, tokenizer=None) -> GenerateOutput:
    """Generate an answer per sample with `method` pruning the prefill, then one mask per ``[SEG]``.

    Args:
        model: the `LisaModel`.
        batch: a collated batch of generation prompts, ``processor.collate(items, answer=False)``
            (right-padded, no ``[SEG]`` in the prompt; keys as `LisaProcessor.collate`).
        method: a bound pruning method (``spec.bind(num_layers, n_image)``); its ``query`` may not be
            ``seg_token`` (a generation prompt has no ``[SEG]`` to score with).
        max_new_tokens: at most this many tokens per sample (≥ 1).
        eos_token_id: stop a sample at this id (``processor.tokenizer.eos_token_id``, ``</s>``);
            None: always generate `max_new_tokens`.
        stopwatch: optional `Stopwatch`; times ``vision`` (when computed here), ``llm_prefill``
            (splice, pruned prefill filling the cache, the first token), ``decode`` (the decoding
            steps) and ``mask_decoder`` (the [SEG] projections, SAM's mask decoder, the resizes).
        observers: watch the prefill's decoder loop (`cspexp.pruning.engine.Observer`); decoding
            steps are not shown to them.
        features: the batch's vision stage (`VisionFeatures`, e.g. from the feature cache); None:
            computed here, as `segment` does.
        tokenizer: when given, each sample's `text` is its ids decoded (`decode_text`).

    Returns a `GenerateOutput`: per sample (`GeneratedSample`) the generated ids and text, one mask
    (logits and bool, at the original size) per generated ``[SEG]`` (none: [0, H, W] and an empty
    `mask`), the final states, the KV-cache size pruned and dense; for the batch the prefill's
    trace, the cache, prefill and decode times and the decoded-token count (`tokens_per_s`).
    """
    require(isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool) and max_new_tokens >= 1,
            f"generate.max_new_tokens={max_new_tokens!r} must be an int ≥ 1")
    if getattr(method.spec, "query", None) == "seg_token":
        raise ConfigError("prune.query=seg_token needs [SEG] in the prompt, and a generation prompt has none "
                          "(evaluate.mode=generate); use prune.query=seg, last or text_mean")
    if bool((batch["input_ids"] == model.seg_token_id).any()):
        raise ValueError("generate() takes generation prompts, without the [SEG]. answer: "
                         "collate the items with processor.collate(items, answer=False)")
    stopwatch = stopwatch or NullStopwatch()
    device = batch["input_ids"].device
    own = Stopwatch(device)  # the times GenerateOutput reports, whatever the caller's stopwatch holds
    with torch.no_grad():
        if features is None:
            with stopwatch.section("vision"):
                features = encode_vision(model, batch, cls_attention=method.needs_cls_attention,
                                         clip_keys=method.needs_clip_keys, method=method)
        both = _Both(stopwatch, own)
        cache = DynamicCache(config=model.llm.config)
        layout = CacheLayout()
        # run_llm times its splice and loop as llm_prefill; the first token is part of the prefill too
        state, last_hidden = run_llm(model, batch, method, both, [*observers, layout], features=features, cache=cache)
        lm_head = model.llm.lm_head
        with both.section("llm_prefill"):
            # without [SEG] in the prompt, run_llm's query state is the last prompt token's (LisaModel.splice)
            first = lm_head(last_hidden).argmax(-1)
        with both.section("decode"):
            kv = KVDecoder(model.decoder, cache, layout)
            tokens, lengths, hidden, extra = greedy_decode(
                kv, lm_head, last_hidden, first, max_new_tokens, eos_token_id,
                feed_last_if=model.seg_token_id if model.seg_query == "at" else None)
        with stopwatch.section("mask_decoder"):
            samples = _samples(model, batch, features, state, cache, tokens, lengths, hidden, extra, eos_token_id,
                               tokenizer)
    ms = own.collect()
    return GenerateOutput(samples=samples, trace=state.trace, state=state, cache=cache,
                          prefill_ms=ms.get("llm_prefill", 0.0), decode_ms=ms.get("decode", 0.0),
                          decode_tokens=sum(s.decode_tokens for s in samples),
                          image_embeddings=features.sam_embeddings)


def _samples(model, batch, features, state, cache, tokens, lengths, hidden, extra, eos_token_id,
             tokenizer) -> list[GeneratedSample]:
    """Per sample: its ids, the states of its [SEG]s (`seg_positions`), one mask each, cache sizes."""
    config = model.llm.config
    trace = state.trace
    per_token = kv_bytes_per_token(config, cache.layers[0].keys.dtype)
    n_image = model.n_image_tokens
    rows = []
    for i in range(tokens.shape[0]):
        n = int(lengths[i])
        ids = tokens[i, :n]
        fed = n - 1 + int(extra[i])
        # the sequence the fed states belong to: the last prompt token (never [SEG]), then the ids
        seq = torch.cat([ids.new_full((1,), -1), ids])
        where = seg_positions(seq, model.seg_token_id, model.seg_query)
        rows.append((ids, hidden[i, : fed + 1], where, fed))
    # one mask-decoder call for every [SEG] of the batch, each with its own sample's image embedding
    owner = torch.cat([torch.full((len(w),), i, dtype=torch.long) for i, (_, _, w, _) in enumerate(rows)])
    states = torch.cat([h[w] for _, h, w, _ in rows]) if len(owner) else None
    seg_embeds = model.seg_embedding(states) if states is not None else None
    low_res = None
    if seg_embeds is not None:
        low_res = model.decode_masks(features.sam_embeddings[owner.to(features.sam_embeddings.device)], seg_embeds)
    out, at = [], 0
    for i, (ids, h, where, fed) in enumerate(rows):
        H, W = (int(v) for v in batch["original_hw"][i])
        k = len(where)
        logits = torch.stack([model.postprocess_masks(low_res[at + j], batch["resized_hw"][i], batch["original_hw"][i])
                              for j in range(k)]) if k else torch.zeros((0, H, W), device=h.device)
        embeds = seg_embeds[at: at + k] if k else h.new_zeros((0, model.text_hidden_fcs[0][2].out_features))
        at += k
        tokens_cached = [int(c) + fed for c in trace.tokens_per_layer[i].tolist()]
        n_text = int(trace.tokens_per_layer[i, 0] - trace.image_per_layer[i, 0])  # as the dense FLOPs reference
        dense_cached = [n_text + n_image + fed] * len(tokens_cached)
        id_list = ids.tolist()
        out.append(GeneratedSample(
            ids=id_list, text=decode_text(tokenizer, id_list) if tokenizer is not None else None,
            seg_embeds=embeds, logits=logits, masks=logits > 0, hidden=h,
            finished=eos_token_id is not None and id_list[-1] == eos_token_id, fed_tokens=fed,
            cached_tokens=tokens_cached, cached_tokens_dense=dense_cached,
            kv_cache_mb=sum(tokens_cached) * per_token / 2**20, kv_cache_dense_mb=sum(dense_cached) * per_token / 2**20,
        ))
    return out
