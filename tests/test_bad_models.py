"""Broken model directories give one line naming the file, the first offending key and its shapes.

`model=converted` (a cspexp model directory) and `model=lisa` (an original LISA checkpoint), each with
weights of the wrong size or a malformed config.json. The model's shape is read from config.json
before any weight (`cspexp.models.loaders.model_shape`), so a malformed config fails there already,
with the same line as the load. The expectations (which key, which shapes) are written from the
edits the tests make, not from the loader.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import cspexp.models.saved as saved_module
from cspexp.models.lisa_checkpoint import load_lisa
from cspexp.models.loaders import build_model, model_shape
from cspexp.models.saved import load_saved, save_model
from cspexp.utils.errors import ConfigError

from conftest import CONF_DIR
from lisa_fixtures import write_tiny_lisa

SAVED = "cspexp.models.saved.load_saved"
LISA = "cspexp.models.lisa_checkpoint.load_lisa"


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    """A tiny cspexp model directory (tiny_random: 2 LLaMA layers of width 64, CLIP width 32)."""
    loaded = build_model(OmegaConf.load(CONF_DIR / "model" / "tiny_random.yaml"), ["the red triangle"])
    return save_model(loaded, tmp_path_factory.mktemp("good") / "model")


def copy_dir(src, dst, *, config=None, state_edit=None):
    shutil.copytree(src, dst)
    if config is not None:
        (dst / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if state_edit is not None:
        state = load_file(str(dst / "model.safetensors"))
        state_edit(state)
        save_file(state, str(dst / "model.safetensors"))
    return dst


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


# --------------------------------------------------------------------------- converted: weights
def test_a_weight_of_the_wrong_size_names_file_key_and_both_shapes(good_dir, tmp_path):
    stored = load_file(str(good_dir / "model.safetensors"))["mm_projector.weight"]
    rows, cols = stored.shape
    bad = copy_dir(good_dir, tmp_path / "bad",
                   state_edit=lambda s: s.__setitem__("mm_projector.weight", torch.zeros(rows, cols + 1)))
    with pytest.raises(ConfigError) as err:
        load_saved(path=str(bad))
    text = one_line(err.value)
    assert text.startswith(f"{bad / 'model.safetensors'}: weight 'mm_projector.weight' has the wrong shape")
    assert f"expected [{rows}, {cols}]" in text and f"found [{rows}, {cols + 1}]" in text


def test_the_shapes_are_checked_from_the_header_before_any_tensor_is_read(good_dir, tmp_path, monkeypatch):
    bad = copy_dir(good_dir, tmp_path / "bad", state_edit=lambda s: s.__setitem__(
        "text_hidden_fcs.0.0.weight", torch.zeros(3, 3)))

    def no_read(*args, **kwargs):
        raise AssertionError("the tensors were read before the shapes were checked")

    monkeypatch.setattr(saved_module, "load_file", no_read)
    with pytest.raises(ConfigError, match=r"weight 'text_hidden_fcs.0.0.weight' has the wrong shape: .* found \[3, 3\]"):
        load_saved(path=str(bad))


def test_the_first_of_several_wrong_weights_is_named_with_a_count(good_dir, tmp_path):
    """Halving the LLM's width in config.json changes every LLM weight; the first in the model's own
    order (the vision tower comes first, then the projector) is the projector's."""
    config = json.loads((good_dir / "config.json").read_text())
    width = config["llm_config"]["hidden_size"]
    config["llm_config"]["hidden_size"] = width // 2
    bad = copy_dir(good_dir, tmp_path / "bad", config=config)
    with pytest.raises(ConfigError) as err:
        load_saved(path=str(bad))
    text = one_line(err.value)
    vision_width = config["vision_config"]["hidden_size"]
    assert f"weight 'mm_projector.weight' has the wrong shape: expected [{width // 2}, {vision_width}]" in text
    assert f"found [{width}, {vision_width}]" in text
    assert "weights differ" in text


