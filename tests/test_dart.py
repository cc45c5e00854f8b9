"""prune=dart against independent references: hand-worked selections on six image tokens, a
re-implementation of the authors' selection rule written from their code and fed by transformers'
own LlamaModel, the edges of prune.keep, and bad settings."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from transformers.modeling_utils import AttentionInterface
from transformers.models.llama.modeling_llama import repeat_kv

from cspexp.models.lisa import IMAGE, PAD, SYSTEM, TEXT
from cspexp.pruning.engine import TokenState, Trace
from cspexp.pruning.methods import NoPruning
from cspexp.pruning.methods.base import PruningContext
from cspexp.pruning.methods.dart import Dart
from cspexp.pruning.pipeline import segment
from cspexp.report.pictures import KeptRecorder
from cspexp.utils.errors import ConfigError, CspexpError
from cspexp.utils.instantiate import build

from conftest import CONF_DIR
from helpers import tiny_random_and_items

L, N = 8, 256  # tiny_random: 8 decoder layers, a 16×16 grid of image tokens


# --------------------------------------------------------------------------- (a) hand-worked
def degrees(*angles: float) -> torch.Tensor:
    """Unit vectors in the plane at `angles` (degrees)."""
    a = torch.tensor(angles, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1).float()


# One sample, d = 2: a system token, six image tokens (grid 0..5 at positions 1..6), then text: 7 and 8
# are the prompt (8 produces [SEG]), 9 is [SEG], 10 is </s>.
KIND = [SYSTEM] + [IMAGE] * 6 + [TEXT] * 4
# Layer K−1's input. The stub layer's norm, k projection and RoPE are identities, so these are the keys.
# L1 norms: system 18 (never a pivot), image 1, 1, 4, 2, 2.5, 1.5, text 2, 4, 10, 1.
KEYS = torch.tensor([[9, 9], [1, 0], [0, 1], [3, 1], [1, 1], [0, 2.5], [1, 0.5], [1, 1], [2, 2], [5, 5], [0, 1]])
# Layer K's input (the final norm is the identity here): unit vectors at these angles. Image grid
# 0..5 at 120°, 330°, 0°, 225°, 45°, 100°; the text pivots 8 at 90° and 9 at 270°.
STATES = degrees(0, 120, 330, 0, 225, 45, 100, 270, 90, 270, 45)


def stub_ctx() -> PruningContext:
    layer = SimpleNamespace(input_layernorm=nn.Identity(), self_attn=SimpleNamespace(k_proj=nn.Identity(), head_dim=2))

    def rotary(x, position_ids):  # no rotation
        return torch.ones(*position_ids.shape, 2), torch.zeros(*position_ids.shape, 2)

    return PruningContext(layers=[layer, layer], rotary_emb=rotary, grid_size=(2, 3), final_norm=nn.Identity())


def hand_state() -> TokenState:
    n = len(KIND)
    kind = torch.tensor([KIND])
    grid = torch.tensor([[-1, 0, 1, 2, 3, 4, 5, -1, -1, -1, -1]])
    zeros = torch.zeros(1, 2, dtype=torch.long)
    return TokenState(hidden=KEYS[None].clone(), pos=torch.arange(n)[None], kind=kind, grid=grid,
                      trace=Trace(image_per_layer=zeros.clone(), tokens_per_layer=zeros.clone()),
                      query_pos=torch.tensor([8]), seg_pos=torch.tensor([9]))


def run_by_hand(spec: Dart) -> tuple[list[int], list[dict]]:
    """Layer 0 sees KEYS, layer 1 (K) sees STATES; returns the grid cells kept and the overhead."""
    method, state, ctx = spec.bind(2, 6), hand_state(), stub_ctx()
    method.setup(state, ctx)
    method.before_layer(0, state, ctx)
    state.hidden = STATES[None].clone()  # what "layer 0" output
    method.before_layer(1, state, ctx)
    return sorted(state.grid[state.kind == IMAGE].tolist()), state.trace.overhead


# The authors' loop visits a Python set of the pivots' positions. CPython's order for these small
# ints is their hash slot in an 8-slot table (position mod 8): 8 lands in slot 0, before 3 and 5.
assert list({3, 8}) == [8, 3] and list({3, 9}) == [9, 3] and list({3, 5, 8}) == [8, 3, 5]


@pytest.mark.parametrize(
    ("spec", "kept", "pivots", "why"),
    [
        # pivots: image grid 2 (L1 4), text 8 (L1 4; 9 and 10 are after the [SEG]-producing token).
        # 2 tokens to take, 1 each. Text 8 (90°) first takes the lowest sin: grid 3 (225°, −0.707);
        # then grid 2 (0°) the lowest cos of the rest: grid 0 (120°, −0.5). (Image pivot first would
        # have taken grid 3 and left grid 1 to the text pivot: the order matters.)
        (Dart(keep=0.5, layer=1, pivot_image=1, pivot_text=1), [0, 2, 3], 2, "prompt"),
        # text_span=all: the text pivot is 9 (L1 10, at 270°), visited first: lowest −sin is grid 5
        # (100°, −0.985); grid 2 then takes grid 3 (225°, cos −0.707).
        (Dart(keep=0.5, layer=1, pivot_image=1, pivot_text=1, text_span="all"), [2, 3, 5], 2, "all"),
        # 3 to take with 2 pivots: the first visited (text 8) takes 2 — grid 3 (−0.707), grid 1 (330°,
        # −0.5) — grid 2 takes 1: grid 0 (−0.5; grid 5 has −0.174).
        (Dart(keep=4 / 6, layer=1, pivot_image=1, pivot_text=1), [0, 1, 2, 3], 2, "quota"),
        # keep = pivots: only grid 2
        (Dart(keep=1 / 6, layer=1, pivot_image=1, pivot_text=1), [2], 2, "pivots only"),
        # two image pivots, grid 2 and grid 4 (L1 2.5); order 8, 3, 5, one each: text 8 takes grid 3,
        # grid 2 takes grid 0, grid 4 (45°) takes the lower of cos(285°) = 0.259 (grid 1) and
        # cos(55°) = 0.574 (grid 5): grid 1.
        (Dart(keep=5 / 6, layer=1, pivot_image=2, pivot_text=1), [0, 1, 2, 3, 4], 3, "two image pivots"),
        # no text pivot: grid 2 takes the two lowest cos: grid 3 (−0.707), grid 0 (−0.5)
        (Dart(keep=0.5, layer=1, pivot_image=1, pivot_text=0), [0, 2, 3], 1, "image pivots only"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_hand_worked_selection(spec, kept, pivots, why):
    got, overhead = run_by_hand(spec)
    assert got == kept
    # keys are computed for the image tokens and the candidate text tokens (none without text pivots)
    candidates = 6 + ((4 if spec.text_span == "all" else 2) if spec.pivot_text else 0)
    assert overhead == [
        {"kind": "matmul", "what": "dart: layer K−1 keys of the pivot candidates", "layer": 0, "m": [candidates],
         "n": 2, "k": 2, "widths": {"n": "kv", "k": "hidden"}},
        {"kind": "matmul", "what": "dart: pivot × image-token cosine similarities", "layer": 1, "m": [pivots],
         "n": 6, "k": 2, "widths": {"k": "hidden"}},
    ]


# --------------------------------------------------------------------------- (b) the authors' rule
# Written from the authors' code: github.com/ZichenWen1/DART, llava/model/language_model/
# modeling_llama_self.py (last changed in commit 9fee9fa199d591cf91891ad468ab52c754de9bf5, the same
# at 5a19452fc173017191c247848673e0bde755695a):
# - L337-342: before decoder layer K (layer_idx == K), on the output of layer K−1: the hidden states
#   after the model's final norm (`self.norm`, L341) and layer K−1's key states (`layer_outputs[-2]`,
#   L342; the layer returns the attention's key_states, L993 — after RoPE (L875) and repeat_kv (L881)
#   on the sdpa path, L912);
# - L409: per-pivot count ⌊max_num_trunction / (pivot_image + pivot_text)⌋;
# - L419-428: heads concatenated; L1 norms; the pivot_image image tokens and the pivot_text tokens
#   after the image with the largest norms;
# - L429-443: a set of the pivots' indices; for each pivot in that set's iteration order, the
#   per-pivot count of remaining non-pivot image tokens with the largest −cosine similarity is added
#   and removed from the pool;
# - L445-447: the text pivots are removed: the kept image tokens are the rest;
# - L313: batch size 1 (so each sample is run alone here, without padding).
def authors_kept(last_state: torch.Tensor, keys: torch.Tensor, start: int, n_image: int, budget: int,
                 pivot_image: int, pivot_text: int) -> list[int]:
    """The image indices (relative to `start`) the authors' rule keeps for one sample.

    last_state: [n, d] layer K−1's output after the final norm; keys: [H, n, hd] layer K−1's keys;
    budget: their max_num_trunction."""
    per_pivot = budget // (pivot_image + pivot_text)
    flat = keys.transpose(0, 1).reshape(keys.shape[1], -1)  # [n, H·hd]
    l1 = flat.abs().sum(-1)
    image_l1, text_l1 = l1[start:start + n_image], l1[start + n_image:]
    image_pivots = [start + int(i) for i in image_l1.topk(pivot_image).indices]
    text_pivots = [start + n_image + int(i) for i in text_l1.topk(pivot_text).indices]
    chosen = set(image_pivots + text_pivots)
    pool = set(range(start, start + n_image)) - set(image_pivots)
    for pivot in list(chosen):
        candidates = list(pool)
        sim = F.cosine_similarity(last_state[pivot][None], last_state[candidates], dim=-1)
        picked = [candidates[int(i)] for i in (-sim).topk(per_pivot).indices]
        chosen |= set(picked)
        pool -= set(picked)
    return sorted(i - start for i in chosen - set(text_pivots))


@pytest.fixture(scope="module")
def tiny():
    loaded, items = tiny_random_and_items(3)
    # the random model's norms are all ones; uneven weights make the final norm (and the layers'
    # input norms) change the cosines, so a method that skipped them would fail the comparison
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in loaded.model.decoder.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.copy_(0.2 + 1.6 * torch.rand(module.weight.shape, generator=g))
    return loaded, loaded.processor.collate(items)


def reference(loaded, batch, layer: int, budget: int, pivot_image: int, pivot_text: int,
              text_span: str) -> list[list[int]]:
    """Per sample, the authors' kept grid cells: each sample alone through transformers' LlamaModel
    (its prompt up to the [SEG]-producing token for `prompt` — what a generation prefill holds; its
    whole teacher-forced prompt for `all`), layer K−1's key states captured inside its attention."""
    model = loaded.model
    with torch.no_grad():
        image_tokens, _ = model.encode_image(batch["clip_pixels"])
        prompt = model.splice(batch["input_ids"], batch["attention_mask"], image_tokens)
    captured = {}
    sdpa = AttentionInterface._global_mapping["sdpa"]

    def capture(module, query, key, value, *args, **kwargs):
        if module.layer_idx == layer - 1:
            captured["keys"] = repeat_kv(key, module.num_key_value_groups)
        return sdpa(module, query, key, value, *args, **kwargs)

    kept = []
    for i in range(prompt.embeds.shape[0]):
        is_image = prompt.kind[i] == IMAGE
        start = int(is_image.nonzero()[0])
        end = int(prompt.query_pos[i]) + 1 if text_span == "prompt" else int((prompt.kind[i] != PAD).sum())
        assert (prompt.pos[i, :end] == torch.arange(end)).all()
        with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
            mp.setitem(AttentionInterface._global_mapping, "sdpa", capture)
            out = model.decoder(inputs_embeds=prompt.embeds[i:i + 1, :end], output_hidden_states=True)
            last_state = model.decoder.norm(out.hidden_states[layer])[0]  # hidden_states[K]: layer K−1's output
        cells = authors_kept(last_state.float(), captured.pop("keys")[0].float(), start, N, budget, pivot_image,
                             pivot_text)
        assert [int(g) for g in prompt.grid[i, start:start + N]] == list(range(N))
        kept.append(cells)
    return kept


