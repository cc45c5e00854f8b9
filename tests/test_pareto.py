"""The Pareto report's parts on hand-made inputs: the frontier, the files, the W&B summary run (with a
fake `wandb`), the aggregator's W&B source (with a fake `wandb.Api`), and the token pictures."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from cspexp import aggregate
from cspexp.models.loaders import build_model
from cspexp.report.pareto import collect_dirs, pareto_front
from cspexp.report.wandb_summary import COLUMNS, log_summary_run
from cspexp.report.write import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- the frontier
def test_pareto_front_on_hand_made_points():
    # (cost, value); lower cost and higher value are better
    pts = [
        (10.0, 0.50),  # 0 dense: most accurate → frontier
        (5.0, 0.50),  # 1 dominates 0? no: same value, lower cost → 1 dominates 0
        (5.0, 0.50),  # 2 exact duplicate of 1 → both stay on the frontier
        (5.0, 0.40),  # 3 same cost, lower value → dominated by 1
        (3.0, 0.45),  # 4 cheaper, less accurate → frontier
        (4.0, 0.44),  # 5 dominated by 4 (cheaper and better)
        (3.0, 0.45),  # 6 duplicate of 4 → frontier
        (1.0, 0.10),  # 7 cheapest → frontier
        (0.5, float("nan")),  # 8 no value → never on it, dominates nothing
        (None, 0.9),  # 9 no cost → never on it
        (2.0, 0.10),  # 10 same value as 7, more cost → dominated
    ]
    front = pareto_front([c for c, _ in pts], [v for _, v in pts])
    assert front == [False, True, True, False, True, False, True, True, False, False, False]


def test_pareto_front_edge_cases():
    assert pareto_front([], []) == []
    assert pareto_front([1.0], [0.5]) == [True]
    assert pareto_front([1.0, 1.0], [0.5, 0.5]) == [True, True]
    with pytest.raises(ValueError):
        pareto_front([1.0], [])


def _staircase_front(costs, values):
    """An independent O(n log n) frontier: sweep by cost ascending (value descending within a cost);
    a point is on the frontier iff its value beats every strictly cheaper point's best value and it
    is the best at its own cost."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -values[i]))
    on = [False] * len(costs)
    best_cheaper = -math.inf
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and costs[order[j]] == costs[order[i]]:
            j += 1
        group = order[i:j]
        top = max(values[k] for k in group)
        for k in group:
            on[k] = values[k] == top and top > best_cheaper
        best_cheaper = max(best_cheaper, top)
        i = j
    return on


@pytest.mark.parametrize("seed", range(5))
def test_pareto_front_equals_an_independent_staircase(seed):
    rng = random.Random(seed)
    # coarse values so that ties and duplicates are frequent
    costs = [rng.choice([1.0, 2.0, 3.0, 4.0, 5.0]) for _ in range(40)]
    values = [rng.choice([0.1, 0.2, 0.3, 0.4]) for _ in range(40)]
    assert pareto_front(costs, values) == _staircase_front(costs, values)


# --------------------------------------------------------------------------- files from job dirs
def _results(method, keep, flops, giou, ciou, prune_extra=None, n=4):
    prune = {"name": method, "keep": keep, **(prune_extra or {})}
    return {"schema": 1, "method": method, "prune": prune, "model": "tiny_random", "n_samples": n,
            "metrics": {"giou": giou, "ciou": ciou},
            "flops": {"unit": "FLOPs", "image": flops, "image_dense": 100.0, "reduction_image": 1 - flops / 100.0},
            "config_hash": f"h-{method}-{keep}"}