def test_an_unreadable_weight_file_is_one_line(good_dir, tmp_path):
    bad = copy_dir(good_dir, tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError) as err:
        load_saved(path=str(bad))
    assert one_line(err.value).startswith(f"cannot read {bad / 'model.safetensors'}: ")


# --------------------------------------------------------------------------- converted: config.json
def _drop(*path):
    def edit(c):
        node = c
        for p in path[:-1]:
            node = node[p]
        del node[path[-1]]
    return edit


def _set(value, *path):
    def edit(c):
        node = c
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop("llm_config"), "llm_config is missing; it must be an object"),
        (_drop("vision_config"), "vision_config is missing; it must be an object"),
        (_drop("sam_config"), "sam_config is missing; it must be an object"),
        (_set([1, 2], "llm_config"), "llm_config is [1, 2] (list); it must be an object"),
        (_set("big", "vision_config", "image_size"), "vision_config.image_size is 'big' (str); it must be a positive int"),
        (_set(2.5, "llm_config", "num_hidden_layers"), "llm_config.num_hidden_layers is 2.5 (float); it must be a positive int"),
        (_set(True, "llm_config", "num_hidden_layers"), "llm_config.num_hidden_layers is True (bool); it must be a positive int"),
        (_set(0, "vision_config", "patch_size"), "vision_config.patch_size is 0 (int); it must be a positive int"),
        (_drop("sam_config", "vision_config"), "sam_config.vision_config is missing"),
        (_set(None, "vision_select_layer"), "vision_select_layer is None (NoneType); it must be an int"),
    ],
)
def test_a_malformed_config_fails_when_the_shape_is_read_and_when_loading(good_dir, tmp_path, edit, message):
    config = json.loads((good_dir / "config.json").read_text())
    edit(config)
    bad = copy_dir(good_dir, tmp_path / "bad", config=config)
    expected = f"{bad / 'config.json'}: {message}"
    with pytest.raises(ConfigError) as err:
        model_shape({"_target_": SAVED, "path": str(bad)})
    assert one_line(err.value).startswith(expected)
    with pytest.raises(ConfigError) as err2:
        load_saved(path=str(bad))
    assert str(err2.value) == str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not valid JSON: "),
        ("[1, 2]", "is not a cspexp model config"),
        ('{"format": "other"}', "is not a cspexp model config (format 'other', expected 'cspexp-lisa')"),
    ],
)
def test_a_config_that_is_not_a_model_config_is_one_line(good_dir, tmp_path, text, message):
    bad = copy_dir(good_dir, tmp_path / "bad", config=text)
    with pytest.raises(ConfigError) as err:
        model_shape({"_target_": SAVED, "path": str(bad)})
    assert one_line(err.value).startswith(f"{bad / 'config.json'} {message}")


def test_values_transformers_refuses_are_one_line_naming_the_file(good_dir, tmp_path):
    """12 heads do not divide the LLM width of 64: transformers' validation error, as one line."""
    config = json.loads((good_dir / "config.json").read_text())
    assert config["llm_config"]["hidden_size"] % 12 != 0
    config["llm_config"]["num_attention_heads"] = 12
    bad = copy_dir(good_dir, tmp_path / "bad", config=config)
    with pytest.raises(ConfigError) as err:
        load_saved(path=str(bad))
    text = one_line(err.value)
    assert text.startswith(f"{bad / 'config.json'} describes a model that cannot be built: ")
    assert "12" in text


# --------------------------------------------------------------------------- LISA checkpoints
@pytest.fixture(scope="module")
def lisa_up_proj_shape(tmp_path_factory):
    tiny = write_tiny_lisa(tmp_path_factory.mktemp("ref"))
    return tuple(tiny.state["model.layers.1.mlp.up_proj.weight"].shape)


