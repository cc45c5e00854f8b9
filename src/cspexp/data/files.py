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

**Image size** (``dataset.max_pixels``). Every image (and mask) header is checked against
``dataset.max_pixels`` (width × height) when the dataset is built: a larger one is a bad sample, named
with its size. cspexp applies its own limit instead of Pillow's ``MAX_IMAGE_PIXELS`` (Pillow warns
above 89.5 MP and raises ``DecompressionBombError`` above 179 MP, whatever cspexp allows), so Pillow's
limit never stops an image within ``max_pixels``, and one beyond it is never decoded.

**Masks** (`read_mask`): single-channel grey (modes ``L``, ``1``), 16/32-bit or float grey whose values
are integers in 0..255, or a colour / palette / alpha image whose every pixel is grey (R = G = B) and
opaque — read as that grey value, exactly what ``convert("L")`` gives. Anything else (colours,
transparency, values beyond 0..255, other modes) is a bad sample: it is never silently converted.

**Polygons** (`check_polygon`): every coordinate a finite number, and every point within one image
size of the image (x in [−W, 2W], y in [−H, 2H]): annotation tools let points stray a little past an
edge, but a point further out is a wrong file or a wrong unit, and a coordinate like 1e12 would
overflow the rasterisers inside a DataLoader worker.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from contextlib import contextmanager
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
# dataset.max_pixels' default: 100 MP, far above a photograph's few megapixels (COCO's are about 0.3 MP);
# the limit is cspexp's: Pillow's own is lifted while cspexp opens a file (`_open_image`).
MAX_PIXELS = 100_000_000
# A polygon point may lie this many image sizes outside the image (x in [-m·W, (1+m)·W], same for y).
POLYGON_MARGIN = 1.0
_PILLOW_LIMIT = threading.Lock()


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


def check_max_pixels(max_pixels) -> int:
    """``dataset.max_pixels``: a positive integer (an integral float such as 2e8 is taken as one)."""
    if isinstance(max_pixels, float) and max_pixels.is_integer():
        max_pixels = int(max_pixels)
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ConfigError(f"dataset.max_pixels must be a positive integer (pixels, width × height), got {max_pixels!r}")
    return max_pixels


def _megapixels(n: int) -> str:
    return f"{n / 1e6:.3g} MP"


@contextmanager
def _open_image(path: Path):
    """``Image.open`` with Pillow's decompression-bomb limit lifted: cspexp checks its own,
    ``dataset.max_pixels``, from the header, before any pixel is decoded (`image_size`)."""
    with _PILLOW_LIMIT:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            im = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    with im:
        yield im


def _pixel_limit_error(what: str, path: Path, w: int, h: int, max_pixels: int) -> str:
    return (f"{what} {path} is {w}×{h} = {_megapixels(w * h)}, over dataset.max_pixels={max_pixels} "
            f"({_megapixels(max_pixels)}); raise dataset.max_pixels to read it")


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


