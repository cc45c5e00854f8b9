"""Data checks at build time on generated malformed trees: each defect stops the build with one line
naming its file (``dataset.on_error=raise``) or is left out and listed (``skip``); a valid tree gives
exactly the items its generator wrote; and a CLI sample (exit code, the stderr line, no results.json).

The generators are seeded: each writes a few valid samples of random sizes and contents plus one sample
per requested defect, under random names, and returns what a correct loader must give back.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cspexp.data.files import image_size, mask_array, read_gray
from cspexp.data.folder import FolderDataset
from cspexp.data.reasonseg import ReasonSegDataset
from cspexp.data.refcoco import RefCocoDataset, pycocotools_available, rle_counts
from cspexp.utils.errors import CspexpError

HUGE = (20_000, 20_000)  # 400 MP: over the default dataset.max_pixels, and over Pillow's own limit


def header_only_png(path: Path, width: int, height: int, colour: bool = True) -> None:
    """A PNG whose header says width × height, with almost no pixel data: opening it reads the size,
    decoding it would fail (and would need width × height bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2 if colour else 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


def one_line_error(exc: BaseException) -> str:
    """The message the CLI prints; the checks below want exactly one line."""
    assert isinstance(exc, CspexpError), type(exc)
    message = str(exc)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------- folder


FOLDER_DEFECTS = {  # defect → what the error line says (besides naming the file)
    "lisa_value": "does not allow (it allows [0, 1, 255]",
    "rgb_colour": "coloured pixel(s)",
    "transparent": "transparent pixel(s)",
    "wide_values": "not integers in 0..255",
    "huge_image": "over dataset.max_pixels=100000000",
    "huge_mask": "over dataset.max_pixels=100000000",
}


@dataclass
class FolderTree:
    root: Path
    valid: list[dict] = field(default_factory=list)        # {"query", "image", "mask"} in line order
    defects: dict[str, tuple[int, str]] = field(default_factory=dict)  # defect → (line number, bad file)


def make_folder_tree(root: Path, seed: int, defects=(), n_valid: int = 3, mask_values=(0, 1, 255)) -> FolderTree:
    """queries.jsonl with `n_valid` good lines (random sizes, masks of `mask_values`) and one line per
    defect, in a seeded random order."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    (root / "mask").mkdir()
    kinds = ["valid"] * n_valid + list(defects)
    order = rng.permutation(len(kinds))
    tree, lines = FolderTree(root), []
    for line_no, k in enumerate(order, start=1):
        kind, name = kinds[k], f"s{line_no:02d}_{int(rng.integers(1_000_000))}"
        h, w = int(rng.integers(8, 24)), int(rng.integers(8, 24))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = rng.choice(np.array(mask_values, np.uint8), size=(h, w))
        img_path, mask_path = root / "img" / f"{name}.png", root / "mask" / f"{name}.png"
        Image.fromarray(image).save(img_path)
        Image.fromarray(mask).save(mask_path)
        bad_file = mask_path
        if kind == "lisa_value":
            mask[0, 0] = 2
            Image.fromarray(mask).save(mask_path)
        elif kind == "rgb_colour":
            rgb = np.stack([mask] * 3, -1)
            rgb[h // 2, w // 2] = (255, 0, 0)
            Image.fromarray(rgb).save(mask_path)
        elif kind == "transparent":
            rgba = np.concatenate([np.stack([mask] * 3, -1), np.full((h, w, 1), 255, np.uint8)], -1)
            rgba[0, 0, 3] = 0
            Image.fromarray(rgba).save(mask_path)
        elif kind == "wide_values":
            wide = mask.astype(np.uint16)
            wide[0, 0] = 300  # a 16-bit mask with a value beyond 0..255
            Image.fromarray(wide).save(mask_path)
        elif kind == "huge_image":
            header_only_png(img_path, *HUGE)
            bad_file = img_path
        elif kind == "huge_mask":
            header_only_png(mask_path, *HUGE, colour=False)
        query = f"query {name}"
        lines.append(json.dumps({"image": f"img/{name}.png", "mask": f"mask/{name}.png", "query": query}))
        if kind == "valid":
            tree.valid.append({"query": query, "image": image, "mask": mask})
        else:
            tree.defects[kind] = (line_no, bad_file)
    (root / "queries.jsonl").write_text("\n".join(lines) + "\n")
    return tree


def test_valid_folder_tree_gives_what_was_written(tmp_path):
    for fmt, values in (("lisa", (0, 1, 255)), ("binary", (0, 1, 7, 255))):
        tree = make_folder_tree(tmp_path / fmt, seed=1, mask_values=values, n_valid=5)
        ds = FolderDataset(root=str(tree.root), mask_format=fmt)
        assert len(ds) == 5 and ds.bad_samples.summary() == {"n": 0, "items": []}
        for i, want in enumerate(tree.valid):
            it = ds[i]
            assert it["query"] == want["query"] and np.array_equal(it["image"], want["image"])
            expected = want["mask"] if fmt == "lisa" else (want["mask"] > 0).astype(np.uint8)
            assert np.array_equal(it["mask"], expected)


@pytest.mark.parametrize("defect", sorted(FOLDER_DEFECTS))
def test_each_folder_defect_is_one_line_naming_the_file(tmp_path, defect):
    tree = make_folder_tree(tmp_path, seed=zlib.crc32(defect.encode()), defects=[defect])
    line_no, bad_file = tree.defects[defect]
    with pytest.raises(CspexpError) as err:
        FolderDataset(root=str(tree.root), mask_format="lisa")
    message = one_line_error(err.value)
    assert f"queries.jsonl:{line_no}: " in message and str(bad_file) in message, message
    assert FOLDER_DEFECTS[defect] in message, message


def test_folder_defects_are_skipped_and_listed(tmp_path, caplog):
    tree = make_folder_tree(tmp_path, seed=7, defects=sorted(FOLDER_DEFECTS), n_valid=4)
    with caplog.at_level(logging.WARNING):
        ds = FolderDataset(root=str(tree.root), mask_format="lisa", on_error="skip")
    assert [ds[i]["query"] for i in range(len(ds))] == [v["query"] for v in tree.valid]
    assert all(np.array_equal(ds[i]["mask"], v["mask"]) for i, v in enumerate(tree.valid))
    summary = ds.bad_samples.summary()
    by_line = sorted(tree.defects.items(), key=lambda kv: kv[1][0])
    assert summary["n"] == len(FOLDER_DEFECTS)
    assert [i["where"] for i in summary["items"]] == [f"queries.jsonl:{line}" for _, (line, _) in by_line]
    for item, (defect, (_, bad_file)) in zip(summary["items"], by_line):
        assert FOLDER_DEFECTS[defect] in item["reason"] and str(bad_file) in item["reason"]
    assert sum("left out queries.jsonl:" in r.message for r in caplog.records) == len(FOLDER_DEFECTS)


def test_lisa_values_are_not_a_defect_under_binary(tmp_path):
    tree = make_folder_tree(tmp_path, seed=3, defects=["lisa_value"])
    ds = FolderDataset(root=str(tree.root), mask_format="binary")
    assert len(ds) == 4  # 2 is a target pixel under binary


def test_a_0_255_mask_under_lisa_is_a_warning(tmp_path, caplog):
    tree = make_folder_tree(tmp_path, seed=5, mask_values=(0, 255))
    with caplog.at_level(logging.WARNING):
        ds = FolderDataset(root=str(tree.root), mask_format="lisa")
    assert len(ds) == 3
    warning = [r.message for r in caplog.records if "mask_format=lisa" in r.message]
    assert len(warning) == 1 and "3 of 3 masks have ignored pixels (255) but no target pixel (1)" in warning[0]
    assert "queries.jsonl:1" in warning[0] and "dataset.mask_format=binary" in warning[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        FolderDataset(root=str(make_folder_tree(tmp_path / "ok", seed=5).root), mask_format="lisa")
    assert not [r for r in caplog.records if "mask_format=lisa" in r.message]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P", "I;16", "I", "F", "1"])
def test_grey_masks_in_other_modes_read_as_their_grey_values(tmp_path, mode):
    """Every accepted mode gives the grey values the file holds (computed here from the array written)."""
    grey = np.random.default_rng(0).choice(np.array([0, 1, 255], np.uint8), size=(6, 9))
    if mode == "1":
        grey = np.where(grey > 0, 255, 0).astype(np.uint8)  # a bilevel image holds 0 / 255
    if mode in ("RGB", "RGBA", "LA", "P"):
        rgb = Image.fromarray(np.stack([grey] * 3, -1))
        im = rgb.convert(mode) if mode != "P" else rgb.quantize(colors=3, dither=Image.Dither.NONE)
    elif mode in ("I;16", "I", "F"):
        im = Image.fromarray(grey.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    else:
        im = Image.fromarray(grey > 0)
    path = tmp_path / ("m.tif" if mode in ("I", "F") else "m.png")  # PNG has no 32-bit integer or float mode
    im.save(path)
    assert Image.open(path).mode == mode
    assert np.array_equal(read_gray(path), grey)
    assert np.array_equal(mask_array(Image.open(path), path), grey)


def test_max_pixels_is_checked_and_pillow_limit_never_surfaces(tmp_path):
    path = tmp_path / "huge.png"
    header_only_png(path, *HUGE)
    with pytest.raises(Image.DecompressionBombError):  # what Pillow alone would do
        Image.open(path)
    limit = Image.MAX_IMAGE_PIXELS
    assert image_size(path, upright=False, max_pixels=10**9) == (HUGE[1], HUGE[0])  # cspexp's limit, not Pillow's
    assert Image.MAX_IMAGE_PIXELS == limit  # restored
    tree = make_folder_tree(tmp_path / "t", seed=2)
    with pytest.raises(CspexpError) as err:
        FolderDataset(root=str(tree.root), max_pixels=100)  # every image here has more than 100 pixels
    assert "over dataset.max_pixels=100 " in one_line_error(err.value)
    for bad in (0, -5, "big", True, 1.5):
        with pytest.raises(CspexpError, match=r"dataset.max_pixels must be a positive integer"):
            FolderDataset(root=str(tree.root), max_pixels=bad)
    assert FolderDataset(root=str(tree.root), max_pixels=2e3).max_pixels == 2000


# ---------------------------------------------------------------------------------------- ReasonSeg


REASONSEG_DEFECTS = {  # defect → (the file the line names: "json" or "jpg", what it says)
    "nan_point": ("json", "coordinates must be finite numbers"),
    "inf_point": ("json", "coordinates must be finite numbers"),
    "huge_coordinate": ("json", "lies outside the"),
    "far_outside": ("json", "lies outside the"),
    "orphan_json": ("json", "has no image"),
    "missing_json": ("json", "does not exist"),
    "huge_image": ("jpg", "over dataset.max_pixels=100000000"),
}


@dataclass
class ReasonSegTree:
    split_dir: Path
    valid: list[dict] = field(default_factory=list)          # in name order: {"name", "query", "mask", "image"}
    defects: dict[str, str] = field(default_factory=dict)    # defect → sample name


def rect_shape(label, x0, y0, x1, y1):
    return {"label": label, "points": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]}


def make_reasonseg_tree(root: Path, seed: int, defects=(), n_valid: int = 3) -> ReasonSegTree:
    """root/val: `n_valid` good samples (random sizes, one target and one ignore rectangle that do not
    overlap, so the mask is known without LISA's drawing order) and one sample per defect."""
    rng = np.random.default_rng(seed)
    split_dir = root / "val"
    split_dir.mkdir(parents=True)
    kinds = ["valid"] * n_valid + list(defects)
    names = sorted(f"{int(v):06d}" for v in rng.choice(1_000_000, size=len(kinds), replace=False))
    tree = ReasonSegTree(split_dir)
    for name, k in zip(names, rng.permutation(len(kinds))):
        kind = kinds[k]
        h, w = int(rng.integers(12, 30)), int(rng.integers(12, 30))
        image = np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8)
        x0, y0 = int(rng.integers(0, w // 2 - 2)), int(rng.integers(0, h - 3))
        x1, y1 = int(rng.integers(x0, w // 2)), int(rng.integers(y0, h))
        shapes = [rect_shape("target", x0, y0, x1, y1), rect_shape("ignore", w // 2 + 1, 0, w - 1, 2)]
        query = f"where is thing {name}?"
        if kind == "nan_point":
            shapes[0]["points"][1][0] = float("nan")
        elif kind == "inf_point":
            shapes[1]["points"][2][1] = float("inf")
        elif kind == "huge_coordinate":
            shapes[0]["points"][2] = [1e12, 1e12]
        elif kind == "far_outside":
            shapes[1]["points"][0][0] = 3 * w
        if kind != "orphan_json":
            if kind == "huge_image":
                header_only_png(split_dir / f"{name}.jpg", *HUGE)
            else:
                Image.fromarray(image).save(split_dir / f"{name}.jpg", quality=95)
        if kind != "missing_json":  # json.dumps writes NaN / Infinity, as Python's json reads them
            anno = {"text": [query], "is_sentence": bool(rng.integers(2)), "shapes": shapes}
            (split_dir / f"{name}.json").write_text(json.dumps(anno))
        if kind == "valid":
            mask = np.zeros((h, w), np.uint8)
            mask[0:3, w // 2 + 1 : w] = 255
            mask[y0 : y1 + 1, x0 : x1 + 1] = 1  # a polygon includes its outline
            tree.valid.append({"name": name, "query": query, "mask": mask, "image": image})
        else:
            tree.defects[kind] = name
    return tree


def test_valid_reasonseg_tree_gives_what_was_written(tmp_path):
    tree = make_reasonseg_tree(tmp_path, seed=11, n_valid=6)
    ds = ReasonSegDataset(root=str(tmp_path), rasterizer="pil")
    assert len(ds) == 6 and ds.bad_samples.summary() == {"n": 0, "items": []}
    for i, want in enumerate(tree.valid):
        it = ds[i]
        assert it["image_id"] == f"val/{want['name']}.jpg" and it["query"] == want["query"]
        assert np.array_equal(it["mask"], want["mask"]), np.argwhere(it["mask"] != want["mask"])


@pytest.mark.parametrize("defect", sorted(REASONSEG_DEFECTS))
def test_each_reasonseg_defect_is_one_line_naming_the_file(tmp_path, defect):
    tree = make_reasonseg_tree(tmp_path, seed=len(defect), defects=[defect])
    suffix, says = REASONSEG_DEFECTS[defect]
    with pytest.raises(CspexpError) as err:
        ReasonSegDataset(root=str(tmp_path), rasterizer="pil")
    message = one_line_error(err.value)
    assert str(tree.split_dir / f"{tree.defects[defect]}.{suffix}") in message and says in message, message


def test_reasonseg_defects_are_skipped_and_listed(tmp_path, caplog):
    tree = make_reasonseg_tree(tmp_path, seed=23, defects=sorted(REASONSEG_DEFECTS), n_valid=4)
    with caplog.at_level(logging.WARNING):
        ds = ReasonSegDataset(root=str(tmp_path), rasterizer="pil", on_error="skip")
    assert [ds[i]["query"] for i in range(len(ds))] == [v["query"] for v in tree.valid]
    assert all(np.array_equal(ds[i]["mask"], v["mask"]) for i, v in enumerate(tree.valid))
    summary = ds.bad_samples.summary()
    # images in name order, then the JSONs without an image
    expected = sorted(f"val/{name}.jpg" for d, name in tree.defects.items() if d != "orphan_json")
    expected.append(f"val/{tree.defects['orphan_json']}.json")
    assert summary["n"] == len(REASONSEG_DEFECTS) and [i["where"] for i in summary["items"]] == expected
    reasons = {i["where"].split("/")[1].split(".")[0]: i["reason"] for i in summary["items"]}
    for defect, name in tree.defects.items():
        assert REASONSEG_DEFECTS[defect][1] in reasons[name]
    assert sum("left out val/" in r.message for r in caplog.records) == len(REASONSEG_DEFECTS)


def test_flag_polygons_are_not_range_checked(tmp_path):
    """`flag` polygons are never drawn (LISA drops them): far-away points there are harmless."""
    tree = make_reasonseg_tree(tmp_path, seed=4, n_valid=1)
    path = tree.split_dir / f"{tree.valid[0]['name']}.json"
    anno = json.loads(path.read_text())
    anno["shapes"].append(rect_shape("flag", 0, 0, 1e6, 1e6))
    path.write_text(json.dumps(anno))
    assert np.array_equal(ReasonSegDataset(root=str(tmp_path), rasterizer="pil")[0]["mask"], tree.valid[0]["mask"])


def test_points_slightly_outside_the_image_are_allowed(tmp_path):
    tree = make_reasonseg_tree(tmp_path, seed=6, n_valid=1)
    path = tree.split_dir / f"{tree.valid[0]['name']}.json"
    anno = json.loads(path.read_text())
    h, w = tree.valid[0]["mask"].shape
    anno["shapes"].append(rect_shape("target", -3.5, h - 2, 2 * w, h + 0.5))  # within one image size
    path.write_text(json.dumps(anno))
    assert len(ReasonSegDataset(root=str(tmp_path), rasterizer="pil")) == 1


# ---------------------------------------------------------------------------------------- refCOCO


def _refer_with(tmp_path, segmentation_of_10=None, segmentation_of_12=None):
    from test_refcoco import ANNOTATIONS, write_refer

    annotations = [dict(a) for a in ANNOTATIONS]
    if segmentation_of_10 is not None:
        annotations[0]["segmentation"] = segmentation_of_10
    if segmentation_of_12 is not None:
        annotations[2]["segmentation"] = segmentation_of_12
    return write_refer(tmp_path, annotations=annotations)


@pytest.mark.parametrize(
    ("seg10", "seg12", "split", "says"),
    [
        ([[2, 3, 1e12, 3, 9, 8]], None, "val", "annotation 10 of instances.json: polygon 0: point 1 (1e+12, 3) lies outside"),
        ([[2, 3, float("nan"), 3, 9, 8]], None, "val", "annotation 10 of instances.json: polygon 0: point 1 is (nan, 3)"),
        ([[2, 3, 9, 3, 9, -40]], None, "val", "point 2 (9, -40) lies outside the 32×24 image"),
        (None, {"size": [20, 21], "counts": [62, 3, 15, 2, 338]}, "testB", "RLE 'size' is [20, 21], but its image is [20, 20]"),
        (None, {"size": [20, 20], "counts": [62, 3, 15, 2, 300]}, "testB", "they sum to 382"),
        (None, {"size": [20, 20], "counts": "0" + chr(48 + 0x20)}, "testB", "not COCO's compressed RLE"),
    ],
)
def test_refcoco_segmentations_are_checked_at_build(tmp_path, seg10, seg12, split, says):
    refer = _refer_with(tmp_path, seg10, seg12)
    with pytest.raises(CspexpError) as err:
        RefCocoDataset(root=str(refer), split=split, rasterizer="skimage" if seg12 is None else "auto")
    message = one_line_error(err.value)
    assert says in message, message
    if seg10 is not None:  # with skip, ref 0's two sentences are left out and listed; ref 3 remains
        ds = RefCocoDataset(root=str(refer), split=split, on_error="skip", rasterizer="skimage")
        assert [s.query for s in ds.samples] == ["nothing"]
        assert [(i["where"], i["samples"]) for i in ds.bad_samples.summary()["items"]] == [("ref 0", 2)]


def test_rle_counts_decode_like_pycocotools():
    """COCO's compressed counts of a known mask: the runs written here by hand, encoded by
    pycocotools when it is installed (else the string it gives, stored here)."""
    mask = np.zeros((5, 4), np.uint8, order="F")
    mask[1:3, 1] = 1
    mask[0:5, 3] = 1
    runs = [6, 2, 7, 5]  # column-major: 6 zeros, 2 ones, 7 zeros, 5 ones
    if pycocotools_available():
        from pycocotools import mask as coco_mask

        encoded = coco_mask.encode(mask)["counts"].decode()
    else:
        encoded = "6273"
    assert rle_counts(encoded) == runs


def test_refcoco_image_over_max_pixels_is_skipped(tmp_path):
    from test_refcoco import IMAGES

    refer = _refer_with(tmp_path)
    header_only_png(refer / "images" / "mscoco" / "images" / "train2014" / IMAGES[1]["file_name"], *HUGE)
    with pytest.raises(CspexpError) as err:
        RefCocoDataset(root=str(refer), rasterizer="skimage")
    assert "COCO_train2014_000000000002.jpg is 20000×20000 = 400 MP, over dataset.max_pixels" in one_line_error(err.value)
    ds = RefCocoDataset(root=str(refer), on_error="skip", rasterizer="skimage")
    assert [s.query for s in ds.samples] == ["the left dog", "dog"] and ds.bad_samples.summary()["n"] == 1


# ---------------------------------------------------------------------------------------- CLI


def cspexp(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "cspexp", "model=tiny_random", "logger=none", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    ("dataset", "defect"),
    [("folder", "lisa_value"), ("folder", "huge_image"), ("reasonseg", "huge_coordinate")],
)
def test_cli_bad_data_is_one_line_and_no_results(tmp_path, dataset, defect):
    data, run_dir = tmp_path / "data", tmp_path / "run"
    if dataset == "folder":
        tree = make_folder_tree(data, seed=13, defects=[defect])
        bad_file = str(tree.defects[defect][1])
        args = ["dataset=folder", f"dataset.root={data}", "dataset.mask_format=lisa"]
        says = FOLDER_DEFECTS[defect]
    else:
        tree = make_reasonseg_tree(data, seed=13, defects=[defect])
        bad_file = str(tree.split_dir / f"{tree.defects[defect]}.json")
        args = ["dataset=reasonseg", f"dataset.root={data}"]
        says = REASONSEG_DEFECTS[defect][1]
    proc = cspexp(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and bad_file in lines[0] and says in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and "DecompressionBomb" not in proc.stderr
    assert not (run_dir / "results.json").exists() and (run_dir / "error.json").exists()


@pytest.mark.slow
def test_cli_skip_lists_every_defect_in_results(tmp_path):
    data, run_dir = tmp_path / "data", tmp_path / "run"
    tree = make_reasonseg_tree(data, seed=29, defects=sorted(REASONSEG_DEFECTS), n_valid=2)
    proc = cspexp("dataset=reasonseg", f"dataset.root={data}", "dataset.on_error=skip", "dataset.num_workers=2",
                  f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["n_samples"] == 2 and results["skipped"]["n"] == len(REASONSEG_DEFECTS)
    listed = {i["where"] for i in results["skipped"]["items"]}
    assert listed == {f"val/{name}.{'json' if d == 'orphan_json' else 'jpg'}" for d, name in tree.defects.items()}
