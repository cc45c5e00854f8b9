"""`dataset=reasonseg`: LISA's ReasonSeg benchmark (val: 200 images, test: 779).

Layout of the ReasonSeg release (LISA keeps it at ``<dataset_dir>/reason_seg/ReasonSeg``)::

    ReasonSeg/val/<name>.jpg  + <name>.json
    ReasonSeg/test/<name>.jpg + <name>.json

``dataset.root`` is that ``ReasonSeg`` folder or a folder above it on LISA's path (``<root>/ReasonSeg``,
``<root>/reason_seg/ReasonSeg``). Samples come from the ``*.jpg`` files of the split (sorted by name),
each with the JSON of the same name: ``text`` (list of queries), ``is_sentence`` (true: the queries
are long sentences, false: short phrases) and ``shapes`` (labelme polygons ``{"label", "points"}``).

What LISA's evaluation does (``utils/dataset.py`` ``ValDataset``, ``utils/data_processing.py``), and so
does this loader:

- The query is the **first** text of the JSON (``texts: first``); ``texts: all`` makes one sample per
  text, all with the image's mask.
- ``is_sentence`` picks the prompt template. The "short query" / "long query" columns of LISA's
  ReasonSeg-test table are the ``is_sentence`` false / true subsets: ``query: short | long`` selects
  one, and ``query_kind`` (``short`` / ``long``) splits ``results.json``'s ``metrics_by_kind`` either way.
- The mask is ``get_mask_from_json``'s: polygons labelled ``flag`` are dropped; the others are drawn
  largest area first (so smaller ones end on top), each as a 1-px outline plus its filling, with
  value 255 when the label contains ``ignore`` (left out of the metrics) and 1 for anything else
  (``target``). Points are truncated to integers, as LISA's ``np.array(points, dtype=np.int32)``.
  A JSON with no polygons gives an empty mask, as in LISA (two ReasonSeg-test files are like that).

Checked when the dataset is built (`cspexp.data.files`; ``on_error: skip`` leaves a bad sample out
and lists it in ``results.json`` → ``skipped``): each image has its JSON and each JSON its image (a
``<name>.json`` without ``<name>.jpg`` is listed too, not ignored: after the images, once every image
was looked at, i.e. unless ``n`` stopped the scan), the JSON's keys and types, the image
header within ``dataset.max_pixels``, and every drawn polygon's points finite and within one image size
of the image (`cspexp.data.files.check_polygon`; ``flag`` polygons, never drawn, are not range-checked).

Rasterisation (``dataset.rasterizer``): ``cv2`` is LISA's own (``cv2.polylines`` + ``cv2.fillPoly``),
exact; ``pil`` draws the same outline and filling with Pillow. They agree inside polygons and differ
by a pixel here and there on the outline (measured in tests/test_reasonseg.py: ≈2 pixels per polygon
on random polygons). ``auto`` takes cv2 when ``opencv-python-headless`` is installed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from cspexp.data import files
from cspexp.data.files import (
    MAX_PIXELS,
    BadSample,
    BadSamples,
    OnError,
    check_max_pixels,
    check_polygon,
    decode_check,
    image_size,
    read_json,
    read_rgb,
)
from cspexp.utils.choices import PositiveInt, check_call
from cspexp.utils.errors import ConfigError, MissingPathError

log = logging.getLogger(__name__)

Split = Literal["val", "test"]
QuerySelection = Literal["all", "short", "long"]
Texts = Literal["first", "all"]
IGNORE_VALUE = 255  # LISA's ignore_label


def cv2_available() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_rasterizer(name: str) -> str:
    """``cv2`` or ``pil`` for ``dataset.rasterizer``."""
    return files.resolve_rasterizer(name, exact="cv2", fallback="pil", available=lambda: cv2_available(),
                                    library="OpenCV", install="pip install opencv-python-headless")


def _paint(mask: np.ndarray, points: np.ndarray, value: int, rasterizer: str) -> np.ndarray:
    """`mask` with polygon `points` (int32 [k, 2], x y) drawn in `value`: outline, then filling."""
    if rasterizer == "cv2":
        import cv2

        cv2.polylines(mask, points[None], True, value, 1)
        cv2.fillPoly(mask, points[None], value)
        return mask
    image = Image.fromarray(mask)
    draw = ImageDraw.Draw(image)
    xy = [tuple(p) for p in points.tolist()]
    if len(xy) >= 2:  # Pillow's polygon needs two points; cv2 draws a single point as its outline
        draw.polygon(xy, fill=value)
    draw.line(xy + [xy[0]], fill=value, width=1)
    return np.array(image)


def polygon_mask(shapes: list[dict], height: int, width: int, rasterizer: str = "cv2") -> np.ndarray:
    """LISA's ``get_mask_from_json`` on already-parsed ``shapes``: uint8 [H, W] in {0, 1, 255}."""
    kept = [s for s in shapes if s["label"].lower() != "flag"]  # "meaningless deprecated annotations"
    polygons = [np.array(s["points"], dtype=np.int32) for s in kept]
    areas = [int(_paint(np.zeros((height, width), np.uint8), p, 1, rasterizer).sum()) for p in polygons]
    # LISA: np.argsort(areas)[::-1]; a stable sort, so equal areas are drawn last-listed first.
    order = np.argsort(areas, kind="stable")[::-1]
    mask = np.zeros((height, width), np.uint8)
    for i in order:
        value = IGNORE_VALUE if "ignore" in kept[i]["label"].lower() else 1
        mask = _paint(mask, polygons[i], value, rasterizer)
    return mask


