"""`dataset=folder` on a tiny folder the test writes."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from cspexp.data.folder import FolderDataset
from cspexp.utils.errors import ConfigError, MissingPathError


def write_folder(root, n=3):
    (root / "img").mkdir(parents=True)
    (root / "mask").mkdir()
    lines = []
    for i in range(n):
        img = np.full((20, 30, 3), 10 * i, dtype=np.uint8)
        mask = np.zeros((20, 30), dtype=np.uint8)
        mask[5:10, 5 + i : 15] = 255
        Image.fromarray(img).save(root / "img" / f"{i}.png")
        Image.fromarray(mask).save(root / "mask" / f"{i}.png")
        lines.append(json.dumps({"image": f"img/{i}.png", "mask": f"mask/{i}.png", "query": f"thing {i}",
                                 "is_sentence": i == 1}))
    (root / "queries.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_items(tmp_path):
    ds = FolderDataset(root=str(write_folder(tmp_path)))
    assert len(ds) == 3
    it = ds[2]
    assert it["idx"] == 2 and it["query"] == "thing 2" and it["is_sentence"] is False
    assert it["image"].shape == (20, 30, 3) and it["mask"].dtype == np.uint8
    assert set(np.unique(it["mask"])) == {0, 1} and it["mask"].sum() == 5 * 8
    assert ds[1]["is_sentence"] is True
    assert len(FolderDataset(root=str(tmp_path), n=2)) == 2


def test_lisa_mask_format_keeps_ignore_label(tmp_path):
    root = write_folder(tmp_path)
    ds = FolderDataset(root=str(root), mask_format="lisa")
    assert set(np.unique(ds[0]["mask"])) == {0, 255}


def test_errors_name_the_file(tmp_path):
    with pytest.raises(MissingPathError, match="dataset.root"):
        FolderDataset(root=str(tmp_path / "absent"))
    root = write_folder(tmp_path / "a")
    (root / "mask" / "1.png").unlink()
    with pytest.raises(MissingPathError, match=r"queries.jsonl:2: mask file .*1.png does not exist"):
        FolderDataset(root=str(root))
    root = write_folder(tmp_path / "b")
    with open(root / "queries.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(ConfigError, match=r"queries.jsonl:4 is not valid JSON"):
        FolderDataset(root=str(root))


def test_mask_of_another_size_stops_the_build(tmp_path):
    root = write_folder(tmp_path)
    Image.fromarray(np.zeros((21, 30), np.uint8)).save(root / "mask" / "2.png")
    with pytest.raises(ConfigError, match=r"queries.jsonl:3: mask mask/2.png is 30×21, its image 30×20"):
        FolderDataset(root=str(root))


def test_skip_leaves_bad_lines_out_and_counts_them(tmp_path, caplog):
    root = write_folder(tmp_path, n=5)
    lines = (root / "queries.jsonl").read_text().splitlines()
    lines[1] = "{not json"                                            # line 2: malformed
    lines[2] = json.dumps({"image": "img/2.png", "query": "no mask"})  # line 3: a key is missing
    lines.insert(3, json.dumps({"image": "img/2.png", "mask": "mask/2.png", "query": ""}))  # line 4: no query
    (root / "mask" / "3.png").unlink()                               # line 5: mask file missing
    (root / "img" / "4.png").write_bytes(b"\x89PNG but not really")   # line 6: image unreadable
    lines.append(json.dumps({"image": "img/0.png", "mask": "mask/0.png", "query": "again"}))  # line 7: fine
    (root / "queries.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"queries.jsonl:2 is not valid JSON"):
        FolderDataset(root=str(root))
    with caplog.at_level(logging.WARNING):
        ds = FolderDataset(root=str(root), on_error="skip")
    assert [ds[i]["query"] for i in range(len(ds))] == ["thing 0", "again"]
    assert [ds[i]["idx"] for i in range(len(ds))] == [0, 1]
    summary = ds.bad_samples.summary()
    assert summary["n"] == 5
    assert [i["where"] for i in summary["items"]] == [f"queries.jsonl:{k}" for k in (2, 3, 4, 5, 6)]
    reasons = [i["reason"] for i in summary["items"]]
    assert "is not valid JSON" in reasons[0] and "needs the keys 'image', 'mask' and 'query'" in reasons[1]
    assert "'query' must be a non-empty string, got ''" in reasons[2]
    assert "mask file" in reasons[3] and "3.png does not exist" in reasons[3]
    assert "image file" in reasons[4] and "cannot be read as an image" in reasons[4]
    assert sum("dataset.on_error=skip: left out" in r.message for r in caplog.records) == 5
    assert len(FolderDataset(root=str(root), on_error="skip", n=1)) == 1  # n counts usable lines


def test_truncated_image_raises_when_read_or_is_skipped_when_built(tmp_path):
    """A JPEG cut short: its header is intact, so only decoding the pixels finds it."""
    root = write_folder(tmp_path)
    noise = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "img" / "1.jpg", quality=95)
    data = (root / "img" / "1.jpg").read_bytes()
    (root / "img" / "1.jpg").write_bytes(data[: int(len(data) * 0.7)])
    queries = (root / "queries.jsonl").read_text().replace("img/1.png", "img/1.jpg")
    (root / "queries.jsonl").write_text(queries)
    ds = FolderDataset(root=str(root))  # the cheap checks pass
    with pytest.raises(ConfigError, match=r"image .*img/1.jpg cannot be decoded"):
        ds[1]
    skipping = FolderDataset(root=str(root), on_error="skip")
    assert len(skipping) == 2 and "img/1.jpg cannot be decoded" in skipping.bad_samples.summary()["items"][0]["reason"]


def test_bad_on_error_and_all_skipped(tmp_path):
    root = write_folder(tmp_path, n=1)
    with pytest.raises(ConfigError, match=r"dataset.on_error='drop' is not allowed; use one of \['raise', 'skip'\]"):
        FolderDataset(root=str(root), on_error="drop")
    (root / "mask" / "0.png").unlink()
    with pytest.raises(ConfigError, match="every line of .*queries.jsonl was skipped"):
        FolderDataset(root=str(root), on_error="skip")


def test_exif_rotated_image_is_read_upright(tmp_path):
    """Stored 20×30 with EXIF orientation 6 (turn 90° clockwise): upright it is 30×20, and so is its mask."""
    root = write_folder(tmp_path, n=1)
    raw = np.full((20, 30, 3), 230, np.uint8)
    raw[:, :15] = 20  # dark left half → the top half once upright
    img = Image.fromarray(raw)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(root / "img" / "0.jpg", exif=exif, quality=95)
    Image.fromarray(np.zeros((30, 20), np.uint8)).save(root / "mask" / "0.png")
    (root / "queries.jsonl").write_text(json.dumps({"image": "img/0.jpg", "mask": "mask/0.png", "query": "q"}) + "\n")
    it = FolderDataset(root=str(root))[0]
    assert it["image"].shape == (30, 20, 3) and it["mask"].shape == (30, 20)
    assert it["image"][:15].mean() < 60 and it["image"][15:].mean() > 190
