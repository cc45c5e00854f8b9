"""`dataset=refcoco` on a tiny REFER tree the tests write (refs pickle, instances.json, COCO-named
images): sentences, splits and masks against hand-made expectations, skimage against pycocotools
(LISA's decoder), and the error paths."""

from __future__ import annotations

import collections
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cspexp.data.refcoco import RefCocoDataset, pycocotools_available, segmentation_mask
from cspexp.utils.errors import ConfigError, MissingPathError

needs_pycocotools = pytest.mark.skipif(not pycocotools_available(), reason="needs pycocotools")
RASTERIZERS = [pytest.param("pycocotools", marks=needs_pycocotools), "skimage"]

# Two images; annotation 11 has two overlapping polygons, 12 is an uncompressed RLE, 13 is empty.
IMAGES = [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 24, "width": 32},
          {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": 20, "width": 20}]
ANNOTATIONS = [
    {"id": 10, "image_id": 1, "segmentation": [[2, 3, 9, 3, 9, 8, 2, 8]]},
    {"id": 11, "image_id": 1, "segmentation": [[12, 2, 16, 2, 16, 6, 12, 6], [14, 4, 20, 4, 20, 10, 14, 10]]},
    # column-major runs on 20×20: 62 off, 3 on (column 3, rows 2-4), 15 off, 2 on (column 4, rows 0-1), rest off
    {"id": 12, "image_id": 2, "segmentation": {"size": [20, 20], "counts": [62, 3, 15, 2, 318]}},
    {"id": 13, "image_id": 2, "segmentation": []},
    {"id": 14, "image_id": 2, "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5]]},
]
REFS = [  # (ref_id, ann_id, image_id, split, sentences), in the refs file's order
    (0, 10, 1, "val", [" The LEFT dog ", "dog"]),
    (1, 11, 1, "testA", ["two boxes"]),
    (2, 12, 2, "testB", ["thin line"]),
    (3, 13, 2, "val", ["nothing"]),
    (4, 14, 2, "train", ["corner"]),
]


def hand_mask(ann_id: int) -> np.ndarray:
    """The masks above worked out by hand: a pixel is in a polygon when its centre (x + ½, y + ½) is."""
    m = np.zeros((24, 32) if ann_id in (10, 11) else (20, 20), np.uint8)
    if ann_id == 10:
        m[3:8, 2:9] = 1
    elif ann_id == 11:
        m[2:6, 12:16] = 1
        m[4:10, 14:20] = 1  # the union: where the two polygons overlap it is 1, not 2
    elif ann_id == 12:
        m[2:5, 3] = 1
        m[0:2, 4] = 1
    elif ann_id == 14:
        m[0:5, 0:5] = 1
    return m


def write_refer(root, dataset="refcoco", split_by="unc", refs=REFS, annotations=ANNOTATIONS):
    """root/refer_seg in LISA's layout; returns the refer_seg folder."""
    refer = root / "refer_seg"
    (refer / dataset).mkdir(parents=True, exist_ok=True)
    images = refer / "images" / "mscoco" / "images" / "train2014"
    images.mkdir(parents=True, exist_ok=True)
    for info in IMAGES:
        pixels = np.full((info["height"], info["width"], 3), 40 * info["id"], np.uint8)
        Image.fromarray(pixels).save(images / info["file_name"], quality=95)
    ref_list = [
        {"ref_id": rid, "ann_id": aid, "image_id": iid, "split": split, "category_id": 1,
         "file_name": f"COCO_train2014_{iid:012d}_{aid}.jpg", "sent_ids": list(range(len(sents))),
         "sentences": [{"sent": s, "raw": s, "tokens": s.split(), "sent_id": 100 * rid + j} for j, s in enumerate(sents)]}
        for rid, aid, iid, split, sents in refs
    ]
    with (refer / dataset / f"refs({split_by}).p").open("wb") as f:
        pickle.dump(ref_list, f, protocol=2)  # the REFER files were written by Python 2
    instances = {"images": IMAGES, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    (refer / dataset / "instances.json").write_text(json.dumps(instances))
    return refer


# ------------------------------------------------------------------------------------------ items


@pytest.mark.parametrize("rasterizer", RASTERIZERS)
def test_every_sentence_of_the_split_is_a_sample(tmp_path, rasterizer):
    ds = RefCocoDataset(root=str(write_refer(tmp_path)), split="val", rasterizer=rasterizer)
    assert len(ds) == 3
    items = [ds[i] for i in range(3)]
    assert [it["query"] for it in items] == ["the left dog", "dog", "nothing"]  # stripped, lower-cased (LISA)
    assert [it["idx"] for it in items] == [0, 1, 2]
    assert all(it["is_sentence"] is False and it["query_kind"] == "phrase" for it in items)
    assert items[0]["image_id"] == "COCO_train2014_000000000001.jpg"
    assert items[0]["image"].shape == (24, 32, 3) and items[2]["image"].shape == (20, 20, 3)
    assert np.array_equal(items[0]["mask"], hand_mask(10)) and np.array_equal(items[1]["mask"], hand_mask(10))
    assert items[2]["mask"].shape == (20, 20) and not items[2]["mask"].any()  # empty segmentation
    assert set(ds.vocabulary()) == {"the left dog", "dog", "nothing"}


@pytest.mark.parametrize("rasterizer", RASTERIZERS)
def test_overlapping_polygons_give_their_union(tmp_path, rasterizer):
    ds = RefCocoDataset(root=str(write_refer(tmp_path)), split="testA", rasterizer=rasterizer)
    assert len(ds) == 1 and ds[0]["query"] == "two boxes"
    assert np.array_equal(ds[0]["mask"], hand_mask(11))


@needs_pycocotools
def test_rle_is_decoded_with_pycocotools(tmp_path):
    ds = RefCocoDataset(root=str(write_refer(tmp_path)), split="testB", rasterizer="pycocotools")
    assert np.array_equal(ds[0]["mask"], hand_mask(12))
    # compressed RLE, its counts a str as in instances.json (encoded by pycocotools from the hand mask)
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(hand_mask(12)))
    compressed = {"size": [20, 20], "counts": rle["counts"].decode()}
    assert np.array_equal(segmentation_mask(compressed, 20, 20, "pycocotools"), hand_mask(12))
    assert np.array_equal(segmentation_mask([compressed, compressed], 20, 20, "pycocotools"), hand_mask(12))


def test_rle_without_pycocotools_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="annotation 12 of instances.json is RLE; decoding it needs pycocotools"):
        RefCocoDataset(root=str(write_refer(tmp_path)), split="testB", rasterizer="skimage")


def test_splits_follow_refer(tmp_path):
    refer = write_refer(tmp_path)

    def queries(split):
        ds = RefCocoDataset(root=str(refer), split=split)
        return [s.query for s in ds.samples]

    assert queries("testA") == ["two boxes"]
    assert queries("train") == ["corner"]
    if pycocotools_available():  # testB's annotation is RLE
        assert queries("testB") == ["thin line"]
        assert queries("test") == ["two boxes", "thin line"]  # every ref whose split contains "test"
    with pytest.raises(ConfigError, match=r"has no ref in split 'testC'; its refs' splits are \['testA', 'testB', 'train', 'val'\]"):
        RefCocoDataset(root=str(refer), split="testC")
    assert len(RefCocoDataset(root=str(refer), split="val", n=2)) == 2


def test_refcocog_umd_and_root_forms(tmp_path):
    write_refer(tmp_path, dataset="refcocog", split_by="umd", refs=[(7, 10, 1, "test", ["a dog"])])
    for root in (tmp_path, tmp_path / "refer_seg"):
        ds = RefCocoDataset(root=str(root), dataset="refcocog", split_by="umd", split="test")
        assert [s.query for s in ds.samples] == ["a dog"]
    moved = tmp_path / "coco"
    (tmp_path / "refer_seg" / "images").rename(moved)
    with pytest.raises(MissingPathError, match="COCO train2014 image folder .* does not exist"):
        RefCocoDataset(root=str(tmp_path), dataset="refcocog", split_by="umd", split="test")
    ds = RefCocoDataset(root=str(tmp_path), dataset="refcocog", split_by="umd", split="test",
                        images=str(moved / "mscoco" / "images" / "train2014"))
    assert ds[0]["image"].shape == (24, 32, 3)


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dataset": "refclef"}, "dataset.dataset='refclef' is not allowed; use one of ['refcoco', 'refcoco+', 'refcocog']"),
        ({"dataset": "refcoco+", "split_by": "google"},
         "dataset.split_by='google' does not exist for refcoco+; the REFER splits are refcoco: unc | google; "
         "refcoco+: unc; refcocog: umd | google"),
        ({"dataset": "refcocog", "split_by": "unc"}, "dataset.split_by='unc' does not exist for refcocog"),
        ({"split": "validation"}, "dataset.split='validation' is not allowed"),
        ({"rasterizer": "opencv"}, "dataset.rasterizer='opencv' is not allowed"),
        ({"on_error": "warn"}, "dataset.on_error='warn' is not allowed"),
    ],
)
def test_bad_options(tmp_path, kwargs, message):
    with pytest.raises(ConfigError) as err:
        RefCocoDataset(root=str(write_refer(tmp_path)), **kwargs)
    assert message in str(err.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(MissingPathError, match="dataset.root=.* does not exist"):
        RefCocoDataset(root=str(tmp_path / "absent"))
    refer = write_refer(tmp_path)
    with pytest.raises(MissingPathError, match=r"refs file .*refcoco/refs\(google\).p does not exist"):
        RefCocoDataset(root=str(refer), split_by="google")
    with pytest.raises(MissingPathError, match=r"holds no 'refcoco\+' folder"):
        RefCocoDataset(root=str(refer), dataset="refcoco+")
    (refer / "images" / "mscoco" / "images" / "train2014" / IMAGES[0]["file_name"]).unlink()
    with pytest.raises(MissingPathError, match=r"image .*COCO_train2014_000000000001.jpg does not exist"):
        RefCocoDataset(root=str(refer))


def test_refs_pickle_may_hold_only_plain_data(tmp_path):
    refer = write_refer(tmp_path)
    with (refer / "refcoco" / "refs(unc).p").open("wb") as f:
        pickle.dump([collections.OrderedDict(ref_id=0)], f)
    with pytest.raises(ConfigError, match=r"is not a REFER refs pickle \(refuses to build collections.OrderedDict"):
        RefCocoDataset(root=str(refer))
    (refer / "refcoco" / "refs(unc).p").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="is not a REFER refs pickle"):
        RefCocoDataset(root=str(refer))
    write_refer(tmp_path)  # good refs again, then instances.json without annotations
    (refer / "refcoco" / "instances.json").write_text('{"images": []}')
    with pytest.raises(ConfigError, match="is not a COCO instances file with 'images' and 'annotations'"):
        RefCocoDataset(root=str(refer))