@pytest.mark.parametrize(
    ("layer", "budget", "pivot_image", "pivot_text", "text_span"),
    [
        (2, 128, 4, 4, "prompt"),  # the authors' defaults: K = 2, 4 + 4 pivots, max_num_trunction 128
        (2, 56, 4, 4, "all"),
        (5, 48, 2, 6, "prompt"),
        (3, 64, 8, 0, "prompt"),  # image pivots only
        (2, 0, 4, 4, "prompt"),  # the smallest keep: only the image pivots
    ],
)
def test_same_kept_sets_as_the_authors_rule(tiny, layer, budget, pivot_image, pivot_text, text_span):
    loaded, batch = tiny
    # cspexp's keep for the authors' budget: their kept count is pivot_image + budget when the pivots
    # divide the budget
    assert budget % (pivot_image + pivot_text) == 0
    count = pivot_image + budget
    spec = Dart(keep=count / N, layer=layer, pivot_image=pivot_image, pivot_text=pivot_text, text_span=text_span)
    rec = KeptRecorder()
    with torch.no_grad():
        out = segment(loaded.model, batch, spec.bind(L, N), observers=[rec])
    expected = reference(loaded, batch, layer, budget, pivot_image, pivot_text, text_span)
    for i in range(3):
        assert rec.kept[layer][i] == expected[i], f"sample {i}"
        assert all(rec.kept[l][i] == list(range(N)) for l in range(layer))
        assert all(rec.kept[l][i] == expected[i] for l in range(layer, L))
    assert len({tuple(cells) for cells in expected}) == 3  # the choice differs per sample
    # FLOPs fall from layer K on; the two products are charged as overhead
    trace = out.trace.image_per_layer
    assert trace[:, :layer].eq(N).all() and trace[:, layer:].eq(count).all()
    assert [e["what"] for e in out.trace.overhead] == ["dart: layer K−1 keys of the pivot candidates",
                                                       "dart: pivot × image-token cosine similarities"]


