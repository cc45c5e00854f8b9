"""prune=fastervlm against independent references: a hand-worked ranking of a few tokens, the
authors' selection re-implemented here from their code on CLIP's own attention output
(`output_attentions`, not cspexp's `clip_cls_attention`), and transformers' `LlamaModel` run on the
shortened prompt the authors' LLM sees (`positions=renumber`)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from cspexp.models.lisa import IMAGE, PAD, SYSTEM, TEXT, PromptEmbeds
from cspexp.pruning.engine import TokenState
from cspexp.pruning.methods import NoPruning, PruningContext
from cspexp.pruning.methods.fastervlm import FasterVLM
from cspexp.pruning.pipeline import run_llm, segment
from cspexp.report.pictures import KeptRecorder
from cspexp.utils.errors import ConfigError
from cspexp.utils.instantiate import build

from conftest import CONF_DIR
from helpers import tiny_random_and_items

L, N = 8, 256  # tiny_random: 8 decoder layers, a 16×16 grid of image tokens


@pytest.fixture(scope="module")
def tiny():
    loaded, items = tiny_random_and_items(3)
    return loaded, loaded.processor.collate(items)


# --------------------------------------------------------------------------- helpers
def hand_state(image: torch.Tensor) -> TokenState:
    """A prompt [system, image tokens `image` [B, n, d], text, text] for a method's `setup`."""
    B, n, d = image.shape
    embeds = torch.cat([torch.zeros(B, 1, d), image, torch.zeros(B, 2, d)], dim=1)
    kind = torch.tensor([SYSTEM] + [IMAGE] * n + [TEXT, TEXT]).expand(B, n + 3).clone()
    grid = torch.tensor([-1] + list(range(n)) + [-1, -1]).expand(B, n + 3).clone()
    pos = torch.arange(n + 3).expand(B, n + 3).clone()
    last = torch.full((B,), n + 2)
    prompt = PromptEmbeds(embeds=embeds, pos=pos, kind=kind, grid=grid, query_pos=last - 1, seg_pos=last)
    return TokenState.from_prompt(prompt, num_layers=1)


def image_cells(state) -> list[list[int]]:
    """The grid cells of the image tokens present, per sample, in sequence order."""
    return [state.grid[b][state.kind[b] == IMAGE].tolist() for b in range(state.batch_size)]


def compact_reference(loaded, batch, kept: list[list[int]]) -> torch.Tensor:
    """What the authors' LLM computes: the prompt with only the `kept` grid cells of each sample,
    run by transformers' LlamaModel with its own position ids 0..n−1 (LLaVA passes position_ids=None).
    Returns the final (normed) hidden states [B, n, d]."""
    model = loaded.model
    with torch.no_grad():
        tokens, _ = model.encode_image(batch["clip_pixels"])
        prompt = model.splice(batch["input_ids"], batch["attention_mask"], tokens)
        rows, masks = [], []
        for b, cells in enumerate(kept):
            keep = (prompt.kind[b] != IMAGE) | torch.isin(prompt.grid[b], torch.tensor(cells))
            rows.append(prompt.embeds[b][keep])
            masks.append((prompt.kind[b][keep] != PAD).long())
        out = model.decoder(inputs_embeds=torch.stack(rows), attention_mask=torch.stack(masks))
    return out.last_hidden_state


