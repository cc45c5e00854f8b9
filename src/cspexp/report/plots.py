"""pareto.png: accuracy against image-token FLOPs reduction, one curve per method variant, one row of
panels per group of comparable runs (the same model, dataset, split and samples).

matplotlib with the Agg backend (no display is needed: sweeps run on headless machines and in CI).
The x-axis is the reduction against the dense model, the quantity the paper reports; the frontier
is computed on absolute FLOPs (`pareto.py`), which orders points the same way within a group, where
every point ran on the same samples.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: never try to open a window

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from cspexp.report.pareto import ParetoReport, Point  # noqa: E402

METRICS = (("giou", "gIoU"), ("ciou", "cIoU"))


def reduction_pct(p: Point, dense: Point | None) -> float | None:
    """Image-token FLOPs saved against the dense model, in percent."""
    if p.reduction_image is not None:
        return 100.0 * p.reduction_image
    ref = p.flops_image_dense or (dense.flops_image if dense else None)
    if ref and p.flops_image is not None:
        return 100.0 * (1.0 - p.flops_image / ref)
    return None


def _keep_label(keep) -> str:
    return f"{keep:g}" if isinstance(keep, (int, float)) else ""


def render_pareto(report: ParetoReport, name: str | None = None) -> bytes:
    """The PNG as bytes (the caller writes it atomically); `name` (the sweep) goes into the title.
    One row of two panels (gIoU, cIoU) per group of comparable runs (`ParetoReport.groups`)."""
    groups = report.groups()
    several = len(groups) > 1
    fig, axes = plt.subplots(max(1, len(groups)), 2, figsize=(13, 5.6 if not several else 1.2 + 4.6 * len(groups)),
                             sharex="row", layout="constrained", squeeze=False)
    handles: dict[str, object] = {}
    for row, group in zip(axes, groups or [None]):
        row_handles = _draw_group(row, report, group, several)
        for label, h in row_handles.items():
            handles.setdefault(label, h)
        if several:  # each row its own legend: curves of different groups are not comparable
            row[1].legend(list(row_handles.values()), [h.get_label() for h in row_handles.values()], fontsize=7,
                          loc="best")
    title = _default_title(report) + (f"\n{name}" if name else "")
    fig.suptitle(title, fontsize=11)
    if not several:
        fig.legend(list(handles.values()), [h.get_label() for h in handles.values()], loc="outside lower center",
                   ncol=min(5, max(1, len(handles))), fontsize=9, frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def _draw_group(axes, report: ParetoReport, group, several: bool) -> dict[str, object]:
    """Draw one group's curves, frontier and dense reference on its two axes; returns legend handles."""
    dense = group.dense if group is not None else None
    points = group.points if group is not None else []
    variants: dict[str, list[Point]] = {}
    for p in points:
        if not p.is_dense:
            variants.setdefault(p.curve, []).append(p)
    cmap = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20")
    handles: dict[str, object] = {}
    for ax, (metric, metric_label) in zip(axes, METRICS):
        for i, (variant, rows) in enumerate(variants.items()):
            xy = [(reduction_pct(p, dense), getattr(p, metric), p) for p in rows]
            xy = sorted((t for t in xy if t[0] is not None and t[1] is not None), key=lambda t: t[0])
            if not xy:
                continue
            (line,) = ax.plot([t[0] for t in xy], [t[1] for t in xy], "-o", color=cmap(i % cmap.N), lw=1.6,
                              ms=5, alpha=0.9, label=variant)
            handles.setdefault(variant, line)
            for x, y, p in xy:
                if len(report.points) <= 40:  # label keeps while they stay readable
                    ax.annotate(_keep_label(p.keep), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                color=line.get_color())
        front = [(reduction_pct(p, dense), getattr(p, metric)) for p in (group.frontier(metric) if group else [])]
        front = sorted((t for t in front if t[0] is not None), key=lambda t: t[0])
        if front:
            ax.plot([t[0] for t in front], [t[1] for t in front], color="black", ls="--", lw=1.0, alpha=0.6)
            ax.scatter([t[0] for t in front], [t[1] for t in front], s=120, facecolors="none", edgecolors="black",
                       linewidths=1.4, zorder=5)
            handles.setdefault("Pareto frontier", Line2D([], [], color="black", ls="--", lw=1.0, marker="o", ms=10,
                                                         mfc="none", mec="black", label="Pareto frontier (ringed)"))
        if dense is not None and getattr(dense, metric) is not None:
            ref = getattr(dense, metric)
            ax.axhline(ref, color="gray", ls=":", lw=1.2)
            (dp,) = ax.plot([0.0], [ref], marker="*", ms=15, color="gold", markeredgecolor="black", ls="none",
                            zorder=6, label="dense (none)")
            handles.setdefault("dense", dp)
        ax.set_xlabel("image-token FLOPs reduction vs dense (%)")
        ax.set_ylabel(f"{metric_label} (higher is better)")
        if several:
            ax.set_title(f"{group.label}\n{metric_label}", fontsize=9)
        else:
            ax.set_title(f"{metric_label} vs image-token FLOPs")
        ax.grid(True, alpha=0.3)
        lo, hi = ax.get_xlim()
        ax.set_xlim(left=min(-3.0, lo), right=max(hi + 3.0, 5.0))  # room for the keep labels at the right
    return handles


def _default_title(report: ParetoReport) -> str:
    groups = report.groups()
    if len(groups) > 1:
        return (f"Accuracy vs image-token FLOPs (point labels: keep) · {len(groups)} groups of comparable runs, "
                "each with its own frontier and dense reference")
    models = sorted({p.model for p in report.points if p.model})
    samples = sorted({p.n_samples for p in report.points if p.n_samples})
    dense = report.dense
    parts = ["Accuracy vs image-token FLOPs (point labels: keep)"]
    if models:
        parts.append(", ".join(models))
    if samples:
        parts.append(f"{'/'.join(map(str, samples))} samples")
    ref = dense.flops_image if dense else next((p.flops_image_dense for p in report.points if p.flops_image_dense), None)
    if ref:
        parts.append(f"dense image-token FLOPs {ref / 1e9:.3g} G/sample")
    return " · ".join(parts)


def write_png(report: ParetoReport, path: Path, name: str | None = None) -> None:
    from cspexp.outputs.files import write_bytes_atomic

    write_bytes_atomic(path, render_pareto(report, name))
