"""`python -m cspexp`: the Hydra entry point.

The config directory is passed to Hydra as an absolute path computed from this file: a relative
``config_path`` is resolved against the *module* under ``python -m`` and breaks (framework.md, H1).

User errors end in one line on stderr and a non-zero exit, never a traceback:
- config composition (unknown key, unknown group option) is checked by `preflight` before Hydra
  starts, so the message can say what *is* allowed;
- bad values and missing paths raise `CspexpError` inside the run, which is reported the same way
  and leaves an ``error.json`` (never a ``results.json``) in the run directory.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cspexp.outputs.files import write_json_atomic
from cspexp.utils.errors import ConfigError, CspexpError
from cspexp.utils.hydra_mode import in_multirun

log = logging.getLogger("cspexp")

EXIT_USAGE = 2


def find_conf_dir() -> Path:
    """``$CSPEXP_CONFIG_DIR`` if set, else ``conf/`` of the checkout this package is installed from."""
    env = os.environ.get("CSPEXP_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "conf"
    if not (path / "eval.yaml").is_file():
        sys.stderr.write(
            f"error: cspexp's configs were not found at {path}; install from a clone with `pip install -e .` "
            "or set CSPEXP_CONFIG_DIR to the repository's conf/ directory\n"
        )
        sys.exit(EXIT_USAGE)
    return path


CONF_DIR = find_conf_dir()


def fail(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(EXIT_USAGE)


def finish_wandb(exit_code: int) -> None:
    """Close the W&B run of this job, marked failed when `exit_code` ≠ 0 (Lightning's own finalize
    does not mark failures: framework.md W2)."""
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


def _failure_is_reported(cfg: DictConfig, multirun: bool) -> bool:
    """In a multirun whose Pareto callback reports failed jobs (see `cspexp.report.callback`), a job
    that raised ends normally after writing error.json, so that the basic sweeper goes on to the
    report instead of aborting; the multirun still exits non-zero (`main`)."""
    if not multirun:
        return False
    from cspexp.report.callback import failures_reported_here

    return failures_reported_here(HydraConfig.get(), cfg.get("task_name"))


def run_task(cfg: DictConfig, task):
    """Run `task(cfg)` with the failure handling every entry point shares.

    Returns the task's result, or None for a failed multirun job whose failure the sweep report
    carries (`_failure_is_reported`)."""
    out_dir = Path(cfg.paths.output_dir)
    multirun = in_multirun()
    try:
        result = task(cfg)
    except CspexpError as exc:
        write_error(out_dir, exc)
        finish_wandb(1)
        if _failure_is_reported(cfg, multirun):
            log.error("job failed: %s (written to %s)", exc, out_dir / "error.json")
            return None
        if multirun:
            raise  # Hydra records the failed job and goes on with the others
        fail(str(exc))
    except Exception as exc:
        write_error(out_dir, exc)
        finish_wandb(1)
        if _failure_is_reported(cfg, multirun):
            log.exception("job failed with %s (written to %s)", type(exc).__name__, out_dir / "error.json")
            return None
        raise
    except BaseException as exc:  # KeyboardInterrupt, SystemExit: stop the whole sweep
        write_error(out_dir, exc)
        finish_wandb(1)
        raise
    finish_wandb(0)
    return result


def objective_values(results: dict, paths) -> float | tuple[float, ...]:
    """The values a sweeper optimises: ``optimized_metrics`` are dotted paths into results.json
    (e.g. ``[metrics.giou, flops.image]`` for Optuna's two directions). One path gives a float."""
    values = []
    for path in paths:
        node = results
        for part in str(path).split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"optimized_metrics: {path!r} is not in results.json (e.g. metrics.giou, flops.image)")
            node = node[part]
        values.append(float(node))
    return values[0] if len(values) == 1 else tuple(values)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def eval_main(cfg: DictConfig):
    from cspexp.evaluate import evaluate
    from cspexp.lit.distributed import process_rank
    from cspexp.outputs.table import print_summary

    def evaluate_and_score(cfg: DictConfig):
        results = evaluate(cfg)
        # What a sweeper optimises: gIoU, or the values named by `optimized_metrics` (Optuna's
        # multi-objective sweeper needs one value per direction). Inside run_task, so that a bad
        # path is reported like any other config error.
        metrics = cfg.get("optimized_metrics")
        return results, objective_values(results, metrics) if metrics else results["metrics"]["giou"]

    outcome = run_task(cfg, evaluate_and_score)
    if outcome is None:  # a failed multirun job, listed in the sweep's report
        return None
    results, score = outcome
    if cfg.get("print_table", True) and process_rank() == 0:  # trainer=ddp: once, not once per process
        print_summary(results)
    return score


def exit_status_of_sweep() -> None:
    """After a multirun: exit 1 with one line if a job failed or the report could not be written.
    The report was written first (`cspexp.report.callback`)."""
    module = sys.modules.get("cspexp.report.callback")
    outcome = getattr(module, "LAST_SWEEP", None)
    if outcome is None:
        return
    if outcome.error:
        sys.stderr.write(f"error: {outcome.error}\n")
        sys.exit(1)
    if outcome.failed:
        n = len(outcome.failed)
        sys.stderr.write(
            f"error: {n} job{'s' if n > 1 else ''} of the sweep failed (listed in {outcome.report_dir / 'report.md'}); "
            f"first: {outcome.failed[0]}\n"
        )
        sys.exit(1)


def main() -> None:
    from cspexp.utils.preflight import preflight

    # Lightning 2.6 on torch 2.13 warns about its own pytree use at every start; not actionable here.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")

    preflight(CONF_DIR, "eval", sys.argv[1:])
    eval_main()
    exit_status_of_sweep()


if __name__ == "__main__":
    main()
