"""Accuracy-versus-FLOPs points, their Pareto frontier, and where they come from.

A *point* is one finished evaluation (one `results.json`, or one W&B run): a method with its
schedule, its image-token FLOPs per sample and its gIoU / cIoU. The frontier is the set of
non-dominated points when FLOPs are minimised and accuracy is maximised, computed separately for
gIoU and for cIoU, and only between points of one *group*: the same model, dataset, split and
evaluated samples (`GROUP_FIELDS`). Runs of different groups are never compared; each group has its
own frontier and its own dense reference. Failed jobs are kept next to the points so that a report
never hides them, and so are *unreadable* jobs, whose files are not what cspexp writes: every file a
report reads is checked field by field (`point_from_results`, `read_job`), and one that fails the
check becomes a `Failure` naming the file and the first wrong field — never an exception.

This module only reads and computes; `cspexp.report.write` turns a `ParetoReport` into files.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cspexp.outputs.results import SCHEMA as RESULTS_SCHEMA
from cspexp.utils.errors import CspexpError

RESULTS = "results.json"
ERROR = "error.json"
OVERRIDES = ".hydra/overrides.yaml"
# Directories inside a sweep dir that never hold a job: Hydra's own, submitit's logs, W&B's files.
SKIP_DIRS = {".hydra", ".submitit", "wandb", "viz", "lightning_logs", "csv"}
DENSE = "none"
UNREADABLE = "unreadable"  # Failure.error of a job whose file is malformed: "unreadable <file>"
# What must be equal for two runs to share a frontier: (Point attribute, how report.md names it).
GROUP_FIELDS = (("model", "model"), ("dataset", "dataset"), ("split", "split"), ("n_samples", "sample count"),
                ("sample_set", "evaluated samples"))


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
    dataset: str | None = None  # results.json → dataset.name
    split: str | None = None  # results.json → dataset.split
    sample_set: str | None = None  # results.json → sample_set: which samples were evaluated
    prune: dict = field(default_factory=dict)  # the method's parameters (results.json → prune)
    variant: str = ""  # the method plus the settings that tell its points apart (see `label_variants`)
    group: str = ""  # the group's label (see `label_groups`): points are compared only within a group
    frontier_giou: bool = False
    frontier_ciou: bool = False
    repeat_of: str | None = None  # results.json → repeat_of: the job whose point this job reused
    cost: dict | None = None  # what the job spent (`job_cost`): model load, vision passes, cache counts, wall time

    @property
    def is_dense(self) -> bool:
        return self.method == DENSE

    @property
    def group_key(self) -> tuple:
        return tuple(getattr(self, name) for name, _ in GROUP_FIELDS)

    @property
    def curve(self) -> str:
        """The variant without its group prefix (the name of the curve inside its group)."""
        prefix = f"{self.group}: "
        return self.variant[len(prefix):] if self.group and self.variant.startswith(prefix) else self.variant

    def row(self) -> dict:
        """The flat record written to pareto.csv / pareto.json (the `prune` dict stays nested)."""
        return asdict(self)


@dataclass
class Failure:
    """A job that left no point: it raised (`error.json`), it was killed before writing, or one of
    its files is unreadable (`error` is then ``"unreadable <file>"`` and `message` says what is wrong)."""

    run_dir: str
    overrides: list[str]
    error: str  # exception type, "incomplete" when neither file exists, or "unreadable <file>"
    message: str

    @property
    def unreadable(self) -> bool:
        return self.error.startswith(f"{UNREADABLE} ")


@dataclass
class Group:
    """The points that share a model, dataset, split and sample set: one frontier, one dense reference."""

    key: tuple
    label: str
    points: list[Point]

    @property
    def dense(self) -> Point | None:
        """The dense reference: the first `none` point (a keep sweep repeats it; `none` ignores keep)."""
        return next((p for p in self.points if p.is_dense), None)

    def frontier(self, metric: str) -> list[Point]:
        """Frontier points for `metric` (giou | ciou), cheapest first."""
        return sorted((p for p in self.points if getattr(p, f"frontier_{metric}")), key=lambda p: p.flops_image)

    def variants(self) -> dict[str, list[Point]]:
        """Points per variant, each list sorted by FLOPs (most expensive first)."""
        out: dict[str, list[Point]] = {}
        for p in self.points:
            out.setdefault(p.variant, []).append(p)
        for rows in out.values():
            rows.sort(key=lambda p: (-(p.flops_image or 0.0), p.keep if p.keep is not None else 0.0))
        return out

    def fields(self) -> dict:
        return dict(zip((name for name, _ in GROUP_FIELDS), self.key))


@dataclass
class ParetoReport:
    source: str
    points: list[Point]
    failed: list[Failure]

    def groups(self) -> list[Group]:
        """The points' groups, in the order of `points` (which `finish` sorts by group)."""
        out: dict[tuple, Group] = {}
        for p in self.points:
            out.setdefault(p.group_key, Group(p.group_key, p.group, [])).points.append(p)
        return list(out.values())

    @property
    def dense(self) -> Point | None:
        """The dense reference of a report with one group (None when the runs form several groups:
        then each group has its own, `dense_of`)."""
        groups = self.groups()
        return groups[0].dense if len(groups) == 1 else None

    def dense_of(self, point: Point) -> Point | None:
        """The dense reference of `point`'s group."""
        return next((p for p in self.points if p.is_dense and p.group_key == point.group_key), None)

    @property
    def separation(self) -> str | None:
        """Why the runs are not on one frontier (None when they form one group)."""
        return separation(self.groups())

    @property
    def unreadable(self) -> list[Failure]:
        return [f for f in self.failed if f.unreadable]

    def variants(self) -> dict[str, list[Point]]:
        """Points per variant (variants of different groups have different names), each list sorted
        by FLOPs (most expensive first)."""
        out: dict[str, list[Point]] = {}
        for g in self.groups():
            out.update(g.variants())
        return out

    def frontier(self, metric: str) -> list[Point]:
        """Frontier points for `metric` (giou | ciou): each group's own, cheapest first, group by group."""
        return [p for g in self.groups() for p in g.frontier(metric)]


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
    """Mark the frontiers of `points`, which must all be of one group."""
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
    between points of that method (an ablation over `cluster.select` gives one curve per choice).
    A search that varies many settings at once would give a curve per point; then the method alone
    names the curve. `points` are of one group; `finish` prefixes the group when there are several."""
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
            p.variant = label


# --------------------------------------------------------------------------- groups
def _shown(value) -> str:
    return "unknown" if value is None else str(value)


def _group_sort_key(key: tuple) -> tuple:
    """Groups in a stable order: by model, dataset, split, sample count, sample set; unknown last."""
    return tuple((v is None, v if isinstance(v, (int, float)) else str(v) if v is not None else "") for v in key)


def label_groups(keys: list[tuple]) -> dict[tuple, str]:
    """A short, unique label per group key: "model · dataset split · N samples", plus the sample
    set's first 8 hex digits where two groups differ in nothing else."""
    def base(key):
        model, dataset, split, n, _ = key
        where = " ".join(_shown(x) for x in (dataset, split) if x is not None) or "unknown dataset"
        return f"{_shown(model)} · {where} · {_shown(n)} samples"

    labels = {}
    for key in keys:
        label = base(key)
        if sum(base(k) == label for k in keys) > 1:
            label += f" · sample set {str(key[-1])[:8] if key[-1] else 'unknown'}"
        labels[key] = label
    seen: dict[str, int] = {}
    for key in keys:  # two sample sets with the same first 8 digits: number them
        n = seen[labels[key]] = seen.get(labels[key], 0) + 1
        if n > 1:
            labels[key] += f" ({n})"
    return labels