def test_bad_refs_raise_or_are_skipped_by_sentence(tmp_path, caplog):
    annotations = [dict(a) for a in ANNOTATIONS]
    annotations[0] = {**annotations[0], "segmentation": [[1, 2, 3, 4]]}  # a polygon of two points
    refs = [*REFS, (5, 99, 1, "val", ["ghost"])]  # annotation 99 does not exist
    refer = write_refer(tmp_path, refs=refs, annotations=annotations)
    with pytest.raises(ConfigError, match=r"annotation 10 of instances.json: polygon 0 must be a flat list of >= 3 x, y pairs"):
        RefCocoDataset(root=str(refer))
    ds = RefCocoDataset(root=str(refer), on_error="skip")
    assert [s.query for s in ds.samples] == ["nothing"]
    summary = ds.bad_samples.summary()
    assert summary["n"] == 3  # ref 0's two sentences and ref 5's one
    assert [(i["where"], i["samples"]) for i in summary["items"]] == [("ref 0", 2), ("ref 5", 1)]
    assert "names annotation 99 / image 1, which instances.json does not hold" in summary["items"][1]["reason"]
    assert any("left out ref 5" in r.message for r in caplog.records)


def test_image_of_another_size_than_instances_says(tmp_path):
    refer = write_refer(tmp_path)
    path = refer / "images" / "mscoco" / "images" / "train2014" / IMAGES[1]["file_name"]
    Image.fromarray(np.zeros((21, 20, 3), np.uint8)).save(path)
    with pytest.raises(ConfigError, match=r"COCO_train2014_000000000002.jpg is 20×21 but instances.json says 20×20"):
        RefCocoDataset(root=str(refer))
    ds = RefCocoDataset(root=str(refer), on_error="skip")
    assert [s.query for s in ds.samples] == ["the left dog", "dog"]
    assert ds.bad_samples.summary()["n"] == 1


