"""`python -m cspexp.aggregate`: the Pareto report of runs that no multirun callback saw.

    python -m cspexp.aggregate outputs/multiruns/2026-08-20_10-00-00          # a sweep dir
    python -m cspexp.aggregate outputs/runs/a outputs/runs/b --out report/     # single runs
    python -m cspexp.aggregate --wandb my-team/cspexp/abc123xy                # a W&B sweep (online)

From directories it reads every job (results.json, error.json) found under the paths — offline,
and the same files the multirun callback writes. From W&B it reads the sweep's runs through
`wandb.Api` (their summary, the flat view of results.json that every cspexp run writes:
`cspexp.outputs.results.SUMMARY_FIELDS`).
Writes pareto.csv, pareto.json, pareto.png and report.md into ``--out``; ``--log-wandb`` also logs
the summary run (``job_type=pareto``). Bad input ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cspexp.outputs.results import results_from_summary
from cspexp.report.pareto import (UNREADABLE, Failure, ParetoReport, Point, Unreadable, collect_dirs, finish,
                                  point_from_results)
from cspexp.utils.errors import CspexpError

log = logging.getLogger("cspexp.aggregate")

FAILED_STATES = {"failed", "crashed", "killed"}


# --------------------------------------------------------------------------- W&B source
def _get(mapping, key, default=None):
    try:
        value = mapping.get(key, default)
    except Exception:  # noqa: BLE001 — W&B summaries are lazy objects; a missing key must not stop the report
        return default
    return default if value is None else value


def _method_of(config) -> str:
    """The method of a run whose summary does not name it (runs of older cspexp versions)."""
    prune = _get(config, "prune", {})
    target = str(_get(prune, "_target_", "") if isinstance(prune, dict) else "")
    names = {"NoPruning": "none", "ClusterScatterPrune": "csp", "FastV": "fastv", "PyramidDrop": "pdrop",
             "VisualTokenWithdrawal": "vtw", "RandomDrop": "random", "UniformDrop": "uniform"}
    return names.get(target.rsplit(".", 1)[-1], target.rsplit(".", 1)[-1] or "?")


def _sweep_overrides(config) -> list[str]:
    """The swept parameters of a W&B sweep run: W&B stores them as top-level dotted keys next to the
    nested config (docs/pitfalls.md, "W&B: sweep parameters as dotted keys"), which is what we want
    to show for a failed run."""
    out = []
    for key in sorted(config.keys() if hasattr(config, "keys") else []):
        value = config[key]
        if "." in key or (key in ("prune", "model", "dataset") and isinstance(value, str)):
            out.append(f"{key}={value}")
    return out


def point_from_wandb_run(run, where: str) -> Point | Failure:
    """A W&B run as a report point: its summary (`cspexp.outputs.results.SUMMARY_FIELDS`) read back
    into the results.json layout, then read like a run directory's results.json."""
    summary, config = run.summary, dict(run.config or {})
    name = getattr(run, "url", None) or f"{where}/{run.id}"
    state = str(getattr(run, "state", "finished"))
    results = results_from_summary(summary)
    if state in FAILED_STATES:
        return Failure(name, _sweep_overrides(config), state, f"W&B run {getattr(run, 'name', run.id)} {state}")
    if state != "finished" or "giou" not in results.get("metrics", {}) or "image" not in results.get("flops", {}):
        return Failure(name, _sweep_overrides(config), "incomplete",
                       f"W&B run {getattr(run, 'name', run.id)} is {state} and has no giou/flops_image in its summary")
    prune_cfg = _get(config, "prune", {})
    configured = {k: v for k, v in prune_cfg.items() if k != "_target_"} if isinstance(prune_cfg, dict) else {}
    results["prune"] = {**configured, **results.get("prune", {})}
    results.setdefault("method", _method_of(config))
    results.setdefault("model", _get(_get(config, "model", {}) or {}, "name"))
    # runs of older cspexp versions have no dataset in their summary: take it from the run's config
    dataset_cfg = _get(config, "dataset", {}) or {}
    dataset = results.setdefault("dataset", {})
    for key in ("name", "split"):
        if key not in dataset and _get(dataset_cfg, key) is not None:
            dataset[key] = _get(dataset_cfg, key)
    try:
        return point_from_results(results, name)
    except Unreadable as exc:
        return Failure(name, _sweep_overrides(config), f"{UNREADABLE} W&B summary", str(exc))


def parse_sweep_path(path: str) -> tuple[str, str, str]:
    parts = path.strip("/").split("/")
    if len(parts) != 3 or not all(parts):
        raise CspexpError(f"--wandb expects ENTITY/PROJECT/SWEEP_ID (as `wandb sweep` prints it), got {path!r}")
    return parts[0], parts[1], parts[2]


