"""prune=norm against an independent reference: the L2 norms of layer K's input hidden states computed
here by transformers' `LlamaModel` (output_hidden_states) on the same spliced prompt, and the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from cspexp.data.shapes import ShapesDataset
from cspexp.models.lisa import IMAGE, PAD
from cspexp.pruning.methods import NormDrop
from cspexp.pruning.pipeline import segment
from cspexp.report.pictures import KeptRecorder
from cspexp.utils.errors import ConfigError
from cspexp.utils.instantiate import build

from conftest import CONF_DIR

L, N = 8, 256  # tiny_random: 8 decoder layers, a 16×16 grid of image tokens


@pytest.fixture(scope="module")
def tiny():
    ds = ShapesDataset(split="val", n=3)
    loaded = build(OmegaConf.load(CONF_DIR / "model" / "tiny_random.yaml"), words=ShapesDataset.vocabulary())
    return loaded, loaded.processor.collate([ds[i] for i in range(3)])


def reference_norms(loaded, batch, layer: int) -> list[dict[int, float]]:
    """Per sample {grid cell: ‖h‖₂} of the image tokens entering `layer`, from the dense model run by
    transformers' LlamaModel (hidden_states[k] is layer k's input) — not by the pruning engine."""
    model = loaded.model
    with torch.no_grad():
        image_tokens, _ = model.encode_image(batch["clip_pixels"])
        prompt = model.splice(batch["input_ids"], batch["attention_mask"], image_tokens)
        out = model.decoder(inputs_embeds=prompt.embeds, attention_mask=(prompt.kind != PAD).long(),
                            position_ids=prompt.pos, output_hidden_states=True)
    hidden = out.hidden_states[layer].float()
    norms = []
    for i in range(hidden.shape[0]):
        is_image = prompt.kind[i] == IMAGE
        cells, values = prompt.grid[i][is_image].tolist(), hidden[i][is_image].norm(dim=-1).tolist()
        assert sorted(cells) == list(range(N))
        norms.append(dict(zip(cells, values)))
    return norms


@pytest.mark.parametrize(("keep", "layer", "k"), [(0.3, 2, 2), (0.5, 0, 0), (0.1, 0.5, 4), (0.77, 7, 7)])
def test_keeps_the_largest_norms_of_layer_k_input(tiny, keep, layer, k):
    loaded, batch = tiny
    count = math.ceil(round(keep * N, 6))
    rec = KeptRecorder()
    with torch.no_grad():
        out = segment(loaded.model, batch, NormDrop(keep=keep, layer=layer).bind(L, N), observers=[rec])

    for i, norms in enumerate(reference_norms(loaded, batch, k)):
        # my own top-k: the largest norms, ties to the lower grid cell
        expected = sorted(sorted(norms, key=lambda c: (-norms[c], c))[:count])
        kept = rec.kept[k][i]
        dropped = sorted(set(range(N)) - set(kept))
        assert len(kept) == count
        # robust to last-bit differences between the engine and LlamaModel: nothing dropped beats a kept one
        assert min(norms[c] for c in kept) >= max(norms[c] for c in dropped) - 1e-5
        assert kept == expected
        # before K all tokens run; from K on the same kept set, never restored
        assert all(rec.kept[l][i] == list(range(N)) for l in range(k))
        assert all(rec.kept[l][i] == kept for l in range(k, L))

    # FLOPs fall: the trace counts ⌈keep·N⌉ image tokens entering every layer from K on
    trace = out.trace.image_per_layer
    assert trace[:, :k].eq(N).all() and trace[:, k:].eq(count).all()
    assert out.trace.overhead == []  # norms cost no extra attention row
    # the selection differs per sample (the norms do), the count does not
    assert len({tuple(rec.kept[k][i]) for i in range(3)}) > 1 or keep == 1.0


def test_keep_one_is_the_dense_pass(tiny):
    loaded, batch = tiny
    with torch.no_grad():
        out = segment(loaded.model, batch, NormDrop(keep=1.0).bind(L, N))
    assert out.trace.image_per_layer.eq(N).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep": 0}, "prune.keep=0 is outside (0, 1]"),
        ({"keep": 1.5}, "prune.keep=1.5 is outside (0, 1]"),
        ({"layer": L}, f"prune.layer={L} resolves to layer {L}"),
        ({"layer": 1.0}, "prune.layer=1.0 resolves to layer 8"),
        ({"layer": 12}, "prune.layer=12 is outside the model's layers"),
        ({"layer": -1}, "prune.layer=-1 is outside the model's layers"),
        ({"layer": 1.5}, "prune.layer=1.5 is a fraction of depth"),
    ],
)
def test_bad_values_are_one_config_error(kwargs, message):
    with pytest.raises(ConfigError) as err:
        NormDrop(**kwargs).bind(L, N)
    assert message in str(err.value) and "\n" not in str(err.value)


def cspexp(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "cspexp", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_cli_run_writes_results(tmp_path):
    run_dir = tmp_path / "run"
    proc = cspexp("model=tiny_random", "dataset.n=4", "logger=none", "prune=norm", "prune.keep=0.3",
                  f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "norm" and results["n_samples"] == 4
    assert results["prune"]["keep"] == 0.3 and results["prune"]["layer"] == 2
    assert results["flops"]["llm"] < results["flops"]["llm_dense"]
    assert not (run_dir / "error.json").exists()


def test_cli_bad_layer_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    proc = cspexp("model=tiny_random", "logger=none", "prune=norm", "prune.layer=12", f"hydra.run.dir={run_dir}",
                  cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "prune.layer=12" in lines[0], proc.stderr
    assert not (run_dir / "results.json").exists()
