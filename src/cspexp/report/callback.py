"""The Hydra callback that turns a finished multirun into a Pareto report.

Configured in ``conf/hydra/default.yaml`` (``hydra.callbacks.pareto``). At multirun end — in the
process that launched the sweep, whatever the launcher — it reads every job directory under
``hydra.sweep.dir``, writes pareto.{csv,json,png} and report.md there, and logs one W&B summary run
(``job_type=pareto``) in the jobs' group when the logger is W&B.

Failed jobs are listed in the report, and the sweep's outcome goes to `cspexp.utils.failures`
(`end_sweep`), which decides the exit status; its module docstring says why a failed job of the
basic sweeper ends normally.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from cspexp.utils.failures import SweepOutcome, begin_sweep, end_sweep

log = logging.getLogger(__name__)


def sweep_group(logger_cfg, sweep_dir) -> str:
    """The W&B group of a sweep's runs: ``logger.group`` if set, else the sweep dir's name
    (`cspexp.run.build_logger` uses the same rule for the job runs)."""
    group = (logger_cfg or {}).get("group") if logger_cfg is not None else None
    return str(group) if group else Path(str(sweep_dir)).name


class ParetoCallback(Callback):
    """Args: enabled (write the report), wandb (also log the summary run when the logger is W&B),
    plot (write pareto.png), tasks (the ``task_name``s whose multiruns are evaluations: conf/hydra/
    is shared with `python -m cspexp.train`, whose jobs write no results.json)."""

    def __init__(self, enabled: bool = True, wandb: bool = True, plot: bool = True, tasks=("eval",)) -> None:
        self.enabled, self.wandb, self.plot, self.tasks = enabled, wandb, plot, list(tasks)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        begin_sweep()
        self.started = time.time()
        # Hydra 1.3 sets HydraConfig only inside each job, but the default sweep dir goes through
        # paths.log_dir → ${hydra:runtime.cwd}, which the sweeper resolves before any job starts
        # (and this callback again at the end). Without this, `python -m cspexp -m` fails with
        # "HydraConfig was not set" unless hydra.sweep.dir is given. Jobs set their own, as always.
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            HydraConfig.instance().set_config(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled or config.get("task_name") not in self.tasks:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        outcome = SweepOutcome(report_dir=sweep_dir)
        from cspexp.utils.errors import CspexpError

        try:
            self._report(config, sweep_dir, outcome)
        except CspexpError as exc:  # the sweep dir cannot be written: one line, no traceback
            outcome.error = str(exc)
        except Exception as exc:  # noqa: BLE001 — Hydra would turn it into a warning and exit 0
            log.exception("the Pareto report could not be written")
            outcome.error = f"the Pareto report in {sweep_dir} could not be written: {type(exc).__name__}: {exc}"
        end_sweep(outcome)

    def _ran_now(self, job_dir: Path) -> bool:
        """Whether the job in `job_dir` was started by this multirun: Hydra writes the job's
        ``.hydra/`` files when it starts it (a skipped, resumed job included)."""
        started = getattr(self, "started", None)
        marker = job_dir / ".hydra" / "overrides.yaml"
        if started is None or not marker.is_file():
            return True  # cannot tell: count it
        return marker.stat().st_mtime >= started - 1.0  # 1 s: coarse file-system timestamps

    def _report(self, config: DictConfig, sweep_dir: Path, outcome: SweepOutcome) -> None:
        from cspexp.report.pareto import collect_dirs
        from cspexp.report.wandb_summary import maybe_log
        from cspexp.report.write import write_report

        if not sweep_dir.is_dir():
            outcome.error = f"the sweep directory {sweep_dir} does not exist: no job ran"
            return
        report = collect_dirs([sweep_dir], base=sweep_dir)
        paths = write_report(report, sweep_dir, title=sweep_dir.name, plot=self.plot)
        # The exit status answers for this multirun's jobs; the report lists every job of the dir
        # (a job dir left failed by an earlier, different sweep into the same dir is listed, not fatal).
        outcome.failed = [" ".join(f"job {f.run_dir} ({' '.join(f.overrides) or 'no overrides'}): {f.error}: "
                                   f"{f.message}".split()) for f in report.failed if self._ran_now(sweep_dir / f.run_dir)]
        logger_cfg = config.get("logger")
        if self.wandb and logger_cfg is not None:
            maybe_log(report, logger_cfg, sweep_group(logger_cfg, sweep_dir), sweep_dir, paths.get("pareto.png"))
        log.info("Pareto report: %s (%d points, %d failed jobs)", paths["report.md"], len(report.points),
                 len(report.failed))
        if report.separation:
            log.info("%s", report.separation)
        for f in report.unreadable:
            log.warning("unreadable: job %s: %s: %s", f.run_dir, f.error.split(" ", 1)[1], f.message)