def separation(groups: list[Group]) -> str | None:
    """One sentence on why the runs are on separate frontiers: the group fields that differ."""
    if len(groups) <= 1:
        return None
    keys = [g.key for g in groups]
    differ = []
    for i, (name, said) in enumerate(GROUP_FIELDS[:-1]):
        values = sorted({k[i] for k in keys}, key=lambda v: _group_sort_key((v,)))
        if len(values) > 1:
            differ.append(f"{said} ({', '.join(_shown(v) for v in values)})")
    # the sample set differs with the dataset anyway: name it only where nothing else tells groups apart
    alike: dict[tuple, list] = {}
    for g in groups:
        alike.setdefault(g.key[:-1], []).append(g)
    twins = [gs for gs in alike.values() if len(gs) > 1]
    if twins:
        said = "; ".join(f"{_shown(gs[0].key[1])} {_shown(gs[0].key[2])} with {_shown(gs[0].key[3])} samples has "
                         f"sample_set {', '.join(str(g.key[-1])[:8] if g.key[-1] else 'unknown' for g in gs)}"
                         for gs in twins)
        differ.append(f"evaluated samples ({said}: other dataset settings, or other samples left out)")
    listed = ", ".join(differ[:-1]) + " and " + differ[-1] if len(differ) > 1 else differ[0]
    return (f"The runs form {len(groups)} groups with separate frontiers and dense references, because they "
            f"differ in {listed}: points are compared only on the same model, dataset, split and evaluated samples.")


