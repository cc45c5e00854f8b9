"""prune=visionzip against independent references: a case worked by hand, a re-implementation of the
authors' rule written here from their code (run on CLIP's own eager attention maps and its k_proj
output, not on cspexp's `clip_cls_attention` / `clip_patch_keys`), the edges of keep and of the split,
and one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch

from cspexp.features.cache import FeatureCache, MemoryStore
from cspexp.features.vision import encode_vision
from cspexp.models.lisa import IMAGE, SYSTEM, TEXT, PromptEmbeds
from cspexp.pruning.engine import Observer, TokenState
from cspexp.pruning.methods import NoPruning, PruningContext
from cspexp.pruning.methods.visionzip import VisionZip, split_counts
from cspexp.pruning.pipeline import run_llm, segment
from cspexp.utils.errors import ConfigError

from helpers import cli_error_line, tiny_random_and_items

L, N = 8, 256  # tiny_random: 8 decoder layers, a 16×16 grid of image tokens


@pytest.fixture(scope="module")
def tiny():
    loaded, items = tiny_random_and_items(3)
    return loaded, loaded.processor.collate(items)


class Layer0(Observer):
    """The image tokens entering layer 0 (after the method's setup): grid cells and hidden states."""

    def before_layer(self, layer, state, ctx):
        if layer == 0:
            cols = state.image_columns()
            taken = state.take(cols)
            self.grid, self.hidden, self.pos = taken.grid.clone(), taken.hidden.clone(), taken.pos.clone()


# --------------------------------------------------------------------------- (a) by hand
def hand_state():
    """One sample: a system token, 8 image tokens on a 2×4 grid, two text tokens; width 2.
    Image cell c holds (c, 1)."""
    n_img, d = 8, 2
    n = 1 + n_img + 2
    embeds = torch.zeros(1, n, d)
    embeds[0, 1 : 1 + n_img] = torch.stack([torch.arange(n_img).float(), torch.ones(n_img)], dim=1)
    kind = torch.tensor([[SYSTEM] + [IMAGE] * n_img + [TEXT, TEXT]])
    grid = torch.tensor([[-1] + list(range(n_img)) + [-1, -1]])
    pos = torch.arange(n)[None]
    prompt = PromptEmbeds(embeds=embeds, pos=pos, kind=kind, grid=grid, query_pos=torch.tensor([n - 2]),
                          seg_pos=torch.tensor([n - 1]))
    return TokenState.from_prompt(prompt, 1)


def test_a_hand_worked_case():
    # [CLS] attention per cell: the two largest are cells 0 (0.30) and 4 (0.20) → dominant.
    cls = torch.tensor([[0.30, 0.05, 0.10, 0.02, 0.20, 0.08, 0.15, 0.10]])
    # keep 0.5 of 8 = 4 tokens, dominant_ratio 0.5 → D = 2, C = 2. The R = 6 others in raster order
    # are cells 1 2 3 5 6 7; step ⌊6/2⌋ = 3 → slots 0 and 3 → targets cells 1 and 5; members 2 3 6 7.
    keys = torch.tensor([[[9.0, 9.0],    # 0 (dominant: its key is never used)
                          [1.0, 0.0],    # 1 target
                          [2.0, 1.0],    # 2 → 1 (cos 0.89 vs 0.45)
                          [1.0, 3.0],    # 3 → 5 (cos 0.95 vs 0.32)
                          [9.0, -9.0],   # 4 (dominant)
                          [0.0, 10.0],   # 5 target, a long key
                          [3.0, 1.0],    # 6 → 1 by cosine (0.95 vs 0.32); a plain dot product would pick 5 (3 vs 10)
                          [1.0, 1.0]]])  # 7: equally similar to both → the first target, cell 1
    state = hand_state()
    method = VisionZip(keep=0.5, dominant_ratio=0.5).bind(1, 8)
    assert (method.n_dominant, method.n_contextual) == (2, 2)
    ctx = PruningContext(layers=None, rotary_emb=None, grid_size=(2, 4), cls_attention=cls, clip_keys=keys)
    method.setup(state, ctx)

    ex = state.extras["visionzip"]
    assert ex["dominant"].tolist() == [[0, 4]]
    assert ex["targets"].tolist() == [[1, 5]] and ex["members"].tolist() == [[2, 3, 6, 7]]
    assert ex["assign"].tolist() == [[0, 1, 0, 0]]  # slot of cell 1, 5, 1, 1
    img = state.kind[0] == IMAGE
    assert state.grid[0][img].tolist() == [0, 1, 4, 5]  # in position order, merged tokens at their targets
    assert state.pos[0][img].tolist() == [1, 2, 5, 6]  # original positions (cell c sits at position c + 1)
    # a target's value is its own plus the plain mean of its members (not a mean that includes it):
    # cell 1: (1, 1) + mean((2, 1), (6, 1), (7, 1)) = (6, 2); cell 5: (5, 1) + (3, 1) = (8, 2)
    assert state.hidden[0][img].tolist() == [[0.0, 1.0], [6.0, 2.0], [4.0, 1.0], [8.0, 2.0]]
    # text and system tokens untouched; the products charged with their sizes
    assert state.kind[0].tolist() == [SYSTEM] + [IMAGE] * 4 + [TEXT, TEXT]
    assert state.trace.overhead == [
        {"kind": "matmul", "what": "visionzip key similarity", "m": 4, "n": 2, "k": 2,  # [M, hd] × [hd, C]
         "widths": {"k": "clip_head"}},
        {"kind": "matmul", "what": "visionzip merge", "m": 2, "n": 2, "k": 4, "widths": {"n": "hidden"}},  # [C, M] × [M, d]
    ]


def test_a_target_nobody_joins_keeps_its_value():
    cls = torch.tensor([[0.30, 0.05, 0.10, 0.02, 0.20, 0.08, 0.15, 0.10]])
    keys = torch.tensor([[[1.0, 0.0]] * 5 + [[0.0, 1.0]] + [[1.0, 0.0]] * 2])  # only cell 5 points elsewhere
    state = hand_state()
    VisionZip(keep=0.5, dominant_ratio=0.5).bind(1, 8).setup(
        state, PruningContext(layers=None, rotary_emb=None, grid_size=(2, 4), cls_attention=cls, clip_keys=keys))
    img = state.kind[0] == IMAGE
    # members 2 3 6 7 all join cell 1: (1, 1) + (18/4, 1); cell 5 keeps (5, 1)
    assert state.hidden[0][img].tolist() == [[0.0, 1.0], [5.5, 2.0], [4.0, 1.0], [5.0, 1.0]]


# --------------------------------------------------------------------------- (b) the authors' rule
def reference_visionzip(model, pixels, n_dominant: int, n_contextual: int) -> dict:
    """VisionZip's selection and merge, written from github.com/dvlab-research/VisionZip at commit
    3151f6d (`visionzip/clip_encoder.py` L42-80, `visionzip/utils.py` L22-24, L89, L113-124, L191,
    `visionzip/main.py` L7, `visionzip/llava_arch.py` L31-33), on CLIP's own outputs:
    the eager attention maps (`output_attentions`) and the raw k_proj output captured by a hook.

    Adapted to LISA in one way (docs/method.md): LISA's LLM sees no [CLS] token, so [CLS] is neither
    kept nor merged — the D dominant tokens are D patches (the authors keep [CLS] as one of theirs,
    main.py L7 `dominant - 1`, clip_encoder.py L53-54).
    Returns per sample the dominant / target / member cells, member → target cell, and the contextual
    tokens in CLIP's width and after the projector (llava_arch.py L32-33: projector after the merge)."""
    tower = copy.deepcopy(model.vision_tower)
    tower.set_attn_implementation("eager")  # the authors read attention maps (their eager CLIPAttention_forward)
    layer = model.vision_select_layer  # −2; utils.py L191: r = 1 at layer 22 of 24, i.e. layers[-2]
    captured = {}
    hook = tower.encoder.layers[layer].self_attn.k_proj.register_forward_hook(
        lambda module, args, out: captured.__setitem__("k", out))
    with torch.no_grad():
        out = tower(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    hook.remove()
    attn_weights = out.attentions[layer]  # L43: [B, H, 1+N, 1+N]
    hidden_states = out.hidden_states[layer]  # L44: the feature layer's output, [B, 1+N, d]
    B, n1, _ = hidden_states.shape
    H = attn_weights.shape[1]
    # utils.py L23-24, L89: key_states = k_proj(x) shaped [B, H, n, hd]; the metric is its mean over heads
    metric = captured["k"].view(B, n1, H, -1).transpose(1, 2).mean(1)  # [B, 1+N, hd]
    # (LISA) no [CLS]: keep the patch rows only
    cls_attention_sum = attn_weights[:, :, 0, 1:].sum(dim=1)  # L51-52: heads summed
    hidden_states, metric = hidden_states[:, 1:], metric[:, 1:]
    n = hidden_states.shape[1]
    topk = cls_attention_sum.topk(n_dominant, dim=1).indices  # L53 (no +1: no [CLS] to skip)
    mask = torch.ones(B, n, dtype=torch.bool).scatter_(1, topk, False)  # L56: True = not dominant
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(B, n_dominant, -1)  # L57
    metric_filtered = metric[mask].view(B, n - n_dominant, metric.shape[2])  # L60
    hidden_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(B, n - n_dominant, -1)  # L62
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)  # L64
    step = max(1, metric_normalized.shape[1] // n_contextual)  # L67
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:n_contextual]  # L68
    target_tokens = metric_normalized[:, target_indices, :]  # L69
    not_target = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    tokens_to_merge = metric_normalized[:, not_target, :]  # L71
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))  # L72
    assign_one_hot = torch.zeros(B, tokens_to_merge.shape[1], n_contextual)  # L73
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)  # L74
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)  # L75
    hidden_to_merge = hidden_filtered[:, not_target, :]  # L76
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts  # L77
    target_hidden = hidden_filtered[:, target_indices, :]  # L78
    contextual_tokens = target_hidden + aggregated_hidden  # L80

    cells = torch.arange(n).expand(B, n)
    rest = cells[mask].view(B, n - n_dominant)  # the non-dominant cells, in order (as masked_select keeps it)
    targets, members = rest[:, target_indices], rest[:, not_target]
    with torch.no_grad():
        projected = model.mm_projector(torch.cat([dominant_tokens, contextual_tokens], dim=1))  # llava_arch L33
    return {
        "dominant": cells[~mask].view(B, n_dominant), "targets": targets, "members": members,
        "member_target": torch.gather(targets, 1, similarity.argmax(dim=2)),
        "has_members": assign_one_hot.sum(dim=1) > 0,  # [B, C]
        "dominant_projected": projected[:, :n_dominant], "contextual_projected": projected[:, n_dominant:],
    }