def test_the_final_norm_decides_which_tokens(tiny, monkeypatch):
    """The comparison above is sensitive to the final norm: without it the authors' rule keeps other tokens."""
    loaded, batch = tiny
    with_norm = reference(loaded, batch, 2, 128, 4, 4, "prompt")
    norm = loaded.model.decoder.norm
    monkeypatch.setattr(type(norm), "forward", lambda self, h: h)
    without = reference(loaded, batch, 2, 128, 4, 4, "prompt")
    assert with_norm != without


# --------------------------------------------------------------------------- (c) prune.keep's edges
def test_keep_one_is_the_dense_pass(tiny):
    loaded, batch = tiny
    with torch.no_grad():
        dense = segment(loaded.model, batch, NoPruning().bind(L, N))
        out = segment(loaded.model, batch, Dart(keep=1.0).bind(L, N))
    assert out.trace.image_per_layer.eq(N).all() and out.trace.overhead == []
    assert torch.allclose(out.seg_embeds, dense.seg_embeds, atol=1e-6)


def test_the_smallest_keep_keeps_the_pivots_and_below_it_binding_fails():
    assert Dart(keep=4 / N).bind(L, N).count == 4  # ⌈0.015625·256⌉ = 4 = pivot_image
    assert Dart(keep=0.01, pivot_image=2).bind(L, N).count == 3
    spec = build(OmegaConf.merge(OmegaConf.load(CONF_DIR / "prune" / "dart.yaml"), {"keep": 0.01}))
    with pytest.raises(ConfigError) as err:
        spec.bind(L, N)  # a bind-time error: the spec itself is fine
    message = str(err.value)
    assert message == ("prune.keep=0.01 keeps 3 of 256 image tokens, fewer than prune.pivot_image=4, which DART "
                       "always keeps; use prune.keep ≥ 0.015625 or fewer image pivots")