def collect_wandb(path: str, api=None) -> ParetoReport:
    """The report over every run of a W&B sweep. `api`: a `wandb.Api` (tests pass a fake)."""
    entity, project, sweep_id = parse_sweep_path(path)
    if api is None:
        import wandb

        api = wandb.Api()
    try:
        sweep = api.sweep(f"{entity}/{project}/{sweep_id}")
        runs = list(sweep.runs)
    except Exception as exc:  # noqa: BLE001 — network, auth, unknown sweep: one line for the user
        raise CspexpError(f"the W&B sweep {entity}/{project}/{sweep_id} could not be read: {type(exc).__name__}: {exc}") from exc
    items = [point_from_wandb_run(run, f"{entity}/{project}") for run in runs]
    if not items:
        raise CspexpError(f"the W&B sweep {entity}/{project}/{sweep_id} has no runs yet")
    return finish(f"wandb:{entity}/{project}/{sweep_id}", [i for i in items if isinstance(i, Point)],
                  [i for i in items if isinstance(i, Failure)])


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cspexp.aggregate",
        description="Build the accuracy-vs-FLOPs Pareto report (pareto.csv/json/png, report.md) from run "
                    "directories or from a W&B sweep.",
    )
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                   help="run directories or sweep directories (searched for results.json / error.json)")
    p.add_argument("--wandb", metavar="ENTITY/PROJECT/SWEEP_ID", help="read the runs of this W&B sweep instead (online)")
    p.add_argument("--out", type=Path,
                   help="where to write the report (default: the PATH if only one is given; "
                        "outputs/wandb_sweeps/<SWEEP_ID> for --wandb)")
    p.add_argument("--no-plot", action="store_true", help="do not write pareto.png")
    p.add_argument("--log-wandb", action="store_true", help="also log the summary run (job_type=pareto) to W&B")
    p.add_argument("--project", help="W&B project of the summary run (default: the sweep's, or cspexp)")
    p.add_argument("--entity", help="W&B entity of the summary run")
    p.add_argument("--group", help="W&B group of the summary run (default: the sweep id, or the --out dir's name)")
    p.add_argument("--mode", choices=["online", "offline", "disabled"],
                   help="W&B mode of the summary run (default: WANDB_MODE, else online for --wandb, offline otherwise)")
    return p


def run(args: argparse.Namespace, api=None) -> tuple[ParetoReport, Path]:
    from cspexp.report.wandb_summary import log_summary_run
    from cspexp.report.write import write_report

    if args.wandb and args.paths:
        raise CspexpError("give run directories or --wandb ENTITY/PROJECT/SWEEP_ID, not both")
    if not args.wandb and not args.paths:
        raise CspexpError("give at least one run or sweep directory, or --wandb ENTITY/PROJECT/SWEEP_ID")
    if args.wandb:
        entity, project, sweep_id = parse_sweep_path(args.wandb)
        out = args.out or Path("outputs") / "wandb_sweeps" / sweep_id
        report = collect_wandb(args.wandb, api)
        group, default_mode = sweep_id, "online"
    else:
        if args.out is None and len(args.paths) > 1:
            raise CspexpError("with several PATHs, say where the report goes: --out DIR")
        out = args.out or args.paths[0]
        report = collect_dirs(args.paths, base=out)
        entity, project, group, default_mode = None, None, Path(out).resolve().name, "offline"
    paths = write_report(report, out, title=Path(out).resolve().name if not args.wandb else args.wandb,
                         plot=not args.no_plot)
    if args.log_wandb:
        import os

        try:
            log_summary_run(report, project=args.project or project or "cspexp", entity=args.entity or entity,
                            group=args.group or group, mode=args.mode or os.environ.get("WANDB_MODE") or default_mode,
                            save_dir=out, png=paths.get("pareto.png"))
        except Exception as exc:  # noqa: BLE001 — no login, no network: one line, the files are written
            raise CspexpError(f"the report is in {out}, but its W&B summary run failed: {type(exc).__name__}: "
                              f"{' '.join(str(exc).split())}") from exc
    return report, out


def summary_lines(report: ParetoReport, out: Path) -> list[str]:
    """What the command prints: the report's path and counts, why runs are on separate frontiers,
    and one line per unreadable job (which file, what is wrong)."""
    unreadable = report.unreadable
    counts = f"{len(report.points)} points, {len(report.failed)} failed jobs"
    if unreadable:
        counts += f" ({len(unreadable)} unreadable)"
    lines = [f"Pareto report: {Path(out) / 'report.md'} — {counts}"]
    if report.separation:
        lines.append(report.separation)
    lines += [f"unreadable: {f.run_dir}: {f.error[len(UNREADABLE) + 1:]}: {f.message}" for f in unreadable]
    return lines


def main(argv: list[str] | None = None, api=None) -> int:
    """Exit 0 when the report was written — also when jobs failed or were unreadable (they are
    listed in it); 2 with one line on stderr when it was not (bad arguments, nothing to read, an
    unwritable --out)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report, out = run(args, api)
    except CspexpError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    print("\n".join(summary_lines(report, out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