@pytest.mark.parametrize(("keep", "ratio"), [(0.25, 0.84375), (0.5, 0.84375), (0.1, 0.5)])
def test_equals_the_authors_rule_on_the_tiny_model(tiny, keep, ratio):
    loaded, batch = tiny
    model = loaded.model
    method = VisionZip(keep=keep, dominant_ratio=ratio).bind(L, N)
    D, C = method.n_dominant, method.n_contextual
    ref = reference_visionzip(model, batch["clip_pixels"], D, C)
    rec = Layer0()
    with torch.no_grad():
        state, _ = run_llm(model, batch, method, observers=[rec])
    ex = state.extras["visionzip"]
    b = model.mm_projector.bias
    for i in range(3):
        assert sorted(ex["dominant"][i].tolist()) == sorted(ref["dominant"][i].tolist())
        assert ex["targets"][i].tolist() == ref["targets"][i].tolist()
        assert ex["members"][i].tolist() == ref["members"][i].tolist()
        assert torch.equal(torch.gather(ex["targets"][i], 0, ex["assign"][i]), ref["member_target"][i])
        # what the pictures draw (`state.extras["merges"]`): each target cell and the cells merged into it
        expected_merges: dict[int, list[int]] = {}
        for member, target in zip(ref["members"][i].tolist(), ref["member_target"][i].tolist()):
            expected_merges.setdefault(target, []).append(member)
        assert state.extras["merges"][i] == {t: sorted(m) for t, m in expected_merges.items()}
        # what the LLM sees: the dominant and contextual tokens, each at its own (or its target's) cell
        cells = rec.grid[i].tolist()
        assert cells == sorted(ref["dominant"][i].tolist() + ref["targets"][i].tolist())
        at = {c: rec.hidden[i, j] for j, c in enumerate(cells)}
        for j, c in enumerate(ref["dominant"][i].tolist()):
            assert torch.allclose(at[c], ref["dominant_projected"][i, j], atol=1e-5)
        # merged after the projector P(x) = Wx + b: P(x_t) + mean P(x_m) = P(x_t + mean x_m) + b — the
        # authors' value plus one bias for a target with members (docs/method.md), exactly it without
        for j, c in enumerate(ref["targets"][i].tolist()):
            expected = ref["contextual_projected"][i, j] + (b if ref["has_members"][i, j] else 0)
            assert torch.allclose(at[c], expected, atol=1e-5), (i, c)
    assert state.trace.image_per_layer.tolist() == [[D + C] * L] * 3
    # per-sample choices: the samples' images differ, so do their dominant sets
    assert len({tuple(ex["dominant"][i].tolist()) for i in range(3)}) == 3


