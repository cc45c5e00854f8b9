"""`pdrop` against PyramidDrop's own rule: `prune.count=original` (⌊N·λ^s⌋ of the original N) and
`prune.positions=renumber` (RoPE positions 0..n−1 after each drop), checked against hand-worked
counts, transformers' `LlamaModel.forward`, and a re-implementation of the authors' selection written
here from their code; the defaults (`remaining`, `keep`) are checked to be today's behaviour."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from cspexp.models.lisa import IMAGE, PAD, SYSTEM, TEXT, PromptEmbeds
from cspexp.pruning.engine import DecoderLoop, Observer, TokenState
from cspexp.pruning.methods import PruningContext, PyramidDrop
from cspexp.pruning.pipeline import run_llm
from cspexp.utils.errors import ConfigError
from cspexp.utils.instantiate import build

from helpers import tiny_random_and_items
from test_engine import prompt_batch, tiny_llama

L, N = 8, 256  # the tiny LISA: 8 LLaMA layers, 16 × 16 image tokens; default drops before layers 2, 4, 6


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_and_items(3)


class Layers(Observer):
    """What enters every layer: hidden states, positions, RoPE positions, image grid cells."""

    def on_setup(self, state, ctx):
        self.hidden, self.pos, self.rope, self.cells = [], [], [], []

    def before_layer(self, layer, state, ctx):
        self.hidden.append(state.hidden.clone())
        self.pos.append(state.pos.clone())
        self.rope.append(state.rope_pos.clone())
        image = state.kind == IMAGE
        self.cells.append([state.grid[b][image[b]].tolist() for b in range(state.batch_size)])


def counts(**kw) -> list[int]:
    return list(PyramidDrop(**kw).bind(L, N).counts.values())


# --------------------------------------------------------------------------- (a) hand-worked counts
def test_counts_of_both_rules_worked_by_hand():
    # remaining: ⌈0.288·256⌉ = ⌈73.728⌉ = 74, ⌈0.288·74⌉ = ⌈21.312⌉ = 22, ⌈0.288·22⌉ = ⌈6.336⌉ = 7
    assert counts(keep=0.288) == counts(keep=0.288, count="remaining") == [74, 22, 7]
    # original: ⌊256·0.288⌋ = ⌊73.728⌋ = 73, ⌊256·0.082944⌋ = ⌊21.233664⌋ = 21, ⌊256·0.023887872⌋ = ⌊6.115…⌋ = 6
    assert counts(keep=0.288, count="original") == [73, 21, 6]
    # the authors' own setting: ratios [0.5, 0.25, 0.125] of 256; both rules agree when λ^s·N is whole
    assert counts(keep=0.5, count="original") == counts(keep=0.5) == [128, 64, 32]
    # exact for a float λ: 0.29·100 is 28.999999999999996 in floats, ⌊·⌋ of the decimal 0.29·100 = 29
    assert int(100 * 0.29) == 28
    assert list(PyramidDrop(keep=0.29, count="original").bind(L, 100).counts.values()) == [29, 8, 2]  # 8.41, 2.4389


@pytest.mark.parametrize(
    ("keep", "layers", "message"),
    [
        # 25.6 → 25, 2.56 → 2, 0.256 → 0
        (0.1, [2, 4, 6], "prune.keep=0.1 with prune.count=original keeps ⌊256·0.1^3⌋ = 0 image tokens at drop 3 "
                         "(layer 6): raise prune.keep, use fewer prune.layers, or prune.count=remaining"),
        # 0.0625·256 = 16, 1, then 0.0625
        (0.0625, [0.25, 0.5, 0.75], "keeps ⌊256·0.0625^3⌋ = 0 image tokens at drop 3 (layer 6)"),
        (0.003, [1], "keeps ⌊256·0.003^1⌋ = 0 image tokens at drop 1 (layer 1)"),  # 0.768
    ],
)
def test_original_count_reaching_zero_is_a_config_error(keep, layers, message):
    with pytest.raises(ConfigError) as err:
        PyramidDrop(keep=keep, layers=layers, count="original").bind(L, N)
    assert message in str(err.value) and "\n" not in str(err.value)
    PyramidDrop(keep=keep, layers=layers).bind(L, N)  # ⌈·⌉ never reaches 0: remaining binds


def test_unknown_values_are_refused_with_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"prune.count='first' is not allowed; use one of \['remaining', 'original'\]"):
        PyramidDrop(count="first")
    with pytest.raises(ConfigError, match=r"prune.positions='shift' is not allowed; use one of \['keep', 'renumber'\]"):
        PyramidDrop(positions="shift")


def test_describe_names_both_settings():
    d = PyramidDrop(keep=0.288, count="original", positions="renumber").describe()
    assert (d["count"], d["positions"]) == ("original", "renumber")
    assert (PyramidDrop().describe()["count"], PyramidDrop().describe()["positions"]) == ("remaining", "keep")


# --------------------------------------------------------------------------- (d) keep at its edges
@pytest.mark.parametrize(
    ("keep", "count", "expected"),
    [
        (1.0, "remaining", [256] * 8),
        (1.0, "original", [256] * 8),
        # λ near 1: ⌈0.999·256⌉ = ⌈255.744⌉ = 256 every time (nothing dropped) …
        (0.999, "remaining", [256] * 8),
        # … while ⌊256·0.999^s⌋ = ⌊255.744⌋, ⌊255.488…⌋, ⌊255.232…⌋ = 255 each time: one token at drop 1
        (0.999, "original", [256, 256] + [255] * 6),
        # small λ: ⌈2.56⌉ = 3, ⌈0.03⌉ = 1, 1 (remaining never goes below one token)
        (0.01, "remaining", [256, 256, 3, 3, 1, 1, 1, 1]),
        # 0.0625 with two drops: 256·1/16 = 16, 256·1/256 = 1
        (0.0625, "original", [256, 256, 16, 16, 1, 1, 1, 1]),
        (0.0625, "remaining", [256, 256, 16, 16, 1, 1, 1, 1]),
    ],
)
@pytest.mark.parametrize("positions", ["keep", "renumber"])
def test_counts_at_the_edges_of_keep_run_as_bound(tiny, keep, count, expected, positions):
    loaded, items = tiny
    layers = [0.25, 0.5] if keep == 0.0625 and count == "original" else [0.25, 0.5, 0.75]
    method = PyramidDrop(keep=keep, layers=layers, count=count, positions=positions).bind(L, N)
    with torch.no_grad():
        state, _ = run_llm(loaded.model, loaded.processor.collate(items[:2]), method)
    assert state.trace.image_per_layer.tolist() == [expected] * 2
    assert torch.isfinite(state.hidden).all()


# --------------------------------------------------------------------------- engine: RoPE positions
def test_renumber_is_hand_computed_and_carried_by_every_edit():
    prompt, _ = prompt_batch([12, 10], n_sys=2, n_image=6)  # image at positions 2..7, text 8..; row 1 pads 10, 11
    state = TokenState.from_prompt(prompt, 1)
    assert torch.equal(state.rope_pos, state.pos)  # RoPE follows the original positions by default
    keep = torch.tensor([[1, 0, 1, 0, 1, 0], [0, 1, 1, 0, 0, 1]], dtype=torch.bool)
    dropped = state.drop_image(keep)
    assert state.pos.tolist() == [[0, 1, 2, 4, 6, 8, 9, 10, 11], [0, 1, 3, 4, 7, 8, 9, 10, 11]]
    assert torch.equal(state.rope_pos, state.pos)  # no renumbering: the gaps stay
    state.renumber()
    assert state.rope_pos.tolist() == [list(range(9))] * 2  # real tokens 0..n_real−1 (row 1: 0..6), pads after
    assert state.pos.tolist() == [[0, 1, 2, 4, 6, 8, 9, 10, 11], [0, 1, 3, 4, 7, 8, 9, 10, 11]]  # order kept
    taken = state.take(torch.tensor([[3, 4], [2, 3]]))
    assert taken.pos.tolist() == [[4, 6], [3, 4]] and taken.rope_pos.tolist() == [[3, 4], [2, 3]]
    # parked tokens come back at their original places with the RoPE positions they left with
    state.insert(dropped)
    assert state.pos.tolist() == [list(range(12))] * 2
    assert state.rope_pos.tolist() == [[0, 1, 2, 3, 3, 5, 4, 7, 5, 6, 7, 8], [0, 1, 2, 2, 3, 5, 6, 4, 5, 6, 7, 8]]


class DropThenRenumber:
    """A method written here: before layer `at` keep the even image tokens, then renumber."""

    needs_cls_attention = False

    def __init__(self, at: int, renumber: bool = True):
        self.at, self.renumber = at, renumber

    def setup(self, state, ctx):
        pass

    def before_layer(self, layer, state, ctx):
        if layer == self.at:
            keep = torch.zeros(state.batch_size, state.n_image, dtype=torch.bool)
            keep[:, ::2] = True
            state.drop_image(keep)
            if self.renumber:
                state.renumber()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_renumbered_drop_before_layer_0_equals_llama_forward_on_the_shorter_prompt(attn):
    """Dropping before any layer and renumbering is the dense model on the prompt without those
    tokens: transformers numbers that prompt 0..n−1 itself (right padding, its own mask)."""
    model = tiny_llama(attn)
    prompt, attn_mask = prompt_batch([40, 33, 37])
    state = TokenState.from_prompt(prompt, 8)
    with torch.no_grad():
        out = DecoderLoop(model).run(state, DropThenRenumber(0), _ctx(model))
        kept = torch.ones_like(attn_mask, dtype=torch.bool)
        kept[:, 5 + 1:5 + 16:2] = False  # odd image tokens (image at columns 5..20)
        embeds = prompt.embeds[kept].view(3, -1, prompt.embeds.shape[-1])
        reference = model(inputs_embeds=embeds, attention_mask=attn_mask[kept].view(3, -1)).last_hidden_state
    valid = out.kind != PAD
    assert valid.sum(1).tolist() == [40 - 8, 33 - 8, 37 - 8]
    assert (out.hidden - reference).abs()[valid].max().item() <= 1e-5


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_renumbering_only_moves_rope_and_changes_nothing_before_it(attn):
    """Up to the drop the runs are bit-identical; after it only RoPE differs (same tokens, same
    original positions, so the same mask), and without `renumber` RoPE is the original positions."""
    model = tiny_llama(attn)
    prompt, _ = prompt_batch([40, 33, 37])
    runs = {}
    for name, renumber in (("keep", False), ("renumber", True)):
        rec = Layers()
        with torch.no_grad():
            out = DecoderLoop(model).run(TokenState.from_prompt(prompt, 8), DropThenRenumber(3, renumber), _ctx(model),
                                         observers=[rec])
        runs[name] = (rec, out)
    (keep, k_out), (ren, r_out) = runs["keep"], runs["renumber"]
    for l in range(4):  # the inputs of layers 0..3 (3: after the drop, before it runs)
        assert torch.equal(keep.hidden[l], ren.hidden[l]) and torch.equal(keep.pos[l], ren.pos[l])
    assert all(torch.equal(k, p) for k, p in zip(keep.rope, keep.pos))  # keep: RoPE = original positions
    assert torch.equal(ren.rope[3], torch.arange(32).expand(3, 32))
    assert not torch.equal(k_out.hidden, r_out.hidden)
    assert torch.equal(k_out.pos, r_out.pos) and torch.equal(k_out.kind, r_out.kind)


def _ctx(model):
    return PruningContext(layers=model.layers, rotary_emb=model.rotary_emb, grid_size=(4, 4))


# --------------------------------------------------------------------------- (b) the authors' rule
def reference_pdrop(llama, embeds: torch.Tensor, image_index: int, n_image: int, layer_list: list[int],
                    ratios: list[float]) -> tuple[torch.Tensor, list[list[int]], list[list[int]]]:
    """PyramidDrop's inference prefill for ONE unpadded sample, written from the authors' code:
    github.com/Cooperx521/PyramidDrop, llava/model/modeling_llama_pdrop.py (commit 6444f30):

    - L1222-1237: after decoder layer i, if i + 1 is in `layer_list`, rank and drop (stage s =
      its index); the ranking uses layer i + 1's `input_layernorm`, `q_proj`, `k_proj` (L1321-1333)
      on layer i's output, with RoPE at the *current* `position_ids` (L1340-1342);
    - L1306-1307: the stage holds int(N·ratio[s]) image tokens and keeps int(N·ratio[s+1]) of them,
      N the original count, ratio = [1.0] + the configured list (llava/eval/model_vqa_loader.py
      L94-96; the shipped list is λ^s, e.g. [0.5, 0.25, 0.125] in scripts/v1_5/pdrop_eval/gqa.sh L21-22);
    - L1390-1392: at inference the query is one row, prompt_total_len − 1 = the last token of the
      prompt (llava/model/llava_arch.py L424-429: prompt_len counts the text tokens);
    - L1395-1401: q·kᵀ/√d plus the causal mask, softmax in fp32 over all keys, mean over heads, the
      image columns, mean over the query rows; no repeat_kv (no grouped-query attention);
    - L1405-1412: topk(keep) of those scores (ties: whatever torch.topk returns), indices sorted, the
      kept image tokens put back between the text before and after (order unchanged);
    - L1431, L1445-1446: position_ids become 0..len−1 of the new sequence; L1240-1258: the causal mask
      is rebuilt over the new sequence order.

    Returns the final normed hidden states [n, d], the kept image indices (original grid order) after
    every drop, and the position ids entering every layer."""
    cfg = llama.config
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    assert cfg.num_key_value_heads == heads  # the authors' ranking does not repeat k/v heads
    h = embeds[None]
    position_ids = torch.arange(h.shape[1])[None]
    image_ids = torch.arange(n_image)  # grid index of each image token present (for the comparison)
    kept_sets, positions = [], []
    for i, layer in enumerate(llama.layers):
        positions.append(position_ids[0].tolist())
        n = h.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        mask = causal if cfg._attn_implementation == "sdpa" else torch.zeros(1, 1, n, n).masked_fill(~causal, -1e30)
        h = layer(h, attention_mask=mask, position_ids=position_ids,
                  position_embeddings=llama.rotary_emb(h, position_ids=position_ids))
        rank_layer = i + 1
        if rank_layer not in layer_list:
            continue
        stage = layer_list.index(rank_layer)
        image_tokens, keep_length = int(n_image * ratios[stage]), int(n_image * ratios[stage + 1])
        ranker = llama.layers[rank_layer]
        x = ranker.input_layernorm(h)
        q = ranker.self_attn.q_proj(x).view(1, n, heads, head_dim).transpose(1, 2)
        k = ranker.self_attn.k_proj(x).view(1, n, heads, head_dim).transpose(1, 2)
        cos, sin = llama.rotary_emb(x, position_ids=position_ids)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        last = n - 1  # prompt_total_len − 1
        weights = (q[0, :, last:last + 1] @ k[0].transpose(1, 2)) / math.sqrt(head_dim)  # [H, 1, n]
        weights = weights.softmax(-1, dtype=torch.float32)  # the last row sees every key: nothing masked
        scores = weights.mean(0)[:, image_index:image_index + image_tokens].mean(0)
        ranked = scores.sort(descending=True).values
        assert ranked[keep_length - 1] > ranked[keep_length]  # no tie at the boundary: the kept set is defined
        top = scores.topk(keep_length).indices.sort().values + image_index
        start = image_index + image_tokens
        h = torch.cat([h[:, :image_index], h[:, top], h[:, start:]], dim=1)
        image_ids = image_ids[top - image_index]
        kept_sets.append(image_ids.tolist())
        position_ids = torch.arange(h.shape[1])[None]
    return llama.norm(h)[0], kept_sets, positions


def compare_with_reference(llama, loop_run, prompt: PromptEmbeds, keep: float, layer_list: list[int], n_image: int):
    """Run cspexp's `pdrop count=original positions=renumber query=last` (through `loop_run`) and the
    reference on each sample alone; the kept sets, RoPE positions and final states must agree."""
    method = PyramidDrop(keep=keep, layers=layer_list, query="last", count="original", positions="renumber")
    rec = Layers()
    with torch.no_grad():
        state = loop_run(method.bind(len(llama.layers), n_image), rec)
    # the ratio list as the authors' scripts write it: decimals (0.288, 0.082944, …), not float powers
    ratios = [1.0] + [round(keep**s, 12) for s in range(1, len(layer_list) + 1)]
    for b in range(prompt.embeds.shape[0]):
        real = prompt.kind[b] != PAD
        image_index = int((prompt.kind[b] == IMAGE).float().argmax())
        with torch.no_grad():
            ref_h, ref_sets, ref_pos = reference_pdrop(llama, prompt.embeds[b][real], image_index, n_image,
                                                        layer_list, ratios)
        ours = [sorted(rec.cells[l][b]) for l in layer_list]
        assert ours == [sorted(s) for s in ref_sets]
        for l in range(len(llama.layers)):
            real_l = rec.pos[l][b] < int(real.sum())  # right padding: real tokens first
            assert rec.rope[l][b][real_l].tolist() == ref_pos[l]
        mine = state.hidden[b][state.kind[b] != PAD]
        assert mine.shape == ref_h.shape
        assert (mine - ref_h).abs().max().item() <= 2e-5
    return [len(s) for s in ref_sets]


def plain_llama(attn: str) -> LlamaModel:
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=176, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, use_cache=False)
    cfg._attn_implementation = attn
    return LlamaModel(cfg).eval()


def layout(lengths: list[int], n_sys: int, n_image: int, d: int) -> PromptEmbeds:
    """Random embeddings in LISA's layout: system, image block, text; right padding."""
    torch.manual_seed(4)
    B, n = len(lengths), max(lengths)
    kind = torch.full((B, n), TEXT)
    grid = torch.full((B, n), -1)
    for b, length in enumerate(lengths):
        kind[b, :n_sys] = SYSTEM
        kind[b, n_sys:n_sys + n_image] = IMAGE
        grid[b, n_sys:n_sys + n_image] = torch.arange(n_image)
        kind[b, length:] = PAD
    query = torch.tensor(lengths) - 3
    return PromptEmbeds(embeds=torch.randn(B, n, d), pos=torch.arange(n).expand(B, n).clone(), kind=kind, grid=grid,
                        query_pos=query, seg_pos=query + 1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(("keep", "layer_list", "expected"),
                         [(0.288, [2, 4, 6], [28, 8, 2]), (0.5, [1, 3, 5], [50, 25, 12]), (0.7, [2, 5], [70, 49])])
def test_llama_from_a_config_matches_the_authors_rule(attn, keep, layer_list, expected):
    llama = plain_llama(attn)
    prompt = layout([130, 121, 126], n_sys=7, n_image=100, d=64)

    def loop_run(method, rec):
        ctx = PruningContext(layers=llama.layers, rotary_emb=llama.rotary_emb, grid_size=(10, 10))
        return DecoderLoop(llama).run(TokenState.from_prompt(prompt, 8), method, ctx, observers=[rec])

    assert compare_with_reference(llama, loop_run, prompt, keep, layer_list, 100) == expected


def test_tiny_lisa_matches_the_authors_rule(tiny):
    """The real pipeline (vision tower, splice, run_llm) at the issue's λ = 0.288: 256 → 73 → 21 → 6."""
    loaded, items = tiny
    model = loaded.model
    batch = loaded.processor.collate(items)
    with torch.no_grad():
        prompt = model.splice(batch["input_ids"], batch["attention_mask"], model.encode_image(batch["clip_pixels"])[0])
    assert (prompt.kind == PAD).any()  # the three prompts differ in length: padding is exercised

    def loop_run(method, rec):
        return run_llm(model, batch, method, observers=[rec])[0]

    assert compare_with_reference(model.decoder, loop_run, prompt, 0.288, [2, 4, 6], N) == [73, 21, 6]


# --------------------------------------------------------------------------- (c) defaults and first stage
def test_renumber_changes_nothing_before_the_first_drop_and_keep_is_todays_behaviour(tiny):
    loaded, items = tiny
    batch = loaded.processor.collate(items)
    recs = {}
    for name, spec in {
        "default": PyramidDrop(keep=0.288),
        "explicit": PyramidDrop(keep=0.288, count="remaining", positions="keep"),
        "renumber": PyramidDrop(keep=0.288, positions="renumber"),
        "original": PyramidDrop(keep=0.288, count="original"),
    }.items():
        recs[name] = rec = Layers()
        with torch.no_grad():
            recs[name + "_out"] = run_llm(loaded.model, batch, spec.bind(L, N), observers=[rec])[0]
    default, explicit, ren, orig = recs["default"], recs["explicit"], recs["renumber"], recs["original"]
    # keep/remaining spelled out is the default, bit for bit, and RoPE is the original positions throughout
    assert torch.equal(recs["default_out"].hidden, recs["explicit_out"].hidden)
    for l in range(L):
        assert torch.equal(default.hidden[l], explicit.hidden[l]) and torch.equal(default.rope[l], default.pos[l])
    # renumber: identical up to and including the first drop (same scores, same kept set) …
    for l in range(3):
        assert torch.equal(ren.hidden[l], default.hidden[l]) and ren.cells[l] == default.cells[l]
    assert torch.equal(ren.rope[0], ren.pos[0]) and not torch.equal(ren.rope[2], ren.pos[2])
    # … and different after it
    assert not torch.equal(recs["renumber_out"].hidden, recs["default_out"].hidden)
    # original with kept positions: one token fewer at the first drop, chosen from the same ranking
    first_default, first_orig = default.cells[2], orig.cells[2]
    assert [len(c) for c in first_orig] == [73] * 3 and all(set(o) < set(d) for o, d in zip(first_orig, first_default))
