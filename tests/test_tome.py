"""prune=tome (ToMe inside CLIP) against independent references: the CLIP layer loop against
transformers' own forward, cases worked by hand (which tokens merge, sizes, weighted averages, the
keep → r schedule), a re-implementation of the authors' rule written here from their code and run on
the tiny model's CLIP tower, the edges of keep, the feature cache and one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

import cspexp.features.cache as feature_cache
from cspexp.evaluate import evaluate
from cspexp.features.cache import MemoryStore
from cspexp.features.vision import encode_vision
from cspexp.models.clip_loop import ClipHook, ClipShape, run_clip
from cspexp.models.lisa import IMAGE
from cspexp.outputs.files import read_jsonl
from cspexp.pruning.engine import Observer
from cspexp.pruning.methods import NoPruning, ToMe
from cspexp.pruning.methods.tome import (
    ToMeHook,
    bipartite_matching,
    merge_schedule,
    merge_weighted,
    smallest_count,
)
from cspexp.pruning.pipeline import run_llm, segment
from cspexp.utils.errors import ConfigError
from cspexp.utils.instantiate import build

from conftest import CONF_DIR
from helpers import cli_error_line, tiny_random_and_items

L, N = 8, 256  # tiny_random: 8 decoder layers, a 16×16 grid; its CLIP runs 2 layers to layer −2


@pytest.fixture(scope="module")
def tiny():
    loaded, items = tiny_random_and_items(3)
    return loaded, loaded.processor.collate(items)


class Layer0(Observer):
    """The image tokens entering layer 0: grid cells, hidden states, original and RoPE positions."""

    def before_layer(self, layer, state, ctx):
        if layer == 0:
            taken = state.take(state.image_columns())
            self.grid, self.hidden, self.pos = taken.grid.clone(), taken.hidden.clone(), taken.pos.clone()
            self.rope_pos = taken.rope_pos.clone()


# --------------------------------------------------------------------------- the CLIP layer loop
@pytest.mark.parametrize("select", [-2, -1, 1, 0])
def test_the_clip_loop_is_transformers_forward(tiny, select):
    loaded, batch = tiny
    tower = loaded.model.vision_tower
    with torch.no_grad():
        expected = tower(pixel_values=batch["clip_pixels"], output_hidden_states=True).hidden_states[select]
        assert torch.equal(run_clip(tower, batch["clip_pixels"], select), expected)  # whole layers: bit for bit
        # step by step (a hook that does nothing): the same operations in the same order
        assert torch.allclose(run_clip(tower, batch["clip_pixels"], select, ClipHook()), expected, atol=1e-5)


def test_clip_shape():
    loaded, _ = tiny_random_and_items(1)
    shape = ClipShape.of(loaded.model.vision_tower.config, -2)
    assert shape == ClipShape(layers=2, n_patches=256, head_dim=16)
    with pytest.raises(ValueError, match="outside hidden_states"):
        ClipShape.of(loaded.model.vision_tower.config, -5)


# --------------------------------------------------------------------------- (a) by hand
# Seven tokens, [CLS] first; A = columns 0 2 4 6, B = 1 3 5. Keys (one head):
KEYS = torch.tensor([[[1.0, 0.0],     # 0 [CLS]: as close to 1 as can be, but never merged
                      [1.0, 0.0],     # 1 (B)
                      [0.0, 1.0],     # 2 (A) → 3, cos 1.0
                      [0.0, 1.0],     # 3 (B)
                      [10.0, 1.0],    # 4 (A) → 1, cos 0.995 — but its dot product (10) is the largest
                      [-1.0, 0.0],    # 5 (B)
                      [0.6, 0.8]]])   # 6 (A) → 3, cos 0.8 (vs 0.6 with 1)


def test_a_which_tokens_merge_by_hand():
    # edges by cosine: 2 → 3 (1.0), 4 → 1 (0.995), 6 → 3 (0.8); [CLS] has none
    # r = 1: the strongest edge, 2 → 3 (a dot product would have picked 4 → 1)
    # new order: unmerged A in order (0, 4, 6), then B (1, 3, 5)
    assert bipartite_matching(KEYS, 1).tolist() == [[0, 3, 4, 4, 1, 5, 2]]
    # r = 2: 2 → 3 and 4 → 1; left: [0, 6 | 1, 3, 5]
    assert bipartite_matching(KEYS, 2).tolist() == [[0, 2, 3, 3, 2, 4, 1]]
    # r = 3 (the cap, ⌊(7 − 1)/2⌋): 6 → 3 too; left: [0 | 1, 3, 5]
    assert bipartite_matching(KEYS, 3).tolist() == [[0, 1, 2, 2, 1, 3, 2]]
    with pytest.raises(ValueError, match="merges 1..3 of 7 tokens, not 4"):
        bipartite_matching(KEYS, 4)


def test_a_size_weighted_average_by_hand():
    hidden = torch.tensor([[[0.0], [10.0], [20.0], [30.0], [40.0], [50.0], [60.0]]])
    size = torch.tensor([[1.0, 1.0, 2.0, 1.0, 3.0, 1.0, 1.0]])  # tokens 2 and 4 already hold 2 and 3 patches
    merged, summed = merge_weighted(hidden, size, bipartite_matching(KEYS, 2), 5)
    # column 2 (token 1) takes in 4: (10·1 + 40·3)/4 = 32.5; column 3 (token 3) takes in 2: (30·1 + 20·2)/3
    assert merged[0, :, 0].tolist() == pytest.approx([0.0, 60.0, 32.5, 70 / 3, 50.0])
    assert summed.tolist() == [[1.0, 1.0, 4.0, 3.0, 1.0]]


def test_a_hook_tracks_cells_sizes_and_proportional_attention_by_hand():
    """One merge of r = 2 on the seven tokens (patch cells 0..5 are columns 1..6), then the output."""
    hook = ToMeHook(schedule=(2, 0), prop_attn=True)
    hidden = torch.arange(7.0)[None, :, None] * torch.ones(1, 1, 3)
    assert hook.attention_bias(0, hidden) is None  # before any merge every size is 1
    out = hook.after_attention(0, hidden, KEYS[:, :, None, :])  # one head
    # columns after: [0 | 6 | 1+4 | 3+2 | 5]; sizes 1 1 2 2 1; values (1+4)/2, (3+2)/2
    assert out[0, :, 0].tolist() == [0.0, 6.0, 2.5, 2.5, 5.0]
    assert hook.attention_bias(1, out).flatten().tolist() == pytest.approx([0.0, 0.0, math.log(2), math.log(2), 0.0])
    assert hook.after_attention(1, out, torch.randn(1, 5, 1, 2)) is out  # r = 0 in layer 1
    feats, merged = hook.patch_tokens(out)
    # patch tokens hold cells {5}, {0, 3}, {1, 2}, {4}: in raster order of their smallest cell
    assert merged["image_grid"].tolist() == [[0, 1, 4, 5]]
    assert merged["image_source"].tolist() == [[0, 1, 1, 0, 2, 3]]
    assert merged["image_size"].tolist() == [[2.0, 2.0, 1.0, 1.0]]
    assert feats[0, :, 0].tolist() == [2.5, 2.5, 5.0, 6.0]
    assert ToMeHook((2, 0), prop_attn=False).attention_bias(1, out) is None


@pytest.mark.parametrize(("n", "out", "layers", "expected"), [
    (256, 64, 23, (9,) * 21 + (3, 0)),  # LISA's CLIP-L/14: ⌈192/23⌉ = 9; 21·9 = 189, then the 3 left
    (256, 128, 23, (6,) * 21 + (2, 0)),  # ⌈128/23⌉ = 6: 126 + 2
    (256, 26, 23, (10,) * 23),  # 0.1·256 → 26: 230 = 23·10
    # one patch: r = 13 for 18 layers (257 → 23 tokens), then the cap: 23 → 12 → 7 → 4 → 3 → 2
    (256, 1, 23, (13,) * 18 + (11, 5, 3, 1, 1)),
    (256, 64, 2, (128, 64)),  # the cap binds: 257 tokens merge ≤ 128, then 129 ≤ 64
    # 0.3·256 → 77 tokens, 179 to merge: r = 101 gives 101 + ⌊155/2⌋ = 178; r = 102 gives 102 + 77
    (256, 77, 2, (102, 77)),
    (256, 256, 5, (0,) * 5),
    (6, 3, 1, (3,)),
])
def test_a_keep_to_r_by_hand(n, out, layers, expected):
    assert merge_schedule(n, out, layers) == expected


def test_a_too_shallow_tower_cannot_reach_the_count():
    assert smallest_count(256, 2) == 64 and smallest_count(256, 8) == 1 and smallest_count(6, 1) == 3
    with pytest.raises(ValueError):
        merge_schedule(256, 63, 2)


# --------------------------------------------------------------------------- (b) the authors' rule
def reference_matching(metric: torch.Tensor, r: int):
    """ToMe's ``bipartite_soft_matching`` with ``class_token=True`` (github.com/facebookresearch/ToMe at
    commit af95e4b, ``tome/merge.py`` L36-97), re-implemented here: returns merge(x, reduce)."""
    t = metric.shape[1]
    r = min(r, (t - 1) // 2)  # L36-44: one protected token, at most half of the rest
    assert r > 0  # L46-47 (the schedules below never ask for 0 at a layer that merges)
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)  # L50
        even, odd = unit[:, 0::2], unit[:, 1::2]  # L51: A and B alternate
        scores = even @ odd.transpose(1, 2)  # L52
        scores[:, 0, :] = -math.inf  # L54-55: [CLS] never merged
        best, best_at = scores.max(dim=2)  # L59
        edges = best.argsort(dim=1, descending=True)[..., None]  # L60
        merged_from, kept = edges[:, :r], edges[:, r:].sort(dim=1).values  # L62-63, L66-68
        merged_into = best_at[..., None].gather(1, merged_from)  # L64

    def merge(x: torch.Tensor, reduce: str) -> torch.Tensor:  # L70-80 (no distillation token)
        a, b = x[:, 0::2], x[:, 1::2]
        c = x.shape[-1]
        left = a.gather(1, kept.expand(-1, -1, c))
        moving = a.gather(1, merged_from.expand(-1, -1, c))
        b = b.scatter_reduce(1, merged_into.expand(-1, -1, c), moving, reduce=reduce)
        return torch.cat([left, b], dim=1)

    return merge


def reference_tome_tower(tower, pixels, select_layer: int, schedule, prop_attn: bool):
    """A ToMe forward of a transformers CLIP tower written from ``tome/patch/timm.py`` (af95e4b) L34-56
    (``ToMeBlock.forward``: attention, residual, merge with ``merge_wavg``, MLP) and L66-96
    (``ToMeAttention``: softmax(q·kᵀ·scale + log size), keys averaged over heads as the metric), with
    ``merge_wavg`` (``tome/merge.py`` L210-224) and ``merge_source`` (L227-239, the trace of which patches
    each token holds). Attention is computed here, eagerly, from CLIP's q/k/v/out projections; the
    norms and MLP are CLIP's. Returns the tower's output [B, T, d] and the source [B, T, 1 + N]."""
    with torch.no_grad():
        x = tower.pre_layrnorm(tower.embeddings(pixels))
        B, T, _ = x.shape
        size = None  # make_tome_class L107-109: a fresh size and source per forward
        source = torch.eye(T)[None].expand(B, T, T)
        run = select_layer % (len(tower.encoder.layers) + 1)  # hidden_states[select_layer]: the first `run` layers
        for layer, r in zip(tower.encoder.layers[:run], schedule, strict=True):
            attn = layer.self_attn
            h = layer.layer_norm1(x)
            H, hd = attn.num_heads, attn.head_dim

            def heads(t):
                return t.view(B, -1, H, hd).transpose(1, 2)

            q, k, v = heads(attn.q_proj(h)), heads(attn.k_proj(h)), heads(attn.v_proj(h))
            logits = (q @ k.transpose(-2, -1)) * attn.scale  # L82
            if prop_attn and size is not None:
                logits = logits + size.log()[:, None, None, :, 0]  # L85-86
            mixed = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, -1, H * hd)  # L88-91
            x = x + attn.out_proj(mixed)  # L92, L38
            metric = k.mean(1)  # L96: keys averaged over heads
            if r > 0:  # L40-53
                merge = reference_matching(metric, r)
                source = merge(source, "amax")  # merge_source
                if size is None:  # merge_wavg L217-218
                    size = torch.ones_like(x[..., 0, None])
                x = merge(x * size, "sum")  # L220
                size = merge(size, "sum")  # L221
                x = x / size  # L223
            x = x + layer.mlp(layer.layer_norm2(x))  # L55
            B, T = x.shape[:2]
    return x, source


@pytest.mark.parametrize(("keep", "prop_attn"), [(0.25, True), (0.3, True), (0.5, False), (0.9, True)])
def test_b_equals_the_authors_rule_on_the_tiny_tower(tiny, keep, prop_attn):
    loaded, batch = tiny
    model = loaded.model
    method = ToMe(keep=keep, prop_attn=prop_attn, positions="renumber").bind(L, N)
    schedule = merge_schedule(N, method.count, 2)
    ref_x, ref_source = reference_tome_tower(model.vision_tower, batch["clip_pixels"], -2, schedule, prop_attn)
    rec = Layer0()
    with torch.no_grad():
        tokens, merged = method.encode_image(model, batch["clip_pixels"])
        state, _ = run_llm(model, batch, method, observers=[rec])
    n = method.count
    assert tokens.shape == (3, n, model.llm.config.hidden_size) and ref_x.shape[1] == n + 1
    for i in range(3):
        # the reference's patch tokens by the cells they hold (its [CLS] stayed first and alone)
        assert ref_source[i, 0].nonzero().flatten().tolist() == [0]
        ref_sets = {frozenset((ref_source[i, j, 1:] > 0).nonzero().flatten().tolist()): j for j in range(1, n + 1)}
        ours = [frozenset((merged["image_source"][i] == j).nonzero().flatten().tolist()) for j in range(n)]
        assert set(ours) == set(ref_sets)  # the same merged sets
        for j, cells in enumerate(ours):
            assert merged["image_grid"][i, j] == min(cells) and merged["image_size"][i, j] == len(cells)
            ref_token = ref_x[i, ref_sets[cells]]
            # what the LLM sees: the projector on the reference's merged feature, at its smallest cell
            assert torch.allclose(rec.hidden[i, j], model.mm_projector(ref_token), atol=1e-5), (i, j)
        assert rec.grid[i].tolist() == sorted(min(c) for c in ours)  # raster order of the smallest cells
    # the LLM sees n image tokens from layer 0, at contiguous RoPE positions (positions=renumber)
    assert state.trace.image_per_layer.tolist() == [[n] * L] * 3
    assert torch.equal(rec.rope_pos, rec.rope_pos[:, :1] + torch.arange(n))
    # per-sample merges: the samples' images differ, so do their sets
    assert len({tuple(merged["image_source"][i].tolist()) for i in range(3)}) == 3


def test_b_positions(tiny):
    """renumber is LLaVA + ToMe's prompt: transformers' LlamaModel on the prompt spliced with only the n
    merged tokens (positions 0..n−1); keep puts each merged token at its cell's original position and
    leaves the text where the dense prompt has it."""
    from cspexp.models.lisa import PAD

    loaded, batch = tiny
    model = loaded.model
    method = ToMe(keep=0.3, positions="renumber").bind(L, N)
    with torch.no_grad():
        tokens, merged = method.encode_image(model, batch["clip_pixels"])
        compact = model.splice(batch["input_ids"], batch["attention_mask"], tokens)
        reference = model.decoder(inputs_embeds=compact.embeds, attention_mask=(compact.kind != PAD).long())
        state, _ = run_llm(model, batch, method)
        rec = Layer0()
        kept, _ = run_llm(model, batch, ToMe(keep=0.3, positions="keep").bind(L, N), observers=[rec])
        dense = model.splice(batch["input_ids"], batch["attention_mask"], model.encode_image(batch["clip_pixels"])[0])
    real = state.kind != PAD
    assert state.hidden.shape == reference.last_hidden_state.shape
    assert (state.hidden - reference.last_hidden_state).abs()[real].max() <= 1e-5
    start = int((dense.kind[0] == IMAGE).nonzero()[0])
    assert torch.equal(rec.pos, start + merged["image_grid"]) and torch.equal(rec.rope_pos, rec.pos)
    text = kept.kind != IMAGE
    assert torch.equal(kept.pos[text].view(3, -1), dense.pos[dense.kind != IMAGE].view(3, -1))
    assert not torch.allclose(kept.hidden[real], reference.last_hidden_state[real], atol=1e-3)


def test_b_merges_for_the_pictures(tiny):
    loaded, batch = tiny
    method = ToMe(keep=0.3).bind(L, N)
    with torch.no_grad():
        _, merged = method.encode_image(loaded.model, batch["clip_pixels"])
        state, _ = run_llm(loaded.model, batch, method)
    for i, got in enumerate(state.extras["merges"]):
        expected = {}
        for j, cell in enumerate(merged["image_grid"][i].tolist()):
            members = [c for c in (merged["image_source"][i] == j).nonzero().flatten().tolist() if c != cell]
            if members:
                expected[cell] = members
        assert got == expected
        assert sum(len(m) for m in got.values()) == N - method.count  # every merged-away cell listed once


# --------------------------------------------------------------------------- (c) edges
def test_c_keep_one_is_the_dense_pass_bit_for_bit(tiny):
    loaded, batch = tiny
    method = ToMe(keep=1.0).bind(L, N)
    assert not method.changes_vision and method.vision_description() is None
    with torch.no_grad():
        dense = segment(loaded.model, batch, NoPruning().bind(L, N))
        out = segment(loaded.model, batch, method)
    assert torch.equal(out.seg_embeds, dense.seg_embeds)
    assert all(torch.equal(a, b) for a, b in zip(out.masks, dense.masks, strict=True))
    assert out.trace.image_per_layer.eq(N).all() and out.trace.overhead == [] and "merges" not in out.state.extras


def test_c_the_smallest_keep_of_the_tiny_tower(tiny):
    """Two CLIP layers merge at most 128 then 64: keep 0.25 is the least, one token less is refused."""
    loaded, batch = tiny
    method = ToMe(keep=0.25).bind(L, N)
    method.check_model(loaded.model)
    with torch.no_grad():
        out = segment(loaded.model, batch, method)
    assert out.trace.image_per_layer.eq(64).all()
    hd = 16
    assert out.trace.overhead == [
        {"kind": "matmul", "what": "tome similarity, CLIP layer 0", "m": 129, "n": 128, "k": hd, "widths": {"k": "clip_head"}},
        {"kind": "matmul", "what": "tome similarity, CLIP layer 1", "m": 65, "n": 64, "k": hd, "widths": {"k": "clip_head"}},
    ]
    with pytest.raises(ConfigError) as err:
        ToMe(keep=0.2).bind(L, N).check_model(loaded.model)
    assert str(err.value) == ("prune.keep=0.2 asks for 52 of 256 image tokens, but ToMe merges at most half of a "
                              "layer's tokens and the CLIP tower runs 2 layers to its feature layer: keep must be at "
                              "least 0.25 (64 tokens)")


def test_c_one_token_holds_the_whole_image():
    """A deeper tower (9 layers to the feature layer) merges 256 patches into one at keep 1/256."""
    from cspexp.data.shapes import ShapesDataset

    cfg = OmegaConf.load(CONF_DIR / "model" / "tiny_random.yaml")
    cfg.vision.num_hidden_layers = 10
    loaded = build(cfg, words=ShapesDataset.vocabulary())
    batch = loaded.processor.collate([ShapesDataset(split="val", n=2)[i] for i in range(2)])
    method = ToMe(keep=1 / 256).bind(L, N)
    # r = 64: 257 → 193 → 129 → 65 tokens, then the cap halves what is left: 32, 16, 8, 4, 2, 1
    # (r = 63 ends with 2 patches: 257 → 194 → 131 → 68 → 35 → 18 → 10 → 6 → 4 → 3)
    assert merge_schedule(N, 1, 9) == (64, 64, 64, 32, 16, 8, 4, 2, 1)
    rec = Layer0()
    with torch.no_grad():
        _, merged = method.encode_image(loaded.model, batch["clip_pixels"])
        state, _ = run_llm(loaded.model, batch, method, observers=[rec])
    assert merged["image_grid"].tolist() == [[0], [0]] and merged["image_source"].eq(0).all()
    assert merged["image_size"].tolist() == [[256.0], [256.0]]
    assert state.trace.image_per_layer.eq(1).all() and rec.grid.tolist() == [[0], [0]]
    assert state.extras["merges"] == [{0: list(range(1, N))}] * 2


# --------------------------------------------------------------------------- the feature cache
BASE = ("model=tiny_random", "dataset.n=5", "dataset.batch_size=2", "logger=none", "++compare_dense=false")
TIMING = ("latency_ms", "features")


def rows(run_dir) -> dict[int, dict]:
    return {r["idx"]: {k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run_dir / "samples.jsonl")}


def results(run_dir) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_cached_tome_equals_uncached_and_never_shares_an_entry(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(feature_cache, "_memory", MemoryStore(0))
    cache_dir = tmp_path / "cache"

    def run(name, *overrides, cached=True):
        cache = ("cache.features=true", f"cache.dir={cache_dir}") if cached else ("cache.features=false",)
        evaluate(compose_cfg(*BASE, *overrides, *cache, f"paths.output_dir={tmp_path / name}"))
        return tmp_path / name

    plain = run("plain", "prune=tome", "prune.keep=0.3", cached=False)
    first = run("first", "prune=tome", "prune.keep=0.3")
    dense = run("dense", "prune=none")  # after tome: finds none of its entries
    monkeypatch.setattr(feature_cache, "_memory", MemoryStore(0))  # as a new process: the disk only
    again = run("again", "prune=tome", "prune.keep=0.3")
    memory = run("memory", "prune=tome", "prune.keep=0.3")
    other = run("other", "prune=tome", "prune.keep=0.5")
    for out, source in ((first, "computed"), (dense, "computed"), (again, "disk"), (memory, "memory"), (other, "computed")):
        assert {r["features"] for r in read_jsonl(out / "samples.jsonl")} == {source}, out.name
    for out in (first, again, memory):
        assert rows(out) == rows(plain), out.name  # bit for bit: counts, IoU, token trace, FLOPs
        for key in ("metrics", "metrics_by_kind", "flops", "tokens"):
            assert results(out)[key] == results(plain)[key], (out.name, key)
    assert (results(dense)["cache"]["misses"], results(other)["cache"]["misses"]) == (5, 5)
    # three batches (2, 2, 1) for each of none, tome 0.3 and tome 0.5
    assert len(list(cache_dir.rglob("*.safetensors"))) == 9
    # tome's FLOPs: the LLM sees 77 tokens from layer 0; CLIP and the projector run on fewer
    r = results(first)
    assert r["tokens"]["image_per_layer"] == [77.0] * L
    assert r["flops"]["vision"]["method"] < r["flops"]["vision"]["dense"] == results(dense)["flops"]["vision"]["dense"]
    assert results(dense)["flops"]["vision"]["reduction"] == 0.0


def test_features_of_another_vision_stage_are_refused(tiny):
    loaded, batch = tiny
    with torch.no_grad():
        dense = encode_vision(loaded.model, batch, cls_attention=True, clip_keys=True)
        merged = encode_vision(loaded.model, batch, cls_attention=True, clip_keys=True,
                               method=ToMe(keep=0.5).bind(L, N))
    assert merged.cls_attention is None and merged.image_tokens.shape[1] == 128
    with pytest.raises(RuntimeError, match=r"the given features are the dense tower's, not prune=tome's"):
        run_llm(loaded.model, batch, ToMe(keep=0.5).bind(L, N), features=dense)
    with pytest.raises(RuntimeError, match=r"the given features are merged inside CLIP, not prune=none's"):
        run_llm(loaded.model, batch, NoPruning().bind(L, N), features=merged)


# --------------------------------------------------------------------------- (d) bad settings
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"keep": 0}, "prune.keep=0 is outside (0, 1]"),
    ({"keep": 1.5}, "prune.keep=1.5 is outside (0, 1]"),
    ({"prop_attn": "yes"}, "prune.prop_attn='yes' is not allowed; it must be true or false"),
    ({"positions": "compact"}, "prune.positions='compact' is not allowed; use one of ['keep', 'renumber']"),
])
def test_d_bad_values_are_one_config_error(kwargs, message):
    with pytest.raises(ConfigError) as err:
        ToMe(**kwargs).bind(L, N)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_d_cli_too_small_a_keep_is_one_line(tmp_path):
    line = cli_error_line(tmp_path, "prune=tome", "prune.keep=0.1")
    assert "prune.keep=0.1 asks for 26 of 256 image tokens" in line and "keep must be at least 0.25 (64 tokens)" in line
