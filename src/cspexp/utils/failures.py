"""What happens when something fails: the one place that decides how a run or a sweep ends.

The promise to the user: an error they can fix (`CspexpError`) ends in one line on stderr and a
non-zero exit, never a traceback; every failed run leaves an ``error.json`` (never a ``results.json``)
in its run directory.

Multiruns: with Hydra's basic sweeper a job's exception is re-raised by the sweeper *before* the
callbacks' ``on_multirun_end``, so the sweep's Pareto report would never be written. When the
report callback (`cspexp.report.callback.ParetoCallback`) is configured for the task, a failed job
therefore ends normally after writing its error.json; the callback lists it in the report and
records the sweep's outcome here (`end_sweep`), and the entry point then exits non-zero
(`exit_status_of_sweep`). Sweepers that handle failures themselves (Optuna) still get the exception.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cspexp.outputs.files import write_json_atomic
from cspexp.utils.errors import CspexpError
from cspexp.utils.hydra_mode import in_multirun

log = logging.getLogger("cspexp")

EXIT_USAGE = 2  # a bad command line or config value
EXIT_FAILED = 1  # a sweep with failed jobs, or whose report could not be written

REPORT_CALLBACK = "cspexp.report.callback.ParetoCallback"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def fail(message: str, status: int = EXIT_USAGE) -> None:
    """End the process with one error line."""
    sys.stderr.write(f"error: {message}\n")
    sys.exit(status)


# --------------------------------------------------------------------------- a closed stdout
# `python -m cspexp … | head` closes stdout before the run ends. A run that succeeded must still
# end normally (status 0, nothing on stderr): once a write finds the reader gone, the rest of stdout
# goes to devnull — also the interpreter's flush at exit (Python's signal docs, "Note on SIGPIPE").
def stdout_closed() -> None:
    """The reader of stdout went away: point stdout's file descriptor at devnull."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # a stdout without a file descriptor (a test's capture): nothing to redirect


@contextmanager
def tolerate_closed_stdout() -> Iterator[None]:
    """Around a final print: a closed stdout is not an error (the output is dropped)."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        stdout_closed()


class _ClosedStdoutSafe:
    """sys.stdout for a whole run: progress bars, log lines and the summary table all write here, and
    a BrokenPipeError sends the rest to devnull instead of failing the run."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            stdout_closed()
            return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            stdout_closed()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def survive_closed_stdout() -> None:
    """Entry points call this first: sys.stdout then survives its reader going away."""
    if sys.stdout is not None and not isinstance(sys.stdout, _ClosedStdoutSafe):
        sys.stdout = _ClosedStdoutSafe(sys.stdout)


# --------------------------------------------------------------------------- one run
def finish_wandb(exit_code: int) -> None:
    """Close the W&B run of this job, marked failed when `exit_code` ≠ 0 (Lightning's own finalize
    does not mark failures: docs/pitfalls.md, "W&B: failed runs look finished")."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.run.finish(exit_code=exit_code)


def write_error(out_dir: Path, exc: BaseException) -> None:
    from cspexp.lit.distributed import process_rank

    # trainer=ddp: when one process fails, the others fail too, often with only an echo ("Connection
    # closed by peer"); each rank > 0 keeps its own file so that no echo overwrites the cause.
    rank = process_rank()
    try:
        write_json_atomic(
            out_dir / ("error.json" if rank == 0 else f"error_rank{rank}.json"),
            {
                "error": type(exc).__name__,
                "message": str(exc),
                "user_error": isinstance(exc, CspexpError),
                "traceback": "".join(traceback.format_exception(exc)),
            },
        )
    except OSError:
        pass  # reporting the original error matters more than the error file


def _reports_task(callback_cfg, task_name) -> bool:
    return (str((callback_cfg or {}).get("_target_", "")) == REPORT_CALLBACK
            and bool((callback_cfg or {}).get("enabled", True))
            and task_name in list((callback_cfg or {}).get("tasks", ["eval"])))


def failures_reported_here(hydra_cfg, task_name: str | None) -> bool:
    """Whether a failed job may end normally because the sweep report lists it: Hydra's basic
    sweeper (which would otherwise abort before the report) and the report callback configured for
    the task (`python -m cspexp` is task ``eval``; `python -m cspexp.train` is not reported)."""
    sweeper = str(hydra_cfg.sweeper.get("_target_", ""))
    callbacks = hydra_cfg.get("callbacks") or {}
    return sweeper == BASIC_SWEEPER and any(_reports_task(c, task_name) for c in callbacks.values())


def run_task(cfg: DictConfig, task: Callable[[DictConfig], object]):
    """Run `task(cfg)` with the failure handling every entry point shares.

    Returns the task's result, or None for a failed multirun job whose failure the sweep report
    carries. A user error in a single run ends the process with one line (`fail`)."""
    out_dir = Path(cfg.paths.output_dir)
    multirun = in_multirun()
    try:
        result = task(cfg)
    except BaseException as exc:
        write_error(out_dir, exc)
        finish_wandb(1)
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: stop the whole sweep
            raise
        if multirun and failures_reported_here(HydraConfig.get(), cfg.get("task_name")):
            if isinstance(exc, CspexpError):
                log.error("job failed: %s (written to %s)", exc, out_dir / "error.json")
            else:
                log.exception("job failed with %s (written to %s)", type(exc).__name__, out_dir / "error.json")
            return None
        if multirun or not isinstance(exc, CspexpError):
            raise  # Hydra records the failed job and goes on with the others; a bug keeps its traceback
        fail(str(exc))
    finish_wandb(0)
    return result


# --------------------------------------------------------------------------- one sweep
@dataclass
class SweepOutcome:
    report_dir: Path | None = None
    failed: list[str] = field(default_factory=list)  # one line per failed job
    error: str | None = None  # the report itself could not be written


_last_sweep: SweepOutcome | None = None  # the last multirun of this process


def begin_sweep() -> None:
    global _last_sweep
    _last_sweep = None


def end_sweep(outcome: SweepOutcome) -> None:
    """Called by the report callback once the sweep's report is written (or could not be)."""
    global _last_sweep
    _last_sweep = outcome


def exit_status_of_sweep() -> None:
    """After a multirun: exit 1 with one line if a job failed or the report could not be written."""
    outcome = _last_sweep
    if outcome is None:
        return
    if outcome.error:
        fail(outcome.error, EXIT_FAILED)
    if outcome.failed:
        n = len(outcome.failed)
        fail(f"{n} job{'s' if n > 1 else ''} of the sweep failed (listed in {outcome.report_dir / 'report.md'}); "
             f"first: {outcome.failed[0]}", EXIT_FAILED)
