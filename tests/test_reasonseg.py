"""`dataset=reasonseg` on tiny ReasonSeg trees the tests write: masks against hand-drawn expectations,
LISA's query rules, the on_error paths, PIL against cv2 (LISA's rasteriser), and one CLI run."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cspexp.data.reasonseg import ReasonSegDataset, cv2_available, polygon_mask
from cspexp.utils.errors import ConfigError, MissingPathError

H, W = 16, 20
RASTERIZERS = ["pil", pytest.param("cv2", marks=pytest.mark.skipif(not cv2_available(), reason="needs opencv"))]


def rect(label, x0, y0, x1, y1):
    """A labelme rectangle polygon through the corners (x0, y0) and (x1, y1)."""
    return {"label": label, "points": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], "shape_type": "polygon"}


# Listed so that drawing in file order would be wrong: the small target (1) comes before the ignore
# region (2) that contains it; LISA draws the larger one first. Fractional points truncate (3).
SHAPES = [
    rect("target", 10, 10, 11, 11),                                   # 2×2 px, on top of the ignore square
    rect("ignore", 8, 8, 13, 13),                                     # 6×6 px
    {"label": "target", "points": [[1.9, 1.2], [6.99, 1.2], [6.99, 5.7], [1.9, 5.7]]},  # → x 1..6, y 1..5
    rect("flag", 15, 1, 18, 3),                                       # dropped
    rect("Target", 15, 12, 17, 14),                                   # any label but ignore/flag is target
]


def expected_mask() -> np.ndarray:
    """The mask of SHAPES, worked out by hand (polygons include their outline pixels)."""
    m = np.zeros((H, W), np.uint8)
    m[8:14, 8:14] = 255
    m[10:12, 10:12] = 1
    m[1:6, 1:7] = 1
    m[12:15, 15:18] = 1
    return m


def write_sample(folder, name, texts, is_sentence, shapes, size=(H, W), colour=(90, 120, 200), raw=None):
    folder.mkdir(parents=True, exist_ok=True)
    img = np.zeros((*size, 3), np.uint8) + np.array(colour, np.uint8)
    Image.fromarray(img).save(folder / f"{name}.jpg", quality=95)
    anno = {"text": texts, "is_sentence": is_sentence, "shapes": shapes}
    (folder / f"{name}.json").write_bytes(raw if raw is not None else json.dumps(anno).encode())


def write_reasonseg(root):
    """root/ReasonSeg/{val,test}: val a (sentence, two texts), b (phrase), c (no polygons); test d, e."""
    base = root / "ReasonSeg"
    write_sample(base / "val", "a", ["  What keeps the rain off?  ", "An alternative wording."], True, SHAPES)
    write_sample(base / "val", "b", ["the red thing"], False, [rect("target", 0, 0, 3, 3)])
    write_sample(base / "val", "c", ["Where is the cat?"], True, [])
    write_sample(base / "test", "d", ["the umbrella"], False, [rect("target", 2, 2, 5, 5)])
    write_sample(base / "test", "e", ["Which object protects from the sun?"], True, [rect("target", 4, 4, 9, 9)])
    return base


# ------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("rasterizer", RASTERIZERS)
def test_mask_follows_get_mask_from_json(rasterizer):
    got = polygon_mask(SHAPES, H, W, rasterizer)
    assert np.array_equal(got, expected_mask()), np.argwhere(got != expected_mask())


@pytest.mark.parametrize("rasterizer", RASTERIZERS)
def test_equal_areas_keep_lisa_order(rasterizer):
    # LISA: np.argsort(areas)[::-1] — of two equal areas the later-listed is drawn first, so the
    # first-listed one ends on top where they overlap.
    shapes = [rect("target", 2, 2, 6, 6), rect("ignore", 4, 4, 8, 8)]
    got = polygon_mask(shapes, 10, 10, rasterizer)
    assert got[5, 5] == 1 and got[7, 7] == 255 and got[3, 3] == 1
    flipped = polygon_mask(shapes[::-1], 10, 10, rasterizer)
    assert flipped[5, 5] == 255


@pytest.mark.parametrize("rasterizer", RASTERIZERS)
def test_degenerate_polygons_draw_their_outline(rasterizer):
    point = polygon_mask([{"label": "target", "points": [[3, 4]]}], 8, 8, rasterizer)
    assert point.sum() == 1 and point[4, 3] == 1
    line = polygon_mask([{"label": "target", "points": [[1, 2], [5, 2]]}], 8, 8, rasterizer)
    assert np.array_equal(np.argwhere(line), [[2, x] for x in range(1, 6)])


@pytest.mark.skipif(not cv2_available(), reason="needs opencv (LISA's rasteriser) as the oracle")
def test_pil_differs_from_cv2_only_on_the_outline():
    """The honest number for dataset.rasterizer=pil: how far Pillow is from LISA's cv2 masks."""
    import cv2

    rng = np.random.default_rng(0)
    diffs, areas = [], []
    for _ in range(200):
        k = int(rng.integers(3, 12))
        angles = np.sort(rng.uniform(0, 2 * np.pi, k))
        radii = rng.uniform(3, 25, k)
        pts = np.stack([40 + radii * np.cos(angles), 30 + radii * np.sin(angles)], 1)  # simple (star-shaped)
        shapes = [{"label": "target", "points": pts.tolist()}]
        ref = np.zeros((60, 80), np.uint8)
        cv2.polylines(ref, np.array([pts], dtype=np.int32), True, 1, 1)
        cv2.fillPoly(ref, np.array([pts], dtype=np.int32), 1)
        assert np.array_equal(polygon_mask(shapes, 60, 80, "cv2"), ref)
        pil = polygon_mask(shapes, 60, 80, "pil")
        outline = np.zeros_like(ref)
        cv2.polylines(outline, np.array([pts], dtype=np.int32), True, 1, 1)
        near_outline = cv2.dilate(outline, np.ones((3, 3), np.uint8))
        assert not np.any((pil != ref) & (near_outline == 0)), "PIL and cv2 disagree away from the outline"
        diffs.append(int((pil != ref).sum()))
        areas.append(int(ref.sum()))
    mean, worst = float(np.mean(diffs)), max(diffs)
    print(f"PIL vs cv2: {mean:.2f} px per polygon (max {worst}), mean area {np.mean(areas):.0f} px")
    assert mean < 4 and worst <= 20  # measured: 2.2 px mean, 16 max (Pillow 13, OpenCV 4.14)


