"""What predict runs on: (image, query) pairs from ``image=`` and ``query=``, or from ``queries=``.

``image=`` is one of
- an image file (any format Pillow reads: PNG, JPEG, BMP, GIF, WebP, TIFF);
- a glob (``imgs/*.jpg``, ``data/**/*.png``): every file it matches, sorted;
- a folder: its image files (by suffix, `IMAGE_SUFFIXES`), sorted, not recursive;
- ``shapes:<split>[:<idx>]``: an item of the procedural `shapes` dataset (idx 0 when left out),
  with its own query unless ``query=`` is given.

``queries=<jsonl>`` gives one pair per line, ``{"image": path, "query": text}`` (optional
``"is_sentence": bool``); a relative path is relative to the file's folder, and ``shapes:…`` works too.

Every input is checked before anything runs — the path exists, a glob or folder is not empty, every
image's header is read and its pixels decoded, every line of the queries file parses — and the first
problem is a one-line `ConfigError` / `MissingPathError` that says what is allowed. Predict therefore
either writes the outputs of every input or none.
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cspexp.data.files import MAX_PIXELS, BadSample, decode_check, image_size, read_rgb
from cspexp.utils.errors import ConfigError, MissingPathError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SHAPES_PREFIX = "shapes:"
#: the input of a run with neither image= nor queries=: it works offline, with no files
DEFAULT_IMAGE = "shapes:val:0"
IMAGE_FORMS = ("an image file, a glob such as 'imgs/*.jpg', a folder of images "
               f"({', '.join(IMAGE_SUFFIXES)}) or shapes:<split>:<idx>")
QUERIES_ROW = '{"image": path, "query": text} (optional "is_sentence": true|false)'


@dataclass(frozen=True)
class PredictInput:
    """One image and the query to segment in it."""

    name: str  # unique among the run's inputs and safe as a folder name: its outputs' folder
    source: str  # the image as the user named it: a path, or shapes:<split>:<idx>
    query: str
    is_sentence: bool
    idx: int  # the sample id a method's per-sample seed uses (a shapes item's own idx, else the position)
    path: Path | None = None  # the image file (None for a shapes item)
    shapes: tuple[str, int] | None = None  # (split, idx) of a shapes item

    def item(self, max_pixels: int = MAX_PIXELS) -> dict:
        """The input as a dataset item (`as_item`)."""
        return as_item(self.read_image(max_pixels), self.query, self.is_sentence, self.idx, self.source)

    def read_image(self, max_pixels: int = MAX_PIXELS) -> np.ndarray:
        """uint8 [H, W, 3] RGB, upright by its EXIF orientation (as evaluation reads images)."""
        if self.shapes is not None:
            return shapes_item(*self.shapes)["image"]
        return read_rgb(self.path, max_pixels)


def as_item(image: np.ndarray, query: str, is_sentence: bool, idx: int = 0, source: str = "") -> dict:
    """An image and a query as a dataset item (`cspexp.data`), what `LisaProcessor.collate` takes. The
    mask is empty: there is no ground truth."""
    return {"idx": idx, "image": image, "mask": np.zeros(image.shape[:2], dtype=np.uint8), "query": query,
            "is_sentence": is_sentence, "query_kind": "predict", "image_id": source}


def is_sentence_of(query: str, sentence) -> bool:
    """``sentence``: true (LISA's sentence template, ReasonSeg), false (the phrase template, refCOCO) or
    ``auto``: a query that ends with '.' or '?' is a sentence — ReasonSeg's sentences do, refCOCO's
    phrases do not."""
    if sentence == "auto":
        return query.rstrip().endswith((".", "?"))
    return bool(sentence)


def shapes_item(split: str, idx: int) -> dict:
    from cspexp.data.shapes import ShapesDataset

    return ShapesDataset(split=split)[idx]


def parse_shapes(spec: str, what: str) -> tuple[str, int]:
    """(split, idx) of ``shapes:<split>[:<idx>]``; a one-line ConfigError otherwise."""
    from cspexp.data.shapes import ShapesDataset

    parts = spec[len(SHAPES_PREFIX):].split(":")
    splits = ("train", "val", "test")
    usage = f"{what}={spec!r}: write shapes:<split>:<idx> with split one of {list(splits)} and idx a whole number"
    if len(parts) not in (1, 2) or parts[0] not in splits or (len(parts) == 2 and not parts[1].isdigit()):
        raise ConfigError(usage)
    split, idx = parts[0], int(parts[1]) if len(parts) == 2 else 0
    size = len(ShapesDataset(split=split))
    if idx >= size:
        raise ConfigError(f"{what}={spec!r}: the shapes {split} split has items 0..{size - 1}")
    return split, idx


def check_image(path: Path, what: str, max_pixels: int, decode: bool) -> None:
    """The file's header is an image within `max_pixels` and, with `decode`, its pixels decode."""
    try:
        image_size(path, what=what, max_pixels=max_pixels)
        if decode:
            decode_check(path, what=what)
    except BadSample as bad:
        raise ConfigError(f"{bad}; images must be files Pillow reads ({', '.join(IMAGE_SUFFIXES)})") from None


def image_paths(spec: str) -> list[Path]:
    """The files ``image=<spec>`` names: one file, a glob's matches, or a folder's image files."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise ConfigError(f"image={spec!r} is a folder with no image files; it must hold files ending in "
                              f"{', '.join(IMAGE_SUFFIXES)}")
        return found
    if any(c in spec for c in "*?["):  # glob's wildcards
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not found:
            raise ConfigError(f"image={spec!r} matches no file; give {IMAGE_FORMS}")
        return found
    raise MissingPathError(f"image={spec!r} does not exist; give {IMAGE_FORMS}")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "image"


def _named(pairs: list[dict]) -> list[PredictInput]:
    """Inputs with unique folder names: the position (zero-padded) and the image's name."""
    width = max(3, len(str(len(pairs) - 1)))
    out = []
    for k, p in enumerate(pairs):
        stem = "_".join(("shapes", *map(str, p["shapes"]))) if p.get("shapes") else Path(p["source"]).stem
        idx = p["shapes"][1] if p.get("shapes") else k
        out.append(PredictInput(name=f"{k:0{width}d}_{_safe(stem)}", idx=idx, **p))
    return out


def resolve_image(spec: str, query: str | None, sentence, max_pixels: int, decode: bool, what: str = "image",
                  base: Path | None = None) -> list[dict]:
    """The pairs of one image spec (before naming); `query` None: only a shapes item has its own."""
    if spec.startswith(SHAPES_PREFIX):
        split, idx = parse_shapes(spec, what)
        if query is None:
            item = shapes_item(split, idx)
            query, is_sentence = item["query"], bool(item["is_sentence"])
        else:
            is_sentence = is_sentence_of(query, sentence)
        return [{"source": spec, "query": query, "is_sentence": is_sentence, "shapes": (split, idx)}]
    if query is None:
        raise ConfigError(f'query="…" is required with image={spec!r} (only a shapes image has a query of its own); '
                          f"or give queries=<jsonl> with rows {QUERIES_ROW}")
    paths = image_paths(str(base / spec) if base is not None and not Path(spec).expanduser().is_absolute() else spec)
    for path in paths:
        check_image(path, "image file", max_pixels, decode)
    return [{"source": str(p), "query": query, "is_sentence": is_sentence_of(query, sentence), "path": p}
            for p in paths]


def read_queries(spec: str, sentence, max_pixels: int, decode: bool) -> list[dict]:
    """The pairs of a queries file, every line checked (see the module docstring)."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise MissingPathError(f"queries={spec!r} does not exist; give a JSONL file with one row per line: {QUERIES_ROW}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"queries={spec!r} cannot be read as UTF-8 text ({exc}); it must be JSONL: {QUERIES_ROW}") from None
    pairs = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where} is not valid JSON ({exc.msg}); each line must be {QUERIES_ROW}") from None
        if not isinstance(row, dict) or not {"image", "query"} <= row.keys():
            raise ConfigError(f"{where} needs the keys 'image' and 'query'; each line must be {QUERIES_ROW}")
        if not isinstance(row["image"], str) or not row["image"].strip():
            raise ConfigError(f"{where}: 'image' must be a non-empty string (a path or shapes:<split>:<idx>), "
                              f"got {row['image']!r}")
        if not isinstance(row["query"], str) or not row["query"].strip():
            raise ConfigError(f"{where}: 'query' must be a non-empty string, got {row['query']!r}")
        if not isinstance(row.get("is_sentence", False), bool):
            raise ConfigError(f"{where}: 'is_sentence' must be true or false, got {row['is_sentence']!r}")
        row_sentence = row.get("is_sentence", sentence)
        try:
            found = resolve_image(row["image"], row["query"], row_sentence, max_pixels, decode, what="image",
                                  base=path.parent)
        except (ConfigError, MissingPathError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
        pairs += found
    if not pairs:
        raise ConfigError(f"queries={spec!r} holds no rows; each line must be {QUERIES_ROW}")
    return pairs


def resolve_inputs(image: str | None = None, query: str | None = None, queries: str | None = None, sentence="auto",
                   max_pixels: int = MAX_PIXELS, decode: bool = True) -> list[PredictInput]:
    """The run's inputs from ``image=``, ``query=`` and ``queries=`` (see the module docstring);
    `decode` also decodes every image once (the check before a run; the run itself reads them later)."""
    if query is not None and not query.strip():
        raise ConfigError('query="" is empty; give the text to segment, e.g. query="the red circle"')
    if queries is not None:
        if image is not None or query is not None:
            raise ConfigError("give either queries=<jsonl> or image=… with query=…, not both")
        return _named(read_queries(queries, sentence, max_pixels, decode))
    return _named(resolve_image(DEFAULT_IMAGE if image is None else image, query, sentence, max_pixels, decode))


def vocabulary(inputs: list[PredictInput]) -> list[str]:
    """The words for a model whose tokenizer is built from the data (`tiny_random`; checkpoints bring
    their own): the `shapes` vocabulary, the task the small models are made for, then the queries."""
    from cspexp.data.shapes import ShapesDataset

    return [*ShapesDataset.vocabulary(), *(inp.query for inp in inputs)]