def parse_annotation(anno, path: Path) -> tuple[list[str], bool, list[dict]]:
    """(texts, is_sentence, shapes) of one ReasonSeg JSON, checked; BadSample names what is wrong."""

    def bad(what: str) -> BadSample:
        return BadSample(f"{path}: {what}")

    if not isinstance(anno, dict):
        raise bad("is not a JSON object")
    missing = [k for k in ("text", "is_sentence", "shapes") if k not in anno]
    if missing:
        raise bad(f"lacks the key(s) {missing} (a ReasonSeg annotation has 'text', 'is_sentence' and 'shapes')")
    texts = [anno["text"]] if isinstance(anno["text"], str) else anno["text"]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise bad("'text' must be a non-empty list of non-empty strings")
    if anno["is_sentence"] not in (True, False):  # also accepts 0 / 1
        raise bad(f"'is_sentence' must be true or false, got {anno['is_sentence']!r}")
    shapes = anno["shapes"]
    if not isinstance(shapes, list):
        raise bad("'shapes' must be a list of polygons")
    for j, shape in enumerate(shapes):
        if not isinstance(shape, dict) or not isinstance(shape.get("label"), str):
            raise bad(f"shapes[{j}] needs a string 'label'")
        points = shape.get("points")
        ok = isinstance(points, list) and len(points) >= 1 and all(
            isinstance(p, (list, tuple)) and len(p) == 2
            and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in p) for p in points
        )
        if not ok:
            raise bad(f"shapes[{j}] ('{shape['label']}') needs 'points': a non-empty list of [x, y] numbers")
    return [t.strip() for t in texts], bool(anno["is_sentence"]), shapes


def check_shapes(shapes: list[dict], height: int, width: int, path: Path) -> None:
    """The points of every polygon that is drawn (all but ``flag``) finite and near the image."""
    for j, shape in enumerate(shapes):
        if shape["label"].lower() != "flag":
            check_polygon(shape["points"], height, width, f"{path}: shapes[{j}] ('{shape['label']}')")


def find_split_dir(root: Path, split: str) -> Path:
    """``<root>/<split>`` or the same under LISA's ``ReasonSeg`` / ``reason_seg/ReasonSeg`` folders."""
    if not root.is_dir():
        raise MissingPathError(f"dataset.root={str(root)!r} does not exist or is not a directory")
    candidates = [root, root / "ReasonSeg", root / "reason_seg" / "ReasonSeg"]
    for base in candidates:
        if (base / split).is_dir():
            return base / split
    tried = ", ".join(str(c / split) for c in candidates)
    raise MissingPathError(f"dataset.root={str(root)!r} holds no ReasonSeg '{split}' folder (looked for {tried})")


