"""prune=divprune against independent references: hand-worked max–min picks on a few 2-D tokens, the
authors' selection loop re-implemented here from their code on the projected image tokens, and
transformers' `LlamaModel` run on the shortened prompt the authors' LLM sees (`positions=renumber`)."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from cspexp.flops.analytic import LlmDims, sample_flops
from cspexp.models.lisa import PAD
from cspexp.pruning.methods import NoPruning, PruningContext
from cspexp.pruning.methods.divprune import DivPrune
from cspexp.pruning.pipeline import run_llm, segment
from cspexp.report.pictures import KeptRecorder
from cspexp.utils.errors import ConfigError
from cspexp.utils.instantiate import build

from conftest import CONF_DIR
from helpers import tiny_random_and_items
from test_fastervlm import compact_reference, hand_state, image_cells

L, N = 8, 256  # tiny_random: 8 decoder layers, a 16×16 grid of image tokens


@pytest.fixture(scope="module")
def tiny():
    loaded, items = tiny_random_and_items(3)
    return loaded, loaded.processor.collate(items)


def no_ctx() -> PruningContext:
    return PruningContext(layers=None, rotary_emb=None, grid_size=(1, 5))


def at(degrees: float, length: float = 1.0) -> list[float]:
    return [length * math.cos(math.radians(degrees)), length * math.sin(math.radians(degrees))]


# --------------------------------------------------------------------------- (a) hand-worked
def test_hand_worked_max_min_picks_under_cosine_distance():
    # five 2-D tokens at 0°, 10°, 90°, 180°, 105°; lengths differ: cosine distance 1 − cos Δθ ignores them
    image = torch.tensor([[at(0), at(10, 5.0), at(90, 0.3), at(180, 2.0), at(105)]])
    # By hand. Nearest-other distance of each: 0 → 1 − cos 10° = 0.015, 1 → 0.015, 2 → 1 − cos 15° = 0.034,
    # 3 → 1 − cos 75° = 0.741, 4 → 0.034: the first pick is 3 (the most isolated token).
    # Distance to {3}: 0 → 2, 1 → 1 − cos 170° = 1.985, 2 → 1, 4 → 0.741: pick 0.
    # Distance to {3, 0}: 1 → min(1.985, 0.015), 2 → min(1, 1) = 1, 4 → min(0.741, 1.259): pick 2.
    # Distance to {3, 0, 2}: 1 → 0.015, 4 → min(0.741, 1.259, 0.034) = 0.034: pick 4; then 1.
    # (Euclidean farthest-point would start from the long token 1 instead.)
    order = [3, 0, 2, 4, 1]
    for count in range(1, 6):
        state = hand_state(image)
        before = state.hidden.clone()
        DivPrune(keep=count / 5).bind(1, 5).setup(state, no_ctx())
        assert image_cells(state) == [sorted(order[:count])], count
        want = [0] + [1 + c for c in sorted(order[:count])] + [6, 7]
        assert state.pos[0].tolist() == want and torch.equal(state.hidden[0], before[0, want])
        assert torch.equal(state.rope_pos, state.pos)
        # one [5, 2] × [2, 5] similarity product per sample, unless nothing is dropped
        assert state.trace.overhead == ([] if count == 5 else
                                        [{"kind": "matmul", "what": "divprune cosine similarities", "m": 5, "n": 5,
                                          "k": 2, "widths": {"k": "hidden"}}])


def test_ties_go_to_the_lowest_index_as_torch_argmax():
    # the four axis directions: every nearest-other distance is exactly 1, so the first pick is token 0;
    # distance to {0}: 1, 2, 1 → token 2; to {0, 2}: 1, 1 → token 1 (the earlier); then 3
    image = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]])
    for count, cells in [(1, [0]), (2, [0, 2]), (3, [0, 1, 2])]:
        state = hand_state(image)
        DivPrune(keep=count / 4).bind(1, 4).setup(state, no_ctx())
        assert image_cells(state) == [cells]


def test_each_sample_gets_its_own_subset_and_renumber_compacts_positions():
    image = torch.tensor([[at(0), at(10, 5.0), at(90, 0.3), at(180, 2.0), at(105)],
                          [at(0), at(170), at(90), at(85), at(5)]])
    # sample 1 by hand: nearest-other 0 → 1 − cos 5°, 1 → 1 − cos 80° (to 2) = 0.826 (the first pick), 2 → 1 − cos 5°,
    # 3 → 1 − cos 5°, 4 → 1 − cos 5°; distance to {1}: 0 → 1.985, 4 → 1 − cos 165° = 1.966: pick 0
    state = hand_state(image)
    DivPrune(keep=0.4, positions="renumber").bind(1, 5).setup(state, no_ctx())
    assert image_cells(state) == [[0, 3], [0, 1]]
    assert state.rope_pos.tolist() == [[0, 1, 2, 3, 4]] * 2 and state.pos[0].tolist() == [0, 1, 4, 6, 7]


# --------------------------------------------------------------------------- (b) the authors' rule
def reference_divprune(visual_feature_vectors: torch.Tensor, threshold_terms: int) -> list[int]:
    """DivPrune's selection, re-implemented from github.com/vbdi/divprune (commit 799e2d9),
    LLaVA/llava/model/llava_arch.py:
    - L147-150 pairwise_cosine_similarity: rows divided by their norm, mm with the transpose;
    - L155: cosine_matrix = 1 − similarity;
    - L158-170: for i = 0 the scores are topk(2 smallest, dim=0).values[1] (each column's second
      smallest); for i > 0 the column minimum over the rows already selected; s[i] = argmax(scores);
    - L377-379: the selected indices sorted into sequence order.
    (L153, threshold_terms = int(round(ratio·N)), is applied by the caller.) Returns the kept indices."""
    norm_matrix = visual_feature_vectors / visual_feature_vectors.norm(dim=1, keepdim=True)
    cosine_matrix = 1.0 - torch.mm(norm_matrix, norm_matrix.t())
    s = torch.empty(threshold_terms, dtype=torch.long)
    for i in range(threshold_terms):
        if i == 0:
            m2 = cosine_matrix
        else:
            m2 = torch.index_select(cosine_matrix, 0, torch.index_select(s, 0, torch.arange(0, i)))
        if i == 0:
            scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(m2, dim=0).values
        s[i] = torch.argmax(scores)
    assert len(set(s.tolist())) == threshold_terms  # no token picked twice on real features
    return s.sort().values.tolist()


def projected_tokens(loaded, batch) -> torch.Tensor:
    """The image tokens the LLM receives (the authors' `new_input_embeds` image span), [B, N, d]."""
    with torch.no_grad():
        return loaded.model.encode_image(batch["clip_pixels"])[0].float()


@pytest.mark.parametrize(
    ("kwargs", "count"),
    [
        ({"keep": 0.25}, 64),  # ⌈64⌉
        ({"keep": 0.1}, 26),  # ⌈25.6⌉
        ({"keep": 0.098, "count": "round"}, 25),  # the authors' SUBSET_RATIO: int(round(25.088))
        ({"keep": 0.1, "count": "round"}, 26),  # int(round(25.6))
        ({"keep": 0.5}, 128),
    ],
)
def test_keeps_what_the_authors_code_keeps(tiny, kwargs, count):
    loaded, batch = tiny
    tokens = projected_tokens(loaded, batch)
    if kwargs.get("count") == "round":
        assert int(round(kwargs["keep"] * N)) == count  # L153
    expected = [reference_divprune(tokens[b], count) for b in range(3)]
    rec = KeptRecorder()
    with torch.no_grad():
        out = segment(loaded.model, batch, DivPrune(**kwargs).bind(L, N), observers=[rec])
    for layer in range(L):  # dropped before layer 0, never restored
        assert rec.kept[layer] == expected, layer
    assert len({tuple(cells) for cells in expected}) == 3  # the choice is per sample
    assert out.trace.image_per_layer.tolist() == [[count] * L] * 3
    # the overhead is the N × N similarity matrix: N·N·d MACs per sample, 2·N·N·d FLOPs
    d = tokens.shape[-1]
    dims = LlmDims.from_config(loaded.model.llm.config)
    for i in range(3):
        f = sample_flops(out.trace.tokens_per_layer[i].tolist(), out.trace.image_per_layer[i].tolist(), N, dims,
                         out.trace.sample_overhead(i))
        assert f["overhead"] == 2 * N * N * d


def test_renumber_runs_the_authors_shortened_prompt(tiny):
    loaded, batch = tiny
    rec = KeptRecorder()
    with torch.no_grad():
        state, _ = run_llm(loaded.model, batch, DivPrune(keep=0.098, count="round", positions="renumber").bind(L, N),
                           observers=[rec])
    reference = compact_reference(loaded, batch, rec.kept[0])
    real = state.kind != PAD
    assert state.hidden.shape == reference.shape
    assert (state.hidden - reference).abs()[real].max() <= 1e-5


# --------------------------------------------------------------------------- (c) keep at its edges
def test_keep_one_is_the_dense_pass_and_costs_nothing(tiny):
    loaded, batch = tiny
    with torch.no_grad():
        dense = segment(loaded.model, batch, NoPruning().bind(L, N))
        for count in ("ceil", "round"):
            out = segment(loaded.model, batch, DivPrune(keep=1.0, count=count).bind(L, N))
            assert out.trace.image_per_layer.eq(N).all() and out.trace.overhead == []
            assert torch.allclose(out.seg_embeds, dense.seg_embeds, atol=1e-6)


def test_the_smallest_keep_keeps_the_most_isolated_token_and_below_is_refused(tiny):
    loaded, batch = tiny
    tokens = projected_tokens(loaded, batch)
    first = [reference_divprune(tokens[b], 1) for b in range(3)]  # the authors' first pick
    # ceil: any keep > 0 keeps 1; round: keep·N must exceed 0.5 (round(0.512) = 1)
    for kwargs in ({"keep": 1e-9}, {"keep": 1 / 256}, {"keep": 0.002, "count": "round"}):
        method = DivPrune(**kwargs).bind(L, N)
        assert method.count == 1
        rec = KeptRecorder()
        with torch.no_grad():
            run_llm(loaded.model, batch, method, observers=[rec])
        assert rec.kept[0] == rec.kept[L - 1] == first, kwargs
    # below, with round: 0.5 tokens round (half to even, as Python's round) to 0 — refused at bind time
    with pytest.raises(ConfigError) as err:
        DivPrune(keep=0.5 / 256, count="round").bind(L, N)
    assert str(err.value) == ("prune.keep=0.001953125 with prune.count=round keeps round(0.001953125·256) = 0 image "
                              "tokens: use prune.keep > 0.001953125 or prune.count=ceil")
    # below, with ceil: only keep ≤ 0, refused when the spec is built
    for keep in (0, -0.1):
        with pytest.raises(ConfigError) as err:
            DivPrune(keep=keep)
        assert str(err.value) == f"prune.keep={keep!r} is outside (0, 1]"


# --------------------------------------------------------------------------- (d) bad settings
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep": 1.5}, "prune.keep=1.5 is outside (0, 1]"),
        ({"keep": "all"}, "prune.keep='all' is not allowed; it must be a number"),
        ({"count": "floor"}, "prune.count='floor' is not allowed; use one of ['ceil', 'round']"),
        ({"positions": "compact"}, "prune.positions='compact' is not allowed; use one of ['keep', 'renumber']"),
        ({"keep": 0.001, "count": "round"}, "prune.keep=0.001 with prune.count=round keeps round(0.001·256) = 0"),
    ],
)
def test_bad_values_are_one_config_error(kwargs, message):
    with pytest.raises(ConfigError) as err:
        DivPrune(**kwargs).bind(L, N)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_the_config_builds_the_default():
    spec = build(OmegaConf.load(CONF_DIR / "prune" / "divprune.yaml"))
    assert spec == DivPrune()
    assert spec.describe() == {"name": "divprune", "keep": 0.25, "count": "ceil", "positions": "keep"}
    method = spec.bind(L, N)
    assert not method.needs_cls_attention and method.count == 64
