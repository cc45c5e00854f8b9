"""LisaModel glue against independent constructions (naive splice, transformers' own forward)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cspexp.models.loaders import build_model
from cspexp.models.lisa import IMAGE, PAD, SYSTEM, TEXT
from cspexp.pruning.methods import NoPruning
from cspexp.pruning.pipeline import run_llm, segment
from cspexp.utils.instantiate import build

from conftest import CONF_DIR

WORDS = ["the red triangle", "the blue circle left of the green square", "which shape could roll ?"]


@pytest.fixture(scope="module")
def tiny():
    cfg = OmegaConf.load(CONF_DIR / "model" / "tiny_random.yaml")
    return build_model(cfg, WORDS)


def items(n: int, sizes=((224, 224),)):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        out.append({
            "idx": i,
            "image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
            "mask": (rng.random((h, w)) > 0.5).astype(np.uint8),
            "query": WORDS[i % len(WORDS)],
            "is_sentence": i % 3 == 2,
            "query_kind": "referring",
        })
    return out


def test_splice_matches_naive_concatenation(tiny):
    model, proc = tiny.model, tiny.processor
    batch = proc.collate(items(3))
    N = model.n_image_tokens
    image_tokens = torch.randn(3, N, model.llm.config.hidden_size)
    with torch.no_grad():
        prompt = model.splice(batch["input_ids"], batch["attention_mask"], image_tokens)
        embed = model.decoder.embed_tokens
        for b in range(3):
            ids = batch["input_ids"][b]
            p = int((ids == model.image_token_id).nonzero())
            expected = torch.cat([embed(ids[:p]), image_tokens[b], embed(ids[p + 1 :])])
            assert torch.equal(prompt.embeds[b], expected)
            length = int(batch["attention_mask"][b].sum())
            kinds = [SYSTEM] * p + [IMAGE] * N + [TEXT] * (length - p - 1) + [PAD] * (ids.numel() - length)
            assert prompt.kind[b].tolist() == kinds
            assert prompt.grid[b, p : p + N].tolist() == list(range(N))
            seg = int((ids == model.seg_token_id).nonzero()[0])
            assert int(prompt.query_pos[b]) == seg + N - 1 - 1  # the token before [SEG], after the splice


def test_query_state_equals_transformers_forward(tiny):
    """The [SEG] query state from our loop equals LlamaForCausalLM's own last hidden state at the
    token before [SEG] (LISA's one-token offset)."""
    model, proc = tiny.model, tiny.processor
    batch = proc.collate(items(3))
    with torch.no_grad():
        _, query_hidden = run_llm(model, batch, NoPruning().bind(model.num_layers, model.n_image_tokens))
        image_tokens, _ = model.encode_image(batch["clip_pixels"])
        prompt = model.splice(batch["input_ids"], batch["attention_mask"], image_tokens)
        mask = (prompt.kind != PAD).long()
        ref = model.llm(inputs_embeds=prompt.embeds, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    for b in range(3):
        seg_col = int((batch["input_ids"][b] == model.seg_token_id).nonzero()[0]) + model.n_image_tokens - 1
        assert torch.allclose(query_hidden[b], ref[b, seg_col - 1], atol=1e-5)


def test_segment_returns_masks_at_original_size(tiny):
    model, proc = tiny.model, tiny.processor
    batch = proc.collate(items(2, sizes=((224, 224), (180, 300))))
    with torch.no_grad():
        out = segment(model, batch, NoPruning().bind(model.num_layers, model.n_image_tokens))
    assert [tuple(m.shape) for m in out.masks] == [(224, 224), (180, 300)]
    assert all(m.dtype == torch.bool for m in out.masks)
    assert out.seg_embeds.shape == (2, model.sam.config.prompt_encoder_config.hidden_size)


def test_clip_and_sam_preprocessing_by_hand():
    from cspexp.models.processor import CLIP_MEAN, CLIP_STD, SAM_MEAN, SAM_STD, clip_preprocess, sam_preprocess

    img = np.zeros((224, 224, 3), dtype=np.uint8)
    img[0, 0] = (255, 128, 0)
    x = clip_preprocess(img, 224)  # already 224: no resize, no crop
    assert x.shape == (3, 224, 224)
    assert x[0, 0, 0].item() == pytest.approx((1.0 - CLIP_MEAN[0]) / CLIP_STD[0], abs=1e-6)
    assert x[1, 0, 0].item() == pytest.approx((128 / 255 - CLIP_MEAN[1]) / CLIP_STD[1], abs=1e-6)
    assert x[2, 5, 5].item() == pytest.approx((0 - CLIP_MEAN[2]) / CLIP_STD[2], abs=1e-6)

    tall = np.full((100, 50, 3), 200, dtype=np.uint8)
    s, (h, w) = sam_preprocess(tall, 256)  # longest side 100 → 256: scale 2.56, width int(50*2.56+0.5)=128
    assert (h, w) == (256, 128)
    assert s[0, 10, 10].item() == pytest.approx((200 - SAM_MEAN[0]) / SAM_STD[0], abs=1e-4)
    assert torch.all(s[:, :, 128:] == 0)  # zero padding on the right, after normalisation


def test_grid_sincos_by_hand_and_linearly_readable():
    """2×2 grid, width 4: one frequency of period 2 cells, so a cell (r, c) codes as
    [sin πr, cos πr, sin πc, cos πc] = [0, (−1)^r, 0, (−1)^c]; on LISA's 16×16 grid a least-squares
    read-out recovers each cell's row and column exactly (what the LLM needs to say where)."""
    from cspexp.models.lisa import grid_sincos

    expected = torch.tensor([[0, 1, 0, 1], [0, 1, 0, -1], [0, -1, 0, 1], [0, -1, 0, -1]], dtype=torch.float32)
    assert torch.allclose(grid_sincos(2, 2, 4), expected, atol=1e-6)
    code = grid_sincos(16, 16, 96).double()
    x = torch.cat([code, torch.ones(256, 1, dtype=torch.float64)], 1)
    for target in (torch.arange(256) // 16, torch.arange(256) % 16):
        fit = torch.linalg.lstsq(x, target.double()[:, None], driver="gelsd").solution
        assert torch.allclose(x @ fit, target.double()[:, None], atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        grid_sincos(16, 16, 30)


def test_image_position_adds_the_grid_code_to_the_projected_tokens():
    """Same weights, image_position sincos vs none: the image tokens differ by exactly the grid code."""
    from cspexp.models.lisa import grid_sincos

    cfg = OmegaConf.load(CONF_DIR / "model" / "tiny_random.yaml")
    plain = build_model(cfg, ["red"]).model
    cfg.image_position = "sincos"
    coded = build_model(cfg, ["red"]).model
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, _ = plain.encode_image(pixels)
        b, _ = coded.encode_image(pixels)
    code = grid_sincos(16, 16, a.shape[-1])
    assert torch.allclose(b - a, code.expand_as(a), atol=1e-5)
    cfg.image_norm = "rms"  # each token scaled to unit RMS (by hand: a / rms(a)), then the code
    normed = build_model(cfg, ["red"]).model
    with torch.no_grad():
        c, _ = normed.encode_image(pixels)
    assert torch.allclose(c - code, a / a.pow(2).mean(-1, keepdim=True).sqrt(), atol=1e-4)
    cfg.image_position = "learned"
    with pytest.raises(Exception, match="image_position='learned' is not allowed"):
        build_model(cfg, ["red"])
    cfg.image_position, cfg.image_norm = "sincos", "layer"
    with pytest.raises(Exception, match="image_norm='layer' is not allowed"):
        build_model(cfg, ["red"])
