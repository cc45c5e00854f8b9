"""Allowed values declared as `Literal` annotations, checked by one validator (`cspexp.utils.choices`):
on hand-made signatures, on every shipped config, and at composition through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Literal, TypedDict

import pytest
from omegaconf import OmegaConf

from cspexp.utils.choices import check_call, check_config, literal_values
from cspexp.utils.errors import ConfigError

from conftest import CONF_DIR

Colour = Literal["red", "green"]


class Brush(TypedDict, total=False):
    colour: Colour
    width: int


def paint(colour: Colour = "red", shade: Colour | None = None, size: int | Literal["auto"] = "auto",
          layers: list[Colour] = (), brush: Brush | None = None, flag: Literal[1, 2] = 1, name: str = "x") -> None:
    """A signature with every form of Literal the validator reads."""


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"colour": "blue"}, "paint.colour='blue' is not allowed; use one of ['red', 'green']"),
        ({"shade": "blue"}, "paint.shade='blue' is not allowed; use one of ['red', 'green']"),
        ({"size": "big"}, "paint.size='big' is not allowed; use one of ['auto'] (or any int)"),
        ({"layers": ["red", "blue"]}, "paint.layers[1]='blue' is not allowed; use one of ['red', 'green']"),
        ({"brush": {"colour": "blue", "width": 3}}, "paint.brush.colour='blue' is not allowed; use one of ['red', 'green']"),
        ({"flag": True}, "paint.flag=True is not allowed; use one of [1, 2]"),  # True == 1, but not a Literal int
        ({"flag": 3}, "paint.flag=3 is not allowed; use one of [1, 2]"),
    ],
)
def test_a_value_outside_its_literal_is_one_line_naming_key_and_values(kwargs, message):
    with pytest.raises(ConfigError) as err:
        check_call(paint, kwargs, "paint")
    assert str(err.value) == message


def test_values_inside_their_literal_and_unannotated_values_pass():
    check_call(paint, {"colour": "green", "shade": None, "size": 12, "layers": ["green", "red"],
                       "brush": {"colour": "red", "width": 1, "unknown": "left to the target"}, "flag": 2,
                       "name": "anything", "not_a_parameter": "left to the target"}, "paint")
    assert literal_values(Colour | None) == ("red", "green") and literal_values(int) is None


def compose(config_name: str = "eval", *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "prune", "dataset", "trainer", "logger", "experiment"])
def test_every_shipped_option_passes(group):
    for option in options(group):
        check_config(compose("eval", f"{group}={option}"))
    for name in ("train", "bench", "prompt"):
        check_config(compose(name))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["prune=csp", "prune.cluster.select=bogus"],
         "prune.cluster.select='bogus' is not allowed; use one of ['uniform', 'random', 'cls_attn', 'seg_first']"),
        (["prune=fastv", "prune.query=bogus"],
         "prune.query='bogus' is not allowed; use one of ['seg', 'seg_token', 'last', 'text_mean']"),
        (["model=tiny_random", "model.seg_query=bogus"], "model.seg_query='bogus' is not allowed; use one of ['before', 'at']"),
        (["model=tiny_random", "model.attn_implementation=flash"],
         "model.attn_implementation='flash' is not allowed; use one of ['sdpa', 'eager']"),
        (["model=converted", "model.dtype=int8"],
         "model.dtype='int8' is not allowed; use one of ['float32', 'fp32', 'bfloat16', 'bf16', 'float16', 'fp16']"),
        (["dataset.split=bogus"], "dataset.split='bogus' is not allowed; use one of ['train', 'val', 'test']"),
        (["dataset=reasonseg", "dataset.query=medium"], "dataset.query='medium' is not allowed; use one of "
                                                        "['all', 'short', 'long']"),
    ],
)
def test_a_composed_config_is_checked_node_by_node(overrides, message):
    """Checked without building anything: no model, no data root (model=converted has no path yet)."""
    with pytest.raises(ConfigError) as err:
        check_config(compose("eval", *overrides))
    assert str(err.value) == message


def test_the_config_of_a_spec_and_the_spec_agree():
    """The validator reads the spec class's own annotations: what composition refuses, construction
    refuses with the same line."""
    from cspexp.utils.instantiate import build

    cfg = OmegaConf.merge(OmegaConf.load(CONF_DIR / "prune" / "csp.yaml"), {"scatter": {"mode": "mean"}})
    with pytest.raises(ConfigError) as composed:
        check_config(OmegaConf.create({"prune": cfg}))
    with pytest.raises(ConfigError) as built:
        build(cfg)
    assert str(composed.value) == str(built.value) == (
        "prune.scatter.mode='mean' is not allowed; use one of ['residual', 'copy', 'reset']")


def cspexp(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "cspexp", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["prune=csp", "prune.cluster.select=bogus"],
         "error: prune.cluster.select='bogus' is not allowed; use one of ['uniform', 'random', 'cls_attn', 'seg_first']"),
        (["model.seg_query=bogus"], "error: model.seg_query='bogus' is not allowed; use one of ['before', 'at']"),
        (["dataset.split=bogus"], "error: dataset.split='bogus' is not allowed; use one of ['train', 'val', 'test']"),
    ],
    ids=["prune", "model", "dataset"],
)
def test_the_cli_refuses_a_bad_literal_when_composing(tmp_path, args, expected):
    """One error line, status 2, and nothing written: the run never started."""
    run_dir = tmp_path / "run"
    proc = cspexp("model=tiny_random", "dataset.n=4", "logger=none", *args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines == [expected], proc.stderr
    assert not run_dir.exists()