# --------------------------------------------------------------------------- (d) bad settings
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layer": 0}, "prune.layer=0 (layer 0) must be in 1..7: DART ranks its pivots with layer K−1's keys"),
        ({"layer": L}, f"prune.layer={L} (layer {L}) must be in 1..7"),
        ({"layer": 1.0}, "prune.layer=1.0 (layer 8) must be in 1..7"),
        ({"layer": 12}, "prune.layer=12 is outside the model's layers 0..8"),
        ({"layer": 1.5}, "prune.layer=1.5 is a fraction of depth"),
        ({"pivot_image": 100}, "prune.keep=0.222 keeps 57 of 256 image tokens, fewer than prune.pivot_image=100"),
        ({"keep": 0.1, "pivot_image": 27}, "keeps 26 of 256 image tokens, fewer than prune.pivot_image=27"),
        ({"pivot_image": 0, "pivot_text": 0}, "prune.pivot_image=0 and prune.pivot_text=0 leave no pivot"),
        ({"pivot_image": -1}, "prune.pivot_image=-1"),
        ({"pivot_text": 2.5}, "prune.pivot_text=2.5"),
        ({"text_span": "answer"}, "prune.text_span='answer' is not allowed; use one of ['prompt', 'all']"),
        ({"keep": 0}, "prune.keep=0"),
        ({"keep": 1.5}, "prune.keep=1.5"),
    ],
)
def test_bad_settings_are_one_config_error(kwargs, message):
    with pytest.raises(CspexpError) as err:
        Dart(**kwargs).bind(L, N)
    assert isinstance(err.value, ConfigError)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_describe_lists_every_setting():
    assert Dart().describe() == {"name": "dart", "keep": 0.222, "layer": 2, "pivot_image": 4, "pivot_text": 4,
                                 "text_span": "prompt"}
