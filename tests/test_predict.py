"""`python -m cspexp.predict` in a subprocess, as a user runs it: the files it writes, checked against
the pass computed here independently (`cspexp.pruning.pipeline.segment` on the same input, FLOPs from
`cspexp.flops.analytic` on its trace), and one error line, exit 2 and no files for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
from cspexp.utils.errors import ConfigError, MissingPathError
from cspexp.utils.instantiate import build

DEFAULT_CSP = [64, 64, 256, 256, 26, 26, 26, 26]  # csp's defaults on 8 layers × 256 tokens (keep 0.1: ⌈25.6⌉)


def predict_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "cspexp.predict", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_lisa():
    from omegaconf import OmegaConf

    loaded, _ = load_model(OmegaConf.load(CONF_DIR / "model" / "tiny_lisa.yaml"), ShapesDataset.vocabulary())
    return loaded


def method(loaded, name: str, **settings):
    from omegaconf import OmegaConf

    node = OmegaConf.merge(OmegaConf.load(CONF_DIR / "prune" / f"{name}.yaml"), settings)
    return build(node).bind(*loaded.shape)


def reference(loaded, bound, image: np.ndarray, query: str, is_sentence: bool, idx: int) -> dict:
    """The mask (0/255) and the FLOPs of the same input through `segment`, computed here."""
    item = {"idx": idx, "image": image, "mask": np.zeros(image.shape[:2], np.uint8), "query": query,
            "is_sentence": is_sentence}
    with torch.inference_mode():
        out = segment(loaded.model, loaded.processor.collate([item]), bound)
    trace = out.trace
    image_per_layer, tokens_per_layer = trace.image_per_layer[0].tolist(), trace.tokens_per_layer[0].tolist()
    flops = sample_flops(tokens_per_layer, image_per_layer, 256, LlmDims.from_config(loaded.model.llm.config),
                         trace.sample_overhead(0))
    return {"mask": out.masks[0].numpy().astype(np.uint8) * 255, "image_per_layer": image_per_layer,
            "tokens_per_layer": tokens_per_layer, "flops": flops}


def check_record(folder: Path, expected: dict, image_hw: tuple[int, int]) -> dict:
    """The files of one image against the reference: mask, overlay, stage maps, record."""
    record = json.loads((folder / "record.json").read_text())
    mask = np.asarray(Image.open(folder / "mask.png"))
    assert mask.dtype == np.uint8 and mask.shape == image_hw
    assert np.array_equal(mask, expected["mask"])
    assert [m["file"] for m in record["masks"]] == ["mask.png"]
    assert record["masks"][0]["pixels"] == int((expected["mask"] > 0).sum())
    overlay = Image.open(folder / "overlay.png")
    assert overlay.width == image_hw[1] and overlay.height > image_hw[0]  # the query's band on top
    flops = record["flops"]
    for key in ("llm", "llm_dense", "image", "image_dense", "overhead"):
        assert flops[key] == expected["flops"][key], key
    assert flops["unit"] == "FLOPs"
    assert flops["reduction_image"] == pytest.approx(1 - expected["flops"]["image"] / expected["flops"]["image_dense"])
    assert flops["reduction_llm"] == pytest.approx(1 - expected["flops"]["llm"] / expected["flops"]["llm_dense"])
    assert record["tokens"]["image_per_layer"] == expected["image_per_layer"]
    assert record["tokens"]["tokens_per_layer"] == expected["tokens_per_layer"]
    # teacher-forced: the answer is the prompt's own, and the record says so
    assert record["mode"] == "teacher_forced" and record["answer"] == "[SEG]." and record["answer_source"] == "teacher_forced"
    assert set(record["latency_ms"]) >= {"vision", "llm_prefill", "mask_decoder", "end_to_end"}
    assert record["latency_ms"]["end_to_end"] >= record["latency_ms"]["llm_prefill"] > 0
    for stage in record["stages"]:
        picture = Image.open(folder / stage["file"])
        assert picture.format == "PNG" and picture.width > 100
    assert not list(folder.glob(".*.tmp"))  # atomic writes leave no temporary file
    return record


@pytest.mark.slow
def test_default_run_segments_a_shapes_image(tmp_path, tiny_lisa):
    out = tmp_path / "out"
    proc = predict_cli(f"out_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    item = ShapesDataset(split="val", n=1)[0]
    expected = reference(tiny_lisa, method(tiny_lisa, "csp"), item["image"], item["query"], item["is_sentence"], 0)
    assert expected["image_per_layer"] == DEFAULT_CSP
    record = check_record(out / "000_shapes_val_0", expected, (224, 224))
    assert record["image"] == "shapes:val:0" and record["query"] == item["query"]
    assert record["model"] == "tiny_lisa" and record["method"]["name"] == "csp" and record["method"]["keep"] == 0.1
    # csp's three stages: clustering (layers 0-1, 64 representatives), scattering (2-3, all), pruning (4-7)
    assert [(s["layers"], s["kept"]) for s in record["stages"]] == [([0, 1], 64), ([2, 3], 256), ([4, 7], 26)]
    assert sorted(p.name for p in (out / "000_shapes_val_0").iterdir()) == [
        "kept_layers_0-1.png", "kept_layers_2-3.png", "kept_layers_4-7.png", "mask.png", "overlay.png", "record.json"]
    assert [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()] == [record]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("000_shapes_val_0  ") and "image-token FLOPs -66.3 %" in lines[0]
    assert lines[-1].startswith("1 image · tiny_lisa · csp keep 0.1 · teacher_forced") and str(out) in lines[-1]
    assert not (tmp_path / "outputs").exists()  # everything went to out_dir


@pytest.mark.slow
def test_a_folder_of_png_and_jpeg_files(tmp_path, tiny_lisa):
    folder = tmp_path / "my images"
    folder.mkdir()
    ds = ShapesDataset(split="val", n=3)
    Image.fromarray(ds[1]["image"][:, :180]).save(folder / "a.png")  # not square: CLIP crops, SAM pads
    Image.fromarray(ds[2]["image"]).save(folder / "b.jpg", quality=92)
    (folder / "notes.txt").write_text("not an image: a folder's other files are left alone\n")
    out = tmp_path / "out"
    query = "Which shape could roll down a hill?"  # ends with '?': a sentence (sentence=auto)
    proc = predict_cli(f"image={folder}", f"query={query}", "prune=fastv", "prune.keep=0.3", f"out_dir={out}",
                       cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    bound = method(tiny_lisa, "fastv", keep=0.3)
    for k, name in enumerate(("a.png", "b.jpg")):
        image = np.asarray(Image.open(folder / name).convert("RGB"))
        expected = reference(tiny_lisa, bound, image, query, True, k)
        record = check_record(out / f"{k:03d}_{Path(name).stem}", expected, image.shape[:2])
        assert record["image"] == str(folder / name) and record["is_sentence"] is True
        assert record["method"]["name"] == "fastv" and record["method"]["keep"] == 0.3
    assert len(proc.stdout.strip().splitlines()) == 3  # one line per image, then the totals
    assert proc.stdout.strip().splitlines()[-1].startswith("2 images · tiny_lisa · fastv keep 0.3")


@pytest.mark.slow
def test_a_queries_file(tmp_path, tiny_lisa):
    (tmp_path / "img").mkdir()
    item = ShapesDataset(split="val", n=4)[3]
    Image.fromarray(item["image"]).save(tmp_path / "img" / "scene.png")
    rows = [{"image": "img/scene.png", "query": "the red circle", "is_sentence": False},  # relative to the file
            {"image": "shapes:val:3", "query": "it's the shape, [left] of ${x}"}]  # taken as written
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    out = tmp_path / "out"
    proc = predict_cli(f"queries={tmp_path / 'pairs.jsonl'}", "prune=none", f"out_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["name"] for r in records] == ["000_scene", "001_shapes_val_3"]
    assert [r["query"] for r in records] == [row["query"] for row in rows]
    dense = method(tiny_lisa, "none")
    for k, record in enumerate(records):
        expected = reference(tiny_lisa, dense, item["image"], rows[k]["query"], False, (0, 3)[k])
        check_record(out / record["name"], expected, (224, 224))
        assert record["flops"]["reduction_image"] == 0.0 and len(record["stages"]) == 1


def write_bad_inputs(root: Path) -> None:
    (root / "empty").mkdir()
    (root / "notes.png").write_text("a text file with an image's name\n")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "ok.png")
    (root / "bad_json.jsonl").write_text('{"image": "ok.png", "query": "x"}\n{"image": "ok.png", "query": \n')
    (root / "no_query.jsonl").write_text('{"image": "ok.png"}\n')
    (root / "missing_image.jsonl").write_text('{"image": "absent.png", "query": "x"}\n')


# The CLI's promise for the inputs users get wrong most: one line, exit 2, no run dir (the other checks
# are the same code path, tested in-process below).
@pytest.mark.parametrize(("args", "expected"), [
    (["image={root}/absent.png", "query=x"], "image='{root}/absent.png' does not exist; give an image file, a glob"),
    (["image={root}/empty", "query=x"], "is a folder with no image files; it must hold files ending in .png"),
    (["image={root}/notes.png", "query=x"], "notes.png cannot be read as an image"),
    (["queries={root}/bad_json.jsonl"], "bad_json.jsonl:2 is not valid JSON"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, expected):
    root = tmp_path / "in"
    root.mkdir()
    write_bad_inputs(root)
    out = tmp_path / "out"
    proc = predict_cli(*(a.format(root=root) for a in args), f"out_dir={out}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and expected.format(root=root) in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists() and not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_generate_mode_writes_the_models_answer(tmp_path, tiny_lisa):
    from cspexp.pruning.generate import generate

    out = tmp_path / "out"
    proc = predict_cli("evaluate.mode=generate", "generate.max_new_tokens=8", "prune=fastv", f"out_dir={out}",
                       cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    item = ShapesDataset(split="val", n=1)[0]
    tokenizer = tiny_lisa.processor.tokenizer
    with torch.inference_mode():
        expected = generate(tiny_lisa.model, tiny_lisa.processor.collate([item], answer=False),
                            method(tiny_lisa, "fastv"), max_new_tokens=8, eos_token_id=tokenizer.eos_token_id,
                            tokenizer=tokenizer)
    sample = expected.samples[0]
    assert sample.n_seg >= 1  # the embedded model answers with a [SEG]
    folder = out / "000_shapes_val_0"
    record = json.loads((folder / "record.json").read_text())
    assert record["mode"] == "generate" and record["answer_source"] == "generated"
    assert record["answer"] == sample.text and record["generation"]["ids"] == sample.ids
    assert record["generation"]["n_seg"] == sample.n_seg == len(record["masks"])
    for entry, mask in zip(record["masks"], sample.masks):
        assert np.array_equal(np.asarray(Image.open(folder / entry["file"])), mask.numpy().astype(np.uint8) * 255)
    trace = expected.trace
    flops = sample_flops(trace.tokens_per_layer[0].tolist(), trace.image_per_layer[0].tolist(), 256,
                         LlmDims.from_config(tiny_lisa.model.llm.config), trace.sample_overhead(0))
    assert all(record["flops"][k] == flops[k] for k in ("llm", "llm_dense", "image", "image_dense", "overhead"))
    assert record["latency_ms"]["decode"] > 0


@pytest.mark.parametrize("text", ["it's a, b", "${oc.env:HOME} and \\${x}", "back\\slash\\", "a\\'b", "x=[1,2] {y}",
                                  "  spaced  ", 'say "hi"'])
def test_verbatim_values_compose_back_to_themselves(text):
    from cspexp.predict import compose_predict, quote_verbatim

    cfg = compose_predict(quote_verbatim([f"query={text}", f"image={text}"]))
    assert cfg.query == text and cfg.image == text


@pytest.mark.parametrize(("kwargs", "error", "expected"), [
    ({"image": "{root}/*.tif", "query": "x"}, ConfigError, "matches no file"),
    ({"image": "{root}/ok.png"}, ConfigError, 'query="…" is required with image='),
    ({"image": "{root}/ok.png", "query": " "}, ConfigError, 'query="" is empty'),
    ({"queries": "{root}/absent.jsonl"}, MissingPathError, "queries='{root}/absent.jsonl' does not exist"),
    ({"queries": "{root}/no_query.jsonl"}, ConfigError, "no_query.jsonl:1 needs the keys 'image' and 'query'"),
    ({"queries": "{root}/missing_image.jsonl"}, MissingPathError,
     "missing_image.jsonl:1: image='{root}/absent.png' does not exist"),
    ({"queries": "{root}/empty.jsonl"}, ConfigError, "empty.jsonl' holds no rows"),
    ({"queries": "{root}/no_query.jsonl", "image": "{root}/ok.png"}, ConfigError, "give either queries=<jsonl> or image="),
    ({"image": "shapes:val:1000"}, ConfigError, "the shapes val split has items 0..999"),
    ({"image": "shapes:valid:1"}, ConfigError, "write shapes:<split>:<idx> with split one of ['train', 'val', 'test']"),
])
def test_every_bad_input_is_named_in_one_line(tmp_path, kwargs, error, expected):
    from cspexp.inference.inputs import resolve_inputs

    root = tmp_path / "in"
    root.mkdir()
    write_bad_inputs(root)
    (root / "empty.jsonl").write_text("\n\n")
    with pytest.raises(error) as raised:
        resolve_inputs(**{k: v.format(root=root) for k, v in kwargs.items()})
    assert expected.format(root=root) in str(raised.value) and "\n" not in str(raised.value)


def test_inputs_are_named_uniquely_in_order(tmp_path):
    from cspexp.inference.inputs import resolve_inputs

    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / sub / "same name.png")
    inputs = resolve_inputs(str(tmp_path / "*" / "*.png"), "the thing")
    assert [i.name for i in inputs] == ["000_same_name", "001_same_name"]
    assert [i.source for i in inputs] == [str(tmp_path / sub / "same name.png") for sub in ("x", "y")]
    assert [i.is_sentence for i in inputs] == [False, False]
