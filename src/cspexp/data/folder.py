"""`dataset=folder`: your own images, masks and queries.

Layout under ``dataset.root``::

    queries.jsonl        one JSON object per line: {"image": "img/0001.jpg", "mask": "mask/0001.png",
                         "query": "the dog on the left", "is_sentence": false}
    img/…, mask/…        paths are relative to the root

``is_sentence`` (optional, default false) picks LISA's sentence or phrase template; ``query_kind``
(optional) groups the metrics. Masks are single-channel PNGs of the image's size; with
``mask_format: binary`` (default) any non-zero pixel is target, with ``mask_format: lisa`` the values
are LISA's labels (0 background, 1 target, 255 ignored). Images are read upright by their EXIF
orientation, as LISA's ``cv2.imread`` reads them; masks as stored.

Every line is checked when the dataset is built — valid JSON with the three keys, both files present
and readable, mask and image of one size — so a bad one stops the run before the model loads, or with
``on_error: skip`` is left out and counted (`cspexp.data.files`). ``n`` keeps the first n usable lines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from torch.utils.data import Dataset

from cspexp.data.files import (
    BadSample,
    BadSamples,
    OnError,
    SampleReadError,
    decode_check,
    image_size,
    read_gray,
    read_rgb,
)
from cspexp.utils.choices import check_call
from cspexp.utils.errors import ConfigError, MissingPathError

MaskFormat = Literal["binary", "lisa"]


class FolderDataset(Dataset):
    def __init__(
        self,
        root: str,
        annotations: str = "queries.jsonl",
        n: int | None = None,
        mask_format: MaskFormat = "binary",
        split: str | None = None,
        on_error: OnError = "raise",
    ) -> None:
        check_call(FolderDataset, {"mask_format": mask_format}, "dataset")
        if n is not None and n < 1:
            raise ConfigError(f"dataset.n must be >= 1 or null, got {n}")
        self.bad_samples = BadSamples(on_error)
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingPathError(f"dataset.root={str(root)!r} does not exist or is not a directory")
        ann = self.root / annotations
        if not ann.is_file():
            raise MissingPathError(f"dataset.annotations: {ann} does not exist")
        self.mask_format = mask_format
        self.entries = self._read(ann, n)

    def _read(self, ann: Path, n: int | None) -> list[dict]:
        entries = []
        for line_no, line in enumerate(ann.read_text(encoding="utf-8").splitlines(), start=1):
            if n is not None and len(entries) >= n:
                break
            if not line.strip():
                continue
            where = f"{ann}:{line_no}"
            try:
                entries.append(self._check(line, where))
            except BadSample as bad:
                self.bad_samples.report(bad, where=f"{ann.name}:{line_no}")
        if not entries:
            if self.bad_samples.items:
                raise ConfigError(f"every line of {ann} was skipped as unusable (dataset.on_error=skip)")
            raise ConfigError(f"{ann} holds no queries")
        return entries

    def _check(self, line: str, where: str) -> dict:
        """The line's entry, after checking its JSON and both files; BadSample otherwise."""
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadSample(f"{where} is not valid JSON ({exc.msg})") from None
        if not isinstance(entry, dict) or not {"image", "mask", "query"} <= entry.keys():
            raise BadSample(f"{where} needs the keys 'image', 'mask' and 'query'")
        if not isinstance(entry["query"], str) or not entry["query"].strip():
            raise BadSample(f"{where}: 'query' must be a non-empty string, got {entry['query']!r}")
        sizes = {}
        for key in ("image", "mask"):
            path = self.root / str(entry[key])
            if not path.is_file():
                raise BadSample(f"{where}: {key} file {path} does not exist", missing=True)
            sizes[key] = image_size(path, what=f"{where}: {key} file", upright=key == "image")
            if self.bad_samples.skip:
                decode_check(path, what=f"{where}: {key} file")
        if sizes["mask"] != sizes["image"]:
            (mh, mw), (ih, iw) = sizes["mask"], sizes["image"]
            raise BadSample(f"{where}: mask {entry['mask']} is {mw}×{mh}, its image {iw}×{ih} (they must match)")
        return entry

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self.entries):
            raise IndexError(i)
        e = self.entries[i]
        image = read_rgb(self.root / e["image"])
        mask = read_gray(self.root / e["mask"])
        if mask.shape != image.shape[:2]:
            raise SampleReadError(f"mask {e['mask']} is {mask.shape[1]}×{mask.shape[0]}, "
                                  f"its image {image.shape[1]}×{image.shape[0]}")
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

    def vocabulary(self) -> list[str]:
        """The queries (the tiny models' word-level tokenizer is built from them)."""
        return sorted({str(e["query"]) for e in self.entries})
