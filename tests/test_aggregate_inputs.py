"""`python -m cspexp.aggregate` and the sweep report on bad and mixed input, in-process.

- Malformed job files, generated from a seed (results.json, error.json, .hydra/overrides.yaml that
  are not JSON / YAML, or are of the wrong shape: a list, strings where numbers belong, missing keys,
  NaN / Infinity, wrong nested types): each such job is listed as unreadable with the file and the
  field, the good points keep their hand-worked frontier, the report is written and the exit is 0.
- Runs of different models, datasets, splits, sample counts or sample sets: separate groups, each
  with its own frontier and dense reference, and one line that says why (checked on hand-made runs).
- An --out that cannot be written: one `error:` line naming it, exit 2, nothing written.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from cspexp import aggregate
from cspexp.outputs.results import SAMPLE_SET_IGNORED, results_from_summary, sample_set, summary_of
from cspexp.report.pareto import collect_dirs

NAN, INF = float("nan"), float("inf")


# --------------------------------------------------------------------------- hand-made jobs
def results(method, keep, flops, giou, ciou, *, model="tiny_random", dataset="shapes", split="val", n=4,
            samples="s-shapes-4"):
    return {"schema": 1, "method": method, "prune": {"name": method, "keep": keep, "cluster": {"ratio": 0.25}},
            "model": model, "dataset": {"name": dataset, "split": split}, "n_samples": n, "sample_set": samples,
            "metrics": {"giou": giou, "ciou": ciou},
            "flops": {"unit": "FLOPs", "image": flops, "image_dense": 100.0, "reduction_image": 1 - flops / 100.0},
            "config_hash": f"h-{method}-{keep}-{model}-{dataset}-{n}-{samples}"}


def job(root: Path, name: str, *, results_text=None, error_text=None, overrides_text="- a=1\n") -> Path:
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    if overrides_text is not None:
        (d / ".hydra" / "overrides.yaml").write_bytes(overrides_text.encode() if isinstance(overrides_text, str)
                                                       else overrides_text)
    for file, text in (("results.json", results_text), ("error.json", error_text)):
        if text is not None:
            (d / file).write_bytes(text.encode() if isinstance(text, str) else text)
    return d


def dump(obj) -> str:
    return json.dumps(obj)  # allow_nan: Python writes NaN / Infinity, which json.loads reads back


# The good points of every generated sweep, and their frontiers worked by hand:
#   gIoU: dense (100, .60); csp 0.3 (40, .58); csp 0.1 (30, .50) — fastv (45, .55) is beaten by csp 0.3
#   cIoU: dense (100, .62); fastv (45, .60); csp 0.1 (30, .55) — csp 0.3 (40, .50) is beaten by csp 0.1
GOOD = {
    "g-dense": results("none", 1.0, 100.0, 0.60, 0.62),
    "g-csp03": results("csp", 0.3, 40.0, 0.58, 0.50),
    "g-csp01": results("csp", 0.1, 30.0, 0.50, 0.55),
    "g-fastv": results("fastv", 0.3, 45.0, 0.55, 0.60),
}
GOOD_FRONTIER = {"giou": {"g-dense", "g-csp03", "g-csp01"}, "ciou": {"g-dense", "g-fastv", "g-csp01"}}


# --------------------------------------------------------------------------- the generator
@dataclass
class Bad:
    """One malformed job: its files, and what the report must say (the file, a fragment of the message)."""

    kind: str
    results_text: str | bytes | None = None
    error_text: str | bytes | None = None
    overrides_text: str | bytes | None = "- a=1\n"
    file: str = "results.json"
    says: str = ""


def _set(d: dict, path: str, value):
    *parents, leaf = path.split(".")
    for p in parents:
        d = d[p]
    d[leaf] = value


def _delete(d: dict, path: str):
    *parents, leaf = path.split(".")
    for p in parents:
        d = d[p]
    del d[leaf]


# (field, wrong value, how the message shows the value, what it expects) — each wrong for that field
WRONG_VALUES = [
    ("metrics.giou", "0.5", "'0.5' (a string)", "a number in [0, 1]"),
    ("metrics.giou", NAN, "NaN", "a number in [0, 1]"),
    ("metrics.giou", INF, "Infinity", "a number in [0, 1]"),
    ("metrics.giou", 1.5, "1.5", "a number in [0, 1]"),
    ("metrics.giou", -0.25, "-0.25", "a number in [0, 1]"),
    ("metrics.giou", None, "null", "a number in [0, 1]"),
    ("metrics.giou", True, "true (a boolean)", "a number in [0, 1]"),
    ("metrics.giou", [0.5], "a list", "a number in [0, 1]"),
    ("metrics.ciou", {"v": 0.5}, "an object", "a number in [0, 1]"),
    ("metrics.ciou", "high", "'high' (a string)", "a number in [0, 1]"),
    ("metrics.ciou", -INF, "-Infinity", "a number in [0, 1]"),
    ("flops.image", "40", "'40' (a string)", "a number ≥ 0 or null"),
    ("flops.image", -1.0, "-1.0", "a number ≥ 0 or null"),
    ("flops.image", NAN, "NaN", "a number ≥ 0 or null"),
    ("flops.image", [40.0], "a list", "a number ≥ 0 or null"),
    ("flops.image_dense", "100", "'100' (a string)", "a number ≥ 0 or null"),
    ("flops.reduction_image", INF, "Infinity", "a number ≤ 1 or null"),
    ("flops.reduction_image", 2.0, "2.0", "a number ≤ 1 or null"),
    ("n_samples", "4", "'4' (a string)", "an integer ≥ 0 or null"),
    ("n_samples", 2.5, "2.5", "an integer ≥ 0 or null"),
    ("n_samples", -3, "-3", "an integer ≥ 0 or null"),
    ("n_samples", False, "false (a boolean)", "an integer ≥ 0 or null"),
    ("prune.keep", "0.3", "'0.3' (a string)", "a number in [0, 1] or null"),
    ("prune.keep", 1.5, "1.5", "a number in [0, 1] or null"),
    ("prune.keep", NAN, "NaN", "a number in [0, 1] or null"),
    ("metrics", [0.5, 0.5], "a list", "an object"),
    ("metrics", "0.5", "'0.5' (a string)", "an object"),
    ("metrics", None, "null", "an object"),
    ("flops", 40.0, "40.0", "an object"),
    ("prune", ["csp", 0.3], "a list", "an object"),
    ("dataset", "shapes", "'shapes' (a string)", "an object"),
    ("dataset.name", 7, "7", "a non-empty string"),
    ("dataset.split", ["val"], "a list", "a non-empty string"),
    ("model", {"name": "m"}, "an object", "a non-empty string"),
    ("model", 3, "3", "a non-empty string"),
    ("method", 5, "5", "a non-empty string"),
    ("method", "", "'' (a string)", "a non-empty string"),
    ("sample_set", 12, "12", "a non-empty string"),
    ("config_hash", ["h"], "a list", "a non-empty string"),
    ("schema", "1", "'1' (a string)", "an integer ≥ 1"),
    ("schema", 0, "0", "an integer ≥ 1"),
]
REQUIRED = ["metrics", "metrics.giou", "metrics.ciou", "flops", "flops.image"]


def bad_results_json(rng: random.Random) -> Bad:
    base = copy.deepcopy(rng.choice(list(GOOD.values())))
    kind = rng.choice(["wrong_value"] * 5 + ["missing", "missing", "text", "text", "top", "nested", "no_method",
                                             "disagree", "newer", "deep"])
    if kind == "wrong_value":
        path, value, shown, expected = rng.choice(WRONG_VALUES)
        _set(base, path, value)
        return Bad(f"{path}={shown}", dump(base), says=f"{path} is {shown}, expected {expected}")
    if kind == "missing":
        path = rng.choice(REQUIRED)
        _delete(base, path)
        return Bad(f"missing {path}", dump(base), says=f"{path} is missing")
    if kind == "text":
        text, says = rng.choice([
            ("", "not valid JSON"),
            (dump(base)[: rng.randrange(1, 40)], "not valid JSON"),
            ("{'method': 'csp'}", "not valid JSON"),
            ("results", "not valid JSON"),
            (b"\xff\xfe{\x00", "not UTF-8 text"),
            (dump(base).encode()[:20] + b"\xc3\x28" + dump(base).encode()[20:], "not UTF-8 text"),
        ])
        return Bad(f"text {text[:12]!r}", text, says=says)
    if kind == "top":
        value, shown = rng.choice([([dump(base)], "a list"), ([], "a list"), ("csp", "'csp' (a string)"),
                                   (0.5, "0.5"), (None, "null"), (True, "true (a boolean)"), (NAN, "NaN")])
        return Bad(f"top {shown}", dump(value), says=f"expected a JSON object, got {shown}")
    if kind == "nested":
        key, value, says = rng.choice([
            ("ratio", NAN, "prune.cluster.ratio is NaN, expected a finite number"),
            ("ratio", -INF, "prune.cluster.ratio is -Infinity, expected a finite number"),
            ("span", [0, INF], "prune.cluster.span[1] is Infinity, expected a finite number"),
        ])
        base["prune"]["cluster"][key] = value
        return Bad(f"prune.cluster.{key}", dump(base), says=says)
    if kind == "no_method":
        del base["method"], base["prune"]["name"]
        return Bad("no method", dump(base), says="names no method")
    if kind == "disagree":
        base["prune"]["name"] = "pdrop"
        return Bad("method/prune.name", dump(base), says=f"method {base['method']!r} and prune.name 'pdrop' disagree")
    if kind == "newer":
        base["schema"] = 2
        return Bad("schema 2", dump(base), says="schema 2 is newer than this cspexp reads (1)")
    depth = rng.choice([30, 100_000])  # deeper than cspexp writes / deeper than the parser can go
    if depth == 30:
        inner: dict = {}
        base["prune"]["deep"] = inner
        for _ in range(depth):
            inner["x"] = {}
            inner = inner["x"]
        return Bad("prune nested 30 deep", dump(base), says="nested more than 16 levels deep")
    return Bad("nested 100000 deep", "[" * depth + "]" * depth, says="nested too deeply")


def bad_error_json(rng: random.Random) -> Bad:
    good = {"error": "RuntimeError", "message": "boom", "user_error": False, "traceback": "Traceback ..."}
    value, says = rng.choice([
        ([good], "expected a JSON object, got a list"),
        ("RuntimeError", "expected a JSON object, got 'RuntimeError' (a string)"),
        ({k: v for k, v in good.items() if k != "error"}, "error is missing"),
        ({k: v for k, v in good.items() if k != "message"}, "message is missing"),
        ({**good, "error": 3}, "error is 3, expected a non-empty string"),
        ({**good, "error": None}, "error is null, expected a string"),
        ({**good, "message": ["boom"]}, "message is a list, expected a string"),
        ({**good, "message": NAN}, "message is NaN, expected a string"),
        ({**good, "user_error": "yes"}, "user_error is 'yes' (a string), expected a boolean"),
        ({**good, "traceback": 12}, "traceback is 12, expected a string"),
    ])
    if rng.random() < 0.2:
        return Bad("error.json text", error_text=rng.choice(["", "{", "\x00\x01"]), file="error.json",
                   says="not valid JSON")
    return Bad(f"error.json {says[:20]}", error_text=dump(value), file="error.json", says=says)


def bad_overrides(rng: random.Random) -> Bad:
    """A failed job (a good error.json) whose overrides.yaml is malformed: still a failed job with its
    own error; the message names the overrides file and what is wrong with it."""
    text, says = rng.choice([
        ("prune: csp\nkeep: 0.3\n", "an object, expected a list of strings"),
        ("prune=csp\n", "'prune=csp' (a string), expected a list of strings"),
        ("- [unclosed\n", "not valid YAML"),
        ("- 1\n- 2\n", "holds 1, expected a list of strings"),
        ("- {a: 1}\n", "holds an object, expected a list of strings"),
        ("", "empty, expected a list of strings"),
        (b"- \xff\xfe\n", "not valid YAML"),
        ("\t- a\n:::", "not valid YAML"),
    ])
    return Bad("overrides", error_text=dump({"error": "RuntimeError", "message": "boom"}), overrides_text=text,
               file=".hydra/overrides.yaml", says=f".hydra/overrides.yaml unreadable: {says}")


def generate(rng: random.Random, n: int) -> list[Bad]:
    makers = [bad_results_json] * 6 + [bad_error_json] * 2 + [bad_overrides]
    return [rng.choice(makers)(rng) for _ in range(n)]


def sweep_with(tmp_path: Path, bads: list[Bad]) -> Path:
    root = tmp_path / "sweep"
    for name, r in GOOD.items():
        job(root, name, results_text=dump(r))
    for i, bad in enumerate(bads):
        job(root, f"b{i}", results_text=bad.results_text, error_text=bad.error_text, overrides_text=bad.overrides_text)
    return root


@pytest.mark.parametrize("seed", range(6))
def test_malformed_jobs_are_listed_and_the_report_is_still_written(tmp_path, capsys, seed):
    rng = random.Random(seed)
    bads = generate(rng, 25)
    root = sweep_with(tmp_path, bads)

    assert aggregate.main([str(root)]) == 0
    out = capsys.readouterr().out

    data = json.loads((root / "pareto.json").read_text())
    # the good points are intact, with the frontier worked by hand
    assert sorted(p["run_dir"] for p in data["points"]) == sorted(GOOD)
    for metric, expected in GOOD_FRONTIER.items():
        assert {p["run_dir"] for p in data["points"] if p[f"frontier_{metric}"]} == expected
    assert data["dense"] == "g-dense" and data["separated"] is None

    failed = {f["run_dir"]: f for f in data["failed"]}
    assert sorted(failed) == sorted(f"b{i}" for i in range(len(bads)))
    md = (root / "report.md").read_text()
    md_failed = md.split("## Failed jobs")[1]
    for i, bad in enumerate(bads):
        f = failed[f"b{i}"]
        if bad.file == ".hydra/overrides.yaml":  # a failed job with its own error, and a note on the file
            assert f["error"] == "RuntimeError" and f["overrides"] == [], (bad.kind, f)
        else:
            assert f["error"] == f"unreadable {bad.file}", (bad.kind, f)
            # one line per unreadable job in the command's output: the job, the file, what is wrong
            line = f"unreadable: b{i}: {bad.file}: {f['message']}"
            assert out.splitlines().count(line) == 1, (line, out)
        assert bad.says in f["message"], (bad.kind, f["message"])
        assert "\n" not in f["message"] and len(f["message"]) < 300, f["message"]
        assert f"| b{i} |" in md_failed
    n_unreadable = sum(b.file != ".hydra/overrides.yaml" for b in bads)
    assert f"4 points, {len(bads)} failed jobs ({n_unreadable} unreadable)" in out.splitlines()[0]
    assert (root / "pareto.png").read_bytes().startswith(b"\x89PNG")


def test_every_wrong_field_is_named(tmp_path, capsys):
    """Every entry of WRONG_VALUES and every required field left out, once each, in one sweep."""
    bads = []
    for path, value, shown, expected in WRONG_VALUES:
        r = copy.deepcopy(GOOD["g-csp03"])
        _set(r, path, value)
        bads.append(Bad(path, dump(r), says=f"{path} is {shown}, expected {expected}"))
    for path in REQUIRED:
        r = copy.deepcopy(GOOD["g-csp03"])
        _delete(r, path)
        bads.append(Bad(path, dump(r), says=f"{path} is missing"))
    root = sweep_with(tmp_path, bads)
    assert aggregate.main([str(root), "--no-plot"]) == 0
    failed = {f["run_dir"]: f for f in json.loads((root / "pareto.json").read_text())["failed"]}
    assert len(failed) == len(bads)
    for i, bad in enumerate(bads):
        assert failed[f"b{i}"]["error"] == "unreadable results.json"
        assert failed[f"b{i}"]["message"] == bad.says  # the first wrong field, and nothing else
    assert len(json.loads((root / "pareto.json").read_text())["points"]) == 4


def test_a_finished_job_with_a_malformed_overrides_file_is_still_a_point(tmp_path):
    # a finished job's point comes from its results.json alone, which holds its whole config
    root = tmp_path / "s"
    job(root, "0", results_text=dump(GOOD["g-csp01"]), overrides_text="prune: [unclosed\n")
    report = collect_dirs([root])
    assert [p.run_dir for p in report.points] == [str(root / "0")] and not report.failed


def test_older_files_without_optional_fields_are_points(tmp_path):
    # fields a results.json of an older cspexp may lack are unknown, not errors
    r = copy.deepcopy(GOOD["g-csp01"])
    for key in ("schema", "model", "dataset", "n_samples", "sample_set", "config_hash", "method"):
        del r[key]
    del r["flops"]["image_dense"], r["flops"]["reduction_image"], r["prune"]["keep"]
    root = tmp_path / "s"
    job(root, "0", results_text=dump(r))
    (point,) = collect_dirs([root]).points
    assert (point.method, point.keep, point.model, point.dataset, point.n_samples) == ("csp", None, None, None, None)
    # a run that evaluated no sample: flops are null, it is a point that is on no frontier
    r = copy.deepcopy(GOOD["g-csp01"])
    r["flops"] = {"unit": "FLOPs", "image": None, "image_dense": None, "reduction_image": None}
    job(root, "1", results_text=dump(r))
    report = collect_dirs([root], base=root)
    empty = next(p for p in report.points if p.run_dir == "1")
    assert empty.flops_image is None and not empty.frontier_giou and not report.failed


def test_a_sweep_of_only_unreadable_jobs_still_gets_a_report(tmp_path, capsys):
    root = tmp_path / "s"
    job(root, "0", results_text="[]")
    job(root, "1", error_text="null")
    assert aggregate.main([str(root)]) == 0
    data = json.loads((root / "pareto.json").read_text())
    assert data["points"] == [] and [f["error"] for f in data["failed"]] == ["unreadable results.json",
                                                                            "unreadable error.json"]
    assert not (root / "pareto.png").exists()  # no point, no plot
    assert "0 points, 2 failed jobs (2 unreadable)" in capsys.readouterr().out


def test_the_multirun_callback_lists_unreadable_jobs_as_failed(tmp_path):
    from omegaconf import OmegaConf

    from cspexp.report.callback import ParetoCallback
    from cspexp.utils import failures

    root = sweep_with(tmp_path, [Bad("list", "[1, 2]")])
    cfg = OmegaConf.create({"task_name": "eval", "hydra": {"sweep": {"dir": str(root)}}, "logger": None})
    ParetoCallback(plot=False).on_multirun_end(cfg)
    outcome = failures._last_sweep
    assert outcome.error is None
    assert outcome.failed == ["job b0 (a=1): unreadable results.json: expected a JSON object, got a list"]
    assert len(json.loads((root / "pareto.json").read_text())["points"]) == 4


def test_a_malformed_wandb_summary_is_an_unreadable_run(tmp_path):
    good = summary_of(GOOD["g-csp01"])
    runs = [SimpleNamespace(id="r0", name="r0", url="u0", state="finished", summary=good, config={}),
            SimpleNamespace(id="r1", name="r1", url="u1", state="finished", summary={**good, "ciou": "high"},
                            config={"prune.keep": 0.1}),
            SimpleNamespace(id="r2", name="r2", url="u2", state="finished", summary={**good, "flops_image": NAN},
                            config={"prune": "csp"})]
    api = SimpleNamespace(sweep=lambda path: SimpleNamespace(runs=runs))
    assert aggregate.main(["--wandb", "e/p/s", "--out", str(tmp_path / "o"), "--no-plot"], api=api) == 0
    data = json.loads((tmp_path / "o" / "pareto.json").read_text())
    assert [p["run_dir"] for p in data["points"]] == ["u0"]
    failed = {f["run_dir"]: f for f in data["failed"]}
    assert failed["u1"]["error"] == "unreadable W&B summary" and failed["u1"]["overrides"] == ["prune.keep=0.1"]
    assert failed["u1"]["message"] == "metrics.ciou is 'high' (a string), expected a number in [0, 1]"
    assert failed["u2"]["message"] == "flops.image is NaN, expected a number ≥ 0 or null"


# --------------------------------------------------------------------------- groups
@pytest.fixture
def mixed(tmp_path):
    """Runs of two models, two datasets, two sample counts and two sample sets of the same data."""
    root = tmp_path / "mixed"
    jobs = {
        # A: tiny_random, shapes val, 4 samples, sample set sA
        "a-dense": results("none", 1.0, 100.0, 0.60, 0.60, samples="sA"),
        "a-csp": results("csp", 0.1, 30.0, 0.50, 0.52, samples="sA"),
        # B: the same model on reasonseg test: its dense is beaten on gIoU by its own csp, but its csp
        # would be beaten by A's (30, .50) if both were on one frontier
        "b-dense": results("none", 1.0, 200.0, 0.30, 0.40, dataset="reasonseg", split="test", samples="sB"),
        "b-csp": results("csp", 0.1, 60.0, 0.35, 0.20, dataset="reasonseg", split="test", samples="sB"),
        # C: another model on A's samples
        "c-dense": results("none", 1.0, 100.0, 0.70, 0.70, model="tiny_lisa", samples="sA"),
        "c-fastv": results("fastv", 0.3, 50.0, 0.65, 0.60, model="tiny_lisa", samples="sA"),
        # D: 8 samples, no dense run
        "d-csp": results("csp", 0.1, 30.0, 0.45, 0.45, n=8, samples="sD"),
        # E: A's model, dataset, split and count, other samples (e.g. another dataset.seed)
        "e-dense": results("none", 1.0, 100.0, 0.20, 0.20, samples="sE"),
    }
    for name, r in jobs.items():
        job(root, name, results_text=dump(r))
    return root


def test_runs_of_different_models_datasets_and_samples_get_separate_frontiers(mixed, capsys):
    assert aggregate.main([str(mixed)]) == 0
    out = capsys.readouterr().out.splitlines()
    data = json.loads((mixed / "pareto.json").read_text())
    groups = {tuple(g["points"]): g for g in data["groups"]}
    # groups sorted by model, dataset, split, count, sample set
    assert [g["points"] for g in data["groups"]] == [["c-dense", "c-fastv"], ["b-dense", "b-csp"],
                                                     ["a-dense", "a-csp"], ["e-dense"], ["d-csp"]]
    # the dense reference of each group is its own
    assert [g["dense"] for g in data["groups"]] == ["c-dense", "b-dense", "a-dense", "e-dense", None]
    assert data["dense"] is None  # no single reference for all of them
    # frontiers per group, by hand
    assert groups[("b-dense", "b-csp")]["frontier"] == {"giou": ["b-csp"], "ciou": ["b-csp", "b-dense"]}
    assert groups[("a-dense", "a-csp")]["frontier"] == {"giou": ["a-csp", "a-dense"], "ciou": ["a-csp", "a-dense"]}
    assert groups[("c-dense", "c-fastv")]["frontier"]["giou"] == ["c-fastv", "c-dense"]
    assert groups[("d-csp",)]["frontier"]["giou"] == ["d-csp"]
    assert groups[("e-dense",)]["frontier"]["giou"] == ["e-dense"]
    by_dir = {p["run_dir"]: p for p in data["points"]}
    assert by_dir["b-csp"]["frontier_giou"] and not by_dir["b-dense"]["frontier_giou"]
    assert by_dir["e-dense"]["frontier_giou"]  # on one frontier with A, (100, .20) would be beaten by a-dense
    assert by_dir["a-csp"]["group"] == "tiny_random · shapes val · 4 samples · sample set sA"
    assert by_dir["e-dense"]["group"] == "tiny_random · shapes val · 4 samples · sample set sE"
    assert by_dir["b-csp"]["group"] == "tiny_random · reasonseg test · 4 samples"
    assert by_dir["b-csp"]["variant"] == "tiny_random · reasonseg test · 4 samples: csp"
    # the reason, once in the report and once in the command's output
    reason = data["separated"]
    for said in ("5 groups", "model (tiny_lisa, tiny_random)", "dataset (reasonseg, shapes)", "split (test, val)",
                 "sample count (4, 8)", "shapes val with 4 samples has sample_set sA, sE"):
        assert said in reason, said
    assert out[1] == reason
    md = (mixed / "report.md").read_text()
    assert f"**Separate frontiers.** {reason}" in md
    assert md.count("**Dense reference**") == 4 and md.count("**No dense reference**") == 1
    assert "repeat it" not in md  # no other group's dense run is called a repeat
    assert "## Group 2: tiny_random · reasonseg test · 4 samples" in md
    group2 = md.split("## Group 2")[1].split("## Group 3")[0]
    assert "run `b-dense`" in group2 and "#### csp" in group2 and "| csp | 0.1 |" in group2
    csv_rows = (mixed / "pareto.csv").read_text().splitlines()
    assert csv_rows[0].endswith(",dataset,split,sample_set,group") and len(csv_rows) == 9
    assert (mixed / "pareto.png").read_bytes().startswith(b"\x89PNG")


def test_one_group_has_no_separation_line(tmp_path, capsys):
    root = tmp_path / "s"
    for name, r in GOOD.items():
        job(root, name, results_text=dump(r))
    assert aggregate.main([str(root)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    md = (root / "report.md").read_text()
    assert "Separate frontiers" not in md and "## Group" not in md


def test_wandb_runs_are_grouped_by_dataset_from_summary_or_config(tmp_path, capsys):
    def summary(method, flops, giou, dataset=None):
        s = {"method": method, "keep": 0.1, "flops_image": flops, "giou": giou, "ciou": giou, "n_samples": 4,
             "model": "m"}
        return {**s, "dataset_name": dataset, "dataset_split": "val"} if dataset else s

    runs = [
        SimpleNamespace(id="r0", name="r0", url="u0", state="finished", summary=summary("none", 100.0, 0.6, "shapes"),
                        config={}),
        SimpleNamespace(id="r1", name="r1", url="u1", state="finished", summary=summary("csp", 30.0, 0.5, "shapes"),
                        config={}),
        # an older run: no dataset in its summary, taken from its config
        SimpleNamespace(id="r2", name="r2", url="u2", state="finished", summary=summary("none", 100.0, 0.3),
                        config={"dataset": {"name": "reasonseg", "split": "val"}}),
    ]
    api = SimpleNamespace(sweep=lambda path: SimpleNamespace(runs=runs))
    assert aggregate.main(["--wandb", "e/p/s", "--out", str(tmp_path / "o"), "--no-plot"], api=api) == 0
    data = json.loads((tmp_path / "o" / "pareto.json").read_text())
    assert [(g["dataset"], g["dense"]) for g in data["groups"]] == [("reasonseg", "u2"), ("shapes", "u0")]
    assert "dataset (reasonseg, shapes)" in data["separated"]


def test_sample_set_names_the_evaluated_samples():
    cfg = {"_target_": "x.Shapes", "name": "shapes", "split": "val", "seed": 0, "n": 4, "batch_size": 8,
           "num_workers": 0}
    ref = sample_set(cfg, [0, 1, 2, 3])
    assert len(ref) == 16 and int(ref, 16) >= 0
    # loader settings and n (its effect is the idx list) do not change it; the order of idx does not
    assert sample_set({**cfg, "batch_size": 1, "num_workers": 4, "n": None, "on_error": "skip"}, [3, 1, 0, 2]) == ref
    assert set(SAMPLE_SET_IGNORED) >= {"batch_size", "num_workers", "n", "on_error"}
    # other samples, another seed, another split, another root: another sample set
    others = [sample_set(cfg, [0, 1, 2]), sample_set(cfg, [0, 1, 2, 4]), sample_set({**cfg, "seed": 1}, [0, 1, 2, 3]),
              sample_set({**cfg, "split": "test"}, [0, 1, 2, 3]), sample_set({**cfg, "root": "/d"}, [0, 1, 2, 3])]
    assert len({ref, *others}) == 6
    # it is in the W&B summary, and read back
    r = results("csp", 0.1, 30.0, 0.5, 0.5, samples=ref)
    assert results_from_summary(summary_of(r))["sample_set"] == ref
    assert results_from_summary(summary_of(r))["dataset"] == {"name": "shapes", "split": "val"}


# --------------------------------------------------------------------------- an --out that cannot be written
def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_an_out_under_a_file_is_one_error_line(tmp_path, capsys):
    root = sweep_with(tmp_path, [])
    (tmp_path / "afile").write_text("not a directory")
    out = tmp_path / "afile" / "out"
    assert aggregate.main([str(root), "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(out) in line and "cannot write the report" in line
    assert (tmp_path / "afile").read_text() == "not a directory"


def test_an_out_that_is_a_file_is_one_error_line(tmp_path, capsys):
    root = sweep_with(tmp_path, [])
    (tmp_path / "f").write_text("x")
    assert aggregate.main([str(root), "--out", str(tmp_path / "f")]) == 2
    assert str(tmp_path / "f") in _one_error_line(capsys.readouterr().err)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="runs as root, for whom a 0o500 directory is still writable")
def test_a_read_only_out_is_one_error_line(tmp_path, capsys):
    root = sweep_with(tmp_path, [])
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert aggregate.main([str(root), "--out", str(ro)]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert str(ro) in line and "Permission denied" in line
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_a_failed_write_leaves_the_old_report_whole(tmp_path, capsys, monkeypatch):
    """Disk full at the third file: no new file, no temporary file, the old report as it was."""
    import tempfile

    from cspexp.report import write

    root = sweep_with(tmp_path, [])
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("OLD")
    real, calls = tempfile.mkstemp, []

    def mkstemp(*args, **kwargs):
        calls.append(kwargs.get("prefix"))
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(write.tempfile, "mkstemp", mkstemp)
    assert aggregate.main([str(root), "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(out) in line and os.strerror(errno.ENOSPC) in line
    assert sorted(p.name for p in out.iterdir()) == ["report.md"] and (out / "report.md").read_text() == "OLD"


def test_the_callback_reports_an_unwritable_sweep_dir_in_one_line(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from cspexp.report import write
    from cspexp.report.callback import ParetoCallback
    from cspexp.utils import failures

    root = sweep_with(tmp_path, [])

    def mkstemp(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(write.tempfile, "mkstemp", mkstemp)
    cfg = OmegaConf.create({"task_name": "eval", "hydra": {"sweep": {"dir": str(root)}}, "logger": None})
    ParetoCallback(plot=False).on_multirun_end(cfg)
    assert failures._last_sweep.error == f"cannot write the report into {root}: {os.strerror(errno.EACCES)}"
    assert not (root / "pareto.json").exists()
