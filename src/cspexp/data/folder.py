"""`dataset=folder`: your own images, masks and queries.

Layout under ``dataset.root``::

    queries.jsonl        one JSON object per line: {"image": "img/0001.jpg", "mask": "mask/0001.png",
                         "query": "the dog on the left", "is_sentence": false}
    img/…, mask/…        paths are relative to the root

``is_sentence`` (optional, default false) picks LISA's sentence or phrase template; ``query_kind``
(optional) groups the metrics. Masks are single-channel PNGs of the image's size; with
``mask_format: binary`` (default) any non-zero pixel is target (every value 0..255 is allowed), with
``mask_format: lisa`` the values are LISA's labels and only they are allowed: 0 background, 1 target,
255 ignored. Images are read upright by their EXIF orientation, as LISA's ``cv2.imread`` reads them;
masks as stored.

Every line is checked when the dataset is built — valid JSON with the three keys, both files present
and readable, image and mask within ``max_pixels``, mask and image of one size, the mask grey
(`cspexp.data.files.read_mask`: a colour mask is refused, not converted) with values its
``mask_format`` allows — so a bad one stops the run before the model loads, or with ``on_error: skip``
is left out and counted (`cspexp.data.files`). Every mask is therefore decoded once at build time.
A ``lisa`` mask with ignored pixels (255) but no target pixel (1) is allowed (LISA's labels permit it)
but logged as a warning: it is what a 0/255 binary mask read as ``lisa`` looks like, and its sample can
only score 0 or 1. ``n`` keeps the first n usable lines.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import numpy as np
from torch.utils.data import Dataset

from cspexp.data.files import (
    MAX_PIXELS,
    BadSample,
    BadSamples,
    OnError,
    SampleReadError,
    check_max_pixels,
    decode_check,
    image_size,
    read_gray,
    read_mask,
    read_rgb,
)
from cspexp.utils.choices import PositiveInt, check_call
from cspexp.utils.errors import ConfigError, MissingPathError

log = logging.getLogger(__name__)

MaskFormat = Literal["binary", "lisa"]
# The mask values each format allows (None: every value 0..255) and what they mean.
MASK_VALUES: dict[str, tuple[int, ...] | None] = {"binary": None, "lisa": (0, 1, 255)}
MASK_MEANING = {"binary": "0 background, any other value target", "lisa": "0 background, 1 target, 255 ignored"}


class FolderDataset(Dataset):
    def __init__(
        self,
        root: str,
        annotations: str = "queries.jsonl",
        n: PositiveInt | None = None,
        mask_format: MaskFormat = "binary",
        split: str | None = None,
        on_error: OnError = "raise",
        max_pixels: PositiveInt = MAX_PIXELS,
    ) -> None:
        check_call(FolderDataset, {"mask_format": mask_format}, "dataset")
        if n is not None and n < 1:
            raise ConfigError(f"dataset.n must be >= 1 or null, got {n}")
        self.max_pixels = check_max_pixels(max_pixels)
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
        self._only_ignored: list[str] = []  # lisa masks with 255 but no 1 (see the module docstring)
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
        if self._only_ignored:
            log.warning("dataset.mask_format=lisa: %d of %d masks have ignored pixels (255) but no target pixel (1), "
                        "e.g. %s; their samples score 0 or 1 — if 255 marks the target, use dataset.mask_format=binary",
                        len(self._only_ignored), len(entries), ", ".join(self._only_ignored[:3]))
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
        sizes, mask = {}, None
        for key in ("image", "mask"):
            path = self.root / str(entry[key])
            if not path.is_file():
                raise BadSample(f"{where}: {key} file {path} does not exist", missing=True)
            what = f"{where}: {key} file"
            if key == "image":
                sizes[key] = image_size(path, what=what, max_pixels=self.max_pixels)
                if self.bad_samples.skip:
                    decode_check(path, what=what)
            else:  # decoded now: its channels and values are checked here, not in a DataLoader worker
                image_size(path, what=what, upright=False, max_pixels=self.max_pixels)
                mask = read_mask(path, what=what, max_pixels=self.max_pixels)
                sizes[key] = mask.shape
        if sizes["mask"] != sizes["image"]:
            (mh, mw), (ih, iw) = sizes["mask"], sizes["image"]
            raise BadSample(f"{where}: mask {entry['mask']} is {mw}×{mh}, its image {iw}×{ih} (they must match)")
        self._check_values(mask, self.root / str(entry["mask"]), where)
        return entry

    def _check_values(self, mask: np.ndarray, path: Path, where: str) -> None:
        """The mask's values against ``mask_format``; BadSample naming the values it does not allow."""
        allowed = MASK_VALUES[self.mask_format]
        if allowed is None:
            return
        values, counts = np.unique(mask, return_counts=True)
        outside = [(int(v), int(c)) for v, c in zip(values, counts) if int(v) not in allowed]
        if outside:
            shown = ", ".join(f"{v} ({c} px)" for v, c in outside[:5]) + (", ..." if len(outside) > 5 else "")
            raise BadSample(f"{where}: mask file {path} has values {shown} that dataset.mask_format={self.mask_format} "
                            f"does not allow (it allows {list(allowed)}: {MASK_MEANING[self.mask_format]}; "
                            f"dataset.mask_format=binary reads any non-zero value as target)")
        if self.mask_format == "lisa" and 255 in values and 1 not in values:
            self._only_ignored.append(where.rsplit("/", 1)[-1])

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self.entries):
            raise IndexError(i)
        e = self.entries[i]
        image = read_rgb(self.root / e["image"], self.max_pixels)
        mask = read_gray(self.root / e["mask"], self.max_pixels)
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