# ------------------------------------------------------------------------------------------ rasterisers


@needs_pycocotools
def test_skimage_differs_from_pycocotools_only_near_the_outline():
    """The honest number for dataset.rasterizer=skimage: how far it is from LISA's pycocotools masks."""
    from pycocotools import mask as coco_mask

    rows, cols = np.mgrid[0:60, 0:80]
    centres = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], 1)  # pixel centres, x y

    def distance_to_outline(xy: np.ndarray) -> np.ndarray:
        """Distance of every pixel centre to the polygon's nearest edge, [60, 80]."""
        a, b = xy, np.roll(xy, -1, axis=0)
        ab = b - a
        t = np.clip(((centres[:, None] - a) * ab).sum(-1) / (ab * ab).sum(-1), 0, 1)
        nearest = a + t[..., None] * ab
        return np.linalg.norm(centres[:, None] - nearest, axis=-1).min(1).reshape(60, 80)

    rng = np.random.default_rng(0)
    diffs, areas, worst_dist = [], [], 0.0
    for _ in range(200):
        k = int(rng.integers(3, 12))
        angles = np.sort(rng.uniform(0, 2 * np.pi, k))
        radii = rng.uniform(3, 25, k)
        poly = np.stack([40 + radii * np.cos(angles), 30 + radii * np.sin(angles)], 1).ravel().tolist()
        ref = coco_mask.decode(coco_mask.frPyObjects([poly], 60, 80))[..., 0]
        assert np.array_equal(segmentation_mask([poly], 60, 80, "pycocotools"), ref)
        ours = segmentation_mask([poly], 60, 80, "skimage")
        dist = distance_to_outline(np.asarray(poly).reshape(-1, 2))
        worst_dist = max(worst_dist, float(dist[ours != ref].max(initial=0)))
        near = dist < 0.25
        assert not np.any((ours != ref) & ~near), "skimage and pycocotools disagree away from the outline"
        diffs.append(int((ours != ref).sum()))
        areas.append(int(ref.sum()))
    mean, worst = float(np.mean(diffs)), max(diffs)
    print(f"skimage vs pycocotools: {mean:.2f} px per polygon (max {worst}), mean area {np.mean(areas):.0f} px, "
          f"differing pixels at most {worst_dist:.2f} px from the outline")
    assert mean < 8 and worst <= 25  # measured: 5.0 px mean, 18 max, all within 0.16 px of the outline


