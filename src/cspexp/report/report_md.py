"""report.md: what a person reads first — the dense reference, the frontier, a table per method
variant, and every failed job with its error."""

from __future__ import annotations

from cspexp.report.pareto import ParetoReport, Point
from cspexp.report.plots import reduction_pct


def _num(x, fmt: str = ".4f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) else "—"


def _gflops(x) -> str:
    return _num(x / 1e9, ".4g") if isinstance(x, (int, float)) else "—"


def _red(p: Point, dense: Point | None) -> str:
    r = reduction_pct(p, dense)
    return f"{r:.1f} %" if r is not None else "—"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: ParetoReport, title: str = "Pareto report", png: str | None = "pareto.png") -> str:
    dense = report.dense
    lines = [f"# {title}", ""]
    n_var = len({p.variant for p in report.points})
    lines.append(f"Source: `{report.source}` — {len(report.points)} point(s) in {n_var} curve(s), "
                 f"{len(report.failed)} failed job(s).")
    lines.append("")
    lines.append("Accuracy is LISA's gIoU (mean per-sample IoU) and cIoU (ΣI/ΣU); cost is the mean image-token "
                 "FLOPs per sample of the LLM prefill (results.json → `flops.image`). A point is on a frontier when "
                 "no other point has at most its FLOPs and at least its accuracy, one of them strictly.")
    lines.append("")
    if dense is not None:
        lines.append(f"**Dense reference** (`none`, run `{dense.run_dir}`): gIoU {_num(dense.giou)}, cIoU {_num(dense.ciou)}, "
                     f"{_gflops(dense.flops_image)} image-token GFLOPs per sample.")
        copies = sum(p.is_dense for p in report.points) - 1
        if copies:
            lines.append(f"({copies} more `none` job(s) in this sweep repeat it: `none` ignores `keep`.)")
    else:
        lines.append("**No dense reference** in these runs: reductions come from each run's own dense FLOPs. "
                     "Add one with `python -m cspexp prune=none hydra.run.dir=<sweep dir>/dense` and aggregate again.")
    lines.append("")
    if png:
        lines += [f"![accuracy vs image-token FLOPs]({png})", ""]

    for metric, name in (("giou", "gIoU"), ("ciou", "cIoU")):
        lines += [f"## Frontier: {name} vs image-token FLOPs", ""]
        front = report.frontier(metric)
        if not front:
            lines += ["(no finished point)", ""]
            continue
        lines += ["| curve | keep | image GFLOPs | reduction | gIoU | cIoU | run |", "|---|---:|---:|---:|---:|---:|---|"]
        for p in front:
            lines.append(f"| {_cell(p.variant)} | {_num(p.keep, 'g')} | {_gflops(p.flops_image)} | {_red(p, dense)} | "
                         f"{_num(p.giou)} | {_num(p.ciou)} | {_cell(p.run_dir)} |")
        lines.append("")

    lines += ["## Points by method", ""]
    for variant, rows in report.variants().items():
        lines += [f"### {variant}", "",
                  "| keep | image GFLOPs | reduction | gIoU | cIoU | frontier | samples | run |",
                  "|---:|---:|---:|---:|---:|---|---:|---|"]
        for p in rows:
            marks = ", ".join(m for m, on in (("gIoU", p.frontier_giou), ("cIoU", p.frontier_ciou)) if on) or ""
            lines.append(f"| {_num(p.keep, 'g')} | {_gflops(p.flops_image)} | {_red(p, dense)} | {_num(p.giou)} | "
                         f"{_num(p.ciou)} | {marks} | {p.n_samples if p.n_samples is not None else '—'} | "
                         f"{_cell(p.run_dir)} |")
        lines.append("")

    lines += ["## Failed jobs", ""]
    if not report.failed:
        lines += ["None.", ""]
    else:
        lines += ["| job | overrides | error | message |", "|---|---|---|---|"]
        for f in report.failed:
            overrides = " ".join(f.overrides) if f.overrides else "—"
            lines.append(f"| {_cell(f.run_dir)} | `{_cell(overrides)}` | {_cell(f.error)} | {_cell(f.message[:300])} |")
        lines += ["", "Re-run the sweep with the same `hydra.sweep.dir`: finished jobs are skipped, these run again."]
        lines.append("")
    return "\n".join(lines)
