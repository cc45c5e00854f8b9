"""The diagnostics of training from scratch (scripts/probe_*.py) run on a tiny random model for a
few steps, and what they print holds what can be worked out by hand for such a model."""

from __future__ import annotations

import importlib.util
import math
import re
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cspexp.data.shapes import ShapesDataset
from cspexp.models.saved import save_model
from cspexp.utils.instantiate import build

from conftest import CONF_DIR, REPO

NUMBER = r"(-?[0-9.]+(?:e[-+][0-9]+)?)"


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name: str, monkeypatch, capsys, *argv: str) -> str:
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    script(name).main()
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    cfg = OmegaConf.load(CONF_DIR / "model" / "tiny_random.yaml")
    return save_model(build(cfg, words=ShapesDataset.vocabulary()), tmp_path_factory.mktemp("probe") / "tiny")


def test_probe_lookup_batches_are_apart_squares_and_the_centre_is_the_target():
    """Each grid holds 3–6 filled squares (side 2–4) of distinct colours, no two touching (not even
    diagonally); the answer's centre cell has the target's colour."""
    lookup = script("probe_lookup")
    torch.manual_seed(0)
    grid, target, centre = lookup.make_batch(8)
    G, background = lookup.G, lookup.N_COLOURS
    for b in range(8):
        g = grid[b].view(G, G).numpy()
        colours = [c for c in np.unique(g) if c != background]
        assert 3 <= len(colours) <= 6 and int(target[b]) in colours
        assert g[int(centre[b, 0]), int(centre[b, 1])] == int(target[b])
        for c in colours:
            rows, cols = np.nonzero(g == c)
            h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
            assert h == w and 2 <= h <= 4 and len(rows) == h * w  # a filled square
            ring = np.zeros_like(g, dtype=bool)
            ring[max(rows.min() - 1, 0):rows.max() + 2, max(cols.min() - 1, 0):cols.max() + 2] = True
            assert set(np.unique(g[ring])) <= {c, background}  # nothing else within one cell


def test_probe_lookup_runs_both_phases(monkeypatch, capsys):
    """One text-only step, then one image step with `--attend 1`. At initialisation (q/k weights
    N(0, 0.02): attention scores within a few hundredths of 0) the query token's attention at layer 1
    is near uniform over the 263 tokens it sees (5 system + 256 grid + colour word + itself), so the
    attention CE is ≈ ln 263 = 5.57 whatever the blob (a trained head: ≈ 2)."""
    out = run("probe_lookup", monkeypatch, capsys, "--steps", "2", "--text-only", "1", "--attend", "1")
    m = re.search(rf"^step 2 loss {NUMBER} row within ±1: {NUMBER} .* attention CE {NUMBER}$", out, re.M)
    assert m, out
    loss, hits, attention_ce = map(float, m.groups())
    assert attention_ce == pytest.approx(math.log(263), abs=0.1)
    assert 0 <= hits <= 1 and loss > attention_ce  # the loss adds the row and column CE


def test_probe_attention_tables_and_swap_test(tiny_model_dir, monkeypatch, capsys):
    """The table covers every sample, layer and head with shares in [0, 1]. The swap test (the phrase
    queries among the samples): the query token's input at layer 0 is its own word embedding (the ':'
    of "ASSISTANT:" in every prompt), so neither swap moves it; later, an untrained model's query
    token follows the image more than the query (each word gets ~1/260 of its attention)."""
    out = run("probe_attention", monkeypatch, capsys, str(tiny_model_dir), "--n", "6", "--swap", "3")
    kinds = re.findall(rf"^(\w+): n (\d+), gIoU {NUMBER}; attention on the target$", out, re.M)
    assert sum(int(n) for _, n, _ in kinds) == 6 and all(0 <= float(g) <= 1 for _, _, g in kinds)
    rows = re.findall(r"^  layer (\d): ((?:head \d [0-9.]+ *)+)$", out, re.M)
    assert len(rows) == 8 * len(kinds)  # tiny_random: 8 layers
    shares = [float(x) for _, row in rows for x in re.findall(r"head \d ([0-9.]+)", row)]
    assert len(shares) == 4 * len(rows) and all(0 <= s <= 1 for s in shares)
    phrases = re.search(r"^swap test on (\d+) phrase queries", out, re.M)
    assert phrases and 2 <= int(phrases.group(1)) <= 3
    swaps = {int(layer): (float(q), float(i)) for layer, q, i in
             re.findall(rf"^  layer (\d): query swap {NUMBER}, image swap {NUMBER}$", out, re.M)}
    assert sorted(swaps) == list(range(8))
    assert swaps[0] == (0.0, 0.0)
    assert swaps[1][1] > 0 and swaps[7][1] > swaps[7][0]


def test_probe_seg_query_reports(tiny_model_dir, monkeypatch, capsys):
    """On the tiny random model (its config as the override): a row per layer and one after the final
    norm, the query token's layer-0 state the same word embedding in every sample (spread 0); the
    ReLU counts add up to at most the layer's width. With the sine-cosine grid code the image tokens
    carry their row and column linearly (README: R² 1.00), without it they carry little."""
    def probe(*overrides):
        out = run("probe_seg_query", monkeypatch, capsys, str(tiny_model_dir), "--n", "6", "model=tiny_random", *overrides)
        layers = re.findall(rf"^ *(\d+) +{NUMBER} +{NUMBER} +{NUMBER}$", out, re.M)
        where = re.search(rf"\| row, column {NUMBER} {NUMBER}$", out, re.M)
        return out, layers, [float(x) for x in where.groups()]

    out, layers, plain = probe()
    assert [int(row[0]) for row in layers] == list(range(9))  # 8 layers + the final norm
    assert float(layers[0][2]) == 0.0
    relu = re.search(r"ReLU units: (\d+) active for every sample, (\d+) for none, of (\d+)$", out, re.M)
    every, none, width = map(int, relu.groups())
    assert width == 64 and every + none <= width  # text_hidden_fcs' first layer: the LLM's width
    match = re.search(rf"^match MSE {NUMBER} \(a constant predictor: {NUMBER}\)$", out, re.M)
    assert match and float(match.group(2)) >= 0
    _, _, coded = probe("+model.image_position=sincos")
    assert min(coded) > 0.9 and max(plain) < 0.5, (coded, plain)