def _job(root: Path, name: str, results=None, error=None, overrides=("a=1",)) -> Path:
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if results is not None:
        (d / "results.json").write_text(json.dumps(results))
    if error is not None:
        (d / "error.json").write_text(json.dumps(error))
    return d


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "sweep"
    _job(root, "0", _results("none", 0.3, 100.0, 0.60, 0.62), overrides=("prune=none", "prune.keep=0.3"))
    _job(root, "1", _results("none", 0.5, 100.0, 0.60, 0.62), overrides=("prune=none", "prune.keep=0.5"))
    _job(root, "2", _results("csp", 0.3, 40.0, 0.58, 0.50, {"cluster": {"select": "uniform"}}))
    _job(root, "3", _results("csp", 0.1, 30.0, 0.50, 0.55, {"cluster": {"select": "uniform"}}))
    _job(root, "4", _results("csp", 0.1, 30.0, 0.52, 0.40, {"cluster": {"select": "random"}}))
    _job(root, "5", _results("fastv", 0.3, 45.0, 0.55, 0.60))
    _job(root, "6", error={"error": "ConfigError", "message": "prune.keep=1.5 is outside (0, 1]"},
         overrides=("prune=fastv", "prune.keep=1.5"))
    _job(root, "10")  # started, never finished (killed)
    return root


