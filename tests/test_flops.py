"""Analytic FLOPs: the formula on a hand-worked case, and equality with torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from cspexp.data.shapes import ShapesDataset
from cspexp.flops.analytic import LlmDims, image_layer_macs, layer_macs, sample_flops, summarize
from cspexp.models.loaders import build_model
from cspexp.pruning.engine import DecoderLoop, TokenState
from cspexp.pruning.methods import ClusterScatterPrune, FastV, NoPruning, PyramidDrop, VisualTokenWithdrawal
from cspexp.pruning.methods.base import PruningContext
from cspexp.pruning.methods.dart import Dart
from cspexp.pruning.methods.divprune import DivPrune
from cspexp.pruning.methods.fastervlm import FasterVLM
from cspexp.pruning.methods.mustdrop import MustDrop
from cspexp.pruning.methods.sparsevlm import SparseVLM
from cspexp.pruning.methods.visionzip import VisionZip

from conftest import CONF_DIR


def test_formula_on_a_hand_worked_case():
    dims = LlmDims(hidden_size=4, intermediate_size=6, num_layers=2, kv_size=2)
    # n=3 tokens: projections 3·(2·4² + 2·4·2) = 144, attention 2·3²·4 = 72, FFN 3·3·4·6 = 216
    assert layer_macs(3, dims) == 432
    # 2 image tokens of 3: linear 2·(32 + 16 + 72) = 240, image-query attention 2·2·3·4 = 48
    assert image_layer_macs(3, 2, dims) == 288
    # layer 0 sees 3 tokens (2 image), layer 1 sees 1 (0 image): dense would be 3 and 2 every layer
    f = sample_flops([3, 1], [2, 0], n_image=2, dims=dims)
    assert f["llm"] == 2 * (432 + layer_macs(1, dims))
    assert f["llm_dense"] == 2 * 2 * 432
    assert f["image"] == 2 * 288 and f["image_dense"] == 2 * 2 * 288
    # a query-attention row over 3 tokens with 1 query: k 3·4·2 + q 1·4·4 + row 1·3·4 = 52 MACs
    g = sample_flops([3, 1], [2, 0], 2, dims, [{"kind": "query_attention", "tokens": 3, "queries": 1}])
    assert g["overhead"] == 2 * 52
    s = summarize([f, f])
    assert s["unit"] == "FLOPs" and s["reduction_image"] == pytest.approx(0.5)
    assert s["reduction_llm"] == pytest.approx(1 - (432 + layer_macs(1, dims)) / (2 * 432))


@pytest.fixture(scope="module")
def eager_model():
    cfg = OmegaConf.load(CONF_DIR / "model" / "tiny_random.yaml")
    cfg.attn_implementation = "eager"
    cfg.llm.num_key_value_heads = 2  # grouped-query attention exercises d_kv ≠ d
    loaded = build_model(cfg, ShapesDataset.vocabulary())
    batch = loaded.processor.collate([ShapesDataset(split="val", n=1)[0]])
    return loaded, batch


@pytest.mark.parametrize(
    "method",
    [
        lambda: NoPruning(),
        lambda: FastV(keep=0.3),
        lambda: PyramidDrop(keep=0.5, query="text_mean"),
        lambda: VisualTokenWithdrawal(layer=3),
        lambda: ClusterScatterPrune(keep=0.3, scatter={"mode": "residual"}),
        lambda: ClusterScatterPrune(keep=0.2, cluster={"assign": "feature"}, scatter={"mode": "copy"}),
        lambda: ClusterScatterPrune(keep=0.5, cluster={"select": "random"}, scatter={"mode": "reset"}),
        lambda: Dart(keep=0.3),
        lambda: FasterVLM(keep=0.3),
        lambda: DivPrune(keep=0.3),
        lambda: VisionZip(keep=0.3),
        lambda: SparseVLM(),
        lambda: MustDrop(keep=0.3),
    ],
    ids=["none", "fastv", "pdrop", "vtw", "csp_residual", "csp_copy_feature", "csp_reset", "dart", "fastervlm", "divprune",
         "visionzip", "sparsevlm", "mustdrop"],
)
def test_analytic_llm_flops_equal_flop_counter(eager_model, method):
    loaded, batch = eager_model
    model = loaded.model
    m = method().bind(model.num_layers, model.n_image_tokens)
    with torch.no_grad():
        # CLIP's [CLS] row (fastervlm) is vision-side work, computed here outside the counter
        image_tokens, cls_attention, *keys = model.encode_image(batch["clip_pixels"],
                                                                output_cls_attention=m.needs_cls_attention,
                                                                output_keys=m.needs_clip_keys)  # visionzip's keys
        prompt = model.splice(batch["input_ids"], batch["attention_mask"], image_tokens)
        loop = DecoderLoop(model.decoder)
        ctx = PruningContext(layers=model.decoder.layers, rotary_emb=model.decoder.rotary_emb,
                             grid_size=model.grid_size, sample_ids=[0], cls_attention=cls_attention,
                             clip_keys=keys[0] if keys else None)
        counter = FlopCounterMode(display=False)
        with counter:
            state = loop.run(TokenState.from_prompt(prompt, loop.num_layers), m, ctx)
    trace = state.trace
    f = sample_flops(trace.tokens_per_layer[0].tolist(), trace.image_per_layer[0].tolist(), model.n_image_tokens,
                     LlmDims.from_config(model.llm.config), trace.sample_overhead(0))
    assert counter.get_total_flops() == f["llm"] + f["overhead"]


@pytest.mark.parametrize("keep", [0.25, 0.3, 0.5])
def test_analytic_flops_with_tome_equal_flop_counter(eager_model, keep):
    """tome works inside CLIP, so the counter runs around the whole of `run_llm` — the ToMe'd tower, the
    projector on the merged tokens, the LLM — and equals CLIP + projector under the schedule
    (`lisa_vision_flops`), the LLM from the trace, and the overhead (ToMe's similarity products)."""
    from cspexp.flops.vision import lisa_vision_flops
    from cspexp.pruning.methods.tome import ToMe
    from cspexp.pruning.pipeline import run_llm

    loaded, batch = eager_model
    model = loaded.model
    m = ToMe(keep=keep).bind(model.num_layers, model.n_image_tokens)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        state, _ = run_llm(model, batch, m)
    trace = state.trace
    f = sample_flops(trace.tokens_per_layer[0].tolist(), trace.image_per_layer[0].tolist(), model.n_image_tokens,
                     LlmDims.from_config(model.llm.config), trace.sample_overhead(0))
    vision = lisa_vision_flops(model, m)
    assert vision["vision"] < vision["vision_dense"] and f["overhead"] > 0
    assert counter.get_total_flops() == vision["vision"] + f["llm"] + f["overhead"]


@pytest.mark.parametrize("method", [lambda: NoPruning(), lambda: ClusterScatterPrune(keep=0.3)], ids=["none", "csp"])
def test_fvcore_breakdown_counts_sdpa_and_matches_the_analytic_llm(method):
    """fvcore (with our SDPA handle) on the default SDPA model gives the analytic LLM FLOPs; without
    the handle the attention would be missing (fvcore counts SDPA as 0)."""
    from cspexp.flops.breakdown import breakdown
    from cspexp.pruning.pipeline import run_llm

    loaded = build_model(OmegaConf.load(CONF_DIR / "model" / "tiny_random.yaml"), ShapesDataset.vocabulary())
    batch = loaded.processor.collate([ShapesDataset(split="val", n=1)[0]])
    m = method().bind(8, 256)
    result = breakdown(loaded.model, m, batch)
    with torch.no_grad():
        state, _ = run_llm(loaded.model, batch, m)
    f = sample_flops(state.trace.tokens_per_layer[0].tolist(), state.trace.image_per_layer[0].tolist(), 256,
                     LlmDims.from_config(loaded.model.llm.config), state.trace.sample_overhead(0))
    from cspexp.flops.breakdown import OTHER

    stages = result["stages"]
    # the q·Kᵀ scoring rows (q·n·d MACs each) run in a function, outside the LLM's modules
    d = loaded.model.llm.config.hidden_size
    rows = sum(2 * e["queries"] * e["tokens"] * d for e in state.trace.sample_overhead(0))
    assert stages["LLM (decoder layers)"] == f["llm"] + f["overhead"] - rows
    assert stages[OTHER] >= rows
    assert "aten::scaled_dot_product_attention" not in result["unsupported_ops"]
    for stage in ("vision tower (CLIP)", "projector", "SAM image encoder", "SAM mask decoder"):
        assert stages[stage] > 0
    assert sum(stages.values()) == result["total"]
