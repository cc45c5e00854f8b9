"""Pruning methods against independent references: the dense model, a masked full-length run built
here from transformers' layers, eager attention matrices, and hand-worked schedule arithmetic."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaModel

from cspexp.models.factory import llm_config
from cspexp.models.lisa import IMAGE, PAD
from cspexp.pruning.engine import Observer, TokenState
from cspexp.pruning.methods import (
    ClusterScatterPrune,
    FastV,
    NoPruning,
    PruningMethod,
    PruningSpec,
    PyramidDrop,
    RandomDrop,
    ToMe,
    UniformDrop,
    VisualTokenWithdrawal,
)
from cspexp.pruning.pipeline import run_llm, segment
from cspexp.pruning.scoring import query_attention
from cspexp.pruning.selection import instance_quotas, seg_first_select, uniform_grid
from cspexp.utils.errors import ConfigError, CspexpError
from cspexp.utils.instantiate import build

from conftest import CONF_DIR
from helpers import tiny_random_and_items
from test_engine import prompt_batch

L, N = 8, 256


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_and_items(3)


def ready(spec):
    return spec.bind(L, N)


def csp(**kw):
    cluster = kw.pop("cluster", {})
    scatter = kw.pop("scatter", {})
    return ClusterScatterPrune(cluster=cluster, scatter=scatter, **kw)


class Recorder(Observer):
    """Records the original positions present before every layer."""

    def __init__(self):
        self.positions = []

    def before_layer(self, layer, state, ctx):
        self.positions.append(state.pos.clone())


# --------------------------------------------------------------------------- (a) no-op == none
@pytest.mark.parametrize(
    "method",
    [
        lambda: FastV(keep=1.0),
        lambda: PyramidDrop(keep=1.0),
        lambda: csp(keep=1.0, cluster={"ratio": 1.0}),
        lambda: VisualTokenWithdrawal(layer=L),
        lambda: RandomDrop(keep=1.0),
        lambda: UniformDrop(keep=1.0),
        lambda: ToMe(keep=1.0),
    ],
    ids=["fastv", "pdrop", "csp", "vtw", "random", "uniform", "tome"],
)
def test_methods_that_remove_nothing_equal_none(tiny, method):
    loaded, items = tiny
    batch = loaded.processor.collate(items)
    with torch.no_grad():
        dense = segment(loaded.model, batch, ready(NoPruning()))
        out = segment(loaded.model, batch, ready(method()))
    assert torch.allclose(out.seg_embeds, dense.seg_embeds, atol=1e-5)
    for a, b in zip(out.masks, dense.masks):
        assert torch.equal(a, b)
    assert out.trace.image_per_layer.tolist() == [[N] * L] * 3


# --------------------------------------------------------------------------- (b) drop == mask
def masked_reference(model, batch, positions):
    """The full-length sequence through transformers' layers, where at layer l only the keys at
    `positions[l]` may be attended (nothing is removed). Returns final hidden [B, n, d] and pos."""
    image_tokens, _ = model.encode_image(batch["clip_pixels"])
    prompt = model.splice(batch["input_ids"], batch["attention_mask"], image_tokens)
    llama = model.decoder
    h, pos, pad = prompt.embeds, prompt.pos, prompt.kind == PAD
    cos_sin = llama.rotary_emb(h, position_ids=pos)
    eye = torch.eye(pos.shape[1], dtype=torch.bool)
    for layer, present in zip(llama.layers, positions):
        key_ok = torch.stack([torch.isin(pos[b], present[b]) for b in range(pos.shape[0])]) & ~pad
        allowed = ((pos[:, None, :] <= pos[:, :, None]) & key_ok[:, None, :]) | eye
        h = layer(h, attention_mask=allowed[:, None], position_ids=pos, position_embeddings=cos_sin)
    return llama.norm(h), pos


@pytest.mark.parametrize(
    "method",
    [
        lambda: FastV(keep=0.3),
        lambda: FastV(keep=0.2, layer=5, query="text_mean"),
        lambda: PyramidDrop(keep=0.5),
        lambda: csp(keep=0.3, cluster={"ratio": 1.0}),
        lambda: VisualTokenWithdrawal(layer=3),
        lambda: RandomDrop(keep=0.4, layer=1),
    ],
    ids=["fastv", "fastv_text_mean", "pdrop", "csp_pruning_stage", "vtw", "random"],
)
def test_physical_drop_equals_masking(tiny, method):
    loaded, items = tiny
    batch = loaded.processor.collate(items)
    rec = Recorder()
    with torch.no_grad():
        state, _ = run_llm(loaded.model, batch, ready(method()), observers=[rec])
        ref_h, ref_pos = masked_reference(loaded.model, batch, rec.positions)
    assert state.n_image < N  # something was dropped
    for b in range(3):
        keep = state.kind[b] != PAD
        cols = torch.stack([(ref_pos[b] == p).nonzero()[0, 0] for p in state.pos[b][keep]])
        assert torch.allclose(state.hidden[b][keep], ref_h[b, cols], atol=1e-5)


# --------------------------------------------------------------------------- (c) scoring row
@pytest.mark.parametrize(("query", "head"), [("seg", None), ("seg_token", None), ("last", None), ("text_mean", None),
                                             ("seg", 1), ("text_mean", 3)])
def test_scoring_row_equals_eager_attention_matrix(query, head):
    torch.manual_seed(0)
    cfg = llm_config({"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 4, "num_attention_heads": 4,
                      "num_key_value_heads": 2}, vocab_size=50, pad_token_id=0, attn_implementation="eager")
    model = LlamaModel(cfg).eval()
    prompt, attn_mask = prompt_batch([40, 33, 37])
    layer_idx = 2
    with torch.no_grad():
        out = model(inputs_embeds=prompt.embeds, attention_mask=attn_mask, output_hidden_states=True,
                    output_attentions=True)
        state = TokenState.from_prompt(prompt, 4)
        state.hidden = out.hidden_states[layer_idx]  # the input of layer 2
        scores = query_attention(model.layers[layer_idx], model.rotary_emb, state, query, head=head)
    # [B, n, n]: heads averaged, or the one head asked for (training supervises one head)
    full = out.attentions[layer_idx].mean(1) if head is None else out.attentions[layer_idx][:, head]
    from cspexp.pruning.scoring import query_mask

    rows = query_mask(state, query)
    img = state.kind == IMAGE
    for b in range(3):
        expected = full[b][rows[b]].mean(0)[img[b]]
        assert torch.allclose(scores[b], expected, atol=1e-6)


# --------------------------------------------------------------------------- (d) schedule counts
@pytest.mark.parametrize(
    ("method", "expected"),
    [
        (lambda: csp(), [64, 64, 256, 256] + [26] * 4),  # ⌈0.1·256⌉ = 26
        (lambda: csp(keep=0.3), [64, 64, 256, 256] + [77] * 4),  # ⌈76.8⌉ = 77
        (lambda: csp(keep=0.3, cluster={"span": [0, 3], "ratio": 0.5}, scatter={"span": [3, 5]}),
         [128] * 3 + [256] * 2 + [77] * 3),
        (lambda: FastV(keep=0.5, layer=3), [256] * 3 + [128] * 5),
        (lambda: PyramidDrop(keep=0.5), [256, 256, 128, 128, 64, 64, 32, 32]),
        (lambda: PyramidDrop(keep=0.3, layers=[1, 0.5]), [256, 77, 77, 77, 24, 24, 24, 24]),
        (lambda: VisualTokenWithdrawal(layer=0), [0] * 8),
        (lambda: VisualTokenWithdrawal(layer=4), [256] * 4 + [0] * 4),
        (lambda: RandomDrop(keep=0.3, layer=1), [256] + [77] * 7),
        (lambda: UniformDrop(keep=0.25, layer=2), [256, 256] + [64] * 6),
    ],
    ids=["csp_default", "csp_keep03", "csp_absolute", "fastv", "pdrop", "pdrop_mixed", "vtw0", "vtw4", "random",
         "uniform"],
)
def test_per_layer_counts_follow_the_schedule(tiny, method, expected):
    loaded, items = tiny
    batch = loaded.processor.collate(items)
    with torch.no_grad():
        state, _ = run_llm(loaded.model, batch, ready(method()))
    assert state.trace.image_per_layer.tolist() == [expected] * 3
    text = (state.kind[:, :] != PAD).sum(1) - state.n_image  # non-image tokens never change
    assert (state.trace.tokens_per_layer - state.trace.image_per_layer).tolist() == [[int(t)] * L for t in text]


# --------------------------------------------------------------------------- (e) batch == singles
@pytest.mark.parametrize(
    "method",
    [
        lambda: csp(keep=0.3, cluster={"select": "random", "assign": "feature"}, scatter={"mode": "residual"}),
        lambda: csp(keep=0.2, cluster={"select": "cls_attn"}, scatter={"mode": "copy"}, query="text_mean"),
        lambda: csp(keep=0.2, cluster={"select": "seg_first"}, scatter={"mode": "reset"}),
        lambda: FastV(keep=0.3),
        lambda: RandomDrop(keep=0.3),
    ],
    ids=["csp_random_feature", "csp_cls_copy", "csp_segfirst_reset", "fastv", "random"],
)
def test_batch_of_three_equals_three_single_runs(tiny, method):
    loaded, items = tiny
    with torch.no_grad():
        batched = segment(loaded.model, loaded.processor.collate(items), ready(method()))
        singles = [segment(loaded.model, loaded.processor.collate([it]), ready(method())) for it in items]
    for b, single in enumerate(singles):
        assert torch.allclose(batched.seg_embeds[b], single.seg_embeds[0], atol=1e-5)
        assert torch.allclose(batched.logits[b], single.logits[0], atol=1e-4)
        assert batched.trace.image_per_layer[b].tolist() == single.trace.image_per_layer[0].tolist()


# --------------------------------------------------------------------------- (f) seeds
def kept_positions(loaded, items, method):
    rec = Recorder()
    with torch.no_grad():
        run_llm(loaded.model, loaded.processor.collate(items), ready(method), observers=[rec])
    return rec.positions[-1]


def test_random_selection_is_reproducible_by_seed(tiny):
    loaded, items = tiny
    a = kept_positions(loaded, items, RandomDrop(keep=0.3, seed=0))
    b = kept_positions(loaded, items, RandomDrop(keep=0.3, seed=0))
    c = kept_positions(loaded, items, RandomDrop(keep=0.3, seed=1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # samples differ from each other (per-sample seeds)
    x = kept_positions(loaded, items, csp(keep=1.0, cluster={"select": "random", "seed": 3}, scatter={"span": [0.25, 1.0]}))
    y = kept_positions(loaded, items, csp(keep=1.0, cluster={"select": "random", "seed": 3}, scatter={"span": [0.25, 1.0]}))
    assert torch.equal(x, y)


# --------------------------------------------------------------------------- (g) seg_first quotas
def test_seg_first_quotas_on_hand_made_instances():
    ids = np.full((8, 8), -1)
    ids[0:4, :] = 0  # A: 32 tokens
    ids[4:6, 0:8] = 1  # B: 16 tokens
    ids[6, 0:4] = 2  # C: 4 tokens
    # exact shares of 16: 9.85, 4.92, 1.23 → floors 9, 4, 1 (sum 14) → +1 to B (.92) and A (.85)
    assert instance_quotas(np.array([32, 16, 4]), 16).tolist() == [10, 5, 1]
    chosen = seg_first_select(ids.reshape(-1), 16, 8, 8)
    assert len(chosen) == 16 and torch.equal(chosen, torch.sort(chosen).values)
    flat = ids.reshape(-1)
    assert [int((flat[chosen.numpy()] == k).sum()) for k in (0, 1, 2)] == [10, 5, 1]
    # every instance keeps ≥ 1 even when tiny; more instances than budget: the largest win
    assert instance_quotas(np.array([60, 1, 1, 1]), 8).tolist() == [5, 1, 1, 1]
    assert instance_quotas(np.array([5, 9, 1, 7]), 2).tolist() == [0, 1, 0, 1]
    # nothing found: the uniform grid
    assert torch.equal(seg_first_select(np.full(64, -1), 16, 8, 8), uniform_grid(16, 8, 8))
    # instances too small for the budget: topped up to exactly the budget
    tiny_ids = np.full(64, -1)
    tiny_ids[[0, 1]] = 0
    assert len(seg_first_select(tiny_ids, 20, 8, 8)) == 20


def test_uniform_grid_is_a_2d_stride():
    idx = uniform_grid(64, 16, 16)
    rows, cols = idx // 16, idx % 16
    assert sorted(set(rows.tolist())) == list(range(1, 16, 2)) and sorted(set(cols.tolist())) == list(range(1, 16, 2))
    assert len(uniform_grid(77, 16, 16)) == 77


# --------------------------------------------------------------------------- (h) bad schedules
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: csp(cluster={"span": [0, 3]}, scatter={"span": [2, 5]}), "overlap"),
        (lambda: csp(cluster={"span": [0, 2]}, scatter={"span": [3, 5]}), "must start where"),
        (lambda: csp(scatter={"span": [0.25, 1.5]}), "must lie in [0, 1]"),
        (lambda: csp(scatter={"span": [2, 12]}), "outside the model's layers 0..8"),
        (lambda: csp(cluster={"ratio": 0.001}), "N_c"),
        (lambda: csp(scatter={"span": [0.25, 0.25]}), "is empty"),
        (lambda: csp(keep=0), "prune.keep=0 is outside (0, 1]"),
        (lambda: csp(keep=1.2), "prune.keep=1.2 is outside (0, 1]"),
        (lambda: csp(cluster={"select": "seg_first", "segmenter": "yolo"}), "yolo_weights"),
        (lambda: csp(cluster={"select": "seg_first", "segmenter": "yolo", "yolo_weights": "/nope.pt"}), "does not exist"),
        (lambda: csp(cluster={"colour": 1}), "unknown csp settings"),
        (lambda: FastV(layer=9), "outside the model's layers"),
        (lambda: FastV(layer=8), "must be in 1..7"),
        (lambda: FastV(layer=0), "must be in 1..7"),
        (lambda: PyramidDrop(layers=[6, 2]), "increasing"),
        (lambda: VisualTokenWithdrawal(layer=12), "outside the model's layers"),
        (lambda: RandomDrop(layer=8), "below the model's depth"),
        (lambda: FastV(query="middle"), "prune.query='middle' is not allowed; use one of ['seg', 'seg_token', 'last', "
                                        "'text_mean']"),
        (lambda: csp(cluster={"select": "bogus"}), "prune.cluster.select='bogus' is not allowed; use one of "
                                                   "['uniform', 'random', 'cls_attn', 'seg_first']"),
        (lambda: csp(cluster={"assign": "nearest"}), "prune.cluster.assign='nearest' is not allowed; use one of "
                                                     "['grid', 'feature']"),
        (lambda: csp(cluster={"segmenter": "sam"}), "prune.cluster.segmenter='sam' is not allowed; use one of "
                                                    "['superpixel', 'yolo']"),
        (lambda: csp(scatter={"mode": "mean"}), "prune.scatter.mode='mean' is not allowed; use one of "
                                                "['residual', 'copy', 'reset']"),
        (lambda: PyramidDrop(query="first"), "prune.query='first' is not allowed"),
    ],
)
def test_bad_schedules_are_rejected_with_the_key(make, message):
    with pytest.raises(CspexpError) as err:
        ready(make())
    assert message in str(err.value)


# --------------------------------------------------------------------------- (i) spec → bound method
# The default schedule of every conf/prune option on 8 layers and 256 image tokens, worked by hand.
DEFAULT_COUNTS = {
    "none": [256] * 8,
    "csp": [64, 64, 256, 256] + [26] * 4,  # spans [0, 2) / [2, 4); ⌊0.25·256⌋ = 64; ⌈0.1·256⌉ = 26
    "dart": [256, 256] + [57] * 6,  # before layer 2: ⌈0.222·256⌉ = 57 (4 image pivots + 53 least duplicated)
    "divprune": [64] * 8,  # before the LLM: ⌈0.25·256⌉ = 64 from layer 0 on
    "fastv": [256, 256] + [128] * 6,
    "fastervlm": [64] * 8,  # before the LLM: ⌈0.25·256⌉ = 64 from layer 0 on
    # before the LLM the batch merges r = min(52, 24, 53) = 24 2×2 windows (256 − 24·3 = 184); after layer 1 the
    # cap ⌈0.333·256⌉ = 86; the raised thresholds drop nothing more on these near-uniform attention rows
    "mustdrop": [184, 184] + [86] * 6,
    "norm": [256, 256] + [128] * 6,
    "pdrop": [256, 256, 128, 128, 64, 64, 32, 32],  # layers 2, 4, 6
    "random": [256, 256] + [128] * 6,
    "sparsevlm": [256, 256, 61, 55, 55, 55, 55, 55],
    "tome": [64] * 8,  # inside CLIP (2 layers to layer −2): r = 128, then the cap 64 → ⌈0.25·256⌉ = 64 from layer 0 on  # scoring layers 1, 2, 4, 5; 4 raters: int(4·13.5) = 54 + 7 merged, then 54 + 1
    "uniform": [256, 256] + [128] * 6,
    "visionzip": [64] * 8,  # before the LLM: ⌈0.25·256⌉ = 64 (54 dominant + 10 contextual) from layer 0 on
    "vtw": [256] * 5 + [0] * 3,  # ⌊0.625·8 + 0.5⌋ = 5
}
# Data-dependent counts (sparsevlm: the rank of the raters' attention): alone, the first sample keeps its own
# count (3 raters: int(3·13.5) = 40 + 7 merged, then 40 + 1); a batch keeps its samples' largest (DEFAULT_COUNTS).
# mustdrop: how many windows merge depends on the image; a batch merges its samples' smallest count.
ALONE_COUNTS = {"sparsevlm": [256, 256, 47, 41, 41, 41, 41, 41],
                "mustdrop": [100, 100] + [86] * 6}  # alone, the first sample merges its own 52 windows
USES_CLS_ATTENTION = {"fastervlm", "visionzip", "mustdrop"}  # options whose method reads CLIP's [CLS] attention (ctx.cls_attention)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF_DIR / "prune").glob("*.yaml")))
def test_binding_a_configured_spec_returns_a_ready_method(tiny, option):
    """A config builds a spec that cannot run; `bind` returns the method, which runs its schedule on
    any number of batches (nothing of one batch carries into the next)."""
    loaded, items = tiny
    spec = build(OmegaConf.load(CONF_DIR / "prune" / f"{option}.yaml"))
    assert isinstance(spec, PruningSpec) and not hasattr(spec, "setup") and not hasattr(spec, "before_layer")
    method = spec.bind(L, N)
    assert isinstance(method, PruningMethod) and method.spec is spec
    assert (method.name, method.needs_cls_attention, method.describe()) == (
        option, option in USES_CLS_ATTENTION, spec.describe())
    with torch.no_grad():
        first, _ = run_llm(loaded.model, loaded.processor.collate(items), method)
        again, _ = run_llm(loaded.model, loaded.processor.collate(items[:1]), method)
    assert first.trace.image_per_layer.tolist() == [DEFAULT_COUNTS[option]] * 3
    assert again.trace.image_per_layer.tolist() == [ALONE_COUNTS.get(option, DEFAULT_COUNTS[option])]


def test_an_unbound_spec_cannot_run_and_a_spec_does_not_change(tiny):
    loaded, items = tiny
    batch = loaded.processor.collate(items[:1])
    for spec in (NoPruning(), csp(keep=0.3)):
        with pytest.raises(AttributeError, match=r"is a pruning spec, not bound to a model: it has no setup; run "
                                                 r"spec\.bind\(num_layers, n_image_tokens\)"):
            segment(loaded.model, batch, spec)
    spec = FastV(keep=0.5, layer=6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.keep = 0.2
    # a shape the schedule does not fit is refused; the spec still binds to one it fits
    with pytest.raises(ConfigError, match="prune.layer=6 is outside the model's layers 0..4"):
        spec.bind(4, N)
    with torch.no_grad():
        state, _ = run_llm(loaded.model, batch, spec.bind(L, N))
    assert state.trace.image_per_layer.tolist() == [[256] * 6 + [128] * 2]


class KeptCells(Observer):
    """The grid cells of the image tokens entering every layer, per sample."""

    def on_setup(self, state, ctx):
        self.cells = []

    def before_layer(self, layer, state, ctx):
        image = state.kind == IMAGE
        self.cells.append([sorted(state.grid[b][image[b]].tolist()) for b in range(state.batch_size)])

    def after_run(self, state):
        self.final_kind = state.kind.clone()


@pytest.mark.parametrize(
    "method",
    [
        lambda: csp(keep=0.3, cluster={"select": "random", "assign": "feature"}),
        lambda: PyramidDrop(keep=0.5, query="text_mean"),
    ],
    ids=["csp_random_feature", "pdrop"],
)
def test_an_observer_sees_the_traced_tokens_and_leaves_the_masks_alone(tiny, method):
    loaded, items = tiny
    batch = loaded.processor.collate(items)
    observer = KeptCells()
    with torch.no_grad():
        plain = segment(loaded.model, batch, ready(method()))
        watched = segment(loaded.model, batch, ready(method()), observers=[observer])
    counts = [[len(cells) for cells in layer] for layer in observer.cells]
    assert counts == watched.trace.image_per_layer.T.tolist() == plain.trace.image_per_layer.T.tolist()
    assert all(len(set(cells)) == len(cells) for layer in observer.cells for cells in layer)
    assert torch.equal(observer.final_kind, watched.state.kind)
    assert torch.equal(watched.seg_embeds, plain.seg_embeds)
    for a, b in zip(watched.masks, plain.masks, strict=True):
        assert torch.equal(a, b)