def test_a_lisa_weight_of_the_wrong_size_names_its_shard_key_and_shapes(tmp_path, lisa_up_proj_shape):
    rows, cols = lisa_up_proj_shape
    key = "model.layers.1.mlp.up_proj.weight"
    tiny = write_tiny_lisa(tmp_path, layout="bin_sharded", edit=lambda s: s.__setitem__(key, torch.zeros(rows + 1, cols)))
    index = json.loads((tiny.path / "pytorch_model.bin.index.json").read_text())
    shard = tiny.path / index["weight_map"][key]
    with pytest.raises(ConfigError) as err:
        load_lisa(path=str(tiny.path), vision_tower=str(tiny.clip_path), dtype="float32", progress=False)
    text = one_line(err.value)
    assert text.startswith(f"{shard}: weight '{key}' has the wrong shape: expected [{rows}, {cols}]")
    assert f"found [{rows + 1}, {cols}]" in text


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop("num_hidden_layers"), "lacks the LLaMA dimension(s) num_hidden_layers"),
        (_set("32", "hidden_size"), "hidden_size is '32' (str); it must be a positive int"),
        (_set(True, "num_hidden_layers"), "num_hidden_layers is True (bool); it must be a positive int"),
        (_set("1e-6", "rms_norm_eps"), "rms_norm_eps is '1e-6' (str); it must be a number"),
        (_set(5, "num_attention_heads"), "describes a LLaMA that cannot be built: "),
    ],
)
def test_a_malformed_lisa_config_fails_when_the_shape_is_read(tmp_path, edit, message):
    tiny = write_tiny_lisa(tmp_path, layout="safetensors", config_edit=edit)
    cfg = {"_target_": LISA, "path": str(tiny.path), "vision_tower": str(tiny.clip_path)}
    with pytest.raises(ConfigError) as err:
        model_shape(cfg)
    text = one_line(err.value)
    assert str(tiny.path / "config.json") in text and message in text, text
    with pytest.raises(ConfigError) as err2:
        load_lisa(path=str(tiny.path), vision_tower=str(tiny.clip_path), dtype="float32", progress=False)
    assert str(err2.value) == text


def test_a_malformed_clip_config_is_one_line(tmp_path):
    tiny = write_tiny_lisa(tmp_path, layout="safetensors")
    config = json.loads((tiny.clip_path / "config.json").read_text())
    vision = config.get("vision_config", config)
    vision["patch_size"] = "fourteen"
    (tiny.clip_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as err:
        model_shape({"_target_": LISA, "path": str(tiny.path), "vision_tower": str(tiny.clip_path)})
    text = one_line(err.value)
    assert str(tiny.clip_path) in text and "patch_size" in text, text


# --------------------------------------------------------------------------- the CLI
@pytest.mark.slow
@pytest.mark.parametrize("case", ["shape", "config"])
def test_cli_a_broken_converted_directory_is_one_line_exit_2_and_no_results(good_dir, tmp_path, case):
    if case == "shape":
        bad = copy_dir(good_dir, tmp_path / "bad", state_edit=lambda s: s.__setitem__("mm_projector.bias", torch.zeros(7)))
        expected = f"error: {bad / 'model.safetensors'}: weight 'mm_projector.bias' has the wrong shape: expected ["
    else:
        config = json.loads((good_dir / "config.json").read_text())
        del config["llm_config"]
        bad = copy_dir(good_dir, tmp_path / "bad", config=config)
        expected = f"error: {bad / 'config.json'}: llm_config is missing"
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "cspexp", "model=converted", f"model.path={bad}", "prune=none",
                           "dataset=shapes", "dataset.n=2", "logger=none", f"hydra.run.dir={run_dir}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
    if case == "shape":
        assert lines[0].endswith("found [7]; were config.json and the weights written together?"), lines[0]
    assert not (run_dir / "results.json").exists()
    assert json.loads((run_dir / "error.json").read_text())["user_error"] is True
