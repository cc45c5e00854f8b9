"""`sparsevlm` against hand-worked cases (raters, rank-adaptive count, recycled clusters and merged
values) and against a re-implementation of the authors' v1 rule written here from their code; keep at
its edges; bad settings; batches."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from cspexp.data.shapes import ShapesDataset
from cspexp.models.lisa import IMAGE, PAD, SYSTEM, TEXT
from cspexp.models.loaders import build_model
from cspexp.pruning.engine import Observer, TokenState, Trace
from cspexp.pruning.methods.sparsevlm import SparseVLM, adaptive_count, choose_raters, density_peaks, merge_clusters
from cspexp.pruning.pipeline import run_llm
from cspexp.utils.errors import ConfigError

from conftest import CONF_DIR
from helpers import tiny_random_and_items

L, N = 8, 256  # the tiny LISA; default scoring layers 2/32, 6/32, 15/32, 19/32 of 8 → 1, 2, 4, 5


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_and_items(3)


@pytest.fixture(scope="module")
def eager_tiny():
    """The tiny LISA with eager attention (the reference reads the layers' attention probabilities)
    and grouped-query attention (2 k/v heads), and three shapes items, one at a time."""
    cfg = OmegaConf.load(CONF_DIR / "model" / "tiny_random.yaml")
    cfg.attn_implementation = "eager"
    cfg.llm.num_key_value_heads = 2
    loaded = build_model(cfg, ShapesDataset.vocabulary())
    ds = ShapesDataset(split="val", n=3)
    return loaded, [ds[i] for i in range(3)]


class Images(Observer):
    """The image tokens entering every layer: grid cells, hidden states, positions, RoPE positions."""

    def on_setup(self, state, ctx):
        self.cells, self.hidden, self.pos, self.rope = [], [], [], []

    def before_layer(self, layer, state, ctx):
        image = state.kind[0] == IMAGE  # batch of one
        self.cells.append(state.grid[0][image].tolist())
        self.hidden.append(state.hidden[0][image].clone())
        self.pos.append(state.pos[0][image].tolist())
        self.rope.append(state.rope_pos[0][image].tolist())

    def after_run(self, state):
        self.recycled = list(state.extras["sparsevlm"]["recycled"])


# --------------------------------------------------------------------------- (a) hand-worked pieces
def test_raters_worked_by_hand():
    # image ·textᵀ = [[2, 0, 0], [0, 0, 2]]; softmax over the text: [e², 1, 1]/(e² + 2) and [1, 1, e²]/(e² + 2);
    # mean over the image: [(e² + 1)/2, 1, (e² + 1)/2]/(e² + 2) = [0.447, 0.106, 0.447], mean 1/3
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    assert choose_raters(image, text).tolist() == [True, False, True]
    # one candidate (relevance 1 = its mean): nobody is above the mean, so every candidate rates
    assert choose_raters(image, text[:1]).tolist() == [True]


def test_adaptive_count_worked_by_hand():
    rank1 = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0], [0.2, 0.4, 0.6, 0.8, 0.0]])  # row 2 = 2 × row 1
    rank2 = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0], [0.0, 0.1, 0.0, 0.1, 0.8]])
    assert adaptive_count(rank1, scale=1.5, bias=0.5, cap=5) == 2  # int(1·1.5 + 0.5) = 2
    assert adaptive_count(rank2, scale=1.5, bias=0.5, cap=5) == 3  # int(2·1.5 + 0.5) = int(3.5) = 3
    assert adaptive_count(rank2, scale=13.5, bias=0.0, cap=5) == 4  # int(27) → n − 1 = 4
    assert adaptive_count(rank2, scale=13.5, bias=0.0, cap=3) == 3  # → the cap ⌈keep·N⌉
    assert adaptive_count(rank2, scale=0.4, bias=0.0, cap=5) == 0  # int(0.8) = 0: only merged tokens stay
    # the default tolerance (σ_max · eps_fp32 · max(R, n)): a 1e-9 perturbation does not add rank
    nearly = rank1.clone()
    nearly[1, 4] = 1e-9
    assert adaptive_count(nearly, scale=1.5, bias=0.5, cap=5) == 2
    # full column rank (r = n): the layer prunes nothing (the authors' s_flag = False)
    assert adaptive_count(torch.eye(3), scale=0.5, bias=0.0, cap=1) == 3


def test_density_peaks_worked_by_hand():
    """Six 1-D tokens (d = 1, so distances are |xᵢ − xⱼ|) into k = 3 clusters; the density uses the
    k = 3 nearest (itself and two). Density exp(−mean d²): 0 → e^(−10/3), 1 → e^(−5/3), 3 → e^(−13/3),
    10 → e^(−4.25/3), 10.5 → e^(−2.5/3) (the densest), 12 → e^(−6.25/3). Distance to the nearest
    denser token: 0 → 1 (to 1), 1 → 9 (to 10), 3 → 2 (to 1), 10 → 0.5, 10.5 → 12 (the largest
    distance), 12 → 1.5 (to 10.5). distance × density: 10.5 → 5.21, 1 → 1.70, 12 → 0.19, 10 → 0.12,
    0 → 0.036, 3 → 0.026 → centres 10.5, 1, 12; every other token joins the nearest centre."""
    x = torch.tensor([[0.0], [1.0], [3.0], [10.0], [10.5], [12.0]])
    centres, cluster = density_peaks(x, 3)
    assert centres.tolist() == [4, 1, 5]
    assert cluster.tolist() == [1, 1, 1, 0, 0, 2]
    merged = merge_clusters(x, cluster, 3)
    assert merged[:, 0].tolist() == pytest.approx([20.5 / (2 + 1e-6), 4.0 / (3 + 1e-6), 12.0 / (1 + 1e-6)],
                                                  rel=1e-7)


def one_row_state(image_values: list[float]) -> TokenState:
    """A batch of one, d = 1: a system token (position 0), the image tokens (cells 0.. at positions 1..)
    and two text tokens."""
    n_img = len(image_values)
    hidden = torch.tensor([[-1.0] + image_values + [-2.0, -3.0]])[..., None]
    n = hidden.shape[1]
    kind = torch.tensor([[SYSTEM] + [IMAGE] * n_img + [TEXT, TEXT]])
    grid = torch.tensor([[-1] + list(range(n_img)) + [-1, -1]])
    zeros = torch.zeros(1, L, dtype=torch.long)
    return TokenState(hidden=hidden, pos=torch.arange(n)[None], kind=kind, grid=grid,
                      trace=Trace(zeros.clone(), zeros.clone()), query_pos=torch.tensor([n - 1]),
                      seg_pos=torch.tensor([n]))


def test_pruning_step_worked_by_hand():
    """10 image tokens; keep 3; recycle_ratio 0.75 → int(7·0.75) + 1 = 6 of the 7 pruned; cluster_ratio
    0.2 → int(6·0.2) + 1 = 2 clusters.

    cell:    0     1    2    3    4    5    6    7    8    9
    score:  .6    .5   .9   .4   .3   .8   .2   .7   .1   .0
    value: 10.5    1  100    0   10  200   12  300    3   -5

    Kept: cells 2, 5, 7. Recycled, best first: 10.5, 1, 0, 10, 12, 3 (cell 9 is the one left out).
    k = 2 nearest (itself and one): 10 and 10.5 are each other's nearest (density e^(−0.125) both),
    so are 0 and 1 (e^(−0.5)); the tie goes to the better-scored token, 10.5 and 1. Nearest denser:
    10.5 → 12 (none: the largest distance), 1 → 9 (to 10), 0 → 1, 10 → 0.5, 12 → 1.5, 3 → 2; ×
    density: 10.59, 5.46, 0.61, 0.44, 0.49, 0.27 → centres 10.5 (cell 0) and 1 (cell 1); groups
    {10.5, 10, 12} (cells 0, 4, 6) and {1, 0, 3} (cells 1, 3, 8)."""
    values = [10.5, 1.0, 100.0, 0.0, 10.0, 200.0, 12.0, 300.0, 3.0, -5.0]
    scores = torch.tensor([[0.6, 0.5, 0.9, 0.4, 0.3, 0.8, 0.2, 0.7, 0.1, 0.0]])
    state = one_row_state(values)
    state.extras["sparsevlm"] = {"raters": None, "pending": None, "recycled": []}
    method = SparseVLM(recycle_ratio=0.75, cluster_ratio=0.2).bind(L, 10)
    method.prune(state, {"at": 3, "scores": scores, "count": 3})
    image = state.kind[0] == IMAGE
    assert state.grid[0][image].tolist() == [0, 1, 2, 5, 7]  # two merged tokens at their centres' cells
    assert state.pos[0][image].tolist() == [1, 2, 3, 6, 8] and torch.equal(state.rope_pos, state.pos)
    assert state.hidden[0][image][:, 0].tolist() == pytest.approx(
        [32.5 / (3 + 1e-6), 4.0 / (3 + 1e-6), 100.0, 200.0, 300.0], rel=1e-6)
    assert state.pos[0].tolist() == sorted(state.pos[0].tolist())  # still in position order
    (step,) = state.extras["sparsevlm"]["recycled"]
    assert step["grid"].tolist() == [[0, 1, 3, 4, 6, 8]]  # best score first
    assert step["cluster"].tolist() == [[0, 1, 1, 0, 0, 1]] and step["centres"].tolist() == [[0, 1]]
    # what the pictures draw: the groups above, each at its centre's cell
    assert state.extras["merges"] == [{0: [4, 6], 1: [3, 8]}]
    # the method's own work: the 6 × 6 Gram matrix and the [2, 6] × [6, 1] merge
    assert state.trace.overhead == [
        {"kind": "matmul", "what": "sparsevlm recycled-token Gram matrix", "m": 6, "n": 6, "k": 1,
         "widths": {"k": "hidden"}},
        {"kind": "matmul", "what": "sparsevlm cluster merge", "m": 2, "n": 1, "k": 6, "widths": {"n": "hidden"}},
    ]


def test_pruning_step_without_recycling_drops_the_rest():
    state = one_row_state([10.5, 1.0, 100.0, 0.0])
    state.extras["sparsevlm"] = {"raters": None, "pending": None, "recycled": []}
    SparseVLM(recycle=False).bind(L, 4).prune(state, {"at": 3, "scores": torch.tensor([[0.1, 0.4, 0.3, 0.2]]),
                                                      "count": 2})
    assert state.grid[0][state.kind[0] == IMAGE].tolist() == [1, 2] and state.trace.overhead == []


# --------------------------------------------------------------------------- (b) the authors' rule
def authors_cluster_and_merge(x: torch.Tensor, cluster_num: int):
    """`cluster_and_merge` (github.com/Gumpest/SparseVLMs, commit b72c5d6,
    llava/model/language_model/utils.py L155-213) for one sample, x [m, C]:

    - L158-161: dist = ‖xᵢ − xⱼ‖₂ / √C by broadcasting;
    - L163-164: density = exp(−mean of the squared distances to the `cluster_num` nearest, itself included);
    - L166-167: + torch.rand·1e-6 "to ensure no tokens have the same density" — here ONE fixed draw of
      that jitter, decreasing along x's rows (x is in descending-score order), in float64 so that
      it is representable (the authors' fp16 would round it away);
    - L170-173: distance to the nearest strictly denser token, the largest distance of all if none;
    - L176-177: centres = topk(distance × density, cluster_num);
    - L180-187: every token joins its nearest centre (argmin), a centre its own cluster;
    - L189-211: merged = Σ x · 1/(count + 1e-6) per cluster (index_add).

    Returns (merged [K, C], cluster of each row [m], centre rows [K])."""
    m, C = x.shape
    xd = x.double()
    dist_matrix = (xd[:, None, :] - xd[None, :, :]).norm(dim=-1, p=2) / (C**0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    density = density + 1e-6 * torch.arange(m, 0, -1, dtype=torch.float64) / (m + 1)
    mask = (density[None, :] > density[:, None]).double()
    dist_max = dist_matrix.max()
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    _, index_down = torch.topk(dist * density, k=cluster_num)
    idx_cluster = dist_matrix[index_down].argmin(dim=0)
    idx_cluster[index_down] = torch.arange(cluster_num)
    all_weight = torch.zeros(cluster_num, 1).index_add_(0, idx_cluster, torch.ones(m, 1)) + 1e-6
    merged = torch.zeros(cluster_num, C).index_add_(0, idx_cluster, x / all_weight[idx_cluster])
    return merged, idx_cluster, index_down


def reference_sparsevlm(llama, embeds, kind, grid, query_pos: int, pruning_loc, scale: float, bias: float):
    """SparseVLM v1's prefill for ONE unpadded sample, written from the authors' code
    (github.com/Gumpest/SparseVLMs, commit b72c5d6, llava/model/language_model/):

    - modelling_sparse_llama.py L215-220: raters from the input embeddings — v_t @ t_tᵀ with t_t the
      text after the image (at inference the prompt ends with the token that answers; here the
      [SEG]-producing token), softmax over the text, mean over the image, torch.where(> mean);
    - L224-238: a layer in `pruning_loc` runs as usual and returns its attention probabilities (here:
      the layer's own eager attention, `self_attn`'s weights);
    - score.py L27-33: heads averaged, the raters' rows over the image columns, matrix_rank of those
      rows in float32, scores = the rows' mean; L36-42: if n − rank ≠ 0 keep topk(min(int(rank·scale
      + bias), n − 1)), else nothing is pruned;
    - modelling_sparse_llama.py L253-266: of the pruned (in sequence order) the int(0.3·n_pruned) + 1
      best-scored (topk), from the layer's OUTPUT states, into int(m/10) + 1 clusters
      (`authors_cluster_and_merge`);
    - layout: the authors put the merged tokens after the kept image tokens and renumber positions
      (L268-283); here, as cspexp, every token keeps its original position and a merged token takes its
      centre's (the one departure this comparison does not cover; docs/method.md).

    Returns the raters' positions, the final normed states [n, d] and, per pruning layer, a dict (None
    where nothing was pruned): kept cells, recycled cells (best first), their clusters, the centres'
    cells and positions, merged values."""
    h = embeds[None]
    pos, cells, kinds = torch.arange(h.shape[1]), grid.clone(), kind.clone()
    v_start = int((kind == IMAGE).float().argmax())
    t_start = v_start + int((kind == IMAGE).sum())
    v_t, t_t = h[:, v_start:t_start], h[:, t_start:query_pos + 1]
    m_v_t = (v_t @ t_t.transpose(1, 2)).softmax(2).mean(1)
    rater_pos = torch.where(m_v_t > m_v_t.mean())[1] + t_start  # text tokens never move
    stages = []
    for i, layer in enumerate(llama.layers):
        n = h.shape[1]
        cos, sin = llama.rotary_emb(h, position_ids=pos[None])
        mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
        attn_out, weights = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=(cos, sin),
                                            attention_mask=mask)
        h = h + attn_out
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        if i not in pruning_loc:
            continue
        img_cols = torch.where(kinds == IMAGE)[0]
        rater_cols = torch.where(torch.isin(pos, rater_pos))[0]
        relation = weights.mean(1)[:, rater_cols][:, :, img_cols]  # [1, R, v]
        rank = torch.linalg.matrix_rank(relation.float())
        relation = relation.mean(1)  # [1, v]
        v = len(img_cols)
        if v - rank.item() == 0:
            stages.append(None)
            continue
        _, indices = torch.topk(relation, min(int(rank.item() * scale + bias), v - 1), dim=1)
        keep = torch.zeros(v, dtype=torch.bool)
        keep[indices[0]] = True
        pruned = torch.where(~keep)[0]
        stage1 = relation[0][pruned]
        best = stage1.topk(int(pruned.shape[0] * 0.3) + 1)[1]
        recycled = img_cols[pruned[best]]  # sequence columns, best first
        merged, idx_cluster, index_down = authors_cluster_and_merge(h[0, recycled], int(best.shape[0] / 10) + 1)
        centres = recycled[index_down]
        stages.append({"kept": sorted(cells[img_cols[keep]].tolist()), "recycled": cells[recycled].tolist(),
                       "cluster": idx_cluster.tolist(), "centres": cells[centres].tolist(), "merged": merged,
                       "centre_pos": pos[centres].tolist()})
        # cspexp's layout: the kept tokens and the merged ones at their centres' positions, in position order
        stay = torch.ones(n, dtype=torch.bool)
        stay[img_cols[~keep]] = False
        new_h = torch.cat([h[0, stay], merged.to(h.dtype)])
        new_pos = torch.cat([pos[stay], pos[centres]])
        new_cells = torch.cat([cells[stay], cells[centres]])
        new_kinds = torch.cat([kinds[stay], torch.full_like(centres, IMAGE)])
        order = torch.argsort(new_pos)
        h, pos, cells, kinds = new_h[order][None], new_pos[order], new_cells[order], new_kinds[order]
    return rater_pos.tolist(), llama.norm(h)[0], stages


@pytest.mark.parametrize(("scale", "bias"), [(13.5, 0.0), (9.0, 6.0), (0.8, 0.0)],
                         ids=["192_tokens", "128_tokens", "64_tokens"])  # the authors' three README settings
def test_tiny_lisa_matches_the_authors_rule(eager_tiny, scale, bias):
    loaded, items = eager_tiny
    model = loaded.model
    spec = SparseVLM(keep=1.0, scale=scale, bias=bias)  # keep = 1: no cap, the authors' rule
    method = spec.bind(model.num_layers, model.n_image_tokens)
    n_compared = 0
    for item in items:
        batch = loaded.processor.collate([item])
        rec = Images()
        with torch.no_grad():
            state, _ = run_llm(model, batch, method, observers=[rec])
            prompt = model.splice(batch["input_ids"], batch["attention_mask"], model.encode_image(batch["clip_pixels"])[0])
            assert not (prompt.kind == PAD).any()
            ref_raters, ref_h, stages = reference_sparsevlm(model.decoder, prompt.embeds[0], prompt.kind[0], prompt.grid[0],
                                                int(prompt.query_pos[0]), method.layers, scale, bias)
        assert torch.where(state.extras["sparsevlm"]["raters"][0])[0].tolist() == ref_raters
        steps = iter(rec.recycled)
        for layer, stage in zip(method.layers, stages):
            after = layer + 1  # what enters the next layer
            if stage is None:
                assert rec.cells[after] == rec.cells[layer]
                continue
            ours = next(steps)
            assert ours["at"] == after
            assert ours["grid"][0].tolist() == stage["recycled"]
            assert ours["cluster"][0].tolist() == stage["cluster"]
            assert ours["centres"][0].tolist() == stage["centres"]
            assert sorted(rec.cells[after]) == sorted(stage["kept"] + stage["centres"])
            at_centre = [rec.cells[after].index(c) for c in stage["centres"]]
            assert [rec.pos[after][j] for j in at_centre] == stage["centre_pos"]
            assert (rec.hidden[after][at_centre] - stage["merged"]).abs().max().item() <= 1e-5
            n_compared += 1
        assert next(steps, None) is None
        mine = state.hidden[0]
        assert mine.shape == ref_h.shape and (mine - ref_h).abs().max().item() <= 2e-5
    assert n_compared >= 3  # every sample pruned at least once


# --------------------------------------------------------------------------- (c) keep at its edges
@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        # keep 1 and 0.999: cap ⌈255.744⌉ = 256 never binds. Every prompt here has 3 or 4 raters (rank 3
        # or 4): the batch keeps the larger, int(4·13.5) = 54, + int(int(0.3·202) + 1)/10) + 1 = 7 merged
        # = 61; then 61 → 54 kept + 1 merged (m = int(0.3·7) + 1 = 3) = 55; then 54 + 1 = 55
        ({"keep": 1.0}, [256, 256, 61, 55, 55, 55, 55, 55]),
        ({"keep": 0.999}, [256, 256, 61, 55, 55, 55, 55, 55]),
        # keep 0.1: ⌈25.6⌉ = 26 kept + int(70/10) + 1 = 8 merged (m = int(0.3·230) + 1 = 70) = 34; then
        # 26 + 1 (m = int(0.3·8) + 1 = 3) = 27; 26 + 1 = 27
        ({"keep": 0.1}, [256, 256, 34, 27, 27, 27, 27, 27]),
        # without recycling the n − 1 rule prunes one more at every later pruning layer: 26, 25, 24, 23
        ({"keep": 0.1, "recycle": False}, [256, 256, 26, 25, 25, 24, 23, 23]),
        # keep 0.001: 1 kept + 8 merged (m = 77) = 9; then 1 + 1 (m = int(0.3·8) + 1 = 3) = 2; with 2
        # image tokens the raters' rows have rank 2 = n: nothing more is pruned
        ({"keep": 0.001}, [256, 256, 9, 2, 2, 2, 2, 2]),
    ],
    ids=["keep_1", "keep_0.999", "keep_0.1", "keep_0.1_no_recycle", "keep_0.001"],
)
def test_counts_at_the_edges_of_keep(tiny, kw, expected):
    loaded, items = tiny
    with torch.no_grad():
        state, _ = run_llm(loaded.model, loaded.processor.collate(items), SparseVLM(**kw).bind(L, N))
    assert state.trace.image_per_layer.tolist() == [expected] * 3
    assert torch.isfinite(state.hidden).all()


def test_keep_one_is_the_uncapped_rule_and_keep_caps_it(tiny):
    assert SparseVLM(keep=1.0).bind(L, N).cap == 256 and SparseVLM().bind(L, N).cap == 86  # ⌈0.333·256⌉
    assert SparseVLM().bind(32, 576).cap == 192  # ⌈0.333·576⌉ = ⌈191.808⌉: the authors' 192-token budget


# --------------------------------------------------------------------------- batches
def test_a_batch_keeps_the_largest_of_its_samples_counts(tiny):
    """Alone, sample 0 (3 raters) keeps int(3·13.5) = 40 + 7 merged; samples 1 and 2 (4 raters) 54 + 7.
    Together every sample keeps 54 (+ 7), and a sample whose own count is the batch's runs as alone."""
    loaded, items = tiny
    method = SparseVLM().bind(L, N)
    alone = []
    with torch.no_grad():
        for i in range(3):
            rec = Images()
            state, q = run_llm(loaded.model, loaded.processor.collate(items[i:i + 1]), method, observers=[rec])
            alone.append((state.trace.image_per_layer[0].tolist(), rec, q))
        both, q_batch = run_llm(loaded.model, loaded.processor.collate(items), method)
    assert alone[0][0] == [256, 256, 47, 41, 41, 41, 41, 41]
    assert alone[1][0] == alone[2][0] == [256, 256, 61, 55, 55, 55, 55, 55]
    assert both.trace.image_per_layer.tolist() == [alone[1][0]] * 3
    assert both.extras["sparsevlm"]["raters"].sum(1).tolist() == [3, 4, 4]
    image = both.kind == IMAGE
    for b in (1, 2):
        assert both.grid[b][image[b]].tolist() == alone[b][1].cells[-1]
        assert (q_batch[b] - alone[b][2][0]).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------- (d) bad settings
