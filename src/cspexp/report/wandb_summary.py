"""One W&B run that summarises a sweep: the points as a `wandb.Table`, W&B's own scatter and line
charts of accuracy against FLOPs reduction, and pareto.png as an image.

It is a run of its own (``job_type=pareto``) in the sweep's group, next to the job runs
(``job_type=eval``), so the group page shows the points and their summary together. The `wandb`
module can be injected: tests pass a fake and check what would be logged.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from cspexp.report.pareto import ParetoReport
from cspexp.report.plots import reduction_pct

log = logging.getLogger(__name__)

COLUMNS = ["method", "variant", "keep", "flops_image", "reduction_pct", "giou", "ciou", "frontier_giou",
           "frontier_ciou", "run_dir", "group"]


def table_rows(report: ParetoReport, only_frontier: str | None = None) -> list[list]:
    """One row per point, sorted by reduction so that line charts draw left to right; with
    `only_frontier` (giou | ciou), the frontier points of that metric only (each group's own)."""
    rows = []
    for p in report.points:
        if only_frontier and not getattr(p, f"frontier_{only_frontier}"):
            continue
        red = reduction_pct(p, report.dense_of(p))
        rows.append([p.method, p.variant, p.keep, p.flops_image, red, p.giou, p.ciou, p.frontier_giou,
                     p.frontier_ciou, p.run_dir, p.group])
    return sorted(rows, key=lambda r: (r[4] is None, r[4] if r[4] is not None else 0.0))


def log_summary_run(report: ParetoReport, *, project: str, entity: str | None = None, group: str | None = None,
                    mode: str | None = None, save_dir: Path | None = None, png: Path | None = None,
                    tags=(), wandb=None) -> None:
    """Open the summary run, log the table, charts and image, and finish it."""
    wandb = wandb or importlib.import_module("wandb")
    groups = report.groups()
    # several groups: one frontier line per group (frontiers of different groups are not one curve)
    front_stroke = {"stroke": "group"} if len(groups) > 1 else {}
    table = wandb.Table(columns=COLUMNS, data=table_rows(report))
    run = wandb.init(
        project=project,
        entity=entity,
        group=group,
        job_type="pareto",
        name=f"pareto · {group}" if group else "pareto",
        tags=list(tags) or None,
        mode=mode,
        dir=str(save_dir) if save_dir else None,
        config={"source": report.source, "n_points": len(report.points), "n_failed": len(report.failed),
                "n_groups": len(groups), "separated": report.separation},
        reinit="create_new",  # never attach to (or finish) a job's run that might still be open
    )
    charts = {"pareto/points": table}
    for metric, name in (("giou", "gIoU"), ("ciou", "cIoU")):
        charts[f"pareto/{metric}_scatter"] = wandb.plot.scatter(
            table, "reduction_pct", metric, title=f"{name} vs image-token FLOPs reduction (%)")
        # stroke: one line per method variant, as in pareto.png
        charts[f"pareto/{metric}_by_method"] = wandb.plot.line(
            table, "reduction_pct", metric, stroke="variant", title=f"{name} by method vs FLOPs reduction (%)")
        front = wandb.Table(columns=COLUMNS, data=table_rows(report, only_frontier=metric))
        charts[f"pareto/{metric}_frontier"] = wandb.plot.line(
            front, "reduction_pct", metric, title=f"{name} Pareto frontier vs FLOPs reduction (%)", **front_stroke)
    if png is not None and Path(png).is_file():
        charts["pareto/plot"] = wandb.Image(str(png))
    run.log(charts)
    dense = report.dense
    run.summary.update({
        "n_points": len(report.points),
        "n_failed": len(report.failed),
        "dense_giou": dense.giou if dense else None,
        "dense_ciou": dense.ciou if dense else None,  # null with several groups: see the table's dense rows
        "n_groups": len(groups),
    })
    run.finish()


def maybe_log(report: ParetoReport, logger_cfg, group: str, save_dir: Path, png: Path | None) -> bool:
    """Log the summary run when the sweep's logger is W&B; a W&B failure is logged, never raised
    (the files on disk are the report; the W&B copy is a convenience)."""
    target = str((logger_cfg or {}).get("_target_", ""))
    if not target.endswith("WandbLogger"):
        return False
    try:
        log_summary_run(report, project=logger_cfg.get("project") or "cspexp", entity=logger_cfg.get("entity"),
                        group=group, mode=logger_cfg.get("mode"), save_dir=save_dir, png=png,
                        tags=logger_cfg.get("tags") or ())
        return True
    except Exception as exc:  # noqa: BLE001 — see the docstring
        log.warning("the W&B summary run was not logged: %s: %s", type(exc).__name__, exc)
        return False
