"""The decoder loop against transformers' own `LlamaModel.forward` (the independent reference)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaModel

from cspexp.models.factory import llm_config
from cspexp.models.lisa import IMAGE, PAD, SYSTEM, TEXT, PromptEmbeds
from cspexp.pruning.engine import DecoderLoop, Observer, TokenState, attention_mask
from cspexp.pruning.methods import NoPruning, PruningContext

N_LAYERS = 8
N_IMAGE = 16


def tiny_llama(attn: str) -> LlamaModel:
    torch.manual_seed(0)
    cfg = llm_config(
        {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": N_LAYERS, "num_attention_heads": 4,
         "num_key_value_heads": 2},
        vocab_size=50, pad_token_id=0, attn_implementation=attn,
    )
    return LlamaModel(cfg).eval()


def prompt_batch(lengths: list[int], d: int = 64, n_sys: int = 5, n_image: int = N_IMAGE) -> tuple[PromptEmbeds, torch.Tensor]:
    """Random embeddings laid out like LISA's: system, image block, text; right padding."""
    torch.manual_seed(1)
    B, n = len(lengths), max(lengths)
    embeds = torch.randn(B, n, d)
    attn = torch.zeros(B, n, dtype=torch.long)
    kind = torch.full((B, n), TEXT)
    grid = torch.full((B, n), -1)
    for b, length in enumerate(lengths):
        attn[b, :length] = 1
        kind[b, :n_sys] = SYSTEM
        kind[b, n_sys : n_sys + n_image] = IMAGE
        grid[b, n_sys : n_sys + n_image] = torch.arange(n_image)
        kind[b, length:] = PAD
    pos = torch.arange(n).expand(B, n).clone()
    query = torch.tensor(lengths) - 3
    return PromptEmbeds(embeds=embeds, pos=pos, kind=kind, grid=grid, query_pos=query, seg_pos=query + 1), attn


def ctx_for(model: LlamaModel) -> PruningContext:
    return PruningContext(layers=model.layers, rotary_emb=model.rotary_emb, grid_size=(4, 4))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("lengths", [[40], [40, 33, 37]], ids=["batch1", "padded_batch3"])
def test_loop_equals_llama_forward(attn, lengths):
    model = tiny_llama(attn)
    prompt, attn_mask = prompt_batch(lengths)
    with torch.no_grad():
        reference = model(inputs_embeds=prompt.embeds, attention_mask=attn_mask).last_hidden_state
        state = TokenState.from_prompt(prompt, N_LAYERS)
        out = DecoderLoop(model).run(state, NoPruning().bind(N_LAYERS, N_IMAGE), ctx_for(model)).hidden
    valid = attn_mask.bool()
    assert out.shape == reference.shape
    diff = (out - reference).abs()[valid].max().item()
    assert diff <= 1e-5, diff


def test_trace_counts_every_layer():
    model = tiny_llama("sdpa")
    prompt, _ = prompt_batch([40, 33, 37])
    with torch.no_grad():
        dense = NoPruning().bind(N_LAYERS, N_IMAGE)
        state = DecoderLoop(model).run(TokenState.from_prompt(prompt, N_LAYERS), dense, ctx_for(model))
    assert state.trace.image_per_layer.tolist() == [[N_IMAGE] * N_LAYERS] * 3
    assert state.trace.tokens_per_layer.tolist() == [[40] * N_LAYERS, [33] * N_LAYERS, [37] * N_LAYERS]


def test_mask_is_positional_and_masks_padding():
    prompt, _ = prompt_batch([6, 4], n_sys=1, n_image=2)
    state = TokenState.from_prompt(prompt, 1)
    # Pretend tokens at positions 2 and 3 were dropped: the mask must follow positions, not columns.
    state.keep_columns(torch.tensor([[0, 1, 4, 5], [0, 1, 4, 5]]))
    allowed = attention_mask(state, "sdpa")[:, 0]
    expected_row0 = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(allowed[0], expected_row0)
    # Sample 1 has length 4: columns 2 and 3 (positions 4, 5) are padding; they only see themselves
    # as keys, and no real query sees them.
    assert not allowed[1, :2, 2:].any()
    assert allowed[1, 2, 2] and allowed[1, 3, 3]
    eager = attention_mask(state, "eager")[:, 0]
    assert torch.equal(eager == 0, allowed)


