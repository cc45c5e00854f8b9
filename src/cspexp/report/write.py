"""Write a `ParetoReport` as pareto.csv, pareto.json, pareto.png and report.md — each atomically, so
a reader (a dashboard, a second aggregate) never sees half a file."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from cspexp.outputs.files import write_json_atomic, write_text_atomic
from cspexp.report.pareto import ParetoReport

SCHEMA = 1
CSV_COLUMNS = ("method", "variant", "keep", "flops_image", "flops_image_dense", "reduction_image", "giou", "ciou",
               "frontier_giou", "frontier_ciou", "n_samples", "model", "config_hash", "run_dir")
FILES = ("pareto.csv", "pareto.json", "pareto.png", "report.md")


def csv_text(report: ParetoReport) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for p in report.points:
        row = p.row()
        writer.writerow({k: ("" if row[k] is None else row[k]) for k in CSV_COLUMNS})
    return buf.getvalue()


def json_obj(report: ParetoReport) -> dict:
    dense = report.dense
    return {
        "schema": SCHEMA,
        "source": report.source,
        "cost": "flops_image: mean image-token FLOPs per sample (LLM prefill), lower is better",
        "accuracy": ["giou", "ciou"],
        "dense": dense.run_dir if dense else None,
        "points": [p.row() for p in report.points],
        "frontier": {m: [p.run_dir for p in report.frontier(m)] for m in ("giou", "ciou")},
        "failed": [vars(f) for f in report.failed],
    }


def write_report(report: ParetoReport, out_dir: Path, title: str | None = None, plot: bool = True) -> dict[str, Path]:
    """Write the four files into `out_dir`; returns their paths by name. The PNG is skipped when
    `plot` is false or there is no finished point."""
    from cspexp.report.plots import write_png
    from cspexp.report.report_md import render_markdown

    out_dir = Path(out_dir)
    paths = {name: out_dir / name for name in FILES}
    write_text_atomic(paths["pareto.csv"], csv_text(report))
    write_json_atomic(paths["pareto.json"], json_obj(report))
    has_png = plot and bool(report.points)
    if has_png:
        write_png(report, paths["pareto.png"], title)
    else:
        paths.pop("pareto.png")
    md_title = f"Pareto report · {title}" if title else "Pareto report"
    write_text_atomic(paths["report.md"], render_markdown(report, md_title, "pareto.png" if has_png else None))
    return paths