@dataclass(frozen=True)
class ReasonSegSample:
    image: Path
    query: str
    is_sentence: bool
    shapes: list


class ReasonSegDataset(Dataset):
    """ReasonSeg's val or test split; see the module docstring."""

    def __init__(
        self,
        root: str,
        split: Split = "val",
        query: QuerySelection = "all",
        texts: Texts = "first",
        n: PositiveInt | None = None,
        on_error: OnError = "raise",
        rasterizer: str = "auto",
        max_pixels: PositiveInt = MAX_PIXELS,
    ) -> None:
        check_call(ReasonSegDataset, {"split": split, "query": query, "texts": texts}, "dataset")
        if n is not None and int(n) < 1:
            raise ConfigError(f"dataset.n must be >= 1 or null, got {n}")
        self.max_pixels = check_max_pixels(max_pixels)
        self.bad_samples = BadSamples(on_error)
        self.rasterizer = resolve_rasterizer(rasterizer)
        self.split = split
        self.dir = find_split_dir(Path(root), split)
        images = sorted(self.dir.glob("*.jpg"))
        if not images:
            raise MissingPathError(f"{self.dir} holds no .jpg images (ReasonSeg pairs <name>.jpg with <name>.json)")
        self.samples = self._index(images, sorted(self.dir.glob("*.json")), query, texts, None if n is None else int(n))
        if not self.samples:
            if self.bad_samples.items:
                raise ConfigError(f"every sample of {self.dir} was skipped as unreadable (dataset.on_error=skip)")
            raise ConfigError(f"{self.dir} has no sample with dataset.query={query!r}")
        log.info("ReasonSeg %s: %d samples, masks drawn with %s", split, len(self.samples), self.rasterizer)

    def _index(self, images: list[Path], annotations: list[Path], query: str, texts: str,
               n: int | None) -> list[ReasonSegSample]:
        samples: list[ReasonSegSample] = []
        no_polygons = 0
        for image in images:
            if n is not None and len(samples) >= n:
                break
            json_path = image.with_suffix(".json")
            try:
                text_list, is_sentence, shapes = parse_annotation(read_json(json_path), json_path)
                if query != "all" and is_sentence != (query == "long"):
                    continue
                height, width = image_size(image, max_pixels=self.max_pixels)
                check_shapes(shapes, height, width, json_path)
                if self.bad_samples.skip:
                    decode_check(image)
            except BadSample as bad:
                self.bad_samples.report(bad, where=f"{self.split}/{image.name}")
                continue
            no_polygons += not any(s["label"].lower() != "flag" for s in shapes)
            chosen = text_list[:1] if texts == "first" else text_list
            samples += [ReasonSegSample(image, t, is_sentence, shapes) for t in chosen]
        else:  # every image was looked at: then the JSONs without an image
            paired = {image.with_suffix(".json") for image in images}
            for json_path in (a for a in annotations if a not in paired):
                bad = BadSample(f"annotation file {json_path} has no image {json_path.with_suffix('.jpg').name} "
                                "beside it (ReasonSeg pairs <name>.jpg with <name>.json)", missing=True)
                self.bad_samples.report(bad, where=f"{self.split}/{json_path.name}")
        if no_polygons:
            log.warning("ReasonSeg %s: %d annotation(s) have no polygon; their masks are empty (as in LISA)",
                        self.split, no_polygons)
        return samples[:n]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self.samples):
            raise IndexError(i)
        s = self.samples[i]
        image = read_rgb(s.image, self.max_pixels)
        return {
            "idx": i,
            "image": image,
            "mask": polygon_mask(s.shapes, image.shape[0], image.shape[1], self.rasterizer),
            "query": s.query,
            "is_sentence": s.is_sentence,
            "query_kind": "long" if s.is_sentence else "short",
            "image_id": f"{self.split}/{s.image.name}",
        }

    def vocabulary(self) -> list[str]:
        """The queries (the tiny models' word-level tokenizer is built from them)."""
        return sorted({s.query for s in self.samples})
