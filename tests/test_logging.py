"""What reaches the experiment logger, and how failures are reported."""

from __future__ import annotations

import json
import sys

import pytest
from omegaconf import OmegaConf, open_dict

from cspexp.utils.failures import run_task
from cspexp.evaluate import evaluate
from cspexp.utils.errors import ConfigError

from helpers import FakeRun, RecordingLogger


def test_logger_gets_resolved_config_and_metrics(compose_cfg):
    cfg = compose_cfg("model=tiny_random", "prune=none", "dataset.n=2", "logger=none")
    with open_dict(cfg):
        cfg.logger = OmegaConf.create({"_target_": "helpers.RecordingLogger"})
    RecordingLogger.instances.clear()
    results = evaluate(cfg)
    (logger,) = RecordingLogger.instances
    assert logger.hparams["prune"] == {"_target_": "cspexp.pruning.methods.NoPruning", "keep": 1.0}
    assert logger.hparams["dataset"]["n"] == 2
    assert logger.metrics["test/giou"] == pytest.approx(results["metrics"]["giou"], abs=1e-6)
    assert logger.metrics["test/ciou"] == pytest.approx(results["metrics"]["ciou"], abs=1e-6)
    assert logger.experiment.summary["giou"] == results["metrics"]["giou"]


@pytest.fixture
def fake_wandb(monkeypatch):
    run = FakeRun()
    import wandb

    monkeypatch.setattr(wandb, "run", run, raising=False)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    return run


def test_user_error_exits_2_marks_run_failed_and_writes_error_json(compose_cfg, fake_wandb, tmp_path):
    cfg = compose_cfg()

    def task(_cfg):
        raise ConfigError("prune.keep=7 is outside (0, 1]")

    with pytest.raises(SystemExit) as exit_info:
        run_task(cfg, task)
    assert exit_info.value.code == 2
    assert fake_wandb.exit_codes == [1]
    err = json.loads((tmp_path / "error.json").read_text())
    assert err["user_error"] is True and "outside (0, 1]" in err["message"]
    assert not (tmp_path / "results.json").exists()


def test_crash_is_reraised_and_marks_run_failed(compose_cfg, fake_wandb, tmp_path):
    cfg = compose_cfg()

    def task(_cfg):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_task(cfg, task)
    assert fake_wandb.exit_codes == [1]
    assert json.loads((tmp_path / "error.json").read_text())["user_error"] is False


def test_success_finishes_run_cleanly(compose_cfg, fake_wandb):
    assert run_task(compose_cfg(), lambda _cfg: 42) == 42
    assert fake_wandb.exit_codes == [0]
