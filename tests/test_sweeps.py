"""Sweeps end to end: the default grid, the Pareto report of a real multirun, resume and force,
failed jobs, launchers, Optuna, W&B sweep files and experiment configs.

Multiruns run the real CLI in a subprocess on the tiny random model with 1–2 samples; config
checks compose in-process with Hydra's compose API and the repository's conf/.
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from cspexp.models.loaders import model_shape
from cspexp.utils.instantiate import build

from conftest import CONF_DIR, REPO

# Small and fast: the tiny random model, no logger, no warm-up pass, no table; no dense side run.
FAST = ("model=tiny_random", "dataset.n=2", "logger=none", "latency.warmup=0", "print_table=false",
        "++compare_dense=false")
SWEEP_FILES = sorted((REPO / "sweeps").glob("*.yaml"))
# The experiments that declare a sweep (others, e.g. smoke or the training recipe, are single runs).
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")
                     if ((yaml.safe_load(p.read_text()) or {}).get("hydra") or {}).get("sweeper"))
HAS_JOBLIB = importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is not None
HAS_OPTUNA = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None


def run(*argv: str, cwd: Path, module: str = "cspexp") -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def read_results(job_dir: Path) -> dict:
    return json.loads((job_dir / "results.json").read_text())


def frontier_by_hand(points: dict[str, tuple[float, float]]) -> set[str]:
    """Names of the non-dominated (cost, value) points: nothing else at most as costly and at least as
    good, one of them strictly."""
    return {
        name for name, (c, v) in points.items()
        if not any(c2 <= c and v2 >= v and (c2, v2) != (c, v) for other, (c2, v2) in points.items() if other != name)
    }


@pytest.fixture
def composer():
    """compose(*overrides) → the eval config (with its hydra node), from the repository's conf/."""

    def _compose(*overrides: str):
        if not GlobalHydra.instance().is_initialized():  # another fixture may have cleared it
            initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3")
        return compose(config_name="eval", overrides=list(overrides), return_hydra_config=True)

    GlobalHydra.instance().clear()
    yield _compose
    GlobalHydra.instance().clear()


def sweep_jobs(params: dict, args: list[str] = ()) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes from `hydra.sweeper.params` and command-line `args`,
    computed by the sweeper's own code (the command line wins per key)."""
    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(args)
    (batch,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(lines), None)
    return batch


def check_schedule(cfg) -> None:
    """The method builds and its schedule fits the configured model and a 32-layer LISA-7B."""
    build(cfg.prune).bind(*model_shape(cfg.model))
    build(cfg.prune).bind(32, 256)


# --------------------------------------------------------------------------- the default grid
def test_default_grid_and_command_line_wins_per_key(composer):
    cfg = composer()
    params = dict(cfg.hydra.sweeper.params)
    grid = sweep_jobs(params)
    methods, keeps = ["none", "fastv", "pdrop", "csp"], ["0.1", "0.2", "0.3", "0.5"]
    assert sorted(map(tuple, grid)) == sorted((f"prune={m}", f"prune.keep={k}") for m, k in itertools.product(methods, keeps))
    # `python -m cspexp prune.keep=0.3 -m`: the methods at keep 0.3 only
    assert sorted(map(tuple, sweep_jobs(params, ["prune.keep=0.3"]))) == sorted(
        (f"prune={m}", "prune.keep=0.3") for m in methods)
    # a single run never sees the grid: its prune config is the default option's file as it is
    option = cfg.hydra.runtime.choices.prune
    assert cfg.prune.keep == yaml.safe_load((CONF_DIR / "prune" / f"{option}.yaml").read_text())["keep"]
    assert cfg.hydra.callbacks.pareto._target_ == "cspexp.report.callback.ParetoCallback"


def test_force_composes_with_and_without_plus(composer):
    assert composer().force is None
    assert composer("force=true").force is True and composer("+force=true").force is True


