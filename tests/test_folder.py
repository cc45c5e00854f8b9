"""`dataset=folder` on a tiny folder the test writes."""

from __future__ import annotations

import json

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
