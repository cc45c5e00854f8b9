"""Test doubles shared by several test files."""

from __future__ import annotations

from types import SimpleNamespace

from lightning.pytorch.loggers import Logger


class RecordingLogger(Logger):
    """A Lightning logger that keeps what it was given (stands in for WandbLogger)."""

    instances: list["RecordingLogger"] = []

    def __init__(self) -> None:
        super().__init__()
        self.hparams: dict = {}
        self.metrics: dict = {}
        self._experiment = SimpleNamespace(summary={})
        RecordingLogger.instances.append(self)

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> str:
        return "0"

    @property
    def experiment(self):
        return self._experiment

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self.hparams.update(params)

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.update(metrics)


class FakeRun:
    """Stands in for `wandb.run`: records how it was finished."""

    def __init__(self) -> None:
        self.exit_codes: list[int] = []

    def finish(self, exit_code: int = 0) -> None:
        self.exit_codes.append(exit_code)


def tiny_random_and_items(n: int = 3):
    """`model=tiny_random` built from its config over the `shapes` vocabulary, and the first `n`
    `shapes` val items: the small end-to-end setting of the pruning tests."""
    from omegaconf import OmegaConf

    from cspexp.data.shapes import ShapesDataset
    from cspexp.utils.instantiate import build
    from conftest import CONF_DIR

    ds = ShapesDataset(split="val", n=n)
    loaded = build(OmegaConf.load(CONF_DIR / "model" / "tiny_random.yaml"), words=ShapesDataset.vocabulary())
    return loaded, [ds[i] for i in range(n)]


def cli_error_line(tmp_path, *overrides: str) -> str:
    """Run ``python -m cspexp model=tiny_random logger=none <overrides>`` in `tmp_path`; assert it exits
    with status 2 and one non-empty line on stderr, and return that line."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "cspexp", "model=tiny_random", "logger=none", *overrides,
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr)
    return lines[0]
