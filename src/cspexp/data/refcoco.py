"""`dataset=refcoco`: refCOCO, refCOCO+ and refCOCOg (referring segmentation) in LISA's layout.

Layout (LISA's ``<dataset_dir>/refer_seg``: the REFER release plus COCO train2014)::

    refer_seg/refcoco/refs(unc).p, refs(google).p, instances.json
    refer_seg/refcoco+/refs(unc).p, instances.json
    refer_seg/refcocog/refs(umd).p, refs(google).p, instances.json
    refer_seg/images/mscoco/images/train2014/COCO_train2014_<id>.jpg

``dataset.root`` is that ``refer_seg`` folder or the folder holding it; ``dataset.images`` points
elsewhere for the COCO images. ``dataset.dataset`` × ``dataset.split_by``: refcoco × unc | google,
refcoco+ × unc, refcocog × umd | google (the files the REFER release has). The splits of LISA's
tables: refcoco and refcoco+ (unc) val, testA, testB; refcocog (umd) val, test.

Samples, as LISA's ``ValDataset`` evaluates them: **every sentence of every referring expression
("ref") of the split**, each with its object's mask; the query is the sentence stripped and
lower-cased, in the phrase template (``is_sentence`` false). LISA batches the sentences of one
image together; its metrics are per sentence, so the order (here: the refs file's) changes
neither gIoU nor cIoU. Split selection is REFER's ``getRefIds``: ``train`` / ``val`` exactly,
``test`` every ref whose split contains "test", ``testA`` / ``testB`` / ``testC`` every ref whose split
contains that letter.

Masks come from the COCO annotation's ``segmentation``: polygons, or RLE (refCOCO* use polygons).
``dataset.rasterizer``: ``pycocotools`` is LISA's own (``frPyObjects`` + ``decode``), exact;
``skimage`` fills each polygon over the pixel centres (x + ½, y + ½) — COCO's pixel convention —
with scikit-image, differing from pycocotools on a few boundary pixels per object (measured in
tests/test_refcoco.py), and cannot decode RLE; ``auto`` takes pycocotools when it is installed.
Checked when the dataset is built (``on_error: skip`` leaves the ref's sentences out and lists
them): polygons have finite coordinates within one image size of the image that instances.json gives
(`cspexp.data.files.check_polygon`), an RLE's ``size`` is that image's and its run lengths cover it
exactly (compressed counts are decoded here, without pycocotools), and the image file's header
matches instances.json's size and is within ``dataset.max_pixels``.

One deliberate difference: LISA sums an object's per-polygon masks as uint8, so where two polygons
of one object overlap its target holds a 2, which its IoU counts as neither target nor background;
here the mask is their union (1).

``refs(*).p`` is a pickle; it is read with an unpickler that builds only plain containers (dicts,
lists, strings, numbers), so a tampered file cannot run code.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from torch.utils.data import Dataset

from cspexp.data import files
from cspexp.data.files import (
    MAX_PIXELS,
    BadSample,
    BadSamples,
    OnError,
    SampleReadError,
    check_max_pixels,
    check_polygon,
    decode_check,
    image_size,
    read_rgb,
)
from cspexp.utils.choices import PositiveInt, check_call
from cspexp.utils.errors import ConfigError, MissingPathError

log = logging.getLogger(__name__)

SPLIT_BY = {"refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google")}
Split = Literal["train", "val", "test", "testA", "testB", "testC"]


def pycocotools_available() -> bool:
    try:
        from pycocotools import mask  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_rasterizer(name: str) -> str:
    """``pycocotools`` or ``skimage`` for ``dataset.rasterizer``."""
    return files.resolve_rasterizer(name, exact="pycocotools", fallback="skimage", available=lambda: pycocotools_available(),
                                    library="pycocotools", install="pip install pycocotools")


# ---------------------------------------------------------------------------------------- files


class _PlainUnpickler(pickle.Unpickler):
    """REFER's refs files hold only dicts, lists, strings and numbers: refuse every class."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refuses to build {module}.{name}: a refs file holds only plain data")