# ------------------------------------------------------------------------------------------ loader


def test_val_items_follow_lisa(tmp_path):
    ds = ReasonSegDataset(root=str(write_reasonseg(tmp_path)), split="val")
    assert len(ds) == 3
    a, b, c = ds[0], ds[1], ds[2]
    assert [x["idx"] for x in (a, b, c)] == [0, 1, 2]
    # the first text only, stripped; is_sentence picks the template and names the subset
    assert a["query"] == "What keeps the rain off?" and a["is_sentence"] is True and a["query_kind"] == "long"
    assert b["query"] == "the red thing" and b["is_sentence"] is False and b["query_kind"] == "short"
    assert a["image_id"] == "val/a.jpg"
    assert a["image"].shape == (H, W, 3) and a["image"].dtype == np.uint8
    assert a["mask"].dtype == np.uint8 and np.array_equal(a["mask"], expected_mask())
    expected_b = np.zeros((H, W), np.uint8)
    expected_b[0:4, 0:4] = 1
    assert np.array_equal(b["mask"], expected_b)
    assert not c["mask"].any()  # no polygon: an empty mask, as in LISA
    assert set(ds.vocabulary()) == {"What keeps the rain off?", "the red thing", "Where is the cat?"}


def test_texts_all_query_subsets_n_and_root_forms(tmp_path):
    base = write_reasonseg(tmp_path / "data" / "reason_seg")
    every = ReasonSegDataset(root=str(base), split="val", texts="all")
    assert [it["query"] for it in (every[i] for i in range(len(every)))] == [
        "What keeps the rain off?", "An alternative wording.", "the red thing", "Where is the cat?"]
    assert np.array_equal(every[1]["mask"], every[0]["mask"])
    # test split: short = is_sentence false, long = is_sentence true
    assert [ReasonSegDataset(root=str(base), split="test", query=q)[0]["query"] for q in ("short", "long")] == [
        "the umbrella", "Which object protects from the sun?"]
    assert len(ReasonSegDataset(root=str(base), split="test")) == 2
    assert len(ReasonSegDataset(root=str(base), split="val", n=2)) == 2
    assert len(ReasonSegDataset(root=str(base), split="val", texts="all", n=1)) == 1
    # root may be the ReasonSeg folder, or LISA's dataset dir holding reason_seg/ReasonSeg
    assert len(ReasonSegDataset(root=str(tmp_path / "data"), split="val")) == 3
    assert len(ReasonSegDataset(root=str(tmp_path / "data" / "reason_seg"), split="val")) == 3