def test_report_files_from_job_dirs(sweep_dir, tmp_path):
    report = collect_dirs([sweep_dir], base=sweep_dir)
    paths = write_report(report, sweep_dir, title="sweep")
    assert set(paths) == {"pareto.csv", "pareto.json", "pareto.png", "report.md"}

    rows = list(csv.DictReader((sweep_dir / "pareto.csv").open()))
    by_dir = {r["run_dir"]: r for r in rows}
    assert sorted(by_dir) == ["0", "1", "2", "3", "4", "5"]
    # frontier by hand: gIoU — dense (100, .60) ties with its copy; csp 0.3 (40, .58); csp-random (30, .52);
    # fastv (45, .55) is beaten by csp 0.3; csp-uniform 0.1 (30, .50) by csp-random at the same cost.
    assert {d for d, r in by_dir.items() if r["frontier_giou"] == "True"} == {"0", "1", "2", "4"}
    # cIoU: dense (.62); fastv (45, .60); csp 0.1 uniform (30, .55); csp 0.3 (40, .50) is beaten by it
    assert {d for d, r in by_dir.items() if r["frontier_ciou"] == "True"} == {"0", "1", "5", "3"}
    assert by_dir["0"]["keep"] == ""  # `none` ignores keep: no keep reported
    assert by_dir["2"]["variant"] == "csp cluster.select=uniform" and by_dir["0"]["variant"] == "dense"

    data = json.loads((sweep_dir / "pareto.json").read_text())
    assert data["dense"] == "0"
    for p in data["points"]:
        for key in ("method", "keep", "run_dir", "flops_image", "giou", "ciou", "frontier_giou", "frontier_ciou"):
            assert key in p
    assert [f["run_dir"] for f in data["failed"]] == ["6", "10"]
    assert data["failed"][0]["error"] == "ConfigError" and data["failed"][0]["overrides"] == ["prune=fastv", "prune.keep=1.5"]
    assert data["failed"][1]["error"] == "incomplete"
    assert data["frontier"]["giou"] == ["4", "2", "0", "1"]  # cheapest first

    md = (sweep_dir / "report.md").read_text()
    for text in ("## Frontier: gIoU", "## Frontier: cIoU", "### dense", "### csp cluster.select=random",
                 "### fastv", "## Failed jobs", "prune=fastv prune.keep=1.5", "ConfigError",
                 "prune.keep=1.5 is outside (0, 1]", "incomplete", "![accuracy vs image-token FLOPs](pareto.png)"):
        assert text in md, text
    assert "1 more `none` job" in md  # the repeated dense point is said once

    png = (sweep_dir / "pareto.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    import matplotlib.image

    h, w = matplotlib.image.imread(str(sweep_dir / "pareto.png")).shape[:2]
    assert w > 1000 and h > 500  # two readable panels


def test_a_forced_rerun_that_failed_wins_over_older_results(tmp_path):
    import os
    import time

    d = _job(tmp_path / "s", "0", _results("csp", 0.1, 30.0, 0.5, 0.5),
             error={"error": "RuntimeError", "message": "boom"})
    older = time.time() - 100
    os.utime(d / "results.json", (older, older))
    report = collect_dirs([tmp_path / "s"])
    assert not report.points and report.failed[0].error == "RuntimeError"


def test_collect_dirs_explains_empty_or_missing_input(tmp_path):
    from cspexp.utils.errors import CspexpError

    with pytest.raises(CspexpError, match="no job found under"):
        collect_dirs([tmp_path])
    with pytest.raises(CspexpError, match="is not a directory"):
        collect_dirs([tmp_path / "nope"])


def test_many_variants_collapse_to_one_curve_per_method(tmp_path):
    for i in range(12):  # an Optuna-like search: every point a different schedule
        _job(tmp_path / "s", str(i), _results("csp", 0.1, 30.0 + i, 0.5, 0.5, {"cluster": {"ratio": 0.01 * (i + 1)}}))
    report = collect_dirs([tmp_path / "s"])
    assert {p.variant for p in report.points} == {"csp"}


# --------------------------------------------------------------------------- W&B summary run (fake wandb)
class FakeWandb:
    """Records what the summary run would send to W&B."""

    def __init__(self):
        self.calls = []
        test = self

        class Table:
            def __init__(self, columns, data):
                self.columns, self.data = columns, data

        class Run:
            def __init__(self):
                self.logged, self.summary, self.finished = {}, {}, False

            def log(self, d):
                self.logged.update(d)

            def finish(self, exit_code=0):
                self.finished = True

        self.Table = Table
        self.run = Run()
        self.plot = SimpleNamespace(
            scatter=lambda table, x, y, title="": test.calls.append(("scatter", table, x, y)) or ("scatter", y),
            line=lambda table, x, y, stroke=None, title="": test.calls.append(("line", table, x, y, stroke)) or ("line", y),
        )
        self.Image = lambda path: ("image", path)

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return self.run


def test_wandb_summary_run_logs_table_scatter_and_lines(sweep_dir):
    report = collect_dirs([sweep_dir], base=sweep_dir)
    paths = write_report(report, sweep_dir)
    fake = FakeWandb()
    log_summary_run(report, project="p", entity="e", group="sweep-1", mode="offline", save_dir=sweep_dir,
                    png=paths["pareto.png"], wandb=fake)
    kw = fake.init_kwargs
    assert kw["job_type"] == "pareto" and kw["group"] == "sweep-1" and kw["project"] == "p" and kw["mode"] == "offline"
    table = fake.run.logged["pareto/points"]
    assert table.columns == COLUMNS and len(table.data) == len(report.points)
    reductions = [r[COLUMNS.index("reduction_pct")] for r in table.data]
    assert reductions == sorted(reductions)  # lines draw left to right
    kinds = sorted((c[0], c[3], str(c[4]) if c[0] == "line" else "-") for c in fake.calls)
    assert kinds == [("line", "ciou", "None"), ("line", "ciou", "variant"), ("line", "giou", "None"),
                     ("line", "giou", "variant"), ("scatter", "ciou", "-"), ("scatter", "giou", "-")]
    frontier_table = next(c[1] for c in fake.calls if c[0] == "line" and c[3] == "giou" and c[4] is None)
    assert len(frontier_table.data) == sum(p.frontier_giou for p in report.points)
    assert fake.run.logged["pareto/plot"] == ("image", str(paths["pareto.png"]))
    assert fake.run.summary["n_failed"] == 2 and fake.run.finished


# --------------------------------------------------------------------------- aggregate --wandb (fake Api)
class FakeApi:
    def __init__(self, runs):
        self.runs, self.asked = runs, []

    def sweep(self, path):
        self.asked.append(path)
        return SimpleNamespace(runs=self.runs)


def _wb_run(i, state, summary, config):
    return SimpleNamespace(id=f"r{i}", name=f"run-{i}", url=f"https://wandb.ai/e/p/runs/r{i}", state=state,
                           summary=summary, config=config)


def test_aggregate_from_a_wandb_sweep(tmp_path, capsys):
    def summary(method, keep, flops, giou):
        return {"method": method, "keep": keep, "flops_image": flops, "flops_image_dense": 100.0,
                "reduction_image": 1 - flops / 100.0, "giou": giou, "ciou": giou - 0.01, "n_samples": 8}

    runs = [
        _wb_run(0, "finished", summary("none", 1.0, 100.0, 0.6), {"prune": {"_target_": "x.NoPruning", "keep": 1.0}}),
        _wb_run(1, "finished", summary("csp", 0.1, 35.0, 0.58),
                {"prune": {"_target_": "x.ClusterScatterPrune", "keep": 0.1}, "prune.keep": 0.1}),
        # an older run without `method` in its summary: the method comes from the config's _target_
        _wb_run(2, "finished", {k: v for k, v in summary("fastv", 0.3, 45.0, 0.5).items() if k != "method"},
                {"prune": {"_target_": "cspexp.pruning.methods.FastV", "keep": 0.3}}),
        _wb_run(3, "crashed", {}, {"prune": {"_target_": "x.FastV"}, "prune.keep": 0.9}),
        _wb_run(4, "running", {}, {}),
    ]
    api = FakeApi(runs)
    out = tmp_path / "out"
    assert aggregate.main(["--wandb", "e/p/abc", "--out", str(out)], api=api) == 0
    assert api.asked == ["e/p/abc"]
    data = json.loads((out / "pareto.json").read_text())
    assert {(p["method"], p["keep"]) for p in data["points"]} == {("none", None), ("csp", 0.1), ("fastv", 0.3)}
    front = {p["method"] for p in data["points"] if p["frontier_giou"]}
    assert front == {"none", "csp"}  # fastv (45, .50) is beaten by csp (35, .58)
    failed = {f["run_dir"]: f for f in data["failed"]}
    assert failed["https://wandb.ai/e/p/runs/r3"]["error"] == "crashed"
    assert failed["https://wandb.ai/e/p/runs/r3"]["overrides"] == ["prune.keep=0.9"]
    assert failed["https://wandb.ai/e/p/runs/r4"]["error"] == "incomplete"
    assert data["source"] == "wandb:e/p/abc"
    assert "3 points, 2 failed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--wandb", "e/p"], "--wandb expects ENTITY/PROJECT/SWEEP_ID"),
        (["--wandb", "e/p/s", "some/dir"], "not both"),
        ([], "give at least one run or sweep directory"),
        (["/nonexistent/dir"], "/nonexistent/dir is not a directory"),
        (["a", "b"], "--out DIR"),
    ],
)
def test_aggregate_bad_input_is_one_line(argv, expected, capsys):
    assert aggregate.main(argv, api=FakeApi([])) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_aggregate_reports_an_unreadable_sweep_in_one_line(tmp_path, capsys):
    class Broken:
        def sweep(self, path):
            raise ConnectionError("no network")

    assert aggregate.main(["--wandb", "e/p/s", "--out", str(tmp_path)], api=Broken()) == 2
    assert "could not be read: ConnectionError: no network" in capsys.readouterr().err


