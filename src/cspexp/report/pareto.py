"""Accuracy-versus-FLOPs points, their Pareto frontier, and where they come from.

A *point* is one finished evaluation (one `results.json`, or one W&B run): a method with its
schedule, its image-token FLOPs per sample and its gIoU / cIoU. The frontier is the set of
non-dominated points when FLOPs are minimised and accuracy is maximised, computed separately for
gIoU and for cIoU. Failed jobs are kept next to the points so that a report never hides them.

This module only reads and computes; `cspexp.report.write` turns a `ParetoReport` into files.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cspexp.utils.errors import CspexpError

RESULTS = "results.json"
ERROR = "error.json"
# Directories inside a sweep dir that never hold a job: Hydra's own, submitit's logs, W&B's files.
SKIP_DIRS = {".hydra", ".submitit", "wandb", "viz", "lightning_logs", "csv"}
DENSE = "none"


@dataclass
class Point:
    """One evaluated configuration."""

    method: str
    keep: float | None
    run_dir: str
    flops_image: float | None  # mean image-token FLOPs per sample (results.json → flops.image)
    giou: float | None
    ciou: float | None
    flops_image_dense: float | None = None
    reduction_image: float | None = None
    n_samples: int | None = None
    model: str | None = None
    config_hash: str | None = None
    prune: dict = field(default_factory=dict)  # the method's parameters (results.json → prune)
    variant: str = ""  # the method plus the settings that tell its points apart (see `label_variants`)
    frontier_giou: bool = False
    frontier_ciou: bool = False

    @property
    def is_dense(self) -> bool:
        return self.method == DENSE

    def row(self) -> dict:
        """The flat record written to pareto.csv / pareto.json (the `prune` dict stays nested)."""
        return asdict(self)


@dataclass
class Failure:
    """A job that left no results: it raised (`error.json`) or it was killed before writing."""

    run_dir: str
    overrides: list[str]
    error: str  # exception type, or "incomplete" when neither file exists
    message: str


@dataclass
class ParetoReport:
    source: str
    points: list[Point]
    failed: list[Failure]

    @property
    def dense(self) -> Point | None:
        """The dense reference: the first `none` point (a keep sweep repeats it; `none` ignores keep)."""
        return next((p for p in self.points if p.is_dense), None)

    def variants(self) -> dict[str, list[Point]]:
        """Points per variant, each list sorted by FLOPs (most expensive first)."""
        out: dict[str, list[Point]] = {}
        for p in self.points:
            out.setdefault(p.variant, []).append(p)
        for rows in out.values():
            rows.sort(key=lambda p: (-(p.flops_image or 0.0), p.keep if p.keep is not None else 0.0))
        return out

    def frontier(self, metric: str) -> list[Point]:
        """Frontier points for `metric` (giou | ciou), cheapest first."""
        return sorted((p for p in self.points if getattr(p, f"frontier_{metric}")), key=lambda p: p.flops_image)


# --------------------------------------------------------------------------- the frontier
def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pareto_front(costs: Sequence[float | None], values: Sequence[float | None]) -> list[bool]:
    """For each point, whether it is non-dominated (lower cost and higher value are better).

    q dominates p when q is at least as good in both and strictly better in one. Exact duplicates
    do not dominate each other, so every copy of a frontier point is on the frontier. Points with a
    missing or non-finite cost or value are never on the frontier and dominate nothing.
    O(n²): sweeps have hundreds of points at most, and the definition stays visible.
    """
    if len(costs) != len(values):
        raise ValueError("costs and values must have the same length")
    ok = [_finite(c) and _finite(v) for c, v in zip(costs, values)]
    out = []
    for i in range(len(costs)):
        if not ok[i]:
            out.append(False)
            continue
        dominated = any(
            ok[j] and costs[j] <= costs[i] and values[j] >= values[i] and (costs[j] < costs[i] or values[j] > values[i])
            for j in range(len(costs))
            if j != i
        )
        out.append(not dominated)
    return out


def mark_frontiers(points: list[Point]) -> None:
    costs = [p.flops_image for p in points]
    for metric in ("giou", "ciou"):
        for p, on in zip(points, pareto_front(costs, [getattr(p, metric) for p in points])):
            setattr(p, f"frontier_{metric}", on)


# --------------------------------------------------------------------------- variant labels
def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


MAX_VARIANTS = 8  # more curves per method than this (a random or Optuna search): one curve per method


def label_variants(points: list[Point]) -> None:
    """Name each point's curve: its method, plus every prune setting other than keep that differs
    between points of that method (an ablation over `cluster.select` gives one curve per choice),
    plus the model when the points come from several models. A search that varies many settings
    at once would give a curve per point; then the method alone names the curve."""
    models = {p.model for p in points}
    by_method: dict[str, list[Point]] = {}
    for p in points:
        by_method.setdefault(p.method, []).append(p)
    for method, rows in by_method.items():
        flat = [_flatten(p.prune) for p in rows]
        keys = sorted({k for f in flat for k in f} - {"name", "keep", "_target_"})
        varying = [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1]
        if len({tuple(repr(f.get(k)) for k in varying) for f in flat}) > MAX_VARIANTS:
            varying = []
        for p, f in zip(rows, flat):
            label = "dense" if p.is_dense else method
            if varying and not p.is_dense:
                label += " " + ", ".join(f"{k}={f.get(k)}" for k in varying)
            if len(models) > 1:
                label = f"{p.model}: {label}"
            p.variant = label


def finish(source: str, points: list[Point], failed: list[Failure]) -> ParetoReport:
    """Label, mark the frontiers, and order points (by method, then FLOPs) and failures (by dir)."""
    points = sorted(points, key=lambda p: (p.method != DENSE, p.method, -(p.flops_image or 0.0), p.run_dir))
    label_variants(points)
    mark_frontiers(points)
    return ParetoReport(source=source, points=points, failed=sorted(failed, key=lambda f: _natural(f.run_dir)))


def _natural(s: str):
    """Sort job dirs 2 before 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# --------------------------------------------------------------------------- from run directories
