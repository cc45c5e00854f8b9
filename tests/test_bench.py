"""`python -m cspexp.bench` on the tiny shape: runs, writes bench.json with every field (no timing
thresholds here — the targets are benchmark results, see docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cspexp.flops.analytic import LlmDims, image_layer_macs, layer_macs


def test_bench_tiny_writes_every_field(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "cspexp.bench", "model_shape=tiny", "repeats=2", "warmup=1",
                           f"hydra.run.dir={out}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "bench.json").read_text())
    for key in ("model_shape", "device", "dtype", "tokens", "transformers_ms", "loop_overhead_vs_transformers",
                "variants", "versions", "command"):
        assert key in result
    labels = [v["variant"] for v in result["variants"]]
    assert labels[0] == "dense (ours)" and {"csp_k0.3", "fastv_k0.3", "pdrop_k0.5", "vtw_l0.625"} <= set(labels)
    for v in result["variants"]:
        for key in ("image_flops_reduction", "ideal_speedup", "measured_speedup", "efficiency", "median_ms"):
            assert isinstance(v[key], float)
        assert len(v["times_ms"]) == 2
        assert v["efficiency"] == pytest.approx(v["measured_speedup"] / v["ideal_speedup"])
    # the csp row's FLOPs follow from its schedule: 8 layers, 35 + 60 text tokens, [64]*2 + [256]*2 + [77]*4
    dims = LlmDims(64, 176, 8, 64)
    text = 95
    counts = [64, 64, 256, 256, 77, 77, 77, 77]
    image = sum(image_layer_macs(text + k, k, dims) for k in counts)
    image_dense = 8 * image_layer_macs(text + 256, 256, dims)
    csp = next(v for v in result["variants"] if v["variant"] == "csp_k0.3")
    assert csp["image_flops_reduction"] == pytest.approx(1 - image / image_dense)
    assert csp["flops_llm"] == 2 * sum(layer_macs(text + k, dims) for k in counts)
    assert (out / "bench.md").read_text().count("|") > 20