# --------------------------------------------------------------------------- pictures
def test_token_pictures_record_each_stage(tmp_path):
    from cspexp.data import build_dataset, vocabulary
    from cspexp.pruning.methods import ClusterScatterPrune
    from cspexp.pruning.selection import uniform_grid
    from cspexp.report.pictures import draw_token_pictures, record, stages
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cspexp.utils.instantiate import build

    from conftest import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["model=tiny_random", "dataset.n=1"])
    GlobalHydra.instance().clear()
    dataset = build_dataset(cfg.dataset)
    loaded = build_model(cfg.model, vocabulary(dataset))
    method = ClusterScatterPrune(keep=0.1).bind(loaded.model.num_layers, loaded.model.n_image_tokens)

    masks, recorder = record(loaded, method, [dataset[0]])
    runs = stages([layer[0] for layer in recorder.kept])
    # tiny_random has 8 layers: clustering [0, 2) with 64 representatives on the uniform grid,
    # scattering [2, 4) with all 256, pruning [4, 8) with ⌈0.1·256⌉ = 26
    assert [(a, b, len(c)) for a, b, c in runs] == [(0, 1, 64), (2, 3, 256), (4, 7, 26)]
    assert runs[0][2] == sorted(uniform_grid(64, 16, 16).flatten().tolist())
    assert set(runs[2][2]) <= set(range(256)) and masks[0].shape == dataset[0]["mask"].shape

    (path,) = draw_token_pictures(loaded, method, [dataset[0]], tmp_path / "viz")
    assert path == tmp_path / "viz" / "sample_0.png" and path.read_bytes().startswith(PNG_MAGIC)