def test_the_keys_are_clips_own_k_projection_averaged_over_heads(tiny):
    """`encode_image(output_keys=True)` against a hook on the feature layer's k_proj during the tower's
    own forward; asking for keys changes nothing else."""
    loaded, batch = tiny
    model = loaded.model
    calls = []  # k_proj outputs in call order: the tower's own forward comes first

    def record(module, args, out):
        calls.append(out)

    hook = model.vision_tower.encoder.layers[model.vision_select_layer].self_attn.k_proj.register_forward_hook(record)
    with torch.no_grad():
        tokens, cls, keys = model.encode_image(batch["clip_pixels"], output_cls_attention=True, output_keys=True)
    hook.remove()
    heads = model.vision_tower.config.num_attention_heads
    B, n1, d = calls[0].shape
    assert keys.shape == (3, N, d // heads) and keys.dtype == torch.float32
    assert torch.allclose(keys, calls[0].view(B, n1, heads, d // heads).mean(2)[:, 1:], atol=1e-6)
    with torch.no_grad():
        plain, plain_cls = model.encode_image(batch["clip_pixels"], output_cls_attention=True)
    assert torch.equal(plain, tokens) and torch.equal(plain_cls, cls)
    with torch.no_grad():
        features = encode_vision(model, batch, cls_attention=True, clip_keys=True)
        without = encode_vision(model, batch, cls_attention=True)
    assert torch.equal(features.clip_keys, keys) and without.clip_keys is None
    assert torch.equal(features.image_tokens, without.image_tokens)


def test_the_feature_cache_stores_and_checks_the_keys(tiny, tmp_path, monkeypatch):
    import cspexp.features.cache as feature_cache

    monkeypatch.setattr(feature_cache, "_memory", MemoryStore(0))
    loaded, batch = tiny
    with torch.no_grad():
        computed = encode_vision(loaded.model, batch, cls_attention=True, clip_keys=True)
    cache = FeatureCache(loaded, "cpu", 0, tmp_path)  # no memory: lookups read the disk
    cache.store(batch, computed, [1.0] * 3)
    got = cache.lookup(batch)
    assert got.source == "disk" and torch.equal(got.features.clip_keys, computed.clip_keys)
    # keys of the wrong width: the shard is stale, and recomputed
    computed.clip_keys = computed.clip_keys[..., :-1]
    cache.store(batch, computed, [1.0] * 3)
    assert cache.lookup(batch) is None


def test_features_without_keys_are_refused(tiny):
    loaded, batch = tiny
    with torch.no_grad():
        features = encode_vision(loaded.model, batch, cls_attention=True)
    with pytest.raises(RuntimeError, match="needs CLIP's patch keys"):
        run_llm(loaded.model, batch, VisionZip().bind(L, N), features=features)
    state = hand_state()
    ctx = PruningContext(layers=None, rotary_emb=None, grid_size=(2, 4), cls_attention=torch.rand(1, 8))
    with pytest.raises(RuntimeError, match=r"prune=visionzip needs CLIP's patch keys in the context \(ctx.clip_keys\)"):
        VisionZip(keep=0.5).bind(1, 8).setup(state, ctx)


# --------------------------------------------------------------------------- (c) edges
@pytest.mark.parametrize(("keep", "ratio", "n", "expected"), [
    (0.25, 0.84375, 256, (54, 10)),  # the authors' 54 + 10 of 64
    (0.5, 0.84375, 256, (108, 20)),  # 108 + 20 of 128
    (0.75, 0.84375, 256, (162, 30)),  # 162 + 30 of 192
    (0.3, 0.84375, 256, (65, 12)),  # ⌈76.8⌉ = 77; 0.84375·77 = 64.97 → 65
    (0.5, 0.5, 6, (2, 1)),  # 3 kept; 1.5 rounds half up
    (1.0, 0.0, 256, (0, 256)),
    (1.0, 1.0, 256, (256, 0)),
    (1 / 256, 0.84375, 256, (1, 0)),  # one token: 0.84 rounds to 1 dominant
    (1 / 256, 0.4, 256, (0, 1)),  # one token: 0.4 rounds to 0, a single contextual token
])
def test_split_counts(keep, ratio, n, expected):
    assert split_counts(keep, ratio, n) == expected


def test_describe_names_the_split():
    assert VisionZip(dominant_ratio=1).describe() == {"name": "visionzip", "keep": 0.25, "dominant_ratio": 1.0}
    assert VisionZip(keep=1, dominant_ratio=1) == VisionZip(keep=1.0, dominant_ratio=1.0)


def test_keep_one_is_the_dense_pass(tiny):
    loaded, batch = tiny
    with torch.no_grad():
        dense = segment(loaded.model, batch, NoPruning().bind(L, N))
        for ratio in (0.0, 0.84375, 1.0):
            out = segment(loaded.model, batch, VisionZip(keep=1.0, dominant_ratio=ratio).bind(L, N))
            assert torch.equal(out.seg_embeds, dense.seg_embeds)
            assert out.trace.image_per_layer.eq(N).all() and out.trace.overhead == []


def test_dominant_ratio_one_keeps_the_top_cls_attention_and_merges_nothing(tiny):
    loaded, batch = tiny
    model = loaded.model
    with torch.no_grad():
        tokens, cls = model.encode_image(batch["clip_pixels"], output_cls_attention=True)
    rec = Layer0()
    with torch.no_grad():
        out = segment(model, batch, VisionZip(keep=0.25, dominant_ratio=1.0).bind(L, N), observers=[rec])
    for i in range(3):
        expected = sorted(sorted(range(N), key=lambda c: (-float(cls[i, c]), c))[:64])
        assert rec.grid[i].tolist() == expected
        assert torch.equal(rec.hidden[i], tokens[i, expected])  # unmerged: the spliced tokens themselves
    assert out.trace.overhead == [] and "targets" not in out.state.extras["visionzip"]


def test_dominant_ratio_zero_merges_everything_into_a_uniform_stride(tiny):
    loaded, batch = tiny
    model = loaded.model
    with torch.no_grad():
        tokens, _cls, keys = model.encode_image(batch["clip_pixels"], output_cls_attention=True, output_keys=True)
    rec = Layer0()
    with torch.no_grad():
        out = segment(model, batch, VisionZip(keep=0.25, dominant_ratio=0.0).bind(L, N), observers=[rec])
    targets = list(range(0, N, 4))  # R = 256, C = 64 → every 4th cell from 0
    members = [c for c in range(N) if c % 4]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    for i in range(3):
        assert rec.grid[i].tolist() == targets
        # my own assignment: most similar target key by cosine, first on ties
        best = (unit[i, members] @ unit[i, targets].T).argmax(1)
        for j, t in enumerate(targets):
            joined = [m for m, k in zip(members, best.tolist()) if k == j]
            expected = tokens[i, t] + (tokens[i, joined].mean(0) if joined else 0)
            assert torch.allclose(rec.hidden[i, j], expected, atol=1e-5)
    assert out.trace.overhead == [
        {"kind": "matmul", "what": "visionzip key similarity", "m": 192, "n": 64, "k": keys.shape[-1],
         "widths": {"k": "clip_head"}},
        {"kind": "matmul", "what": "visionzip merge", "m": 64, "n": model.llm.config.hidden_size, "k": 192,
         "widths": {"n": "hidden"}},
    ]


def test_a_single_contextual_token_holds_the_whole_image(tiny):
    loaded, batch = tiny
    model = loaded.model
    with torch.no_grad():
        tokens, _ = model.encode_image(batch["clip_pixels"])
    rec = Layer0()
    with torch.no_grad():
        segment(model, batch, VisionZip(keep=1 / 256, dominant_ratio=0.4).bind(L, N), observers=[rec])
    assert rec.grid.tolist() == [[0]] * 3  # the one target: the first remaining cell
    assert torch.allclose(rec.hidden[:, 0], tokens[:, 0] + tokens[:, 1:].mean(1), atol=1e-5)


# --------------------------------------------------------------------------- (d) bad settings
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"keep": 0}, "prune.keep=0 is outside (0, 1]"),
    ({"keep": 1.5}, "prune.keep=1.5 is outside (0, 1]"),
    ({"dominant_ratio": 1.5}, "prune.dominant_ratio=1.5 is outside [0, 1]"),
    ({"dominant_ratio": -0.1}, "prune.dominant_ratio=-0.1 is outside [0, 1]"),
    ({"dominant_ratio": "half"}, "prune.dominant_ratio='half' is not allowed; it must be a number"),
    ({"dominant_ratio": True}, "prune.dominant_ratio=True is not allowed; it must be a number"),
])
def test_bad_values_are_one_config_error(kwargs, message):
    with pytest.raises(ConfigError) as err:
        VisionZip(**kwargs).bind(L, N)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_bad_ratio_is_one_line(tmp_path):
    assert "prune.dominant_ratio=2 is outside [0, 1]" in cli_error_line(tmp_path, "prune=visionzip",
                                                                          "prune.dominant_ratio=2")
