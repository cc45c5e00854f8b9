"""Reading a dataset's files as LISA does, and what happens to a sample whose files are bad.

**Images** are decoded with PIL and turned upright by their EXIF orientation: LISA reads images with
``cv2.imread``, which applies the EXIF orientation, and annotation tools draw on the upright image.
PIL + ``exif_transpose`` gives the same pixels as ``cv2.imread`` + BGR→RGB (tests/test_reasonseg.py).

**Bad samples** (``dataset.on_error``). A missing or malformed file is found while the dataset is
built — before the model loads — by cheap checks: the file exists, its JSON parses and has the needed
keys, its image header can be read and gives the expected size. Then:

- ``raise`` (default): the first bad sample stops the run with one line naming the file (a pixel
  decoding error that only shows when the sample is read stops the run then, just as clearly);
- ``skip``: every image and mask is also decoded once, so that corrupt pixel data is found up front
  too; each bad sample is left out with a warning and recorded in the dataset's ``bad_samples``,
  which ``results.json`` reports as ``"skipped": {"n": …, "items": [{"where", "samples", "reason"}]}``
  (``n`` counts samples: one bad refCOCO object leaves out each of its sentences).
  Files the whole split needs (the split folder, a refs or instances file) always stop the run.

Skipping therefore happens only at build time: the DataLoader, the metrics and every DDP rank see
the same, clean list of samples, and ``n_samples`` counts what was evaluated. A file that becomes
unreadable during the run still raises.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cspexp.utils.choices import check_value
from cspexp.utils.errors import ConfigError, CspexpError, MissingPathError

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
# Orientation values 5-8 swap width and height (EXIF 2.3, tag 0x0112).
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)


class BadSample(CspexpError):
    """One sample cannot be used; the message names the file and what is wrong with it."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


class SampleReadError(ConfigError):
    """A sample's file fails when the sample is read during the run.

    A DataLoader worker process re-raises it in the main process as
    ``SampleReadError("Caught SampleReadError in DataLoader worker process 0.\nOriginal Traceback ...")``;
    the original message, the traceback's last line, is kept alone so the CLI still prints one line."""

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "\nOriginal Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


class BadSamples:
    """Applies ``dataset.on_error`` to the bad samples found while a dataset is built."""

    def __init__(self, on_error: OnError) -> None:
        check_value(on_error, OnError, "dataset.on_error")
        self.skip = on_error == "skip"
        self.items: list[dict] = []

    def report(self, bad: BadSample, where: str, samples: int = 1) -> None:
        """Raise `bad` as the project's error (``raise``), or warn and record that the `samples`
        samples of `where` (an image, a JSONL line, a referring expression) are left out (``skip``)."""
        if not self.skip:
            raise (MissingPathError if bad.missing else ConfigError)(str(bad)) from None
        log.warning("dataset.on_error=skip: left out %s: %s", where, bad)
        self.items.append({"where": where, "samples": samples, "reason": str(bad)})

    def summary(self) -> dict:
        """``{"n": samples left out, "items": [{"where", "samples", "reason"}, ...]}``."""
        return {"n": sum(i["samples"] for i in self.items), "items": list(self.items)}


def skipped_summary(dataset) -> dict:
    """``results.json``'s ``skipped`` entry: the samples the dataset left out (none for datasets
    that cannot skip)."""
    bad = getattr(dataset, "bad_samples", None)
    return bad.summary() if isinstance(bad, BadSamples) else {"n": 0, "items": []}


def require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise BadSample(f"{what} {path} does not exist", missing=True)


def read_json(path: Path):
    """A JSON file, as UTF-8 or, failing that, cp1252 (LISA's ``get_mask_from_json`` does the same:
    a few ReasonSeg files are not UTF-8)."""
    require_file(path, "annotation file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadSample(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None


def image_size(path: Path, what: str = "image", upright: bool = True) -> tuple[int, int]:
    """(height, width) from the file's header, after the EXIF rotation when `upright`; no decoding."""
    require_file(path, what)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if upright and im.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED:
                w, h = h, w
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise BadSample(f"{what} {path} cannot be read as an image ({exc})") from None
    return h, w


def decode_check(path: Path, what: str = "image") -> None:
    """Decode every pixel once (truncated or corrupt data only shows up here)."""
    try:
        with Image.open(path) as im:
            im.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise BadSample(f"{what} {path} cannot be decoded ({exc})") from None


def read_rgb(path: Path) -> np.ndarray:
    """uint8 [H, W, 3] RGB, upright by EXIF orientation (as ``cv2.imread`` gives it)."""
    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except FileNotFoundError:
        raise SampleReadError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise SampleReadError(f"image {path} cannot be decoded ({exc})") from None


def read_gray(path: Path) -> np.ndarray:
    """uint8 [H, W] of a single-channel mask file (stored orientation: masks carry no EXIF)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"))
    except FileNotFoundError:
        raise SampleReadError(f"mask {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise SampleReadError(f"mask {path} cannot be decoded ({exc})") from None


def resolve_rasterizer(name: str, *, exact: str, fallback: str, available, library: str, install: str) -> str:
    """``dataset.rasterizer``: `exact` (LISA's own library, when `available()`), `fallback` (a few
    boundary pixels differ), or ``auto`` (the exact one when it is installed)."""
    allowed = ("auto", exact, fallback)
    if name not in allowed:
        raise ConfigError(f"dataset.rasterizer={name!r} is not allowed; use one of {list(allowed)}")
    if name == "auto":
        return exact if available() else fallback
    if name == exact and not available():
        raise ConfigError(f"dataset.rasterizer={exact} needs {library}: {install} (or use {fallback} / auto)")
    return name