def image_size(path: Path, what: str = "image", upright: bool = True, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) from the file's header, after the EXIF rotation when `upright` (reading a PNG's
    EXIF decodes it, so that comes after the size check); more than `max_pixels` pixels is a BadSample."""
    require_file(path, what)
    try:
        with _open_image(path) as im:
            w, h = im.size
            if w * h > max_pixels:  # before getexif, which decodes a PNG to find its EXIF chunk
                raise BadSample(_pixel_limit_error(what, path, w, h, max_pixels))
            if upright and im.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED:
                w, h = h, w
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadSample(f"{what} {path} cannot be read as an image ({exc})") from None
    return h, w


def decode_check(path: Path, what: str = "image") -> None:
    """Decode every pixel once (truncated or corrupt data only shows up here)."""
    try:
        with _open_image(path) as im:
            im.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadSample(f"{what} {path} cannot be decoded ({exc})") from None


def read_rgb(path: Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """uint8 [H, W, 3] RGB, upright by EXIF orientation (as ``cv2.imread`` gives it)."""
    try:
        with _open_image(path) as im:
            if im.size[0] * im.size[1] <= max_pixels:
                return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
            size = im.size
    except FileNotFoundError:
        raise SampleReadError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise SampleReadError(f"image {path} cannot be decoded ({exc})") from None
    raise SampleReadError(_pixel_limit_error("image", path, *size, max_pixels))


# Mask modes (Pillow's): read as they are / integer or float grey, values checked / converted if every
# pixel is grey and opaque. Any other mode (CMYK, YCbCr, HSV, LAB, ...) is refused.
_GREY_MODES = ("L", "1")
_WIDE_GREY_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")
_COLOUR_MODES = ("RGB", "RGBA", "RGBX", "LA", "P", "PA")
MASK_RULE = "a mask must be single-channel grey, values 0..255 (colour or alpha channels only if every pixel is grey and opaque)"


def mask_array(im: Image.Image, path: Path, what: str = "mask file") -> np.ndarray:
    """uint8 [H, W] grey values of a decoded mask image (see the module docstring); BadSample when
    the image is not grey: colours, transparency, values outside 0..255, or another mode."""
    mode = im.mode
    if mode in _GREY_MODES:
        return np.asarray(im.convert("L"))
    if mode in _WIDE_GREY_MODES:
        raw = np.asarray(im)
        if raw.size and (not np.isfinite(raw).all() or raw.min() < 0 or raw.max() > 255
                         or not np.array_equal(raw, np.round(raw))):
            bad = raw[~(np.isfinite(raw) & (raw >= 0) & (raw <= 255) & (raw == np.round(raw)))]
            raise BadSample(f"{what} {path} (image mode {mode}) has {bad.size} pixel(s) that are not integers in "
                            f"0..255 (e.g. {bad.flat[0].item()!r}); {MASK_RULE}")
        return np.asarray(im.convert("L"))
    if mode in _COLOUR_MODES:
        has_alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info)
        rgba = np.asarray(im.convert("RGBA" if has_alpha else "RGB"))
        if has_alpha and (rgba[..., 3] != 255).any():
            n = int((rgba[..., 3] != 255).sum())
            raise BadSample(f"{what} {path} (image mode {mode}) has {n} transparent pixel(s); {MASK_RULE}")
        rgb = rgba[..., :3]
        not_grey = (rgb[..., 0] != rgb[..., 1]) | (rgb[..., 1] != rgb[..., 2])
        if not_grey.any():
            y, x = (int(v) for v in np.argwhere(not_grey)[0])
            raise BadSample(f"{what} {path} (image mode {mode}) has {int(not_grey.sum())} coloured pixel(s) "
                            f"(e.g. RGB {tuple(int(c) for c in rgb[y, x])} at x={x}, y={y}); {MASK_RULE}")
        return np.ascontiguousarray(rgb[..., 0])  # = convert("L") of a grey pixel: the weights sum to 1
    raise BadSample(f"{what} {path} has image mode {mode}; {MASK_RULE}")


def read_mask(path: Path, what: str = "mask file", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A mask file decoded and checked (`mask_array`), at build time: every problem is a BadSample."""
    require_file(path, what)
    try:
        with _open_image(path) as im:
            if im.size[0] * im.size[1] > max_pixels:
                raise BadSample(_pixel_limit_error(what, path, *im.size, max_pixels))
            im.load()
            return mask_array(im, path, what)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadSample(f"{what} {path} cannot be decoded ({exc})") from None


def read_gray(path: Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """uint8 [H, W] of a mask file (stored orientation: masks carry no EXIF), read as `read_mask`
    reads it; while the run reads samples a problem is a SampleReadError."""
    if not path.is_file():
        raise SampleReadError(f"mask {path} does not exist")
    try:
        return read_mask(path, what="mask", max_pixels=max_pixels)
    except BadSample as bad:
        raise SampleReadError(str(bad)) from None


def check_polygon(points, height: int, width: int, what: str) -> None:
    """Every point of `points` ([[x, y], ...]) finite and within `POLYGON_MARGIN` image sizes of the
    `width` × `height` image; BadSample naming the first point that is not."""
    lo_x, hi_x = -POLYGON_MARGIN * width, (1 + POLYGON_MARGIN) * width
    lo_y, hi_y = -POLYGON_MARGIN * height, (1 + POLYGON_MARGIN) * height
    for k, (x, y) in enumerate(points):
        if not (math.isfinite(x) and math.isfinite(y)):
            raise BadSample(f"{what}: point {k} is ({x}, {y}); coordinates must be finite numbers")
        if not (lo_x <= x <= hi_x and lo_y <= y <= hi_y):
            raise BadSample(f"{what}: point {k} ({x:g}, {y:g}) lies outside the {width}×{height} image by more than "
                            f"its size; points must lie within x in [{lo_x:g}, {hi_x:g}], y in [{lo_y:g}, {hi_y:g}]")


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