def test_auto_falls_back_to_skimage_without_pycocotools(tmp_path, monkeypatch):
    import cspexp.data.refcoco as refcoco

    monkeypatch.setattr(refcoco, "pycocotools_available", lambda: False)
    ds = RefCocoDataset(root=str(write_refer(tmp_path)), split="testA")
    assert ds.rasterizer == "skimage" and np.array_equal(ds[0]["mask"], hand_mask(11))
    with pytest.raises(ConfigError, match="dataset.rasterizer=pycocotools needs pycocotools: pip install pycocotools"):
        RefCocoDataset(root=str(tmp_path), split="testA", rasterizer="pycocotools")


@pytest.mark.slow
def test_cli_end_to_end_on_refcoco_val(tmp_path):
    refer = write_refer(tmp_path / "data")
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "cspexp", "model=tiny_random", "dataset=refcoco", f"dataset.root={refer.parent}",
         "dataset.split=val", "dataset.num_workers=0", "logger=none", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["n_samples"] == 3 and results["dataset"] == {"name": "refcoco", "split": "val"}
    assert results["metrics_by_kind"]["phrase"]["n"] == 3 and results["skipped"]["n"] == 0
    rows = sorted(json.loads(line)["idx"] for line in (run_dir / "samples.jsonl").read_text().splitlines())
    assert rows == [0, 1, 2]
