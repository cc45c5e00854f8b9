"""`dataset=folder`: your own images, masks and queries.

Layout under ``dataset.root``::

    queries.jsonl        one JSON object per line: {"image": "img/0001.jpg", "mask": "mask/0001.png",
                         "query": "the dog on the left", "is_sentence": false}
    img/…, mask/…        paths are relative to the root

``is_sentence`` (optional, default false) picks LISA's sentence or phrase template; ``query_kind``
(optional) groups the metrics. Masks are single-channel PNGs of the image's size; with
``mask_format: binary`` (default) any non-zero pixel is target, with ``mask_format: lisa`` the values
are LISA's labels (0 background, 1 target, 255 ignored).
Every file is checked when the dataset is built, so a missing one stops the run before the model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from cspexp.utils.errors import ConfigError, MissingPathError

MASK_FORMATS = ("binary", "lisa")


class FolderDataset(Dataset):
    def __init__(
        self,
        root: str,
        annotations: str = "queries.jsonl",
        n: int | None = None,
        mask_format: str = "binary",
        split: str | None = None,
    ) -> None:
        if mask_format not in MASK_FORMATS:
            raise ConfigError(f"dataset.mask_format={mask_format!r} is not allowed; use one of {list(MASK_FORMATS)}")
        if n is not None and n < 1:
            raise ConfigError(f"dataset.n must be >= 1 or null, got {n}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingPathError(f"dataset.root={str(root)!r} does not exist or is not a directory")
        ann = self.root / annotations
        if not ann.is_file():
            raise MissingPathError(f"dataset.annotations: {ann} does not exist")
        self.mask_format = mask_format
        self.entries = self._read(ann)[: n if n is not None else None]

    def _read(self, ann: Path) -> list[dict]:
        entries = []
        for line_no, line in enumerate(ann.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{ann}:{line_no}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where} is not valid JSON ({exc.msg})") from None
            if not isinstance(entry, dict) or not {"image", "mask", "query"} <= entry.keys():
                raise ConfigError(f"{where} needs the keys 'image', 'mask' and 'query'")
            for key in ("image", "mask"):
                if not (self.root / entry[key]).is_file():
                    raise MissingPathError(f"{where}: {key} file {self.root / entry[key]} does not exist")
            entries.append(entry)
        if not entries:
            raise ConfigError(f"{ann} holds no queries")
        return entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self.entries):
            raise IndexError(i)
        e = self.entries[i]
        image = np.asarray(Image.open(self.root / e["image"]).convert("RGB"))
        mask = np.asarray(Image.open(self.root / e["mask"]).convert("L"))
        if mask.shape != image.shape[:2]:
            raise ConfigError(f"mask {e['mask']} is {mask.shape[1]}×{mask.shape[0]}, its image {image.shape[1]}×{image.shape[0]}")
        if self.mask_format == "binary":
            mask = (mask > 0).astype(np.uint8)
        return {
            "idx": i,
            "image": image,
            "mask": mask,
            "query": e["query"],
            "is_sentence": bool(e.get("is_sentence", False)),
            "query_kind": e.get("query_kind", "folder"),
            "image_id": e["image"],
        }
