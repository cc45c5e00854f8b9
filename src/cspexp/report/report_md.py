"""report.md: what a person reads first — the dense reference, the frontier, a table per method
variant, and every failed or unreadable job with its error. Runs that are not comparable (another
model, dataset, split or sample set) get a section each, with its own dense reference and frontier,
after one line that says why they were separated."""

from __future__ import annotations

from cspexp.report.pareto import Group, ParetoReport, Point
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
    groups = report.groups()
    lines = [f"# {title}", ""]
    n_var = len({p.variant for p in report.points})
    lines.append(f"Source: `{report.source}` — {len(report.points)} point(s) in {n_var} curve(s), "
                 f"{len(report.failed)} failed job(s).")
    lines.append("")
    lines.append("Accuracy is LISA's gIoU (mean per-sample IoU) and cIoU (ΣI/ΣU); cost is the mean image-token "
                 "FLOPs per sample of the LLM prefill (results.json → `flops.image`). A point is on a frontier when "
                 "no other point has at most its FLOPs and at least its accuracy, one of them strictly.")
    lines.append("")
    if len(groups) <= 1:
        group = groups[0] if groups else None
        lines += _dense_lines(group)
        if png:
            lines += [f"![accuracy vs image-token FLOPs]({png})", ""]
        lines += _group_body(group, level=2)
    else:
        lines += [f"**Separate frontiers.** {report.separation}", ""]
        if png:
            lines += [f"![accuracy vs image-token FLOPs]({png})", ""]
        for i, group in enumerate(groups, 1):
            lines += [f"## Group {i}: {_cell(group.label)}", ""]
            lines += _dense_lines(group)
            lines += _group_body(group, level=3)
    lines += _failed_lines(report)
    lines += _cost_lines(report)
    return "\n".join(lines)


def _points_times_samples(points: list[Point]) -> str:
    sizes = {p.n_samples or 0 for p in points}
    total = sum(p.n_samples or 0 for p in points)
    return f"{len(points)} × {sizes.pop()} = {total}" if len(sizes) == 1 else f"{len(points)} points, {total} samples"


def _cost_lines(report: ParetoReport) -> list[str]:
    """What the sweep spent: wall time, jobs, points × samples, model loads, vision passes (the
    feature cache's work) — from each job's results.json ``cost`` block."""
    jobs = [p for p in report.points if p.cost is not None]
    if not jobs:
        return []
    repeated = [p for p in jobs if p.repeat_of]
    evaluated = [p for p in jobs if not p.repeat_of]

    def total(key: str, how=sum):
        values = [p.cost[key] for p in jobs if p.cost.get(key) is not None]
        return how(values) if values else None

    loads = sum(p.cost.get("model") == "loaded" for p in jobs)
    reused = sum(p.cost.get("model") == "reused" for p in jobs)
    hits, misses = total("cache_hits"), total("cache_misses")
    starts, ends = total("started_at", min), total("finished_at", max)
    wall = f"{ends - starts:.1f} s" if starts is not None and ends is not None else "—"
    job_wall = total("wall_s")
    lines = ["## Sweep cost", "",
             "What the jobs listed above spent (results.json → `cost`, `cache`). Every point's FLOPs are still those "
             "of one inference; sharing the model and the vision stage is a saving of the sweep, not of a method.", "",
             "| | |", "|---|---:|",
             f"| wall time, first job's start to last job's end | {wall} |",
             f"| jobs' own time, summed | {_num(job_wall, '.1f')} s |",
             f"| jobs | {len(jobs)}: {len(evaluated)} evaluated, {len(repeated)} repeated an earlier job's point |",
             f"| points × samples | {_points_times_samples(evaluated)} |",
             f"| model loads | {loads} ({reused} job(s) reused the loaded model) |",
             f"| vision passes (samples, warm-up included) | {_num(total('vision_passes'), 'd')} |",
             f"| feature cache (samples) | {_num(hits, 'd')} hits, {_num(misses, 'd')} misses |",
             ""]
    return lines


def _dense_lines(group: Group | None) -> list[str]:
    dense = group.dense if group is not None else None
    lines = []
    if dense is not None:
        lines.append(f"**Dense reference** (`none`, run `{dense.run_dir}`): gIoU {_num(dense.giou)}, cIoU {_num(dense.ciou)}, "
                     f"{_gflops(dense.flops_image)} image-token GFLOPs per sample.")
        copies = sum(p.is_dense for p in group.points) - 1
        if copies:
            lines.append(f"({copies} more `none` job(s) in this sweep repeat it: `none` ignores `keep`.)")
    else:
        lines.append("**No dense reference** in these runs: reductions come from each run's own dense FLOPs. "
                     "Add one with `python -m cspexp prune=none hydra.run.dir=<sweep dir>/dense` and aggregate again.")
    lines.append("")
    return lines


def _group_body(group: Group | None, level: int) -> list[str]:
    """The frontiers and the tables per variant of one group; `level`: the heading level of its sections."""
    h, hh = "#" * level, "#" * (level + 1)
    dense = group.dense if group is not None else None
    lines = []
    for metric, name in (("giou", "gIoU"), ("ciou", "cIoU")):
        lines += [f"{h} Frontier: {name} vs image-token FLOPs", ""]
        front = group.frontier(metric) if group is not None else []
        if not front:
            lines += ["(no finished point)", ""]
            continue
        lines += ["| curve | keep | image GFLOPs | reduction | gIoU | cIoU | run |", "|---|---:|---:|---:|---:|---:|---|"]
        for p in front:
            lines.append(f"| {_cell(p.curve)} | {_num(p.keep, 'g')} | {_gflops(p.flops_image)} | {_red(p, dense)} | "
                         f"{_num(p.giou)} | {_num(p.ciou)} | {_cell(p.run_dir)} |")
        lines.append("")

    lines += [f"{h} Points by method", ""]
    for rows in (group.variants().values() if group is not None else []):
        lines += [f"{hh} {rows[0].curve}", "",
                  "| keep | image GFLOPs | reduction | gIoU | cIoU | frontier | samples | run |",
                  "|---:|---:|---:|---:|---:|---|---:|---|"]
        for p in rows:
            marks = ", ".join(m for m, on in (("gIoU", p.frontier_giou), ("cIoU", p.frontier_ciou)) if on) or ""
            lines.append(f"| {_num(p.keep, 'g')} | {_gflops(p.flops_image)} | {_red(p, dense)} | {_num(p.giou)} | "
                         f"{_num(p.ciou)} | {marks} | {p.n_samples if p.n_samples is not None else '—'} | "
                         f"{_cell(p.run_dir)} |")
        lines.append("")
    return lines


def _failed_lines(report: ParetoReport) -> list[str]:
    lines = ["## Failed jobs", ""]
    if not report.failed:
        return lines + ["None.", ""]
    lines += ["| job | overrides | error | message |", "|---|---|---|---|"]
    for f in report.failed:
        overrides = " ".join(f.overrides) if f.overrides else "—"
        lines.append(f"| {_cell(f.run_dir)} | `{_cell(overrides)}` | {_cell(f.error)} | {_cell(f.message[:300])} |")
    lines += ["", "Re-run the sweep with the same `hydra.sweep.dir`: finished jobs are skipped, these run again."]
    if report.unreadable:
        lines.append(f"{len(report.unreadable)} job(s) are *unreadable*: the file named in the error column is not "
                     "what cspexp writes, and the message says what is wrong; fix or delete it, or re-run the job "
                     "with `force=true`.")
    lines.append("")
    return lines