# --------------------------------------------------------------------------- (a) hand-worked
def test_hand_worked_ranking_with_ties_to_the_earlier_cell():
    # two samples, six image tokens; [CLS] attention per grid cell (a row sums to 1 with [CLS] itself)
    cls = torch.tensor([[0.10, 0.30, 0.05, 0.30, 0.20, 0.05],
                        [0.40, 0.01, 0.02, 0.03, 0.04, 0.50]])
    # by hand: sample 0 ranks 1 = 3 (tie: 1 first) > 4 > 0 > 2 = 5 (tie: 2 first); sample 1 ranks 5 > 0 > 4 > 3 > 2 > 1
    expected = {1: [[1], [5]], 2: [[1, 3], [0, 5]], 3: [[1, 3, 4], [0, 4, 5]], 5: [[0, 1, 2, 3, 4], [0, 2, 3, 4, 5]],
                6: [list(range(6))] * 2}
    for count, cells in expected.items():
        state = hand_state(torch.randn(2, 6, 4))
        before = state.hidden.clone()
        method = FasterVLM(keep=count / 6).bind(1, 6)
        method.setup(state, PruningContext(layers=None, rotary_emb=None, grid_size=(2, 3), cls_attention=cls))
        assert image_cells(state) == cells, count
        # the kept tokens are the original rows, in position order, with their original positions
        for b in range(2):
            want = [0] + [1 + c for c in cells[b]] + [7, 8]
            assert state.pos[b].tolist() == want and torch.equal(state.hidden[b], before[b, want])
        assert torch.equal(state.rope_pos, state.pos)
        assert state.trace.overhead == []


def test_renumber_gives_positions_0_to_n():
    state = hand_state(torch.randn(1, 6, 4))
    cls = torch.tensor([[0.1, 0.3, 0.05, 0.25, 0.2, 0.05]])
    FasterVLM(keep=0.5, positions="renumber").bind(1, 6).setup(
        state, PruningContext(layers=None, rotary_emb=None, grid_size=(2, 3), cls_attention=cls))
    assert image_cells(state) == [[1, 3, 4]]
    assert state.pos.tolist() == [[0, 2, 4, 5, 7, 8]] and state.rope_pos.tolist() == [[0, 1, 2, 3, 4, 5]]


# --------------------------------------------------------------------------- (b) the authors' rule
def reference_fastervlm(loaded, batch, visual_token_num: int) -> list[list[int]]:
    """FasterVLM's selection, re-implemented from github.com/Theia-4869/FasterVLM (commit f5d5f12):
    - llava/model/multimodal_encoder/clip_encoder.py L36-47, L60-61: run CLIP with
      output_attentions=True; image_attentions = attentions[select_layer][:, :, 0, 1:] ('patch');
    - llava/model/llava_arch.py L148-153: mean over heads, topk(k=visual_token_num), scatter into an
      index mask; L244-246: image_feature[index_mask] keeps the chosen tokens in their original order.
    Returns the kept grid cells per sample (sorted)."""
    model = loaded.model
    tower = model.vision_tower
    implementation = tower.config._attn_implementation
    tower.set_attn_implementation("eager")  # SDPA returns no attention maps
    try:
        with torch.no_grad():
            out = tower(pixel_values=batch["clip_pixels"], output_attentions=True, output_hidden_states=True)
    finally:
        tower.set_attn_implementation(implementation)
    image_attentions = out.attentions[model.vision_select_layer][:, :, 0, 1:]  # (B, H, N)
    image_attentions = image_attentions.mean(dim=1)  # (B, N)
    token_indices = torch.topk(image_attentions, k=visual_token_num, dim=1)[1]  # (B, T)
    index_masks = torch.zeros(image_attentions.shape, dtype=torch.bool)
    index_masks.scatter_(1, token_indices, True)
    return [torch.nonzero(m).flatten().tolist() for m in index_masks]


@pytest.mark.parametrize(("keep", "count"), [(0.25, 64), (0.1, 26), (0.5, 128), (0.01, 3)])
def test_keeps_what_the_authors_code_keeps(tiny, keep, count):
    loaded, batch = tiny
    expected = reference_fastervlm(loaded, batch, count)  # ⌈keep·256⌉ worked by hand
    rec = KeptRecorder()
    with torch.no_grad():
        out = segment(loaded.model, batch, FasterVLM(keep=keep).bind(L, N), observers=[rec])
    for layer in range(L):  # dropped before layer 0, never restored
        assert rec.kept[layer] == expected, layer
    assert len({tuple(cells) for cells in expected}) == 3  # the choice is per sample
    assert out.trace.image_per_layer.tolist() == [[count] * L] * 3  # FLOPs fall from layer 0 on
    assert out.trace.overhead == []  # the [CLS] row is CLIP's: no LLM-side work


