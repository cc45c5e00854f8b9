"""Write a `ParetoReport` as pareto.csv, pareto.json, pareto.png and report.md — all or none: every
file is rendered first, then each goes to a temporary file beside its target, and only when all of
them are written are they renamed over the targets. A reader (a dashboard, a second aggregate) never
sees half a file, and a directory that cannot be written is one `CspexpError` naming it, with
nothing left behind."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path

from cspexp.report.pareto import ParetoReport
from cspexp.utils.errors import CspexpError

SCHEMA = 1
CSV_COLUMNS = ("method", "variant", "keep", "flops_image", "flops_image_dense", "reduction_image", "giou", "ciou",
               "frontier_giou", "frontier_ciou", "n_samples", "model", "config_hash", "run_dir",
               "dataset", "split", "sample_set", "group")
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
        "separated": report.separation,
        "groups": [
            {"group": g.label, **g.fields(), "dense": g.dense.run_dir if g.dense else None,
             "points": [p.run_dir for p in g.points],
             "frontier": {m: [p.run_dir for p in g.frontier(m)] for m in ("giou", "ciou")}}
            for g in report.groups()
        ],
    }


def render_report(report: ParetoReport, title: str | None = None, plot: bool = True) -> dict[str, bytes]:
    """The report's files as bytes, by name (no pareto.png when `plot` is false or no point finished)."""
    import json

    from cspexp.report.plots import render_pareto
    from cspexp.report.report_md import render_markdown

    has_png = plot and bool(report.points)
    files = {
        "pareto.csv": csv_text(report).encode("utf-8"),
        # as cspexp.outputs.files.write_json_atomic writes it
        "pareto.json": (json.dumps(json_obj(report), indent=2, sort_keys=False) + "\n").encode("utf-8"),
    }
    if has_png:
        files["pareto.png"] = render_pareto(report, title)
    md_title = f"Pareto report · {title}" if title else "Pareto report"
    files["report.md"] = render_markdown(report, md_title, "pareto.png" if has_png else None).encode("utf-8")
    return files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def write_together(out_dir: Path, files: dict[str, bytes]) -> dict[str, Path]:
    """Write every file into `out_dir` or none: temporary files first (fsynced), then the renames.
    An `OSError` (no such directory, not a directory, permission denied, disk full) becomes one
    `CspexpError` naming `out_dir`; the temporary files are removed and no target is touched."""
    out_dir = Path(out_dir)
    temps: dict[str, str] = {}
    try:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
                temps[name] = tmp
                os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; reports are meant to be shared
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            for name, tmp in temps.items():
                os.replace(tmp, out_dir / name)
        except BaseException:
            for tmp in temps.values():
                Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise CspexpError(f"cannot write the report into {out_dir}: {reason}") from exc
    return {name: out_dir / name for name in files}


def write_report(report: ParetoReport, out_dir: Path, title: str | None = None, plot: bool = True) -> dict[str, Path]:
    """Write the files into `out_dir` (all or none); returns their paths by name. The PNG is skipped
    when `plot` is false or there is no finished point. Raises `CspexpError` when `out_dir` cannot
    be written."""
    return write_together(Path(out_dir), render_report(report, title, plot))
