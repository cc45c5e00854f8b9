"""Multi-process evaluation (`trainer=ddp`): two CPU processes over gloo give the single-process results.

The end-to-end tests run the real CLI, as a user does: Lightning's ddp re-runs that command line
for rank 1. Each command runs in its own session and is killed whole (rank 1 included) if it
outlives its timeout, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch.distributed as dist

from cspexp.data.sampling import EvalData
from cspexp.lit import distributed
from cspexp.lit.distributed import check_processes
from cspexp.outputs.files import read_jsonl
from cspexp.pruning.methods import NoPruning, PruningMethod
from cspexp.utils.errors import ConfigError

TIMEOUT_S = 240


def cspexp(*args: str, cwd: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "cspexp", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # rank 0 and the rank it launched
        out, err = proc.communicate()
        pytest.fail(f"cspexp {' '.join(args)} did not finish in {TIMEOUT_S} s\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def rows_without_timing(path: Path) -> dict[int, dict]:
    return {r["idx"]: {k: v for k, v in r.items() if k != "latency_ms"} for r in read_jsonl(path)}


@pytest.mark.slow
def test_two_processes_give_exactly_the_single_process_results(tmp_path):
    # 7 samples over 2 ranks: 4 + 3, so a padding sampler would repeat one. Batches of 2 leave both
    # ranks with a short last batch. csp makes compare_dense=auto run a second, dense test.
    common = ["model=tiny_random", "dataset.n=7", "dataset.batch_size=2", "prune=csp", "logger=csv"]
    single = cspexp(*common, f"hydra.run.dir={tmp_path / 'single'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    # Rank 0 alone draws the pictures and the fvcore breakdown: before and after the distributed part.
    # The default run dir (a timestamp): rank 1 must be told rank 0's, not make one of its own.
    (tmp_path / "ddp_cwd").mkdir()
    ddp = cspexp(*common, "trainer=ddp_cpu", "flops.report=true", "viz.n_samples=1", cwd=tmp_path / "ddp_cwd")
    assert ddp.returncode == 0, ddp.stderr
    (ddp_dir,) = (tmp_path / "ddp_cwd" / "outputs" / "runs").iterdir()

    one = json.loads((tmp_path / "single" / "results.json").read_text())
    two = json.loads((ddp_dir / "results.json").read_text())
    assert two["distributed"]["world_size"] == 2 and one["distributed"]["world_size"] == 1
    assert two["distributed"]["samples_per_rank"] == [4, 3]  # rank 0: idx 0, 2, 4, 6; rank 1: 1, 3, 5
    assert two["n_samples"] == one["n_samples"] == 7
    for key in ("giou", "ciou"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], abs=1e-6)
        assert two["dense"]["metrics"][key] == pytest.approx(one["dense"]["metrics"][key], abs=1e-6)

    rows = rows_without_timing(ddp_dir / "samples.jsonl")
    assert sorted(rows) == list(range(7)) and len(read_jsonl(ddp_dir / "samples.jsonl")) == 7
    assert rows == rows_without_timing(tmp_path / "single" / "samples.jsonl")
    # the reduced metrics against LISA's formulas on the merged rows
    giou = sum(r["intersection"] / (r["union"] + 1e-5) if r["union"] else 1.0 for r in rows.values()) / 7
    ciou = sum(r["intersection"] for r in rows.values()) / (sum(r["union"] for r in rows.values()) + 1e-10)
    assert two["metrics"]["giou"] == pytest.approx(giou, abs=1e-6)
    assert two["metrics"]["ciou"] == pytest.approx(ciou, abs=1e-6)
    assert two["flops"]["llm"] == pytest.approx(one["flops"]["llm"])

    # Rank 0 alone writes: one results.json in the whole tree, one CSV log holding the reduced
    # metrics, one summary table, no error.json.
    expected = [ddp_dir / "results.json", tmp_path / "single" / "results.json"]
    assert sorted(tmp_path.rglob("results.json")) == sorted(expected)
    assert not list(tmp_path.rglob("error*.json"))
    assert (ddp_dir / "flops_breakdown.json").is_file() and len(list(tmp_path.rglob("*.png"))) == 1
    assert [p.name for p in (ddp_dir / "csv").iterdir()] == ["version_0"]
    logged = (ddp_dir / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    assert len(logged) == 2
    values = dict(zip(logged[0].split(","), logged[1].split(","), strict=True))
    assert float(values["test/giou"]) == pytest.approx(two["metrics"]["giou"], abs=1e-6)
    assert ddp.stdout.count("gIoU") == single.stdout.count("gIoU") > 0  # the summary, printed once


@pytest.mark.slow
def test_fewer_samples_than_processes_stops_before_any_process_starts(tmp_path):
    run_dir = tmp_path / "run"
    proc = cspexp("model=tiny_random", "dataset.n=1", "trainer=ddp_cpu", "logger=none", f"hydra.run.dir={run_dir}",
                  cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: the dataset has 1 sample, fewer than the 2 processes "
                     "(trainer.devices × trainer.num_nodes); use at most trainer.devices=1"], proc.stderr
    assert not (run_dir / "results.json").exists()
    assert not (run_dir / "train_ddp_process_1.log").exists()  # rank 1 was never launched


def cpu_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False, **kwargs)


def test_guards_refuse_setups_that_would_repeat_lose_or_hang(monkeypatch):
    check_processes(cpu_trainer(devices=1), n_samples=1)  # one process: nothing to check
    check_processes(cpu_trainer(devices=2, strategy="ddp"), n_samples=2)
    with pytest.raises(ConfigError, match="fewer than the 2 processes"):
        check_processes(cpu_trainer(devices=2, strategy="ddp"), n_samples=1)
    with pytest.raises(ConfigError, match=r"spawn .*use trainer=ddp"):
        check_processes(cpu_trainer(devices=2, strategy="ddp_spawn"), n_samples=8)
    monkeypatch.setattr(distributed, "in_multirun", lambda: True)
    with pytest.raises(ConfigError, match=r"cannot run inside a multirun \(-m\)"):
        check_processes(cpu_trainer(devices=2, strategy="ddp"), n_samples=8)
    check_processes(cpu_trainer(devices=1), n_samples=8)  # a multirun of single-process jobs is fine


def rank_slices(n: int, world: int, batch_size: int) -> list[list[int]]:
    """The dataset positions each rank's test loader yields, in order."""
    data = EvalData(list(range(n)), batch_size=batch_size, num_workers=0, collate_fn=list)
    slices = []
    for rank in range(world):
        data.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        slices.append([i for batch in data.test_dataloader() for i in batch])
    return slices


