"""The embedded model: shipped in the package, loaded offline, the default of `python -m cspexp`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cspexp.evaluate import evaluate
from cspexp.models.packaged import packaged_path

FILES = ("config.json", "model.safetensors", "tokenizer.json")


def test_packaged_model_is_small_and_complete():
    path = packaged_path("tiny_lisa")
    sizes = {f: (path / f).stat().st_size for f in FILES}
    assert sum(sizes.values()) <= 25 * 2**20, sizes


def test_packaged_model_reproduces_its_stored_giou(compose_cfg):
    """metrics.json was written by the quality evaluation when the model was packaged (README)."""
    stored = json.loads((packaged_path("tiny_lisa") / "metrics.json").read_text())
    cfg = compose_cfg("model=tiny_lisa", "prune=none", "dataset.n=32", "logger=none", "++compare_dense=false")
    results = evaluate(cfg)
    assert results["n_samples"] == 32 and results["model"] == "tiny_lisa"
    assert results["metrics"]["giou"] == pytest.approx(stored["val32"]["giou"], abs=0.02)
    assert results["metrics"]["ciou"] == pytest.approx(stored["val32"]["ciou"], abs=0.02)


def test_default_main_job_shows_dense_and_csp(tmp_path):
    """`python -m cspexp` with no model/prune arguments: tiny_lisa under csp, with the dense row."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "cspexp", "dataset.n=4", "logger=none", f"hydra.run.dir={run_dir}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["model"] == "tiny_lisa" and results["method"] == "csp"
    assert results["dense"]["metrics"]["giou"] >= 0 and results["flops"]["reduction_image"] > 0.5
    assert "(dense)" in proc.stdout and "csp" in proc.stdout and "gIoU" in proc.stdout