def test_renumber_runs_the_authors_shortened_prompt(tiny):
    """positions=renumber equals transformers' LlamaModel on the prompt holding only the kept image
    tokens, numbered 0..n−1 — the sequence the authors' LLM runs."""
    loaded, batch = tiny
    rec = KeptRecorder()
    with torch.no_grad():
        state, _ = run_llm(loaded.model, batch, FasterVLM(keep=0.25, positions="renumber").bind(L, N),
                           observers=[rec])
    reference = compact_reference(loaded, batch, rec.kept[0])
    real = state.kind != PAD
    assert state.hidden.shape == reference.shape
    assert (state.hidden - reference).abs()[real].max() <= 1e-5
    # the default keeps the original positions, so the states differ
    with torch.no_grad():
        kept_pos, _ = run_llm(loaded.model, batch, FasterVLM(keep=0.25).bind(L, N))
    assert torch.equal(kept_pos.rope_pos, kept_pos.pos) and kept_pos.pos[0, -1] > state.rope_pos[0, -1]
    assert not torch.allclose(kept_pos.hidden[real], reference[real], atol=1e-3)


# --------------------------------------------------------------------------- (c) keep at its edges
def test_keep_one_is_the_dense_pass(tiny):
    loaded, batch = tiny
    with torch.no_grad():
        dense = segment(loaded.model, batch, NoPruning().bind(L, N))
        out = segment(loaded.model, batch, FasterVLM(keep=1.0).bind(L, N))
    assert out.trace.image_per_layer.eq(N).all()
    assert torch.allclose(out.seg_embeds, dense.seg_embeds, atol=1e-6)


def test_the_smallest_keep_keeps_one_token_and_zero_is_refused(tiny):
    loaded, batch = tiny
    # any keep > 0 keeps ⌈keep·N⌉ ≥ 1: 1/256 and 1e-9 both keep the single most attended patch
    expected = reference_fastervlm(loaded, batch, 1)
    for keep in (1 / 256, 1e-9):
        method = FasterVLM(keep=keep).bind(L, N)
        assert method.count == 1
        rec = KeptRecorder()
        with torch.no_grad():
            run_llm(loaded.model, batch, method, observers=[rec])
        assert rec.kept[0] == rec.kept[L - 1] == expected
    # below: keep = 0 (or less) is refused when the spec is built, before any bind or model load
    for keep in (0, 0.0, -0.25):
        with pytest.raises(ConfigError) as err:
            FasterVLM(keep=keep)
        assert str(err.value) == f"prune.keep={keep!r} is outside (0, 1]"


# --------------------------------------------------------------------------- (d) bad settings
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep": 1.5}, "prune.keep=1.5 is outside (0, 1]"),
        ({"keep": True}, "prune.keep=True is not allowed; it must be a number"),
        ({"keep": "half"}, "prune.keep='half' is not allowed; it must be a number"),
        ({"positions": "compact"}, "prune.positions='compact' is not allowed; use one of ['keep', 'renumber']"),
    ],
)
def test_bad_values_are_one_config_error(kwargs, message):
    with pytest.raises(ConfigError) as err:
        FasterVLM(**kwargs).bind(L, N)
    assert str(err.value) == message


def test_the_config_builds_the_default_and_without_cls_attention_it_says_why():
    spec = build(OmegaConf.load(CONF_DIR / "prune" / "fastervlm.yaml"))
    assert spec == FasterVLM() and spec.describe() == {"name": "fastervlm", "keep": 0.25, "positions": "keep"}
    method = spec.bind(L, N)
    assert method.needs_cls_attention and method.count == 64
    state = hand_state(torch.randn(1, N, 4))
    with pytest.raises(RuntimeError, match=r"prune=fastervlm needs CLIP's \[CLS\] attention"):
        method.setup(state, PruningContext(layers=None, rotary_emb=None, grid_size=(16, 16)))
