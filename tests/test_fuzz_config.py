"""Bad config values, generated: every key of every primary config (eval, train, bench, prompt,
predict, demo) gets values of the wrong type, and a seeded sample gets typos, out-of-range numbers
and bad sweep values. Each must end in one error line that names the key (or be a value the key
accepts), before anything is built. In-process through the pre-flight check, so the suite is fast; a
few go through the CLI.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from conftest import CONF_DIR

from cspexp.utils.errors import ConfigError
from cspexp.utils.preflight import check_composed, preflight

PRIMARY = ("eval", "train", "bench", "prompt", "predict", "demo")
SEED = 20261130
# Keys whose own declaration accepts a string (so "abc" is a value they take): Lightning's
# `val_check_interval` (int, float, str or timedelta) and free-text names.
TAKES_STRINGS = {"trainer.val_check_interval"}


def composed(name: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=name)
    GlobalHydra.instance().clear()
    return cfg


def leaves(node: DictConfig, prefix: str = ""):
    """(dotted key, value) of every leaf a user may set (Hydra's and the paths' own left out)."""
    for key in node.keys():
        key = str(key)
        path = f"{prefix}.{key}" if prefix else key
        if key.startswith("_") or path.split(".")[0] in ("hydra", "paths"):
            continue
        if "." in key:  # a label such as bench's `csp_k0.3`: no dotted override can address what is below it
            continue
        try:
            value = node[key]
        except Exception:  # ??? or an interpolation needing the running app
            continue
        if isinstance(value, DictConfig):
            yield from leaves(value, path)
        else:
            yield path, value


def wrong_types(value, rng: random.Random) -> list:
    """Values of another type than `value`'s (as the command line would give them)."""
    if isinstance(value, bool):
        return [rng.choice(["maybe", "yes please", 3])]
    if isinstance(value, int):
        return [rng.choice(["abc", "1e", "ten"]), rng.choice([2.5, 0.1, 1e-3])]
    if isinstance(value, float):
        return [rng.choice(["abc", "1.0.0", "half"])]
    return []


def expect_refused(cfg: DictConfig, name: str, key: str, value) -> str:
    """The one-line error of `key=value` on `cfg`, or fail."""
    changed = cfg.copy()
    OmegaConf.update(changed, key, value, force_add=True)
    with pytest.raises(ConfigError) as err:
        check_composed(changed, name)
    message = str(err.value)
    assert "\n" not in message and key in message, message
    return message


@pytest.mark.parametrize("name", PRIMARY)
def test_every_key_refuses_values_of_another_type(name):
    cfg = composed(name)
    rng = random.Random(f"{SEED}-{name}")
    checked = 0
    for key, value in leaves(cfg):
        if key in TAKES_STRINGS:
            continue
        for bad in wrong_types(value, rng):
            expect_refused(cfg, name, key, bad)
            checked += 1
    assert checked > {"eval": 15, "train": 40, "bench": 10, "prompt": 30, "predict": 10, "demo": 10}[name]  # the walk saw the config


@pytest.mark.parametrize("name", PRIMARY)
def test_numbers_out_of_range_are_refused_or_valid_with_one_line(name):
    """Negative and huge numbers: a key with a range refuses them in one line naming it; a key without
    one (a seed, a layer index some methods take from the end) accepts them at composition."""
    cfg = composed(name)
    rng = random.Random(f"{SEED}-{name}-range")
    refused = 0
    for key, value in leaves(cfg):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        for bad in (-rng.randint(1, 10**6), rng.choice([10**12, 1e30])):
            changed = cfg.copy()
            OmegaConf.update(changed, key, bad)
            try:
                check_composed(changed, name)
            except ConfigError as exc:
                assert "\n" not in str(exc) and key in str(exc), str(exc)
                refused += 1
    assert refused >= 5


def test_known_ranges_are_enforced():
    cfg = composed("eval")
    for key, bad, words in [
        ("dataset.num_workers", -1, "must be >= 0"),
        ("dataset.batch_size", 0, "must be >= 1"),
        ("prune.keep", 0.0, "is outside (0, 1]"),
        ("prune.keep", 1.5, "is outside (0, 1]"),
        ("objective.target_reduction", 2.0, "is outside [0, 1]"),
        ("viz.n_samples", -3, "must be >= 0"),
        ("latency.warmup", -1, "must be >= 0"),
    ]:
        assert words in expect_refused(cfg, "eval", key, bad)


def run_preflight(name: str, argv: list[str], capsys) -> tuple[int | None, str]:
    try:
        preflight(CONF_DIR, name, argv)
    except SystemExit as exc:
        return exc.code, capsys.readouterr().err
    return None, capsys.readouterr().err


def typo(key: str, rng: random.Random) -> str:
    """The key with one letter of its last part dropped, doubled or swapped with its neighbour."""
    *parents, leaf = key.split(".")
    i = rng.randrange(len(leaf))
    kind = rng.choice(["drop", "double", "swap"]) if len(leaf) > 2 else "double"
    if kind == "drop":
        leaf = leaf[:i] + leaf[i + 1:]
    elif kind == "double":
        leaf = leaf[:i] + leaf[i] + leaf[i:]
    else:
        i = min(i, len(leaf) - 2)
        leaf = leaf[:i] + leaf[i + 1] + leaf[i] + leaf[i + 2:]
    return ".".join([*parents, leaf])


@pytest.mark.parametrize("name", PRIMARY)
def test_typos_name_the_mistyped_key(name, capsys):
    cfg = composed(name)
    rng = random.Random(f"{SEED}-{name}-typo")
    keys = [k for k, _ in leaves(cfg)]
    for key in rng.sample(keys, min(6, len(keys))):
        wrong = typo(key, rng)
        if OmegaConf.select(cfg, wrong) is not None or wrong == key:
            continue  # the typo is another real key
        # beside a mandatory key still at ??? (the case that used to blame the wrong key)
        extra = ["model=converted", "model.path=/nonexistent"] if name == "eval" else []
        code, err = run_preflight(name, [*extra, f"{wrong}=1"], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert f"unknown config key '{wrong}'" in lines[0], lines[0]


@pytest.mark.parametrize("argv,key", [
    (["-m", "prune.keep=0.3,0.5,1.5"], "prune.keep"),
    (["-m", "prune=none,csp", "dataset.n=4,abc"], "dataset.n"),
    (["-m", "prune=none,fastv", "prune.query=seg,bogus"], None),  # `none` has no query: the first value fails
    (["-m", "compare_dense=true,maybe"], "compare_dense"),
    (["-m", "dataset.batch_size=range(-1,3)"], "dataset.batch_size"),
])
def test_every_sweep_value_is_checked(argv, key, capsys):
    code, err = run_preflight("eval", argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    if key:
        assert key in lines[0]


def test_a_valid_sweep_passes(capsys):
    code, err = run_preflight("eval", ["-m", "prune=none,csp,fastv", "prune.keep=0.1,0.3", "dataset.n=4,8"], capsys)
    assert code is None and err == ""


@pytest.mark.parametrize("args,words", [
    (["dataset.n=abc"], "dataset.n='abc'"),
    (["dataset.n=2.5"], "dataset.n=2.5"),
    (["compare_dense=maybe"], "compare_dense='maybe'"),
    (["trainer=gpu"], "trainer.accelerator=gpu"),
])
def test_cli_sample_one_line_no_run_dir(tmp_path, args, words):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "cspexp", "model=tiny_random", "logger=none", *args,
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=300,
                          env={"WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr
    assert not run_dir.exists()