def test_image_is_read_upright_like_cv2(tmp_path):
    """An EXIF-rotated JPEG: the image (and so the mask drawn on it) is the upright one, as
    cv2.imread gives LISA. Raw 12×20, left half dark; orientation 6 = turn 90° clockwise."""
    folder = tmp_path / "val"
    folder.mkdir()
    raw = np.full((12, 20, 3), 230, np.uint8)
    raw[:, :10] = 20
    img = Image.fromarray(raw)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(folder / "r.jpg", exif=exif, quality=95)
    (folder / "r.json").write_text(json.dumps({"text": ["x"], "is_sentence": False,
                                               "shapes": [rect("target", 0, 0, 3, 3)]}))
    it = ReasonSegDataset(root=str(tmp_path), split="val")[0]
    assert it["image"].shape == (20, 12, 3) and it["mask"].shape == (20, 12)
    assert it["image"][:10].mean() < 60 and it["image"][10:].mean() > 190  # the dark left half is now on top
    if cv2_available():
        import cv2

        assert np.array_equal(it["image"], cv2.cvtColor(cv2.imread(str(folder / "r.jpg")), cv2.COLOR_BGR2RGB))


def test_non_utf8_json_is_read_as_cp1252(tmp_path):
    anno = '{"text": ["the caf\xe9 sign"], "is_sentence": false, "shapes": []}'.encode("cp1252")
    write_sample(tmp_path / "val", "a", None, None, None, raw=anno)
    assert ReasonSegDataset(root=str(tmp_path), split="val")[0]["query"] == "the caf\xe9 sign"


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "train"}, "dataset.split='train' is not allowed; use one of ['val', 'test']"),
        ({"query": "medium"}, "dataset.query='medium' is not allowed; use one of ['all', 'short', 'long']"),
        ({"texts": "random"}, "dataset.texts='random' is not allowed; use one of ['first', 'all']"),
        ({"rasterizer": "gdal"}, "dataset.rasterizer='gdal' is not allowed"),
        ({"on_error": "ignore"}, "dataset.on_error='ignore' is not allowed; use one of ['raise', 'skip']"),
        ({"n": 0}, "dataset.n must be >= 1"),
    ],
)
def test_bad_options(tmp_path, kwargs, message):
    base = write_reasonseg(tmp_path)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        ReasonSegDataset(root=str(base), **kwargs)


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(MissingPathError, match="dataset.root=.*absent.* does not exist"):
        ReasonSegDataset(root=str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingPathError, match=r"holds no ReasonSeg 'val' folder \(looked for .*reason_seg/ReasonSeg/val"):
        ReasonSegDataset(root=str(tmp_path / "empty"))
    base = write_reasonseg(tmp_path / "t")
    (base / "val" / "b.json").unlink()
    with pytest.raises(MissingPathError, match=r"annotation file .*val/b.json does not exist"):
        ReasonSegDataset(root=str(base))


def corrupt(base):
    """Break val: b's JSON does not parse, c's JSON lacks 'shapes', a's image is no image."""
    (base / "val" / "b.json").write_text('{"text": ["the red thing"], "is_sentence": fal')
    (base / "val" / "c.json").write_text(json.dumps({"text": ["q"], "is_sentence": True}))
    (base / "val" / "a.jpg").write_bytes(b"not a jpeg at all")


def test_malformed_files_raise_naming_the_file(tmp_path):
    base = write_reasonseg(tmp_path)
    corrupt(base)
    with pytest.raises(ConfigError, match=r"image .*val/a.jpg cannot be read as an image"):
        ReasonSegDataset(root=str(base))
    (base / "val" / "a.jpg").unlink()
    with pytest.raises(ConfigError, match=r"val/b.json is not valid JSON"):
        ReasonSegDataset(root=str(base))
    (base / "val" / "b.jpg").unlink()
    with pytest.raises(ConfigError, match=r"val/c.json: lacks the key\(s\) \['shapes'\]"):
        ReasonSegDataset(root=str(base))
    bad_points = {"text": ["q"], "is_sentence": True, "shapes": [{"label": "target", "points": [[1, 2, 3]]}]}
    (base / "val" / "c.json").write_text(json.dumps(bad_points))
    with pytest.raises(ConfigError, match=r"c.json: shapes\[0\] \('target'\) needs 'points'"):
        ReasonSegDataset(root=str(base))


def test_skip_leaves_bad_samples_out_and_counts_them(tmp_path, caplog):
    base = write_reasonseg(tmp_path)
    corrupt(base)
    write_sample(base / "val", "d", ["a fine one"], False, [rect("target", 1, 1, 2, 2)])
    with caplog.at_level(logging.WARNING):
        ds = ReasonSegDataset(root=str(base), on_error="skip")
    assert len(ds) == 1 and ds[0]["query"] == "a fine one" and ds[0]["idx"] == 0
    summary = ds.bad_samples.summary()
    assert summary["n"] == 3
    assert [i["where"] for i in summary["items"]] == ["val/a.jpg", "val/b.jpg", "val/c.jpg"]
    assert "cannot be read as an image" in summary["items"][0]["reason"]
    assert sum("dataset.on_error=skip: left out val/" in r.message for r in caplog.records) == 3
    # n counts usable samples
    assert len(ReasonSegDataset(root=str(base), on_error="skip", n=1)) == 1
    (base / "val" / "d.jpg").unlink()
    with pytest.raises(ConfigError, match="every sample of .* was skipped"):
        ReasonSegDataset(root=str(base), on_error="skip")