def finish(source: str, points: list[Point], failed: list[Failure]) -> ParetoReport:
    """Group the points, label them, mark each group's frontiers, and order points (by group, method,
    then FLOPs) and failures (by dir)."""
    keys = sorted({p.group_key for p in points}, key=_group_sort_key)
    labels = label_groups(keys)
    order = {k: i for i, k in enumerate(keys)}
    points = sorted(points, key=lambda p: (order[p.group_key], p.method != DENSE, p.method, -(p.flops_image or 0.0),
                                           p.run_dir))
    for key in keys:
        members = [p for p in points if p.group_key == key]
        label_variants(members)
        mark_frontiers(members)
        for p in members:
            p.group = labels[key]
            if len(keys) > 1:
                p.variant = f"{p.group}: {p.variant}"
    return ParetoReport(source=source, points=points, failed=sorted(failed, key=lambda f: _natural(f.run_dir)))


def _natural(s: str):
    """Sort job dirs 2 before 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# --------------------------------------------------------------------------- checking what is read
class Unreadable(ValueError):
    """A job file (or a W&B summary) that is not what cspexp writes; the message says which field
    is wrong and how, in one line."""


_MISSING = object()
MAX_DEPTH = 16  # nesting of `prune` (cspexp writes 3 levels)


def _what(x) -> str:
    """A value as a message shows it: short, one line, with its JSON type."""
    if x is None:
        return "null"
    if isinstance(x, bool):
        return f"{str(x).lower()} (a boolean)"
    if isinstance(x, str):
        return f"{(x[:40] + '…') if len(x) > 40 else x!r} (a string)"
    if isinstance(x, list):
        return "a list"
    if isinstance(x, dict):
        return "an object"
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    if isinstance(x, float) and math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if isinstance(x, int) and abs(x) > 10**15:
        return "a very large number"
    if isinstance(x, (int, float)):
        return repr(x)
    return f"a {type(x).__name__}"


def _value(d: dict, key: str, where: str, required: bool):
    if key not in d:
        if required:
            raise Unreadable(f"{where}{key} is missing")
        return _MISSING
    return d[key]


def _object(d: dict, key: str, where: str = "", required: bool = False) -> dict | None:
    """d[key] as an object (None when an optional one is missing or null)."""
    v = _value(d, key, where, required)
    if v is _MISSING or (v is None and not required):
        return None
    if not isinstance(v, dict):
        raise Unreadable(f"{where}{key} is {_what(v)}, expected an object")
    return v


def _string(d: dict, key: str, where: str = "", required: bool = False) -> str | None:
    """d[key] as a non-empty string, or None when it is missing or null."""
    v = _value(d, key, where, required)
    if v is _MISSING or v is None:
        if required and v is None:
            raise Unreadable(f"{where}{key} is null, expected a string")
        return None
    if not isinstance(v, str) or not v:
        raise Unreadable(f"{where}{key} is {_what(v)}, expected a non-empty string")
    return v


def _number(d: dict, key: str, where: str = "", *, required: bool, nullable: bool, lo: float | None = None,
            hi: float | None = None, integer: bool = False):
    """d[key] as a finite number (an int with `integer`) in [lo, hi], or None when missing / null."""
    kind = "an integer" if integer else "a number"
    if lo is not None and hi is not None:
        expected = f"{kind} in [{lo:g}, {hi:g}]"
    elif lo is not None:
        expected = f"{kind} ≥ {lo:g}"
    elif hi is not None:
        expected = f"{kind} ≤ {hi:g}"
    else:
        expected = kind if integer else "a finite number"
    expected += " or null" if nullable else ""
    v = _value(d, key, where, required)
    if v is _MISSING:
        return None
    if v is None:
        if nullable:
            return None
        raise Unreadable(f"{where}{key} is null, expected {expected}")
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if ok and not isinstance(v, bool):
        try:
            f = float(v)
        except OverflowError:
            ok = False
        else:
            ok = math.isfinite(f) and (lo is None or f >= lo) and (hi is None or f <= hi)
    else:
        ok = False
    if not ok:
        raise Unreadable(f"{where}{key} is {_what(v)}, expected {expected}")
    return v


def _plain(v, where: str, depth: int = 0) -> None:
    """`v` is plain JSON: objects with string keys, lists, strings, booleans, null, finite numbers."""
    if depth > MAX_DEPTH:
        raise Unreadable(f"{where} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise Unreadable(f"{where} has a key {_what(k)}, expected strings")
            _plain(x, f"{where}.{k}", depth + 1)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _plain(x, f"{where}[{i}]", depth + 1)
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        too_large = isinstance(v, int) and abs(v) > 10**300  # float() of it would overflow
        if too_large or not math.isfinite(v):
            raise Unreadable(f"{where} is {_what(v)}, expected a finite number")
    elif not (v is None or isinstance(v, (str, bool))):
        raise Unreadable(f"{where} is {_what(v)}, expected a JSON value")


# --------------------------------------------------------------------------- from run directories
def point_from_results(results, run_dir: str) -> Point:
    """The point of a results dict (a results.json, or a W&B summary read back into its layout).

    Every field the report reads is checked: `method` (or `prune.name`), `metrics.giou` and
    `metrics.ciou` (numbers in [0, 1]) and `flops.image` (a number ≥ 0, null when no sample was
    evaluated) must be there; `prune` (plain JSON, `keep` in [0, 1]), `flops.image_dense`,
    `flops.reduction_image`, `n_samples`, `model`, `config_hash`, `dataset.name` / `.split` and
    `sample_set` may be missing or null (an older file: unknown), but when present have their
    documented types. Raises `Unreadable` naming the first field that is wrong."""
    if not isinstance(results, dict):
        raise Unreadable(f"expected a JSON object, got {_what(results)}")
    schema = _number(results, "schema", required=False, nullable=False, lo=1, integer=True)
    if schema is not None and schema > RESULTS_SCHEMA:
        raise Unreadable(f"schema {schema} is newer than this cspexp reads ({RESULTS_SCHEMA}): update cspexp")
    prune = _object(results, "prune") or {}
    name = _string(prune, "name", "prune.")
    keep = _number(prune, "keep", "prune.", required=False, nullable=True, lo=0, hi=1)
    _plain(prune, "prune")  # the rest of it goes into pareto.json and the curve names as it is
    method = _string(results, "method")
    if method is None and name is None:
        raise Unreadable("names no method (neither method nor prune.name is there)")
    if method is not None and name is not None and method != name:
        raise Unreadable(f"method {method!r} and prune.name {name!r} disagree")
    method = method or name
    metrics = _object(results, "metrics", required=True)
    giou = _number(metrics, "giou", "metrics.", required=True, nullable=False, lo=0, hi=1)
    ciou = _number(metrics, "ciou", "metrics.", required=True, nullable=False, lo=0, hi=1)
    flops = _object(results, "flops", required=True)
    image = _number(flops, "image", "flops.", required=True, nullable=True, lo=0)
    image_dense = _number(flops, "image_dense", "flops.", required=False, nullable=True, lo=0)
    reduction = _number(flops, "reduction_image", "flops.", required=False, nullable=True, hi=1)
    n_samples = _number(results, "n_samples", required=False, nullable=True, lo=0, integer=True)
    dataset = _object(results, "dataset") or {}
    return Point(
        method=method,
        keep=None if method == DENSE else keep,  # `none` ignores keep: a swept value means nothing
        run_dir=run_dir,
        flops_image=image,
        giou=giou,
        ciou=ciou,
        flops_image_dense=image_dense,
        reduction_image=reduction,
        n_samples=n_samples,
        model=_string(results, "model"),
        config_hash=_string(results, "config_hash"),
        dataset=_string(dataset, "name", "dataset."),
        split=_string(dataset, "split", "dataset."),
        sample_set=_string(results, "sample_set"),
        prune=prune,
        repeat_of=_string(results, "repeat_of"),
        cost=job_cost(results),
    )


def job_cost(results: dict) -> dict | None:
    """What a job spent, from results.json's ``cost`` and ``cache`` blocks (None for files written
    before they existed; a malformed block counts as absent — the report's cost section is a summary,
    not a check)."""
    cost, cache = results.get("cost"), results.get("cache")
    if not isinstance(cost, dict):
        return None

    def count(d, key):
        v = d.get(key) if isinstance(d, dict) else None
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    return {"model": cost.get("model") if isinstance(cost.get("model"), str) else None,
            "vision_passes": count(cost, "vision_passes"), "wall_s": count(cost, "wall_s"),
            "started_at": count(cost, "started_at"), "finished_at": count(cost, "finished_at"),
            "cache_hits": count(cache, "hits"), "cache_misses": count(cache, "misses")}


def read_json(path: Path):
    """The JSON in `path`; `Unreadable` (one line) when it cannot be read or parsed."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise Unreadable(f"cannot be read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise Unreadable(f"not UTF-8 text (byte {exc.start})") from exc
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise Unreadable("nested too deeply to parse") from exc
    except ValueError as exc:
        raise Unreadable(f"not valid JSON: {exc}") from exc