def test_drop_and_insert_restore_position_order():
    prompt, _ = prompt_batch([30, 30])
    state = TokenState.from_prompt(prompt, 1)
    before = state.hidden.clone()
    keep = torch.zeros(2, N_IMAGE, dtype=torch.bool)
    keep[0, ::2] = True
    keep[1, 1::2] = True
    dropped = state.drop_image(keep)
    assert state.n_image == N_IMAGE // 2 and dropped.hidden.shape[1] == N_IMAGE // 2
    assert torch.all(state.pos[:, 1:] > state.pos[:, :-1])  # still sorted by original position
    state.insert(dropped)
    assert torch.equal(state.pos, prompt.pos) and torch.equal(state.hidden, before)


# --------------------------------------------------------------------------- observers
class DropOddAtLayer3:
    """A method written here: before layer 3 keep the even grid cells (16 → 8 image tokens)."""

    needs_cls_attention = False

    def setup(self, state, ctx):
        pass

    def before_layer(self, layer, state, ctx):
        if layer == 3:
            keep = torch.zeros(state.batch_size, state.n_image, dtype=torch.bool)
            keep[:, ::2] = True
            state.drop_image(keep)


class Counter(Observer):
    """Counts the tokens it sees before every layer, from the token kinds."""

    def on_setup(self, state, ctx):
        self.setups = getattr(self, "setups", 0) + 1
        self.layers, self.image, self.tokens = [], [], []

    def before_layer(self, layer, state, ctx):
        self.layers.append(layer)
        self.image.append((state.kind == IMAGE).sum(1).tolist())
        self.tokens.append((state.kind != PAD).sum(1).tolist())

    def after_run(self, state):
        self.final = state.hidden.clone()


class Meddler(Observer):
    """Tries every way of changing the state an observer might reach for."""

    def before_layer(self, layer, state, ctx):
        self.refused = []
        for attempt in (lambda: state.drop_image(torch.zeros(state.batch_size, state.n_image, dtype=torch.bool)),
                        lambda: state.insert(None), lambda: state.keep_columns(None),
                        lambda: setattr(state, "hidden", state.hidden * 0), lambda: setattr(state, "changed", True),
                        lambda: state.extras.__setitem__("x", 1)):
            try:
                attempt()
            except (AttributeError, TypeError):
                self.refused.append(True)


def test_observers_see_the_traced_counts_and_cannot_change_the_run():
    """Before each layer an observer sees the tokens that layer runs on (the trace's counts, here
    worked out by hand: 16 image tokens, 8 from layer 3); with observers the final states are
    bit-identical to a run without, also when an observer tries to edit the state."""
    model = tiny_llama("sdpa")
    prompt, _ = prompt_batch([40, 33, 37])
    counter, meddler = Counter(), Meddler()
    with torch.no_grad():
        plain = DecoderLoop(model).run(TokenState.from_prompt(prompt, N_LAYERS), DropOddAtLayer3(), ctx_for(model))
        watched = DecoderLoop(model).run(TokenState.from_prompt(prompt, N_LAYERS), DropOddAtLayer3(), ctx_for(model),
                                         observers=[meddler, counter])
    expected_image = [[N_IMAGE] * 3] * 3 + [[N_IMAGE // 2] * 3] * 5
    assert counter.setups == 1 and counter.layers == list(range(N_LAYERS))
    assert counter.image == expected_image
    assert counter.tokens == [[40, 33, 37]] * 3 + [[40 - 8, 33 - 8, 37 - 8]] * 5
    assert watched.trace.image_per_layer.T.tolist() == counter.image
    assert watched.trace.tokens_per_layer.T.tolist() == counter.tokens
    assert meddler.refused == [True] * 6
    assert torch.equal(watched.hidden, plain.hidden) and torch.equal(counter.final, plain.hidden)
    assert torch.equal(watched.pos, plain.pos) and torch.equal(watched.kind, plain.kind)
