"""`mustdrop` against hand-worked cases (window similarities, the batch's merge count, merged values and
where they sit, the key set, the dual-attention scores and the thresholds' factor), against a
re-implementation of the authors' rule written here from their code, keep at its edges, and bad
settings."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from cspexp.data.shapes import ShapesDataset
from cspexp.models.lisa import IMAGE, PAD, SYSTEM, TEXT
from cspexp.models.loaders import build_model
from cspexp.pruning.engine import Observer, TokenState, Trace
from cspexp.pruning.methods import NoPruning, PruningContext
from cspexp.pruning.methods.mustdrop import (MustDrop, calibrate, filter_scores, key_count, merge_count,
                                             window_cells, window_similarity)
from cspexp.pruning.pipeline import run_llm, segment
from cspexp.utils.errors import ConfigError
from cspexp.utils.instantiate import build

from conftest import CONF_DIR
from helpers import cli_error_line, tiny_random_and_items

L, N = 8, 256  # the tiny LISA: 8 decoder layers, a 16×16 grid; filtering layers 2, 6, 10, 14 of 32 → 1, 2, 3, 4


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_and_items(3)


@pytest.fixture(scope="module")
def eager_tiny():
    """The tiny random LISA with eager attention (the reference reads the layers' attention
    probabilities) and grouped-query attention (2 k/v heads), and three shapes items."""
    cfg = OmegaConf.load(CONF_DIR / "model" / "tiny_random.yaml")
    cfg.attn_implementation = "eager"
    cfg.llm.num_key_value_heads = 2
    loaded = build_model(cfg, ShapesDataset.vocabulary())
    ds = ShapesDataset(split="val", n=3)
    return loaded, [ds[i] for i in range(3)]


@pytest.fixture(scope="module")
def eager_tiny_lisa():
    """The embedded trained model with eager attention: its prompts attend to the image unevenly, so
    the later filtering layers drop tokens too (on random weights attention is nearly uniform)."""
    cfg = OmegaConf.load(CONF_DIR / "model" / "tiny_lisa.yaml")
    cfg.attn_implementation = "eager"
    loaded = build(cfg)
    ds = ShapesDataset(split="val", n=3)
    return loaded, [ds[i] for i in range(3)]


class Images(Observer):
    """Batch of one: the image tokens entering every layer (cells, hidden states, positions)."""

    def on_setup(self, state, ctx):
        self.cells, self.hidden, self.pos = [], [], []

    def before_layer(self, layer, state, ctx):
        image = state.kind[0] == IMAGE
        self.cells.append(state.grid[0][image].tolist())
        self.hidden.append(state.hidden[0][image].clone())
        self.pos.append(state.pos[0][image].tolist())


# --------------------------------------------------------------------------- (a) by hand
def test_windows_are_the_authors_unfold_order():
    # 4×4 grid, 2×2 windows: raster order of windows, raster order inside; the last cell is the destination
    assert window_cells(4, 2).tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert window_cells(4, 4).tolist() == [list(range(16))]


def grid_state(values: list[list[list[float]]]) -> TokenState:
    """B samples of a 4×4 grid, d = 2: a system token (position 0), the 16 image cells at positions
    1..16, two text tokens; `values[b][c]` is cell c's vector."""
    B = len(values)
    image = torch.tensor(values)  # [B, 16, 2]
    hidden = torch.cat([torch.full((B, 1, 2), -1.0), image, torch.full((B, 2, 2), -2.0)], dim=1)
    n = hidden.shape[1]
    kind = torch.tensor([[SYSTEM] + [IMAGE] * 16 + [TEXT, TEXT]] * B)
    grid = torch.tensor([[-1] + list(range(16)) + [-1, -1]] * B)
    zeros = torch.zeros(B, L, dtype=torch.long)
    return TokenState(hidden=hidden, pos=torch.arange(n).expand(B, n).clone(), kind=kind, grid=grid,
                      trace=Trace(zeros.clone(), zeros.clone()), query_pos=torch.full((B,), n - 2),
                      seg_pos=torch.full((B,), n - 1))


# four window patterns and their mean cosine over the 12 ordered pairs of distinct tokens:
SAME = [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [6.0, 0.0]]  # parallel: 1
ONE_OFF = [[5.0, 0.0], [5.0, 0.0], [5.0, 0.0], [3.0, 4.0]]  # (6·1 + 6·0.6) / 12 = 0.8
HALF = [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]  # (6·1 + 6·0) / 12 = 0.5
CROSS = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]  # each: two at 0, one at −1 → −4/12 = −1/3