def require_dataset_file(path: Path, what: str) -> None:
    """A file the whole split needs: missing, it stops the run whatever dataset.on_error says."""
    if not path.is_file():
        raise MissingPathError(f"{what} {path} does not exist")


def load_refs(path: Path) -> list:
    require_dataset_file(path, "refs file")
    try:
        with path.open("rb") as f:
            refs = _PlainUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not a REFER refs pickle ({exc})") from None
    if not isinstance(refs, list):
        raise ConfigError(f"{path} is not a REFER refs pickle (expected a list of refs, got {type(refs).__name__})")
    return refs


def load_instances(path: Path) -> tuple[dict, dict]:
    """(annotations by id, images by id) of a REFER ``instances.json``."""
    require_dataset_file(path, "instances file")
    try:
        data = json.loads(path.read_bytes())
        anns = {a["id"]: a for a in data["annotations"]}
        images = {im["id"]: im for im in data["images"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a COCO instances file with 'images' and 'annotations' ({exc!r})") from None
    return anns, images


def find_refer_root(root: Path, dataset: str) -> Path:
    """The ``refer_seg`` folder: `root` itself or ``root/refer_seg``."""
    if not root.is_dir():
        raise MissingPathError(f"dataset.root={str(root)!r} does not exist or is not a directory")
    for base in (root, root / "refer_seg"):
        if (base / dataset).is_dir():
            return base
    raise MissingPathError(
        f"dataset.root={str(root)!r} holds no '{dataset}' folder (looked in {root} and {root / 'refer_seg'})"
    )


# ---------------------------------------------------------------------------------------- masks


def _is_polygon_list(seg) -> bool:
    return isinstance(seg, list) and all(isinstance(p, list) for p in seg)


def _is_rle(seg) -> bool:
    items = seg if isinstance(seg, list) else [seg]
    return bool(items) and all(
        isinstance(r, dict) and isinstance(r.get("counts"), (str, bytes, list)) and isinstance(r.get("size"), list)
        for r in items
    )


def rle_counts(counts: str) -> list[int]:
    """The run lengths of COCO's compressed RLE string (pycocotools' ``rleFrString``); ValueError if
    the string ends inside a number."""
    out: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise ValueError("the string ends inside a run length")
            c = ord(counts[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def _check_rle(r: dict, where: str, height: int, width: int) -> None:
    size = r["size"]
    if list(size) != [height, width]:
        raise BadSample(f"{where}: RLE 'size' is {size}, but its image is [{height}, {width}] (height, width)")
    counts = r["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise BadSample(f"{where}: RLE 'counts' must be integers")
    else:
        try:
            counts = rle_counts(counts.decode("ascii") if isinstance(counts, bytes) else counts)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadSample(f"{where}: RLE 'counts' is not COCO's compressed RLE ({exc})") from None
    if any(c < 0 for c in counts) or sum(counts) != height * width:
        raise BadSample(f"{where}: RLE run lengths must be >= 0 and cover the {width}×{height} image "
                        f"({height * width} pixels), they sum to {sum(counts)}")


def check_segmentation(seg, where: str, height: int | None = None, width: int | None = None) -> None:
    """Polygons (each a flat [x0, y0, x1, y1, ...] of >= 3 points), RLE, or empty; with the image's
    `height` and `width`, also every point finite and near the image, every RLE of the image's size."""
    if _is_polygon_list(seg):
        for j, poly in enumerate(seg):
            if len(poly) < 6 or len(poly) % 2 or not all(isinstance(c, (int, float)) and not isinstance(c, bool)
                                                         for c in poly):
                raise BadSample(f"{where}: polygon {j} must be a flat list of >= 3 x, y pairs, got {len(poly)} numbers")
            if height is not None and width is not None:
                check_polygon(list(zip(poly[0::2], poly[1::2])), height, width, f"{where}: polygon {j}")
        return
    if not _is_rle(seg):
        raise BadSample(f"{where}: 'segmentation' is neither polygons nor RLE")
    if height is not None and width is not None:
        for r in seg if isinstance(seg, list) else [seg]:
            _check_rle(r, where, height, width)


def segmentation_mask(seg, height: int, width: int, rasterizer: str = "pycocotools") -> np.ndarray:
    """uint8 [H, W] in {0, 1}: the union of the annotation's polygons (or its RLE); empty stays empty."""
    if isinstance(seg, list) and not seg:
        return np.zeros((height, width), np.uint8)
    if rasterizer == "pycocotools":
        from pycocotools import mask as coco_mask

        if _is_polygon_list(seg):
            rles = coco_mask.frPyObjects(seg, height, width)
        else:
            rles = []
            for r in seg if isinstance(seg, list) else [seg]:
                if isinstance(r["counts"], list):  # uncompressed RLE → compressed
                    r = coco_mask.frPyObjects(r, height, width)
                elif isinstance(r["counts"], str):
                    r = {**r, "counts": r["counts"].encode()}
                rles.append(r)
        m = coco_mask.decode(rles)  # [H, W, k]
        return (m.reshape(height, width, -1).sum(axis=2) > 0).astype(np.uint8)
    if not _is_polygon_list(seg):
        raise ConfigError("an RLE segmentation needs pycocotools: pip install pycocotools "
                          "(dataset.rasterizer=skimage draws polygons only)")
    from skimage.draw import polygon2mask

    out = np.zeros((height, width), bool)
    for poly in seg:
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        out |= polygon2mask((height, width), xy[:, ::-1] - 0.5)  # rows, cols; pixel (r, c) is centred at +½
    return out.astype(np.uint8)


# ---------------------------------------------------------------------------------------- dataset


def in_split(ref_split: str, split: str) -> bool:
    """REFER's ``getRefIds(split=...)``."""
    if split in ("testA", "testB", "testC"):
        return split[-1] in ref_split
    if split == "test":
        return "test" in ref_split
    return ref_split == split


def _image_hw(info: dict) -> tuple[int | None, int | None]:
    """instances.json's (height, width) of an image, or (None, None) when they are not integers (the
    image check then names the mismatch)."""
    h, w = info.get("height"), info.get("width")
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() and v > 0 for v in (h, w))
    return (int(h), int(w)) if ok else (None, None)


@dataclass(frozen=True)
class RefSample:
    image: Path
    query: str
    segmentation: object
    height: int
    width: int
    image_name: str


class RefCocoDataset(Dataset):
    """One referring-expression split; see the module docstring."""

    def __init__(
        self,
        root: str,
        dataset: str = "refcoco",
        split_by: str = "unc",
        split: Split = "val",
        images: str | None = None,
        n: PositiveInt | None = None,
        on_error: OnError = "raise",
        rasterizer: str = "auto",
        max_pixels: PositiveInt = MAX_PIXELS,
    ) -> None:
        if dataset not in SPLIT_BY:
            raise ConfigError(f"dataset.dataset={dataset!r} is not allowed; use one of {list(SPLIT_BY)}")
        if split_by not in SPLIT_BY[dataset]:
            allowed = "; ".join(f"{d}: {' | '.join(s)}" for d, s in SPLIT_BY.items())
            raise ConfigError(f"dataset.split_by={split_by!r} does not exist for {dataset}; the REFER splits are {allowed}")
        check_call(RefCocoDataset, {"split": split}, "dataset")
        if n is not None and int(n) < 1:
            raise ConfigError(f"dataset.n must be >= 1 or null, got {n}")
        self.max_pixels = check_max_pixels(max_pixels)
        self.bad_samples = BadSamples(on_error)
        self.rasterizer = resolve_rasterizer(rasterizer)
        self.split = split
        refer = find_refer_root(Path(root), dataset)
        self.image_dir = Path(images) if images else refer / "images" / "mscoco" / "images" / "train2014"
        if not self.image_dir.is_dir():
            raise MissingPathError(f"COCO train2014 image folder {self.image_dir} does not exist (set dataset.images)")
        refs_path = refer / dataset / f"refs({split_by}).p"
        refs = load_refs(refs_path)
        anns, image_info = load_instances(refer / dataset / "instances.json")
        chosen = [r for r in refs if isinstance(r, dict) and in_split(str(r.get("split")), split)]
        if not chosen:
            present = sorted({str(r.get("split")) for r in refs if isinstance(r, dict)})
            raise ConfigError(f"{refs_path} has no ref in split {split!r}; its refs' splits are {present}")
        self.samples = self._index(chosen, anns, image_info, refs_path, None if n is None else int(n))
        if not self.samples:
            raise ConfigError(f"every sample of {dataset} ({split_by}) {split} was skipped as unreadable (dataset.on_error=skip)")
        log.info("%s (%s) %s: %d sentences of %d refs, masks drawn with %s", dataset, split_by, split,
                 len(self.samples), len(chosen), self.rasterizer)

    def _index(self, refs: list[dict], anns: dict, image_info: dict, refs_path: Path, n: int | None) -> list[RefSample]:
        samples: list[RefSample] = []
        image_checked: dict[int, BadSample | None] = {}
        for ref in refs:
            if n is not None and len(samples) >= n:
                break
            sentences = ref.get("sentences")
            n_sent = len(sentences) if isinstance(sentences, list) else 1
            where = f"ref {ref.get('ref_id')}"
            try:
                if not isinstance(sentences, list) or not all(isinstance(s, dict) and isinstance(s.get("sent"), str)
                                                              for s in sentences):
                    raise BadSample(f"{refs_path}: {where} needs 'sentences', a list of {{'sent': ...}}")
                ann, info = anns.get(ref.get("ann_id")), image_info.get(ref.get("image_id"))
                if ann is None or info is None:
                    raise BadSample(f"{refs_path}: {where} names annotation {ref.get('ann_id')} / image "
                                    f"{ref.get('image_id')}, which instances.json does not hold")
                seg = ann.get("segmentation")
                check_segmentation(seg, f"annotation {ann['id']} of instances.json", *_image_hw(info))
                if self.rasterizer == "skimage" and seg and not _is_polygon_list(seg):
                    raise ConfigError(f"annotation {ann['id']} of instances.json is RLE; decoding it needs pycocotools "
                                      "(pip install pycocotools); dataset.rasterizer=skimage draws polygons only")
                image = self.image_dir / str(info.get("file_name"))
                if info["id"] not in image_checked:
                    image_checked[info["id"]] = self._check_image(image, info)
                if image_checked[info["id"]] is not None:
                    raise image_checked[info["id"]]
            except BadSample as bad:
                self.bad_samples.report(bad, where=where, samples=n_sent)
                continue
            samples += [RefSample(image, s["sent"].strip().lower(), seg, int(info["height"]), int(info["width"]),
                                  str(info["file_name"])) for s in sentences]
        return samples[:n]

    def _check_image(self, image: Path, info: dict) -> BadSample | None:
        try:
            hw = image_size(image, max_pixels=self.max_pixels)
            expected = (info.get("height"), info.get("width"))
            if hw != expected:
                raise BadSample(f"image {image} is {hw[1]}×{hw[0]} but instances.json says {expected[1]}×{expected[0]}")
            if self.bad_samples.skip:
                decode_check(image)
        except BadSample as bad:
            return bad
        return None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self.samples):
            raise IndexError(i)
        s = self.samples[i]
        image = read_rgb(s.image, self.max_pixels)
        if image.shape[:2] != (s.height, s.width):
            raise SampleReadError(f"image {s.image} is {image.shape[1]}×{image.shape[0]}, "
                                  f"instances.json says {s.width}×{s.height}")
        return {
            "idx": i,
            "image": image,
            "mask": segmentation_mask(s.segmentation, s.height, s.width, self.rasterizer),
            "query": s.query,
            "is_sentence": False,
            "query_kind": "phrase",
            "image_id": s.image_name,
        }

    def vocabulary(self) -> list[str]:
        """The queries (the tiny models' word-level tokenizer is built from them)."""
        return sorted({s.query for s in self.samples})
