"""`python -m cspexp.convert` and LISA checkpoints through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from cspexp.models.loaders import build_model
from cspexp.convert import convert, main
from cspexp.models.lisa_checkpoint import load_lisa
from cspexp.outputs.files import read_jsonl
from cspexp.pruning.methods import NoPruning
from cspexp.pruning.pipeline import segment
from cspexp.utils.instantiate import build
from lisa_fixtures import write_tiny_lisa
from test_cli import cspexp


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_lisa(tmp_path_factory.mktemp("tiny"))


def batch_for(processor):
    rng = np.random.default_rng(1)
    items = [{"idx": i, "image": rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), "mask": np.zeros((48, 64), np.uint8),
              "query": q, "is_sentence": s} for i, (q, s) in enumerate([("the red circle", False),
                                                                          ("What can roll down a slope?", True)])]
    return processor.collate(items)


def test_converted_directory_loads_through_model_converted_with_identical_outputs(tiny, tmp_path, compose_cfg):
    dst = convert(tiny.path, tmp_path / "converted", vision_tower=tiny.clip_path, dtype="float32", progress=False)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    assert json.loads((dst / "config.json").read_text())["tokenizer"] == "lisa"
    assert [p.name for p in tmp_path.iterdir()] == ["converted"]  # no temporary directory left beside it

    original = load_lisa(path=str(tiny.path), vision_tower=str(tiny.clip_path), dtype="float32", progress=False)
    converted = build_model(compose_cfg("model=converted", f"model.path={dst}").model, [])
    assert converted.name == "lisa"
    a_batch, b_batch = batch_for(original.processor), batch_for(converted.processor)
    assert torch.equal(a_batch["input_ids"], b_batch["input_ids"])  # the LISA tokenizer round-tripped
    assert converted.model.seg_token_id == original.model.seg_token_id and converted.model.image_token_id == -200
    with torch.no_grad():
        a = segment(original.model, a_batch, NoPruning().bind(original.model.num_layers, original.model.n_image_tokens))
        b = segment(converted.model, b_batch, NoPruning().bind(converted.model.num_layers, converted.model.n_image_tokens))
    for x, y in zip(a.logits, b.logits):
        assert torch.equal(x, y)
    ref = original.model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in converted.model.state_dict().items())


def test_cli_writes_bfloat16_and_refuses_to_overwrite(tiny, tmp_path, compose_cfg):
    dst = tmp_path / "lisa-bf16"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "cspexp.convert", str(tiny.path), str(dst), "--vision-tower", str(tiny.clip_path),
            "--no-progress"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"model=converted model.path={dst}" in proc.stdout
    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}
    # model=converted keeps the stored dtype unless model.dtype says otherwise
    loaded = build_model(compose_cfg("model=converted", f"model.path={dst}").model, [])
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    loaded = build_model(compose_cfg("model=converted", f"model.path={dst}", "model.dtype=float32").model, [])
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}

    before = (dst / "model.safetensors").stat().st_mtime_ns
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: DST {str(dst)!r} exists and is not empty; pass --force to replace it"]
    assert (dst / "model.safetensors").stat().st_mtime_ns == before


def test_force_replaces_and_leaves_nothing_else(tiny, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    assert main([str(tiny.path), str(dst), "--vision-tower", str(tiny.clip_path), "--dtype", "float32",
                 "--no-progress", "--force"]) == 0
    assert not (dst / "old.txt").exists() and (dst / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_empty_dst_is_filled(tiny, tmp_path):
    (tmp_path / "out").mkdir()
    assert main([str(tiny.path), str(tmp_path / "out"), "--vision-tower", str(tiny.clip_path), "--no-progress"]) == 0
    assert (tmp_path / "out" / "config.json").is_file()


def test_a_failed_write_leaves_no_dst_and_no_temporary(tiny, tmp_path, monkeypatch):
    import cspexp.models.saved as saved

    def failing_save(loaded, path):
        (path / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(saved, "save_model", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert(tiny.path, tmp_path / "out", vision_tower=tiny.clip_path, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/nonexistent/LISA", "{out}", "--vision-tower", "{clip}"], "error: SRC='/nonexistent/LISA' does not exist or is not a directory"),
        (["{clip}", "{out}", "--vision-tower", "{clip}"], "error: {clip}/config.json lacks the LLaMA dimension(s) hidden_size"),
        (["{src}", "{out}", "--vision-tower", "/nonexistent/clip"], "error: --vision-tower='/nonexistent/clip' does not exist"),
        (["{src}", "{out}/deeper/dst", "--vision-tower", "{clip}"], "error: the parent directory of DST"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path, capsys, args, message):
    fill = {"src": str(tiny.path), "clip": str(tiny.clip_path), "out": str(tmp_path / "out")}
    assert main([a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message.format(**fill)), err
    assert not (tmp_path / "out").exists()


def test_vision_tower_is_required(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tiny.path), str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "--vision-tower" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_end_to_end_on_a_lisa_checkpoint_and_its_conversion(tiny, tmp_path):
    """The user's command on an original-layout checkpoint writes results.json; the converted directory
    gives the same per-sample results through model=converted."""
    common = ["dataset=shapes", "dataset.n=4", "logger=none"]
    run_dir = tmp_path / "run_lisa"
    proc = cspexp("model=lisa", f"model.path={tiny.path}", f"model.vision_tower={tiny.clip_path}", "model.dtype=float32",
                  *common, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["n_samples"] == 4 and results["model"] == "lisa"
    assert results["model_dims"]["num_layers"] == 4 and results["tokens"]["n_image"] == 16

    dst = convert(tiny.path, tmp_path / "converted", vision_tower=tiny.clip_path, dtype="float32", progress=False)
    run_dir2 = tmp_path / "run_converted"
    proc = cspexp("model=converted", f"model.path={dst}", *common, f"hydra.run.dir={run_dir2}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {r["idx"]: r for r in read_jsonl(run_dir / "samples.jsonl")}
    rows2 = {r["idx"]: r for r in read_jsonl(run_dir2 / "samples.jsonl")}
    assert rows.keys() == rows2.keys() == set(range(4))
    for idx in rows:
        assert (rows[idx]["intersection"], rows[idx]["union"]) == (rows2[idx]["intersection"], rows2[idx]["union"])
    assert json.loads((run_dir2 / "results.json").read_text())["metrics"] == results["metrics"]


@pytest.mark.slow
def test_cli_names_a_pruning_schedule_that_does_not_fit_before_loading(tiny, tmp_path):
    """The schedule is checked against config.json's depth (4 layers) before any weight is read: the
    checkpoint here has no weights at all, and the error is still the schedule's."""
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((tiny.path / "config.json").read_bytes())
    run_dir = tmp_path / "run"
    proc = cspexp("model=lisa", f"model.path={bare}", f"model.vision_tower={tiny.clip_path}", "prune=fastv",
                  "prune.layer=6", "dataset=shapes", "dataset.n=2", "logger=none", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "prune.layer=6 is outside the model's layers 0..4" in proc.stderr
    assert not (run_dir / "results.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model_args", "message"),
    [
        (["model=lisa"], "error: model.path, model.vision_tower must be set"),
        (["model=lisa_7b", "model.path={path}", "model.vision_tower={clip}"],
         "error: model=lisa_7b expects hidden_size 4096, intermediate_size 11008, num_hidden_layers 32, "
         "num_attention_heads 32, but {path}/config.json has hidden_size 32"),
    ],
)
def test_cli_one_line_errors_for_lisa_models(tiny, tmp_path, model_args, message):
    fill = {"path": str(tiny.path), "clip": str(tiny.clip_path)}
    run_dir = tmp_path / "run"
    proc = cspexp(*[a.format(**fill) for a in model_args], "dataset=shapes", "dataset.n=2", "logger=none",
                  f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(message.format(**fill)), proc.stderr
    assert not (run_dir / "results.json").exists()