def test_each_rank_reads_a_disjoint_strided_slice():
    assert rank_slices(7, 2, batch_size=2) == [[0, 2, 4, 6], [1, 3, 5]]
    assert rank_slices(13, 4, batch_size=3) == [[0, 4, 8, 12], [1, 5, 9], [2, 6, 10], [3, 7, 11]]
    assert rank_slices(5, 1, batch_size=8) == [[0, 1, 2, 3, 4]]
    for n in range(1, 12):
        for world in range(1, n + 1):
            slices = rank_slices(n, world, batch_size=2)
            flat = sorted(i for s in slices for i in s)
            assert flat == list(range(n)), (n, world)  # every sample once: none repeated, none dropped
            assert max(map(len, slices)) - min(map(len, slices)) <= 1


class FailsOnRankOne(NoPruning):
    """The dense model, except that the second process of a ``trainer=ddp`` run raises at its
    first sample (the CLI test below builds it with ``prune._target_``)."""

    def bind(self, num_layers: int, n_image: int) -> PruningMethod:
        return DenseFailingOnRankOne(self, num_layers, n_image)


class DenseFailingOnRankOne(PruningMethod):
    def setup(self, state, ctx) -> None:
        if dist.is_initialized() and dist.get_rank() == 1:
            raise RuntimeError("injected failure on rank 1")


@pytest.mark.slow
def test_a_failing_rank_ends_the_run_without_hanging_or_results(tmp_path):
    run_dir = tmp_path / "run"
    importable = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    proc = cspexp("model=tiny_random", "dataset.n=7", "dataset.batch_size=2", "trainer=ddp_cpu", "logger=none",
                  "prune=none", "prune._target_=test_ddp_eval.FailsOnRankOne", f"hydra.run.dir={run_dir}", cwd=tmp_path,
                  extra_env={"PYTHONPATH": importable})
    assert proc.returncode != 0
    assert not (run_dir / "results.json").exists() and not (run_dir / "samples.jsonl").exists()
    # rank 1's own error file holds the cause; rank 0's (if it lived to write one) cannot overwrite it
    assert json.loads((run_dir / "error_rank1.json").read_text())["message"] == "injected failure on rank 1"
