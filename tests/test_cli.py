"""The real CLI in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF_DIR

from cspexp.outputs.files import read_jsonl

REPO = Path(__file__).resolve().parents[1]


def cspexp(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "cspexp", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_end_to_end_run_writes_consistent_results(tmp_path):
    run_dir = tmp_path / "run"
    proc = cspexp("model=tiny_random", "prune=none", "dataset=shapes", "dataset.n=8", "logger=none", f"hydra.run.dir={run_dir}",
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["schema"] == 1 and results["n_samples"] == 8
    assert results["method"] == "none" and results["model"] == "tiny_random"
    for key in ("giou", "ciou"):
        assert 0.0 <= results["metrics"][key] <= 1.0
    for key in ("flops", "tokens", "latency_ms", "memory_mb", "model_dims", "config", "config_hash", "versions", "git"):
        assert key in results
    assert results["flops"]["unit"] == "FLOPs"

    rows = read_jsonl(run_dir / "samples.jsonl")
    assert sorted(r["idx"] for r in rows) == list(range(8))
    # gIoU / cIoU recomputed from the per-sample rows with LISA's formulas
    giou = sum(r["intersection"] / (r["union"] + 1e-5) if r["union"] else 1.0 for r in rows) / len(rows)
    ciou = sum(r["intersection"] for r in rows) / (sum(r["union"] for r in rows) + 1e-10)
    assert results["metrics"]["giou"] == pytest.approx(giou, abs=1e-6)
    assert results["metrics"]["ciou"] == pytest.approx(ciou, abs=1e-6)
    # the dense model: every layer sees all 256 image tokens, so nothing is saved
    assert all(r["image_per_layer"] == [256] * 8 for r in rows)
    flops = results["flops"]
    assert flops["llm"] == pytest.approx(sum(r["flops_llm"] for r in rows) / 8)
    assert flops["llm"] == pytest.approx(flops["llm_dense"]) and flops["reduction_image"] == pytest.approx(0.0)
    assert flops["overhead"] == 0
    assert results["latency_ms"]["end_to_end"] > results["latency_ms"]["llm_prefill"] > 0
    assert results["memory_mb"] > 0
    assert results["tokens"]["avg_image_per_layer"] == 256
    assert "gIoU" in proc.stdout  # the summary table
    assert not (run_dir / "error.json").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["prune.kep=0.3"], "unknown config key 'prune.kep'"),
        (["prune=nonexistent"], "prune=nonexistent is not a known option of 'prune'; choose one of: "),
        (["model=nonexistent"], "is not a known option of 'model'"),
        (["prune.keep=1.5"], "prune.keep=1.5 is outside (0, 1]"),
        (["prune.keep=0"], "prune.keep=0 is outside (0, 1]"),
        (["prune.keep=-0.2"], "prune.keep=-0.2 is outside (0, 1]"),
        (["dataset.split=bogus"], "dataset.split"),
        (["dataset.n=0"], "dataset.n"),
        (["prune=csp", "prune.cluster.span=[0,3]", "prune.scatter.span=[2,5]"],
         "prune.cluster.span [0, 3) and prune.scatter.span [2, 5) overlap"),
        (["prune=fastv", "prune.layer=12"], "prune.layer=12 is outside the model's layers 0..8"),
        (["prune=csp", "prune.cluster.ratio=0.001"], "N_c"),
        (["prune=pdrop", "prune.keep=0"], "prune.keep=0 is outside (0, 1]"),
        (["model=converted"], "model.path must be set"),
        (["model=converted", "model.path=/nonexistent/model"], "model.path='/nonexistent/model' does not exist"),
        (["dataset=folder", "dataset.root=/nonexistent/data"], "dataset.root='/nonexistent/data' does not exist"),
    ],
)
def test_bad_input_is_one_line_nonzero_and_leaves_no_results(tmp_path, args, expected):
    run_dir = tmp_path / "run"
    proc = cspexp(*args, "logger=none", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (run_dir / "results.json").exists()


def test_help_and_cfg_job(tmp_path):
    help_ = cspexp("--help", cwd=tmp_path)
    assert help_.returncode == 0
    for group in ("model:", "prune:", "dataset:", "trainer:", "logger:"):
        assert group in help_.stdout
    cfg = cspexp("--cfg", "job", "prune.keep=0.5", cwd=tmp_path)
    assert cfg.returncode == 0
    # the defaults: the packaged model (its path resolved into the installed package) under csp
    assert "keep: 0.5" in cfg.stdout and "_target_: cspexp.models.saved.load_saved" in cfg.stdout
    assert "path: ${packaged:tiny_lisa}" in cfg.stdout and "cspexp.pruning.methods.ClusterScatterPrune" in cfg.stdout


def test_multirun_runs_each_job(tmp_path):
    sweep = tmp_path / "sweep"
    # hydra/sweep_grid=none: only the seeds, not seeds × the default method-keep grid
    proc = cspexp("-m", "hydra/sweep_grid=none", "dataset.n=2", "dataset.seed=0,1", "logger=none",
                  f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    seeds = sorted(json.loads((sweep / str(i) / "results.json").read_text())["config"]["dataset"]["seed"] for i in range(2))
    assert seeds == [0, 1]


def test_csp_run_records_its_schedule(tmp_path):
    run_dir = tmp_path / "run"
    proc = cspexp("model=tiny_random", "prune=csp", "prune.keep=0.3", "dataset.n=8", "logger=none",
                  f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    # 8 layers: clustering [0, 2) with N_c = 64, scattering [2, 4) with all 256, then ⌈0.3·256⌉ = 77
    expected = [64, 64, 256, 256, 77, 77, 77, 77]
    assert results["tokens"]["image_per_layer"] == expected
    assert results["tokens"]["avg_image_per_layer"] == pytest.approx(sum(expected) / 8)
    assert all(r["image_per_layer"] == expected for r in read_jsonl(run_dir / "samples.jsonl"))
    assert results["prune"]["cluster"]["select"] == "uniform" and results["prune"]["keep"] == 0.3
    flops = results["flops"]
    assert 0.5 < flops["reduction_image"] < 0.7 and flops["overhead"] > 0
    assert flops["llm"] < flops["llm_dense"]


def test_every_method_runs_from_the_cli_at_keep_03(tmp_path):
    methods = sorted(p.stem for p in (CONF_DIR / "prune").glob("*.yaml"))  # every method cspexp ships
    assert {"none", "csp", "fastv", "pdrop", "vtw", "random", "uniform"} <= set(methods)
    sweep = tmp_path / "sweep"
    proc = cspexp("-m", f"prune={','.join(methods)}", "prune.keep=0.3", "dataset.n=2", "logger=none",
                  f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    seen = {json.loads((sweep / str(i) / "results.json").read_text())["method"] for i in range(len(methods))}
    assert seen == set(methods)
