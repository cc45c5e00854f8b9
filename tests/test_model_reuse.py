"""One model load per multirun process: the jobs of a sweep reuse the model the previous job loaded
(same config), evaluation never changes it, and the results are those of a fresh load."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

import cspexp.evaluate
import cspexp.run
from cspexp.evaluate import evaluate


def weights_checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture
def counted_loads(monkeypatch):
    """Every model the run module loads, in order; the kept model of earlier tests is forgotten."""
    loads = []
    real = cspexp.run.build_model

    def counting(cfg_model, words=()):
        loaded = real(cfg_model, words)
        loads.append(loaded)
        return loaded

    monkeypatch.setattr(cspexp.run, "build_model", counting)
    monkeypatch.setattr(cspexp.run, "_kept", None)
    yield loads
    cspexp.run._kept = None


def as_multirun_job(monkeypatch, on: bool = True):
    monkeypatch.setattr(cspexp.evaluate, "in_multirun", lambda: on)


def rows(path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("latency_ms", "features")}
            for line in path.read_text().splitlines()]


BASE = ("model=tiny_random", "dataset.n=3", "dataset.batch_size=2", "logger=none", "++compare_dense=false")


def test_a_sweep_loads_its_model_once_and_never_changes_it(compose_cfg, counted_loads, monkeypatch, tmp_path):
    as_multirun_job(monkeypatch)
    evaluate(compose_cfg(*BASE, "prune=none"))
    model = counted_loads[0].model
    before = weights_checksum(model)
    first = rows(tmp_path / "samples.jsonl")
    reused = []
    for prune in ("csp", "fastv", "none"):
        (tmp_path / "results.json").unlink()
        evaluate(compose_cfg(*BASE, f"prune={prune}", "prune.keep=0.3"))
        reused.append(cspexp.run._kept.loaded.model is model)
    assert len(counted_loads) == 1 and all(reused)
    assert weights_checksum(model) == before  # three pruned and dense jobs later: not one weight changed
    # the last job (dense again) on the reused model gives the first job's numbers again
    assert rows(tmp_path / "samples.jsonl") == first


def test_another_model_config_loads_again_and_drops_the_kept_one(compose_cfg, counted_loads, monkeypatch, tmp_path):
    as_multirun_job(monkeypatch)
    evaluate(compose_cfg(*BASE, "prune=none"))
    (tmp_path / "results.json").unlink()
    evaluate(compose_cfg(*BASE, "prune=none", "model.seed=1"))
    assert len(counted_loads) == 2
    assert cspexp.run._kept.loaded is counted_loads[1]  # one model kept at a time
    assert weights_checksum(counted_loads[0].model) != weights_checksum(counted_loads[1].model)


@pytest.mark.parametrize("multirun,setting", [(False, "true"), (True, "false")])
def test_single_runs_and_cache_model_false_load_every_time(compose_cfg, counted_loads, monkeypatch, tmp_path,
                                                           multirun, setting):
    as_multirun_job(monkeypatch, multirun)
    for _ in range(2):
        (tmp_path / "results.json").unlink(missing_ok=True)
        evaluate(compose_cfg(*BASE, "prune=none", f"cache.model={setting}"))
    assert len(counted_loads) == 2 and cspexp.run._kept is None


def test_reused_results_equal_a_fresh_load(compose_cfg, counted_loads, monkeypatch, tmp_path):
    """A csp job after a dense job, with the reused model, against the same csp job in a fresh process state."""
    as_multirun_job(monkeypatch)
    evaluate(compose_cfg(*BASE, "prune=none"))
    (tmp_path / "results.json").unlink()
    reused = evaluate(compose_cfg(*BASE, "prune=csp", "prune.keep=0.3"))
    reused_rows = rows(tmp_path / "samples.jsonl")
    assert len(counted_loads) == 1
    cspexp.run._kept = None
    (tmp_path / "results.json").unlink()
    fresh = evaluate(compose_cfg(*BASE, "prune=csp", "prune.keep=0.3"))
    assert len(counted_loads) == 2
    assert fresh["metrics"] == reused["metrics"] and fresh["flops"] == reused["flops"]
    assert rows(tmp_path / "samples.jsonl") == reused_rows


@pytest.mark.slow
def test_cli_multirun_loads_the_model_once(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "cspexp", "-m", "model=tiny_random", "prune=none,csp,fastv",
                           "prune.keep=0.3", "dataset.n=2", "logger=none", f"hydra.sweep.dir={sweep}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert log.count("reused from the previous job of this process") == 2
    assert {json.loads((sweep / str(i) / "results.json").read_text())["method"] for i in range(3)} == {
        "none", "csp", "fastv"}
