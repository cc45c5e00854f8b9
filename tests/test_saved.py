"""cspexp's model directory: round trip, strict keys, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from cspexp.models.loaders import build_model
from cspexp.models.saved import load_saved, save_model
from cspexp.pruning.methods import NoPruning
from cspexp.pruning.pipeline import segment
from cspexp.utils.errors import ConfigError, MissingPathError
from cspexp.utils.instantiate import build

from conftest import CONF_DIR


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    loaded = build_model(OmegaConf.load(CONF_DIR / "model" / "tiny_random.yaml"), ["the red triangle"])
    path = save_model(loaded, tmp_path_factory.mktemp("model"))
    return loaded, path


def batch_for(loaded):
    rng = np.random.default_rng(0)
    items = [{"idx": 0, "image": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),
              "mask": np.zeros((224, 224), np.uint8), "query": "the red triangle", "is_sentence": False}]
    return loaded.processor.collate(items)


def test_round_trip_gives_the_same_masks(saved):
    original, path = saved
    reloaded = load_saved(path=str(path))
    assert reloaded.name == original.name
    batch = batch_for(original)
    with torch.no_grad():
        a = segment(original.model, batch, NoPruning().bind(original.model.num_layers, original.model.n_image_tokens))
        b = segment(reloaded.model, batch, NoPruning().bind(reloaded.model.num_layers, reloaded.model.n_image_tokens))
    assert torch.allclose(a.logits[0], b.logits[0], atol=1e-5)
    assert original.processor.encode_prompt("the red triangle", False) == reloaded.processor.encode_prompt(
        "the red triangle", False
    )


def test_round_trip_keeps_the_image_token_options(tmp_path):
    """A from-scratch model's image-token options (grid code, RMS scaling) are part of the
    architecture: the reloaded model gives the same image tokens, so the same masks."""
    cfg = OmegaConf.load(CONF_DIR / "model" / "tiny_random.yaml")
    cfg.image_position, cfg.image_norm = "sincos", "rms"
    original = build_model(cfg, ["the red triangle"])
    reloaded = load_saved(path=str(save_model(original, tmp_path / "m")))
    assert (reloaded.model.image_position, reloaded.model.image_norm) == ("sincos", "rms")
    batch = batch_for(original)
    with torch.no_grad():
        a = segment(original.model, batch, NoPruning().bind(original.model.num_layers, original.model.n_image_tokens))
        b = segment(reloaded.model, batch, NoPruning().bind(reloaded.model.num_layers, reloaded.model.n_image_tokens))
    assert torch.allclose(a.logits[0], b.logits[0], atol=1e-5)


def _copy(path, tmp_path, edit):
    dst = tmp_path / "edited"
    dst.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (dst / f).write_bytes((path / f).read_bytes())
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_missing_key_is_named(saved, tmp_path):
    _, path = saved
    dst = _copy(path, tmp_path, lambda s: s.pop("mm_projector.bias"))
    with pytest.raises(ConfigError, match=r"missing keys \['mm_projector.bias'\]"):
        load_saved(path=str(dst))


def test_unexpected_key_is_named(saved, tmp_path):
    _, path = saved
    dst = _copy(path, tmp_path, lambda s: s.__setitem__("stray.weight", torch.zeros(1)))
    with pytest.raises(ConfigError, match=r"unexpected keys \['stray.weight'\]"):
        load_saved(path=str(dst))


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(MissingPathError, match="does not exist"):
        load_saved(path=str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps({"format": "cspexp-lisa"}))
    with pytest.raises(MissingPathError, match="lacks model.safetensors, tokenizer.json"):
        load_saved(path=str(tmp_path))