def _error_info(info) -> tuple[str, str]:
    """(error, message) of an error.json; `Unreadable` when it is not what cspexp writes."""
    if not isinstance(info, dict):
        raise Unreadable(f"expected a JSON object, got {_what(info)}")
    error = _string(info, "error", required=True)
    message = _value(info, "message", "", required=True)
    if not isinstance(message, str):
        raise Unreadable(f"message is {_what(message)}, expected a string")
    for key, kind in (("user_error", bool), ("traceback", str)):
        if key in info and info[key] is not None and not isinstance(info[key], kind):
            raise Unreadable(f"{key} is {_what(info[key])}, expected a {'boolean' if kind is bool else 'string'}")
    return error, message.strip()


def _job_overrides(job_dir: Path) -> tuple[list[str], str | None]:
    """The job's command-line overrides as Hydra saved them, and what is wrong with the file (None
    when it is fine or absent: no overrides)."""
    path = job_dir / OVERRIDES
    if not path.is_file():
        return [], None
    import yaml

    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except RecursionError:
        return [], "nested too deeply to parse"
    except Exception as exc:  # noqa: BLE001 — a half-written file of a killed job: the report must still be written
        return [], f"not valid YAML ({type(exc).__name__})"
    if not isinstance(data, list):
        return [], f"{'empty' if data is None else _what(data)}, expected a list of strings"
    bad = next((x for x in data if not isinstance(x, str)), _MISSING)
    if bad is not _MISSING:
        return [], f"holds {_what(bad)}, expected a list of strings"
    return data, None