def point_from_results(results: dict, run_dir: str) -> Point:
    flops = results.get("flops") or {}
    metrics = results.get("metrics") or {}
    prune = results.get("prune") or {}
    method = results.get("method") or prune.get("name") or "?"
    return Point(
        method=method,
        keep=None if method == DENSE else prune.get("keep"),  # `none` ignores keep: a swept value means nothing
        run_dir=run_dir,
        flops_image=flops.get("image"),
        giou=metrics.get("giou"),
        ciou=metrics.get("ciou"),
        flops_image_dense=flops.get("image_dense"),
        reduction_image=flops.get("reduction_image"),
        n_samples=results.get("n_samples"),
        model=results.get("model"),
        config_hash=results.get("config_hash"),
        prune=prune,
    )


def _job_overrides(job_dir: Path) -> list[str]:
    """The job's command-line overrides as Hydra saved them (empty if it did not)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    try:
        return [str(x) for x in OmegaConf.load(path)]
    except Exception:  # a half-written file of a killed job: the report must still be written
        return []


def job_dirs(root: Path) -> list[Path]:
    """Every directory under `root` (itself included) that holds a job: a results.json, an
    error.json, or Hydra's `.hydra/` record of a job that started."""
    found = []
    stack = [root]
    while stack:
        d = stack.pop()
        if (d / RESULTS).is_file() or (d / ERROR).is_file() or (d / ".hydra" / "overrides.yaml").is_file():
            found.append(d)  # a job dir's own subfolders (wandb/, viz/) hold no further jobs
            continue
        stack.extend(sorted((c for c in d.iterdir() if c.is_dir() and c.name not in SKIP_DIRS), reverse=True))
    return found


def _relative(path: Path, base: Path | None) -> str:
    if base is not None:
        try:
            return str(path.resolve().relative_to(base.resolve())) or "."
        except ValueError:
            pass
    return str(path)


def read_job(job_dir: Path, base: Path | None = None) -> Point | Failure:
    """The point of a finished job, or the failure of one that did not finish.

    A job dir can hold both files only if a forced re-run failed and an older evaluate did not
    clear its results; then the newer file wins.
    """
    name = _relative(job_dir, base)
    results, error = job_dir / RESULTS, job_dir / ERROR
    if results.is_file() and not (error.is_file() and error.stat().st_mtime > results.stat().st_mtime):
        try:
            return point_from_results(json.loads(results.read_text(encoding="utf-8")), name)
        except (OSError, ValueError) as exc:
            return Failure(name, _job_overrides(job_dir), "unreadable results.json", str(exc))
    if error.is_file():
        try:
            info = json.loads(error.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = {"error": "error.json", "message": "unreadable error.json"}
        return Failure(name, _job_overrides(job_dir), str(info.get("error")), str(info.get("message", "")).strip())
    return Failure(name, _job_overrides(job_dir), "incomplete", "no results.json and no error.json: killed, or still running")


def collect_dirs(paths: Iterable[Path], base: Path | None = None) -> ParetoReport:
    """The report over every job found under `paths` (run dirs or sweep dirs). Run dirs are named
    relative to `base` when they lie inside it."""
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_dir():
            raise CspexpError(f"{p} is not a directory (give run directories or sweep directories)")
    points: list[Point] = []
    failed: list[Failure] = []
    seen: set[Path] = set()
    for root in paths:
        for d in job_dirs(root):
            if d.resolve() in seen:
                continue
            seen.add(d.resolve())
            item = read_job(d, base)
            (points if isinstance(item, Point) else failed).append(item)
    if not points and not failed:
        raise CspexpError(
            f"no job found under {', '.join(map(str, paths))}: expected results.json or error.json in a run directory"
        )
    return finish(", ".join(str(p) for p in paths), points, failed)