def cells_of(windows_in_order: list[list[list[float]]]) -> list[list[float]]:
    """Four 2×2 windows (each in its raster order) → the 16 cells of the 4×4 grid in raster order."""
    out = [None] * 16
    for w, cells in enumerate(window_cells(4, 2).tolist()):
        for c, v in zip(cells, windows_in_order[w]):
            out[c] = v
    return out


def test_window_similarity_worked_by_hand():
    x = torch.tensor([cells_of([SAME, HALF, ONE_OFF, CROSS])])
    assert window_similarity(x, window_cells(4, 2))[0].tolist() == pytest.approx([1.0, 0.5, 0.8, -1 / 3], abs=1e-6)
    # r is the fewest windows at or above the threshold in any sample (the authors' batch rule)
    sims = torch.tensor([[1.0, 0.5, 0.8, -0.3], [-0.3, 0.8, 0.5, 0.5]])
    assert merge_count(sims, 0.75) == 1 and merge_count(sims, 0.4) == 3 and merge_count(sims, None) == 0
    assert merge_count(sims, 0.8) == 1  # ≥, not >
    assert key_count(0.08, 25) == 2 and key_count(0.08, 576) == 47 and key_count(0.0, 100) == 0


def test_the_vision_stage_worked_by_hand():
    """Sample 0 has two windows at ≥ 0.75 (SAME 1.0 and ONE_OFF 0.8), sample 1 one (ONE_OFF): the batch
    merges r = 1 window each, each sample its most similar: sample 0 window 0 (cells 0 1 4 5 → cell 5),
    sample 1 window 1 (cells 2 3 6 7 → cell 7). A merged token is the plain mean of its 4 tokens, at
    its last cell's position; 13 image tokens remain. Key set: ⌈0.2·13⌉ = 3 by [CLS] attention, a
    merged token scored by its window's mean."""
    state = grid_state([cells_of([SAME, HALF, ONE_OFF, CROSS]), cells_of([CROSS, ONE_OFF, HALF, HALF])])
    cls = torch.full((2, 16), 0.01)
    cls[0, [0, 1, 4]] = 0.3  # window 0 of sample 0: mean (0.9 + 0.0) / 4 = 0.225; its own cell 5 has 0
    cls[0, 5], cls[0, 10], cls[0, 15], cls[0, 2] = 0.0, 0.3, 0.25, 0.21
    cls[1, [3, 8, 9]] = torch.tensor([0.5, 0.4, 0.3])
    method = MustDrop(merge_threshold=0.75, key_ratio=0.2, layers=[1]).bind(L, 16)
    ctx = PruningContext(layers=None, rotary_emb=None, grid_size=(4, 4), cls_attention=cls)
    method.setup(state, ctx)

    own = state.extras["mustdrop"]
    assert own["windows"].tolist() == [[0], [1]]
    image = state.kind == IMAGE
    assert state.grid[0][image[0]].tolist() == [2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    assert state.grid[1][image[1]].tolist() == [0, 1, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    assert state.pos[0][image[0]].tolist() == [c + 1 for c in [2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]
    merged0 = state.hidden[0][image[0]][2]  # cell 5 holds (1 + 2 + 3 + 6) / 4 = 3
    merged1 = state.hidden[1][image[1]][4]  # cell 7 holds ((5, 0) · 3 + (3, 4)) / 4 = (4.5, 1)
    assert merged0.tolist() == [3.0, 0.0] and merged1.tolist() == [4.5, 1.0]
    assert state.hidden[0][image[0]][0].tolist() == [1.0, 0.0]  # cell 2 (window 1, not merged) untouched
    assert state.extras["merges"] == [{5: [0, 1, 4]}, {7: [2, 3, 6]}]
    # key set: sample 0 cells 10 (0.3), 15 (0.25) and the merged 5 (0.225) beat cell 2 (0.21)
    key_cells = [sorted(state.grid[b][own["key"][b][state.pos[b]] & image[b]].tolist()) for b in range(2)]
    # sample 1: cell 3 (0.5) went into cell 7, scored (0.01 + 0.5 + 0.01 + 0.01) / 4 = 0.1325: 7, 8, 9
    assert key_cells == [[5, 10, 15], [7, 8, 9]]
    # the products charged: the windows' Gram matrices [4·4 tokens, 2] × [2, 4], the merge [1, 4] × [4, 2]
    assert state.trace.overhead == [
        {"kind": "matmul", "what": "mustdrop window similarity", "m": 16, "n": 4, "k": 2, "widths": {"k": "hidden"}},
        {"kind": "matmul", "what": "mustdrop window merge", "m": 1, "n": 2, "k": 4, "widths": {"n": "hidden"}},
    ]


def test_no_window_above_the_threshold_merges_nothing():
    state = grid_state([cells_of([HALF, HALF, CROSS, CROSS])])
    MustDrop(merge_threshold=0.75, layers=[1]).bind(L, 16).setup(
        state, PruningContext(layers=None, rotary_emb=None, grid_size=(4, 4), cls_attention=torch.rand(1, 16)))
    assert state.n_image == 16 and "merges" not in state.extras
    assert [e["what"] for e in state.trace.overhead] == ["mustdrop window similarity"]  # computed, nothing merged


def test_dual_attention_scores_worked_by_hand():
    """Two text rows over four image tokens: G = [0.5, 0.1, 0.2, 0.2] (ΣG = 1, so G is the share),
    I = [0.3, 0.05, 0.1, 0.2]. With g = 0.25, i = 0.15 the authors drop a token when G < g and I < i:
    tokens 1 and 2; token 3 is kept by its individual attention alone. s = max(G/g, I/i) is below 1
    exactly for those: [2, 0.4, 0.8, 1.333]."""
    rows = torch.tensor([[0.20, 0.05, 0.10, 0.00], [0.30, 0.05, 0.10, 0.20]])
    s = filter_scores(rows, 0.25, 0.15)
    assert s.tolist() == pytest.approx([2.0, 0.4, 0.8, 0.2 / 0.15], rel=1e-6)
    authors_drop = (rows.sum(0) < rows.sum() * 0.25) & (rows.max(0).values < 0.15)
    assert authors_drop.tolist() == [False, True, True, False] == (s < 1).tolist()
    no_key = torch.zeros(4, dtype=torch.bool)
    # cap 3: the authors' thresholds keep 2 ≤ 3, so they stay (factor 1)
    assert calibrate(s, no_key, 3) == 1.0
    # cap 1: halfway between the last admitted (2) and the first refused (1.333): both thresholds × 1.667,
    # which keeps token 0 only (token 3's I = 0.2 < 0.15 · 1.667 = 0.25 and G = 0.2 < 0.417)
    c = calibrate(s, no_key, 1)
    assert c == pytest.approx(5 / 3, rel=1e-6)
    scaled = (rows.sum(0) < rows.sum() * 0.25 * c) & (rows.max(0).values < 0.15 * c)
    assert scaled.tolist() == [False, True, True, True]
    # a key token takes a place of the cap and is never ranked: token 2 key, cap 2 → one more, token 0
    key = torch.tensor([False, False, True, False])
    assert calibrate(s, key, 2) == pytest.approx(5 / 3, rel=1e-6)
    assert calibrate(s, key, 1) == math.inf  # the key set alone fills the cap
    assert calibrate(s, no_key, 4) == 1.0  # room for every token


# --------------------------------------------------------------------------- (b) the authors' rule
def authors_local_merge(feat: torch.Tensor, threshold: float, window: int):
    """MustDrop's vision-stage merge, written from github.com/liuting20/MustDrop at commit 909afa5,
    llava/model/multimodal_encoder/local_merge.py: `conditional_pooling` L30-133 and `merge_wavg`
    L135-146 (the same code is ModelTC/llmc llmc/compression/token_reduction/mustdrop.py at commit
    05eedff, L29-185), on patch tokens feat [B, N, C] (the authors split [CLS] off first, L43, and put
    it back, L130; LISA's LLM sees no [CLS]).

    Returns the merged sequence in the authors' order (the r destination tokens in topk order, then
    the unmerged in raster order, L129), the destination cells [B, r], the source cells [B, r, w²−1]
    and the unmerged cells [B, N − r·w²]."""
    ws = window
    k = ws * ws  # L41
    B, N, C = feat.shape
    H = W = int(math.sqrt(N))  # L45-47
    assert H * W == N and H % ws == 0
    f = feat.view(B, H, W, C).permute(0, 3, 1, 2)  # L49: 'b (h w) c -> b c h w'
    f = f.reshape(B, C, H // ws, ws, W // ws, ws).permute(0, 2, 4, 1, 3, 5)  # L51: 'b c (gh ps_h) (gw ps_w) -> b gh gw c ps_h ps_w'
    flat = f.reshape(B, H // ws, W // ws, C, k)  # L55
    sims = F.cosine_similarity(flat.unsqueeze(-1), flat.unsqueeze(-2), dim=3)  # L59-63
    sims = sims * (1 - torch.eye(k))  # L66-67
    similarity_map = (sims.sum(-1).sum(-1) / (k * (k - 1))).reshape(B, -1)  # L70-72
    r = int(torch.ge(similarity_map, torch.tensor(threshold).repeat(1, similarity_map.shape[1])).sum(dim=1).min())  # L76-79
    _, sim_super_patch_idxs = similarity_map.topk(r, dim=-1)  # L83
    tensor = torch.arange(H * W).reshape(H, W).unsqueeze(0).repeat(B, 1, 1)  # L86-89
    windowed = tensor.unfold(1, ws, ws).unfold(2, ws, ws).reshape(B, -1, k)  # L93-96
    gathered = torch.gather(windowed, 1, sim_super_patch_idxs.unsqueeze(-1).expand(-1, -1, k))  # L99
    mask = torch.ones((B, windowed.shape[1]), dtype=torch.bool)  # L103
    mask.scatter_(1, sim_super_patch_idxs, torch.zeros_like(sim_super_patch_idxs, dtype=torch.bool))  # L106-109
    remaining = windowed[mask.unsqueeze(-1).expand(-1, -1, k)].reshape(B, -1, k)  # L112
    unm_idx = remaining.reshape(B, -1).sort(dim=-1).values.unsqueeze(-1)  # L113
    dim_index = k - 1  # L114
    src_idx = gathered[:, :, :dim_index].reshape(B, -1).unsqueeze(-1)  # L115
    dst_idx = gathered[:, :, dim_index].reshape(B, -1).unsqueeze(-1)  # L116
    merge_idx = torch.arange(src_idx.shape[1] // dim_index).repeat_interleave(dim_index).repeat(B, 1).unsqueeze(-1)  # L117

    def merge(x: torch.Tensor, mode: str) -> torch.Tensor:  # L120-131, without the [CLS] row
        n, t1, c = x.shape
        src = x.gather(dim=-2, index=src_idx.expand(n, r * dim_index, c))
        dst = x.gather(dim=-2, index=dst_idx.expand(n, r, c))
        unm = x.gather(dim=-2, index=unm_idx.expand(n, t1 - r * k, c))
        dst = dst.scatter_reduce(-2, merge_idx.expand(n, r * dim_index, c), src, reduce=mode)
        return torch.cat([dst, unm], dim=1)

    size = torch.ones_like(feat[..., 0, None])  # L139-140
    x = merge(feat * size, "sum")  # L142
    size = merge(size, "sum")  # L143
    return x / size, dst_idx[..., 0], src_idx[..., 0].view(B, r, dim_index), unm_idx[..., 0]  # L144


def clip_cls_rows(model, pixels: torch.Tensor) -> torch.Tensor:
    """[B, N] the [CLS] row of CLIP's own eager attention maps in the feature layer, heads averaged
    (the authors average heads too, clip_encoder.py L105-106)."""
    tower = copy.deepcopy(model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = tower(pixel_values=pixels, output_attentions=True)
    return out.attentions[model.vision_select_layer][:, :, 0, 1:].mean(1)


def reference_mustdrop(model, batch: dict, threshold: float | None, window: int, key_ratio: float,
                       pruning_loc, global_thr: float, individual_thr: float) -> dict:
    """MustDrop's vision stage and prefill for ONE unpadded sample, written from the authors' code
    (github.com/liuting20/MustDrop, commit 909afa5):

    - the merge (`authors_local_merge`), on the image tokens the LLM receives (cspexp's placement;
      the authors merge after CLIP's first layer, clip_encoder.py L110-112);
    - the key set, clip_encoder.py L98-107: topk of the [CLS] row, ⌈0.08·n⌉ (math.ceil of the float,
      L104) — with cspexp's adaptation: the feature layer's row, a merged token scored by its window's mean;
    - the prefill, llava/model/language_model/modelling_sparse_llama.py L219-267: a layer in
      `pruning_loc` runs as usual on the layer's own eager attention (its `self_attn` weights), then
      `dual_attention_filter` L336-354 — heads averaged, the rows of the text after the image (here:
      up to the [SEG]-producing token, cspexp's adaptation) over the image columns; a token is a
      candidate when its column sum < global_thr × the sum of all columns and its column max <
      individual_thr; kept: the others and the key set (torch.unique of both, L256-258); the
      tokens leave before the next layer;
    - layout: cspexp's (every token at its original position, a merged token at its destination's),
      not the authors' (merged tokens first, positions renumbered after each filter, L263-266).

    Returns the merge (destinations, sources, values), the key cells, per layer the image cells
    entering it, and the final normed states."""
    llama = model.decoder
    with torch.no_grad():
        tokens, _ = model.encode_image(batch["clip_pixels"])
        prompt = model.splice(batch["input_ids"], batch["attention_mask"], tokens)
    assert not (prompt.kind == PAD).any()
    h, kinds, cells = prompt.embeds[0].clone(), prompt.kind[0].clone(), prompt.grid[0].clone()
    pos = prompt.pos[0].clone()
    img = torch.where(kinds == IMAGE)[0]
    n_img = len(img)
    out = {"dst": [], "src": [], "merged": torch.zeros(0, h.shape[-1])}
    cls = clip_cls_rows(model, batch["clip_pixels"])[0]  # per cell
    if threshold is not None:
        merged, dst, src, unm = authors_local_merge(tokens, threshold, window)
        r = dst.shape[1]
        out = {"dst": dst[0].tolist(), "src": src[0].tolist(), "merged": merged[0, :r]}
        # cspexp's layout: the unmerged cells at their positions, each merged token at its destination's
        stay = torch.ones(len(h), dtype=torch.bool)
        stay[img] = False
        stay[img[unm[0]]] = True
        new_h = torch.cat([h[stay], merged[0, :r].to(h.dtype)])
        new_pos = torch.cat([pos[stay], pos[img[dst[0]]]])
        new_cells = torch.cat([cells[stay], dst[0]])
        new_kinds = torch.cat([kinds[stay], torch.full((r,), IMAGE)])
        order = torch.argsort(new_pos)
        h, pos, cells, kinds = new_h[order], new_pos[order], new_cells[order], new_kinds[order]
        cls = cls.clone()
        for d_cell, s_cells in zip(dst[0].tolist(), src[0].tolist()):
            cls[d_cell] = cls[[*s_cells, d_cell]].mean()
    img = torch.where(kinds == IMAGE)[0]
    left_tokens = math.ceil(key_ratio * len(img))  # clip_encoder.py L104 (N − 1: the patch tokens after the merge)
    _, index = torch.topk(cls[cells[img]], left_tokens) if left_tokens else (None, torch.zeros(0, dtype=torch.long))
    key_set = index  # indices among the image tokens, as the authors' (L107, L256)
    out["key"] = sorted(cells[img][key_set].tolist())
    entering = []
    h = h[None]
    query_pos = int(prompt.query_pos[0])
    last_image_pos = int(pos[kinds == IMAGE].max())
    with torch.no_grad():
        for idx, layer in enumerate(llama.layers):
            entering.append(sorted(cells[kinds == IMAGE].tolist()))
            n = h.shape[1]
            cos, sin = llama.rotary_emb(h, position_ids=pos[None])
            mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]  # tokens are in position order
            attn_out, weights = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=(cos, sin),
                                                attention_mask=mask)
            h = h + attn_out
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            if idx not in pruning_loc:
                continue
            img = torch.where(kinds == IMAGE)[0]
            text = torch.where((kinds == TEXT) & (pos > last_image_pos) & (pos <= query_pos))[0]
            attn = weights[0][:, text][:, :, img].mean(dim=0)  # L342-344: [text_seq, img_seq]
            attn_sum = attn.sum(dim=0)  # L345
            candidate_mask = (attn_sum < attn_sum.sum(dim=0) * global_thr) & (attn.max(dim=0)[0] < individual_thr)  # L348
            vis_indices = torch.arange(len(img))[~candidate_mask]  # L349-352
            vis_indices = torch.unique(torch.cat((vis_indices, key_set)))  # L256-257
            key_set = torch.nonzero(torch.isin(vis_indices, key_set)).squeeze(-1)  # L258
            keep = torch.ones(n, dtype=torch.bool)
            keep[img] = False
            keep[img[vis_indices]] = True
            h, pos, cells, kinds = h[:, keep], pos[keep], cells[keep], kinds[keep]
    out["entering"] = entering
    out["final"] = llama.norm(h)[0]
    return out


def check_against_reference(loaded, items, spec, thresholds_for) -> int:
    """Run `spec` on each item alone and the reference with the thresholds `thresholds_for(state)`
    returns (from the method's own run); compare merges, key set, the cells entering every layer, the
    merged values and the final states. Returns how many filtering steps dropped tokens."""
    model = loaded.model
    method = spec.bind(model.num_layers, model.n_image_tokens)
    drops = 0
    for item in items:
        batch = loaded.processor.collate([item])
        rec = Images()
        with torch.no_grad():
            state, _ = run_llm(model, batch, method, observers=[rec])
        g, i = thresholds_for(state)
        ref = reference_mustdrop(model, batch, spec.merge_threshold, spec.window, spec.key_ratio, method.layers, g, i)
        merges = state.extras.get("merges", [{}])[0]
        assert merges == {d: sorted(s) for d, s in zip(ref["dst"], ref["src"])}
        for d, value in zip(ref["dst"], ref["merged"]):
            assert (rec.hidden[0][rec.cells[0].index(d)] - value).abs().max().item() <= 1e-5
        # every image token, merged or not, sits at its cell's original position
        assert len({p - c for p, c in zip(rec.pos[0], rec.cells[0])}) == 1
        own = state.extras["mustdrop"]
        key_cells = sorted(c for c, p in zip(rec.cells[0], rec.pos[0]) if own["key"][0, p])
        assert key_cells == ref["key"]
        assert [sorted(c) for c in rec.cells] == ref["entering"]
        drops += sum(a != b for a, b in zip(ref["entering"], ref["entering"][1:]))
        mine = state.hidden[0]
        assert mine.shape == ref["final"].shape and (mine - ref["final"]).abs().max().item() <= 2e-5
    return drops


def test_tiny_random_lisa_matches_the_authors_rule_at_their_thresholds(eager_tiny):
    """keep = 1: the thresholds as given. Random weights attend almost uniformly (every share within
    1 % of 1/n), so thresholds at 1/n₀ (n₀ the tokens after the merge) drop about half the tokens by
    their global share at the first filtering layer (individual threshold out of reach); a second
    pair drops by the individual attention alone."""
    loaded, items = eager_tiny
    rules = {"global": lambda n0: (1.0 / n0, 1.0),  # the individual filter never keeps a token
             "individual": lambda n0: (1.0, 0.745 / n0)}  # the global filter never keeps a token
    for name, rule in rules.items():
        drops = 0
        for item in items:
            with torch.no_grad():  # n₀: the tokens after the merge
                probe, _ = run_llm(loaded.model, loaded.processor.collate([item]), MustDrop(keep=1.0).bind(L, N))
            g, i = rule(probe.trace.image_per_layer[0, 0].item())
            drops += check_against_reference(loaded, [item], MustDrop(keep=1.0, global_thr=g, individual_thr=i),
                                             lambda state, g=g, i=i: (g, i))
        assert drops >= 2, name


@pytest.mark.parametrize("keep", [0.25, 0.1])
def test_tiny_random_lisa_keep_caps_by_raising_both_thresholds(eager_tiny, keep):
    """keep < 1: the method's kept sets are the authors' rule at the thresholds × the factor it reports
    (set at the first filtering layer, held at the later ones)."""
    loaded, items = eager_tiny
    spec = MustDrop(keep=keep)
    drops = check_against_reference(loaded, items, spec, lambda state: (
        spec.global_thr * state.extras["mustdrop"]["scale"][0], spec.individual_thr * state.extras["mustdrop"]["scale"][0]))
    assert drops >= 3


def test_trained_model_matches_the_authors_rule_at_every_filtering_layer(eager_tiny_lisa):
    """On the embedded model the prompt's attention is uneven, so the raised thresholds drop more tokens
    at the later filtering layers too; the reference agrees at every one."""
    loaded, items = eager_tiny_lisa
    spec = MustDrop()
    method = spec.bind(loaded.model.num_layers, loaded.model.n_image_tokens)
    later = 0
    for item in items:
        with torch.no_grad():
            state, _ = run_llm(loaded.model, loaded.processor.collate([item]), method)
        counts = state.trace.image_per_layer[0].tolist()
        later += counts[method.layers[-1] + 1] < counts[method.layers[0] + 1]
    assert later >= 1
    check_against_reference(loaded, items, spec, lambda state: (
        spec.global_thr * state.extras["mustdrop"]["scale"][0], spec.individual_thr * state.extras["mustdrop"]["scale"][0]))


# --------------------------------------------------------------------------- (c) keep at its edges
def test_keep_one_without_a_merge_is_the_dense_pass_when_the_thresholds_drop_nothing(tiny):
    """keep = 1 is the authors' thresholds as given, not a switch-off; on the tiny model the default pair
    (0.001, 0.001) is below every token's individual attention, so with the merge off nothing leaves."""
    loaded, items = tiny
    batch = loaded.processor.collate(items)
    with torch.no_grad():
        dense = segment(loaded.model, batch, NoPruning().bind(L, N))
        out = segment(loaded.model, batch, MustDrop(keep=1.0, merge_threshold=None).bind(L, N))
    assert torch.equal(out.seg_embeds, dense.seg_embeds)
    assert out.trace.image_per_layer.eq(N).all()
    assert [e["kind"] for e in out.trace.overhead] == ["query_attention"] * 4  # the filter still scored
    assert out.state.extras["mustdrop"]["scale"] == [1.0] * 3


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        # the batch merges r = min(52, 24, 53) = 24 windows: 256 − 24·3 = 184 from layer 0; keep 1: the
        # thresholds drop nothing more; keep 0.333: ⌈85.248⌉ = 86 after layer 1; on random weights
        # the later layers' shares stay within 1 % of uniform, nothing more leaves
        ({"keep": 1.0}, [184] * 8),
        ({}, [184, 184] + [86] * 6),
        ({"keep": 0.1}, [184, 184] + [26] * 6),
        # keep 1/256: the cap (1) is below the key set ⌈0.08·184⌉ = 15, which alone stays
        ({"keep": 1 / 256}, [184, 184] + [15] * 6),
        ({"keep": 1 / 256, "key_ratio": 0.0}, [184, 184] + [1] * 6),
        # threshold −1: every window merges, 64 tokens from layer 0
        ({"keep": 1.0, "merge_threshold": -1.0}, [64] * 8),
        ({"merge_threshold": None}, [256, 256] + [86] * 6),
        ({"window": 4, "merge_threshold": 0.5}, None),  # 16×16 of 4×4: fewer, larger windows (checked below)
    ],
    ids=["keep_1", "default", "keep_0.1", "keep_min", "keep_min_no_key", "merge_all", "no_merge", "window_4"],
)
def test_counts_at_the_edges(tiny, kw, expected):
    loaded, items = tiny
    with torch.no_grad():
        state, _ = run_llm(loaded.model, loaded.processor.collate(items), MustDrop(**kw).bind(L, N))
    counts = state.trace.image_per_layer.tolist()
    if expected is None:  # window 4: r windows of 16 cells merge, 15 leave per window
        r = state.extras["mustdrop"]["windows"].shape[1]
        assert r > 0 and counts[0][0] == N - 15 * r
        assert all(len(members) == 15 for sample in state.extras["merges"] for members in sample.values())
    else:
        assert counts == [expected] * 3
    assert torch.isfinite(state.hidden).all()


def test_merging_every_window_gives_the_window_means(tiny):
    loaded, items = tiny
    model = loaded.model
    batch = loaded.processor.collate(items)
    with torch.no_grad():
        tokens, _ = model.encode_image(batch["clip_pixels"])
    rec = Images()
    with torch.no_grad():
        run_llm(model, loaded.processor.collate(items[:1]), MustDrop(keep=1.0, merge_threshold=-1.0).bind(L, N),
                observers=[rec])
    windows = window_cells(16, 2)
    assert rec.cells[0] == windows[:, -1].tolist()  # every window's last cell, in raster order
    assert torch.allclose(rec.hidden[0], tokens[0][windows].mean(1), atol=1e-6)


def test_a_batch_merges_its_smallest_count_and_keeps_its_largest(tiny):
    """Alone, sample 0 merges 52 windows (100 tokens), sample 1 24 (184); together every sample merges 24.
    A sample whose own merge count is the batch's runs as it would alone."""
    loaded, items = tiny
    method = MustDrop().bind(L, N)
    with torch.no_grad():
        alone = [run_llm(loaded.model, loaded.processor.collate([it]), method) for it in items]
        both, q = run_llm(loaded.model, loaded.processor.collate(items), method)
    assert [s.trace.image_per_layer[0, 0].item() for s, _ in alone] == [100, 184, 97]
    assert both.trace.image_per_layer[:, 0].tolist() == [184] * 3
    assert (q[1] - alone[1][1][0]).abs().max().item() <= 1e-5
    assert both.extras["merges"][1] == alone[1][0].extras["merges"][0]


def test_it_needs_the_cls_attention(tiny):
    state = grid_state([cells_of([SAME, HALF, ONE_OFF, CROSS])])
    with pytest.raises(RuntimeError, match=r"prune=mustdrop needs CLIP's \[CLS\] attention"):
        MustDrop(layers=[1]).bind(L, 16).setup(state, PruningContext(layers=None, rotary_emb=None, grid_size=(4, 4)))


def test_describe_names_every_setting():
    assert MustDrop().describe() == {
        "name": "mustdrop", "keep": 0.333, "window": 2, "merge_threshold": 0.8, "key_ratio": 0.08,
        "layers": [0.0625, 0.1875, 0.3125, 0.4375], "global_thr": 0.001, "individual_thr": 0.001}
    assert MustDrop(merge_threshold=1, layers=[1, 2]) == MustDrop(merge_threshold=1.0, layers=(1, 2))
    assert MustDrop().bind(32, 576).cap == 192 and MustDrop().bind(L, N).layers == (1, 2, 3, 4)
    assert MustDrop().bind(32, 576).layers == (2, 6, 10, 14)


# --------------------------------------------------------------------------- (d) bad settings
@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"keep": 0.0}, "prune.keep=0.0 is outside (0, 1]"),
        ({"window": 1}, "prune.window=1 must be >= 2"),
        ({"window": 2.5}, "prune.window=2.5 is not allowed; it must be an int"),
        ({"merge_threshold": 1.5}, "prune.merge_threshold=1.5 is outside [-1, 1]"),
        ({"merge_threshold": "high"}, "prune.merge_threshold='high' is not allowed; it must be a number (or null)"),
        ({"key_ratio": 1.2}, "prune.key_ratio=1.2 is outside [0, 1]"),
        ({"global_thr": 0.0}, "prune.global_thr=0.0 must be > 0"),
        ({"individual_thr": -1.0}, "prune.individual_thr=-1.0 must be > 0"),
    ],
)
def test_bad_values_are_one_line_config_errors(kw, message):
    with pytest.raises(ConfigError) as err:
        MustDrop(**kw)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("kw", "n_image", "message"),
    [
        ({"window": 3}, 256, "prune.window=3 must divide the side of a square image-token grid (256 tokens, 16×16)"),
        ({}, 200, "prune.window=2 must divide the side of a square image-token grid (200 tokens)"),
        ({"layers": [1, 7]}, 256, "prune.layers=[1, 7] resolves to [1, 7]: MustDrop's filtering layers must be "
                                  "distinct, increasing and within 0..6 (the tokens leave before the layer after each)"),
        ({"layers": [2, 2]}, 256, "prune.layers=[2, 2] resolves to [2, 2]"),
        ({"layers": []}, 256, "prune.layers=[] resolves to []"),
        ({"layers": [1.5]}, 256, "prune.layers[0]=1.5 is a fraction of depth and must lie in [0, 1]"),
    ],
)
def test_bad_schedules_are_refused_at_bind_time(kw, n_image, message):
    spec = MustDrop(**kw)
    with pytest.raises(ConfigError) as err:
        spec.bind(L, n_image)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_bad_window_is_one_line(tmp_path):
    assert "prune.window=3 must divide the side" in cli_error_line(tmp_path, "prune=mustdrop", "prune.window=3")