def job_dirs(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Every directory under `root` (itself included) that holds a job: a results.json, an
    error.json, or Hydra's `.hydra/` record of a job that started; and the directories that could
    not be listed, with the reason. Each directory is visited once (symbolic-link loops end)."""
    found, unlisted = [], []
    stack, seen = [root], set()
    while stack:
        d = stack.pop()
        try:
            real = d.resolve()
            if real in seen:
                continue
            seen.add(real)
            if (d / RESULTS).is_file() or (d / ERROR).is_file() or (d / OVERRIDES).is_file():
                found.append(d)  # a job dir's own subfolders (wandb/, viz/) hold no further jobs
                continue
            stack.extend(sorted((c for c in d.iterdir() if c.is_dir() and c.name not in SKIP_DIRS), reverse=True))
        except (OSError, RuntimeError) as exc:  # unreadable directory, or a link loop resolve() refuses
            unlisted.append((d, getattr(exc, "strerror", None) or str(exc)))
    return found, unlisted


def _relative(path: Path, base: Path | None) -> str:
    if base is not None:
        try:
            return str(path.resolve().relative_to(base.resolve())) or "."
        except (ValueError, OSError, RuntimeError):
            pass
    return str(path)


def _newer(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_mtime > b.stat().st_mtime
    except OSError:
        return False


def read_job(job_dir: Path, base: Path | None = None) -> Point | Failure:
    """The point of a finished job, or the failure of one that did not finish, or an unreadable job
    (a malformed file: ``error`` names it, ``message`` says what is wrong). Never raises.

    A job dir can hold both files only if a forced re-run failed and an older evaluate did not
    clear its results; then the newer file wins. A finished job's overrides are not read (its
    results.json holds its whole config); a failed job's are, and a malformed overrides.yaml is
    noted in its message.
    """
    name = _relative(job_dir, base)
    results, error = job_dir / RESULTS, job_dir / ERROR
    if results.is_file() and not (error.is_file() and _newer(error, results)):
        try:
            return point_from_results(read_json(results), name)
        except Unreadable as exc:
            return _failure(job_dir, name, f"{UNREADABLE} {RESULTS}", str(exc))
        except RecursionError:
            return _failure(job_dir, name, f"{UNREADABLE} {RESULTS}", "nested too deeply")
    if error.is_file():
        try:
            kind, message = _error_info(read_json(error))
        except Unreadable as exc:
            return _failure(job_dir, name, f"{UNREADABLE} {ERROR}", str(exc))
        except RecursionError:
            return _failure(job_dir, name, f"{UNREADABLE} {ERROR}", "nested too deeply")
        return _failure(job_dir, name, kind, message)
    return _failure(job_dir, name, "incomplete", "no results.json and no error.json: killed, or still running")


def _failure(job_dir: Path, name: str, error: str, message: str) -> Failure:
    overrides, problem = _job_overrides(job_dir)
    if problem:
        message = f"{message} ({OVERRIDES} unreadable: {problem})"
    return Failure(name, overrides, error, message)


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
        found, unlisted = job_dirs(root)
        for d, reason in unlisted:
            failed.append(Failure(_relative(d, base), [], f"{UNREADABLE} directory", f"cannot be listed: {reason}"))
        for d in found:
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
