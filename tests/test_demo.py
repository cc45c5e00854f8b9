"""`python -m cspexp.demo`: the server starts on a free port of 127.0.0.1, a request through
`gradio_client` returns the mask the same pass computes here (`segment`), and the server is shut down.
Skipped when Gradio is not installed (the ``demo`` extra)."""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF_DIR
from PIL import Image

from cspexp.data.shapes import ShapesDataset
from cspexp.flops.analytic import LlmDims, sample_flops
from cspexp.pruning.pipeline import segment
from cspexp.run import load_model
from cspexp.utils.instantiate import build

pytest.importorskip("gradio", reason='the demo needs Gradio: pip install -e ".[demo]"')
gradio_client = pytest.importorskip("gradio_client", reason="the demo test talks to the server through gradio_client")

READY = "cspexp demo: "  # the line the demo prints once it serves


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def demo_server(tmp_path):
    """The demo in a subprocess on a free port; yields its URL; terminated (and waited for) afterwards."""
    port = free_port()
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    proc = subprocess.Popen([sys.executable, "-m", "cspexp.demo", f"demo.port={port}", "demo.examples=2"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, output = wait_until_ready(proc, timeout=300)
        assert url is not None, f"the demo did not start:\n{output}"
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.poll() is not None
        with socket.socket() as s:  # the port is free again: the server is gone
            assert s.connect_ex(("127.0.0.1", port)) != 0


def wait_until_ready(proc: subprocess.Popen, timeout: float) -> tuple[str | None, str]:
    """(the URL from the demo's ready line, or None if it exited or timed out; what it printed)."""
    seen = []
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not selector.select(timeout=1.0):
            if proc.poll() is not None:
                break
            continue
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith(READY):
            return line.split(" on ", 1)[1].split(" ", 1)[0], "".join(seen)
    return None, "".join(seen)


@pytest.mark.slow
def test_a_request_returns_the_mask_of_the_same_pass(tmp_path, demo_server):
    from omegaconf import OmegaConf

    assert demo_server.startswith("http://127.0.0.1:")
    item = ShapesDataset(split="val", n=4)[3]
    image = item["image"][:, :200]  # not square
    Image.fromarray(image).save(tmp_path / "upload.png")
    client = gradio_client.Client(demo_server, download_files=str(tmp_path / "downloads"), verbose=False)
    dense_overlay, pruned_overlay, stages, table, mask_file = client.predict(
        gradio_client.handle_file(str(tmp_path / "upload.png")), item["query"], "csp", 0.1, api_name="/segment")

    loaded, _ = load_model(OmegaConf.load(CONF_DIR / "model" / "tiny_lisa.yaml"), ShapesDataset.vocabulary())
    method = build(OmegaConf.load(CONF_DIR / "prune" / "csp.yaml")).bind(*loaded.shape)
    batch = loaded.processor.collate([{"idx": 0, "image": image, "mask": np.zeros(image.shape[:2], np.uint8),
                                       "query": item["query"], "is_sentence": True}])  # it ends with "?"
    with torch.inference_mode():
        out = segment(loaded.model, batch, method)
    mask = np.asarray(Image.open(mask_file))
    assert mask.shape == image.shape[:2]
    assert np.array_equal(mask, out.masks[0].numpy().astype(np.uint8) * 255)
    # the table's image-token FLOPs reduction is the analytic one of this pass
    trace = out.trace
    flops = sample_flops(trace.tokens_per_layer[0].tolist(), trace.image_per_layer[0].tolist(), 256,
                         LlmDims.from_config(loaded.model.llm.config), trace.sample_overhead(0))
    assert f"**{-100 * (1 - flops['image'] / flops['image_dense']):+.1f} %**" in table
    assert "| | dense | csp, keep 0.1 |" in table and "latency, end to end" in table
    for path in (dense_overlay, pruned_overlay, stages):
        assert Path(path).is_file() and Image.open(path).format == "PNG"
    assert Image.open(stages).width > 3 * 300  # csp's three stages side by side