# --------------------------------------------------------------------------- a real multirun
def test_multirun_writes_the_pareto_report_and_aggregate_rebuilds_it(tmp_path):
    # as a user types it: the default sweep dir, outputs/multiruns/<time> under the working dir
    proc = run("prune.keep=0.3", *FAST, "-m", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multiruns").iterdir()
    jobs = {str(i): read_results(sweep / str(i)) for i in range(4)}
    assert {r["method"] for r in jobs.values()} == {"none", "fastv", "pdrop", "csp"}
    assert all(r["config"]["prune"]["keep"] == 0.3 for r in jobs.values())

    rows = {r["run_dir"]: r for r in csv.DictReader((sweep / "pareto.csv").open())}
    assert set(rows) == set(jobs)
    for metric in ("giou", "ciou"):
        by_hand = frontier_by_hand({d: (r["flops"]["image"], r["metrics"][metric]) for d, r in jobs.items()})
        assert {d for d, row in rows.items() if row[f"frontier_{metric}"] == "True"} == by_hand
    for d, r in jobs.items():
        assert float(rows[d]["flops_image"]) == pytest.approx(r["flops"]["image"])
        assert float(rows[d]["giou"]) == pytest.approx(r["metrics"]["giou"])

    data = json.loads((sweep / "pareto.json").read_text())
    assert data["dense"] == next(d for d, r in jobs.items() if r["method"] == "none")
    assert data["failed"] == []
    md = (sweep / "report.md").read_text()
    assert all(f"### {m}" in md for m in ("dense", "fastv", "pdrop", "csp")) and "## Failed jobs\n\nNone." in md
    assert (sweep / "pareto.png").read_bytes().startswith(b"\x89PNG")

    # the aggregate command, from the sweep dir: the same files
    before = {n: (sweep / n).read_text() for n in ("pareto.csv", "pareto.json", "report.md")}
    agg = run(str(sweep), cwd=tmp_path, module="cspexp.aggregate")
    assert agg.returncode == 0, agg.stderr
    assert {n: (sweep / n).read_text() for n in before} == before
    # ... and from the four run dirs, elsewhere: the same points
    out = tmp_path / "elsewhere"
    agg = run(*(str(sweep / d) for d in jobs), "--out", str(out), cwd=tmp_path, module="cspexp.aggregate")
    assert agg.returncode == 0, agg.stderr

    def points(path):
        return sorted(({**p, "run_dir": Path(p["run_dir"]).name} for p in json.loads(path.read_text())["points"]),
                      key=lambda p: p["run_dir"])

    assert points(out / "pareto.json") == points(sweep / "pareto.json")


# --------------------------------------------------------------------------- failures, resume, force
def test_failed_job_is_reported_and_resume_skips_finished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    args = ("prune=fastv", "prune.keep=0.3", "prune.layer=2,0", *FAST, f"hydra.sweep.dir={sweep}")
    first = run(*args, "viz.n_samples=1", "-m", cwd=tmp_path)
    # layer 0 does not fit FastV (it ranks with layer K−1): only binding to the model can tell, so job 1
    # fails at run time; job 0 still finishes, the report lists job 1, the exit is non-zero
    assert first.returncode == 1, first.stderr[-3000:]
    assert (sweep / "0" / "results.json").is_file() and not (sweep / "1" / "results.json").exists()
    assert json.loads((sweep / "1" / "error.json").read_text())["error"] == "ConfigError"
    last = first.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 job of the sweep failed") and "prune.layer=0 (layer 0) must be in 1..7" in last
    md = (sweep / "report.md").read_text()
    failed_section = md.split("## Failed jobs")[1]
    assert "prune.layer=0" in failed_section and "ConfigError" in failed_section
    assert json.loads((sweep / "pareto.json").read_text())["failed"][0]["run_dir"] == "1"
    assert (sweep / "0" / "viz" / "sample_0.png").read_bytes().startswith(b"\x89PNG")  # viz.n_samples=1

    stamp = (sweep / "0" / "results.json").stat().st_mtime_ns
    again = run(*args, "-m", cwd=tmp_path)
    assert again.returncode == 1  # job 1 still fails
    assert (sweep / "0" / "results.json").stat().st_mtime_ns == stamp  # job 0 was skipped ...
    assert "skipped: " in again.stderr + again.stdout  # ... and said so

    forced = run("prune=fastv", "prune.keep=0.3", "prune.layer=2", *FAST, f"hydra.sweep.dir={sweep}", "+force=true", "-m", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr[-3000:]  # job 1 of the earlier sweep is listed, not this run's
    assert (sweep / "0" / "results.json").stat().st_mtime_ns != stamp
    assert "skipped: " not in forced.stderr + forced.stdout
    assert json.loads((sweep / "pareto.json").read_text())["failed"][0]["run_dir"] == "1"


# --------------------------------------------------------------------------- launchers and sweepers
@pytest.mark.skipif(not HAS_JOBLIB, reason="hydra-joblib-launcher is not installed (pip install -e '.[sweeps]')")
def test_two_jobs_through_the_joblib_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run("hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "prune=none,csp", "prune.keep=0.3", *FAST,
               "dataset.n=1", f"hydra.sweep.dir={sweep}", "-m", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {read_results(sweep / str(i))["method"] for i in range(2)} == {"none", "csp"}
    assert len(json.loads((sweep / "pareto.json").read_text())["points"]) == 2


def test_launcher_configs_take_their_settings_from_the_environment(composer, monkeypatch):
    monkeypatch.setenv("SBATCH_PARTITION", "gpu-a100")
    monkeypatch.setenv("SBATCH_ACCOUNT", "lab42")
    monkeypatch.setenv("CSPEXP_SLURM_TIMEOUT_MIN", "90")
    monkeypatch.setenv("CSPEXP_N_JOBS", "3")
    slurm = composer("hydra/launcher=slurm_1gpu").hydra.launcher
    assert (slurm.partition, slurm.account, slurm.timeout_min) == ("gpu-a100", "lab42", 90)
    assert slurm.gpus_per_node == 1 and slurm.tasks_per_node == 1 and slurm._target_.endswith("SlurmLauncher")
    parallel = composer("hydra/launcher=parallel").hydra.launcher
    assert parallel.n_jobs == 3 and parallel._target_.endswith("JoblibLauncher")
    monkeypatch.delenv("SBATCH_PARTITION")
    assert composer("hydra/launcher=slurm_1gpu").hydra.launcher.partition is None  # SLURM's default partition


@pytest.mark.skipif(not HAS_OPTUNA, reason="hydra-optuna-sweeper is not installed (pip install -e '.[sweeps]')")
def test_optuna_multi_objective_search_returns_giou_and_flops(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run("experiment=optuna_csp", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.population_size=2",
               *FAST, "dataset.n=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    solutions = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["solutions"]
    jobs = [read_results(sweep / str(i)) for i in range(2)]
    measured = {(r["metrics"]["giou"], r["flops"]["image"]) for r in jobs}
    assert solutions and all(tuple(s["values"]) in measured for s in solutions)
    assert len(json.loads((sweep / "pareto.json").read_text())["points"]) == 2


# --------------------------------------------------------------------------- W&B sweep files
def wandb_param_sets(spec: dict):
    """Parameter sets of a W&B sweep: every combination of a grid; for bayes/random each value (or
    min and max) of each parameter with the others at their first value."""
    params = spec["parameters"]
    fixed = {k: v["value"] for k, v in params.items() if "value" in v}
    swept = {k: v for k, v in params.items() if "value" not in v}
    if spec["method"] == "grid":
        keys = list(swept)
        for combo in itertools.product(*(swept[k]["values"] for k in keys)):
            yield {**fixed, **dict(zip(keys, combo))}
        return

    def choices(v):
        return v["values"] if "values" in v else [v["min"], v["max"]]

    base = {k: choices(v)[0] for k, v in swept.items()}
    for key, v in swept.items():
        for choice in choices(v):
            yield {**fixed, **base, key: choice}


def wandb_args(params: dict) -> list[str]:
    """`${args_no_hyphens}` as the W&B agent renders it: f"{key}={value}" with Python's str()."""
    return [f"{k}={v}" for k, v in params.items()]


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_wandb_sweep_file_composes_at_every_point(path, composer):
    spec = yaml.safe_load(path.read_text())
    assert spec["program"] == "cspexp"
    assert spec["command"] == ["${env}", "${interpreter}", "-m", "${program}", "${args_no_hyphens}"]
    assert spec["method"] in ("grid", "bayes", "random")
    # the optimised metric is a top-level key that every run's summary holds (cspexp.evaluate)
    assert spec["metric"]["name"] in ("giou", "ciou", "objective") and spec["metric"]["goal"] in ("maximize", "minimize")
    assert "-m" not in [str(v.get("value")) for v in spec["parameters"].values()]
    sets = list(wandb_param_sets(spec))
    assert sets
    for params in sets:
        cfg = composer(*wandb_args(params), "model=tiny_random")
        check_schedule(cfg)


def test_one_wandb_sweep_point_runs_with_the_agents_command(tmp_path):
    spec = yaml.safe_load((REPO / "sweeps" / "csp_bayes.yaml").read_text())
    params = next(wandb_param_sets(spec))  # the first point: every parameter at its first value / min
    params["logger.mode"] = "disabled"  # no network in tests
    run_dir = tmp_path / "run"
    # the sweep's own logger (W&B, here disabled), so not FAST's logger=none
    fast = [a for a in FAST if not a.startswith(("logger=", "dataset.n="))]
    args = wandb_args(params) + [*fast, "dataset.n=1", f"hydra.run.dir={run_dir}"]
    # as wandb/wandb_agent.py expands them (the interpreter: this test's, rather than `python`)
    macros = {"${env}": ["/usr/bin/env"] if Path("/usr/bin/env").exists() else [], "${interpreter}": [sys.executable],
              "${program}": [spec["program"]], "${args_no_hyphens}": args}
    command = [part for token in spec["command"] for part in macros.get(token, [token])]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_results(run_dir)
    prune = results["config"]["prune"]
    assert prune["scatter"]["span"][0] == prune["cluster"]["span"][1] == 0.125  # the interpolation resolved
    # 8 layers: clustering [0, 1) with ⌊0.0625·256⌋ = 16 tokens, scattering [1, 4) with 256 (0.4375·8 = 3.5
    # rounds to 4), pruning [4, 8) with ⌈0.02·256⌉ = 6
    assert results["tokens"]["image_per_layer"] == [16, 256, 256, 256, 6, 6, 6, 6]


# --------------------------------------------------------------------------- experiment configs
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_with_every_job_of_its_sweep(name, composer):
    cfg = composer(f"experiment={name}")
    sweeper = cfg.hydra.sweeper
    params = dict(sweeper.params or {})
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.runtime.choices["hydra/sweep_grid"] == "none"
    assert "prune" not in params or "," not in str(params["prune"])  # the default method grid is gone
    if sweeper._target_.endswith("BasicSweeper"):
        jobs = sweep_jobs(params)
    else:  # Optuna: choice(a, b, ...) — each value of each parameter, the others at their first
        parsed = {o.get_key_element(): list(o.sweep_string_iterator())
                  for o in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])}
        base = {k: v[0] for k, v in parsed.items()}
        jobs = [[f"{k}={v}" for k, v in {**base, key: value}.items()] for key, vs in parsed.items() for value in vs]
        assert cfg.optimized_metrics == ["metrics.giou", "flops.image"]
    assert len(jobs) >= 2
    for job in jobs:
        check_schedule(composer(f"experiment={name}", "model=tiny_random", *job))


PAPER_TARGETS = {"dense": 0.0, "csp65": 0.65, "csp70": 0.70, "fastv65": 0.65, "fastv70": 0.70, "pdrop65": 0.65,
                 "pdrop70": 0.70}


def image_tokens_per_layer(prune: dict, L: int, N: int = 256) -> list[int]:
    """The schedule's image tokens per layer, from the paper_main config values by the rules the
    README states (fractions of depth round to the nearest layer, kept counts round up)."""
    layer = lambda f: int(math.floor(f * L + 0.5)) if isinstance(f, float) else f  # noqa: E731
    ceil = lambda x: max(1, math.ceil(round(x, 6)))  # noqa: E731
    target = prune["_target_"].rsplit(".", 1)[-1]
    if target == "NoPruning":
        return [N] * L
    if target == "FastV":
        k = layer(prune["layer"])
        return [N if i < k else ceil(prune["keep"] * N) for i in range(L)]
    if target == "PyramidDrop":
        drops, n, out = [layer(f) for f in prune["layers"]], N, []
        for i in range(L):
            n = ceil(prune["keep"] * n) if i in drops else n
            out.append(n)
        return out
    assert target == "ClusterScatterPrune"
    c1, s1 = layer(prune["cluster"]["span"][1]), layer(prune["scatter"]["span"][1])
    n_c = math.floor(prune["cluster"]["ratio"] * N)
    return [n_c if i < c1 else N if i < s1 else ceil(prune["keep"] * N) for i in range(L)]


@pytest.mark.parametrize("point", sorted(PAPER_TARGETS))
def test_paper_main_points_are_matched_to_their_reduction(point, composer):
    from omegaconf import OmegaConf

    assert point in str(composer("experiment=paper_main").hydra.sweeper.params["+experiment/paper_main_points"])
    cfg = composer(f"+experiment/paper_main_points={point}")
    prune = OmegaConf.to_container(cfg.prune, resolve=True)
    for L in (8, 16, 32):  # the tiny models and LISA-7B
        counts = image_tokens_per_layer(prune, L)
        reduction = 1 - sum(counts) / (256 * L)
        assert reduction == pytest.approx(PAPER_TARGETS[point], abs=0.0025), (L, counts)
    check_schedule(cfg)


# --------------------------------------------------------------------------- small pieces
def test_job_runs_are_grouped_by_sweep(compose_cfg, tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    from cspexp.run import build_logger

    cfg = compose_cfg("logger=wandb")
    assert build_logger(cfg)._wandb_init["group"] is None  # a single run keeps no group
    with read_write(cfg.hydra), open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(tmp_path / "2026-01-01_paper_main")
    HydraConfig.instance().set_config(cfg)
    assert build_logger(cfg)._wandb_init["group"] == "2026-01-01_paper_main"
    with open_dict(cfg):
        cfg.logger.group = "mine"
    assert build_logger(cfg)._wandb_init["group"] == "mine"


def test_optimized_metrics_select_values_from_results():
    from cspexp.cli import objective_values
    from cspexp.utils.errors import ConfigError

    results = {"metrics": {"giou": 0.5}, "flops": {"image": 2e9}}
    assert objective_values(results, ["metrics.giou"]) == 0.5
    assert objective_values(results, ["metrics.giou", "flops.image"]) == (0.5, 2e9)
    with pytest.raises(ConfigError, match="'flops.imag' is not in results.json"):
        objective_values(results, ["flops.imag"])


def test_bayes_objective_penalises_missing_reduction(compose_cfg):
    from omegaconf import open_dict

    from cspexp.outputs.results import objective

    cfg = compose_cfg()
    results = {"metrics": {"giou": 0.6}, "flops": {"reduction_image": 0.55}}
    assert objective(cfg, results) == pytest.approx(0.6)  # target 0: plain gIoU
    with open_dict(cfg):
        cfg.objective.target_reduction = 0.65
    assert objective(cfg, results) == pytest.approx(0.6 - 2.0 * 0.10)
    results["flops"]["reduction_image"] = 0.7
    assert objective(cfg, results) == pytest.approx(0.6)


def test_failed_jobs_end_normally_only_where_the_report_lists_them(composer):
    from cspexp.utils.failures import failures_reported_here

    cfg = composer()
    assert failures_reported_here(cfg.hydra, "eval")
    assert not failures_reported_here(cfg.hydra, "train")  # python -m cspexp.train shares conf/hydra
    assert not failures_reported_here(composer("hydra.callbacks.pareto.enabled=false").hydra, "eval")
    if HAS_OPTUNA:  # Optuna counts failed trials itself: the job must raise
        assert not failures_reported_here(composer("experiment=optuna_csp").hydra, "eval")