def test_truncated_image(tmp_path):
    """Header fine, pixel data cut: `raise` notices when the sample is read, `skip` while building."""
    base = write_reasonseg(tmp_path)
    noise = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    Image.fromarray(noise).save(base / "val" / "b.jpg", quality=95)
    data = (base / "val" / "b.jpg").read_bytes()
    (base / "val" / "b.jpg").write_bytes(data[: int(len(data) * 0.7)])
    ds = ReasonSegDataset(root=str(base))
    assert len(ds) == 3
    with pytest.raises(ConfigError, match=r"image .*val/b.jpg cannot be decoded"):
        ds[1]
    skipping = ReasonSegDataset(root=str(base), on_error="skip")
    assert len(skipping) == 2 and skipping.bad_samples.summary()["items"][0]["where"] == "val/b.jpg"


# ------------------------------------------------------------------------------------------ CLI


@pytest.mark.slow
def test_cli_end_to_end_with_a_skipped_sample(tmp_path):
    base = write_reasonseg(tmp_path / "data")
    (base / "val" / "c.json").write_text("{broken")
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "cspexp", "model=tiny_random", "dataset=reasonseg", f"dataset.root={base}",
         "dataset.on_error=skip", "dataset.num_workers=0", "logger=none", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["n_samples"] == 2 and results["dataset"] == {"name": "reasonseg", "split": "val"}
    assert results["skipped"]["n"] == 1 and results["skipped"]["items"][0]["where"] == "val/c.jpg"
    assert "c.json is not valid JSON" in results["skipped"]["items"][0]["reason"]
    assert set(results["metrics_by_kind"]) == {"long", "short"}
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert sorted(r["idx"] for r in rows) == [0, 1]
    assert "left out val/c.jpg" in proc.stderr + proc.stdout


def test_auto_falls_back_to_pil_without_opencv(tmp_path, monkeypatch):
    import cspexp.data.reasonseg as reasonseg

    monkeypatch.setattr(reasonseg, "cv2_available", lambda: False)
    ds = ReasonSegDataset(root=str(write_reasonseg(tmp_path)))
    assert ds.rasterizer == "pil" and np.array_equal(ds[0]["mask"], expected_mask())
    with pytest.raises(ConfigError, match="dataset.rasterizer=cv2 needs OpenCV: pip install opencv-python-headless"):
        ReasonSegDataset(root=str(tmp_path), rasterizer="cv2")


@pytest.mark.slow
def test_lisa_checkpoint_on_reasonseg_test_end_to_end(tmp_path):
    """The issue's command: an original-layout LISA checkpoint and its CLIP tower on ReasonSeg test."""
    from lisa_fixtures import write_tiny_lisa

    tiny = write_tiny_lisa(tmp_path / "ckpt")
    base = write_reasonseg(tmp_path / "data" / "reason_seg")
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "cspexp", "model=lisa", f"model.path={tiny.path}", f"model.vision_tower={tiny.clip_path}",
         "dataset=reasonseg", f"dataset.root={tmp_path / 'data'}", "dataset.split=test", "dataset.num_workers=0",
         "logger=none", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["model"] == "lisa" and results["n_samples"] == 2 and results["skipped"] == {"n": 0, "items": []}
    assert {k: v["n"] for k, v in results["metrics_by_kind"].items()} == {"long": 1, "short": 1}
    rows = {r["idx"]: r for r in (json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines())}
    ds = ReasonSegDataset(root=str(base), split="test")
    for idx, row in rows.items():
        target = int((ds[idx]["mask"] == 1).sum())  # 16 and 36 pixels: the union holds them, the intersection fits in them
        assert row["intersection"] <= target <= row["union"]


@pytest.mark.slow
def test_cli_image_failing_in_a_loader_worker_is_one_line(tmp_path):
    """A JPEG whose pixel data is cut passes the build-time checks (on_error=raise) and fails when a
    DataLoader worker reads it: still one error line naming the file, exit 2, no results.json."""
    base = write_reasonseg(tmp_path / "data")
    noise = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    Image.fromarray(noise).save(base / "val" / "b.jpg", quality=95)
    data = (base / "val" / "b.jpg").read_bytes()
    (base / "val" / "b.jpg").write_bytes(data[: int(len(data) * 0.7)])
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "cspexp", "model=tiny_random", "dataset=reasonseg", f"dataset.root={base}",
         "dataset.num_workers=2", "logger=none", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: image ") and "val/b.jpg cannot be decoded" in lines[0], proc.stderr
    assert not (run_dir / "results.json").exists() and (run_dir / "error.json").exists()