@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"layers": [1, 7]}, "prune.layers=[1, 7] resolves to [1, 7]: SparseVLM's scoring layers must be distinct, "
                             "increasing and within 0..6 (the tokens leave before the layer after each)"),
        ({"layers": [2, 2]}, "prune.layers=[2, 2] resolves to [2, 2]"),
        ({"layers": [4, 2]}, "prune.layers=[4, 2] resolves to [4, 2]"),
        ({"layers": [0.5, 0.55]}, "prune.layers=[0.5, 0.55] resolves to [4, 4]"),  # ⌊4.4 + 0.5⌋ = 4
        ({"layers": []}, "prune.layers=[] resolves to []"),
        ({"layers": [1.5]}, "prune.layers[0]=1.5 is a fraction of depth and must lie in [0, 1]"),
        ({"layers": [9]}, "prune.layers[0]=9 is outside the model's layers 0..8"),
    ],
)
def test_bad_layers_are_refused_at_bind_time(kw, message):
    spec = SparseVLM(**kw)  # a spec is not checked against a depth until it is bound
    with pytest.raises(ConfigError) as err:
        spec.bind(L, N)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"scale": 0.0}, "prune.scale=0.0 must be > 0"),
        ({"scale": -1.0}, "prune.scale=-1.0 must be > 0"),
        ({"bias": -0.5}, "prune.bias=-0.5 must be >= 0"),
        ({"recycle_ratio": 1.0}, "prune.recycle_ratio=1.0 must be < 1"),
        ({"recycle_ratio": -0.1}, "prune.recycle_ratio=-0.1 is outside [0, 1]"),
        ({"cluster_ratio": 1.0}, "prune.cluster_ratio=1.0 must be < 1"),
        ({"keep": 0.0}, "prune.keep=0.0"),
        ({"recycle": "yes"}, "prune.recycle='yes' is not allowed"),
        ({"scale": "big"}, "prune.scale='big' is not allowed"),
    ],
)
def test_bad_values_are_one_line_config_errors(kw, message):
    with pytest.raises(ConfigError) as err:
        SparseVLM(**kw).bind(L, N)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_describe_lists_every_parameter():
    d = SparseVLM().describe()
    assert d == {"name": "sparsevlm", "keep": 0.333, "layers": [2 / 32, 6 / 32, 15 / 32, 19 / 32], "scale": 13.5,
                 "bias": 0.0, "recycle": True, "recycle_ratio": 0.3, "cluster_ratio": 0.1}
    assert SparseVLM().bind(32, 576).layers == (2, 6, 15, 19)  # the authors' pruning_loc on 32 layers
    assert SparseVLM().bind(L, N).layers == (1, 2, 4, 5)  # ⌊0.5 + 0.5⌋, ⌊1.5 + 0.5⌋, ⌊3.75 + 0.5⌋, ⌊4.75 + 0.5⌋
    assert math.isclose(SparseVLM(scale=9).scale, 9.0) and isinstance(SparseVLM(scale=9).scale, float)
