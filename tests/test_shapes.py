"""Tests for the procedural ``shapes`` dataset.

The unambiguity checks do not reuse the generator's metadata: they re-read each scene from the
*pixels* (saturated connected components, colour by nearest palette entry, shape type from the
mask's geometry), parse the query with an independent grammar, resolve it on that reading and
require exactly one answer, equal to the returned mask.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter

import numpy as np
import pytest
from skimage.measure import label, regionprops

from cspexp.data.shapes import ShapesDataset, tokenize_query

N_ITEMS = 300

# Nominal colours as the test understands them (targets are matched to the nearest one).
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
}
CORNERS = {"circle": 0, "triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6, "star": 10}
NUMBERS = {"three": 3, "four": 4, "five": 5, "six": 6, "ten": 10}


@pytest.fixture(scope="module")
def val_items():
    ds = ShapesDataset("val", n=N_ITEMS)
    return [ds[i] for i in range(len(ds))]


@pytest.fixture(scope="module")
def train_items():
    ds = ShapesDataset("train", n=N_ITEMS)
    return [ds[i] for i in range(len(ds))]


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


def _dilate4(m: np.ndarray) -> np.ndarray:
    p = np.pad(m, 1)
    return p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]


def _nearest_colour(rgb) -> tuple[str, float]:
    d = {k: float(np.linalg.norm(np.asarray(rgb, float) - np.asarray(v, float))) for k, v in PALETTE.items()}
    name = min(d, key=d.get)
    return name, d[name]


# --------------------------------------------------------------------------------------------------
# construction, determinism, splits
# --------------------------------------------------------------------------------------------------


def test_determinism_and_n_independence():
    a, b = ShapesDataset("val", seed=3), ShapesDataset("val", seed=3)
    small = ShapesDataset("val", seed=3, n=8)
    other = ShapesDataset("val", seed=4)
    for i in (0, 1, 7):
        x, y, z = a[i], b[i], small[i]
        for item in (y, z, a[i]):  # a second instance, a truncated one, and regenerating
            assert item["image"].tobytes() == x["image"].tobytes()
            assert item["mask"].tobytes() == x["mask"].tobytes()
            assert item["query"] == x["query"]
            assert item["idx"] == i and item["image_id"] == x["image_id"] == f"shapes-val-{i}"
        assert not np.array_equal(other[i]["image"], x["image"])


def test_item_format():
    ds = ShapesDataset("test", n=3, image_size=160)
    it = ds[2]
    assert set(it) >= {"idx", "image", "mask", "query", "is_sentence", "query_kind", "image_id"}
    assert it["image"].shape == (160, 160, 3) and it["image"].dtype == np.uint8
    assert it["mask"].shape == (160, 160) and it["mask"].dtype == np.uint8
    assert isinstance(it["query"], str) and isinstance(it["is_sentence"], bool)
    assert it["image_id"] == "shapes-test-2"
    # The background is not a flat colour: look at the corners, which are rarely covered by a shape.
    assert it["image"].reshape(-1, 3).std(axis=0).max() > 2.0


def test_splits_are_disjoint():
    sizes = {"train": 400, "val": 100, "test": 100}
    hashes = {
        split: {_digest(ds[i]["image"]) for i in range(len(ds))}
        for split in ("train", "val", "test")
        for ds in [ShapesDataset(split, split_sizes=sizes, image_size=96)]
    }
    assert all(len(h) == sizes[s] for s, h in hashes.items())  # no duplicates inside a split either
    assert not hashes["val"] & hashes["train"]
    assert not hashes["val"] & hashes["test"]
    assert not hashes["test"] & hashes["train"]


def test_default_split_sizes_and_len():
    assert len(ShapesDataset("train")) == 20000
    assert len(ShapesDataset("val")) == 1000
    assert len(ShapesDataset("test")) == 1000
    assert len(ShapesDataset("val", n=5)) == 5
    assert len(ShapesDataset("val", n=10**9)) == 1000  # capped
    assert len(ShapesDataset("val", split_sizes={"val": 7})) == 7
    ds = ShapesDataset("val", n=4)
    assert [ds[i]["idx"] for i in range(len(ds))] == [0, 1, 2, 3]
    for bad in (4, -1, 100):
        with pytest.raises(IndexError):
            ds[bad]


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"split": "training"}, "dataset.split"),
        ({"split": "dev"}, "dataset.split"),
        ({"n": 0}, "dataset.n"),
        ({"n": -3}, "dataset.n"),
        ({"kinds": ["referring", "counting"]}, "dataset.kinds"),
        ({"kinds": []}, "dataset.kinds"),
    ],
)
def test_bad_arguments(kwargs, key):
    with pytest.raises(ValueError) as err:
        ShapesDataset(**kwargs)
    msg = str(err.value)
    assert key in msg and "\n" not in msg
    if key == "dataset.split":
        assert all(s in msg for s in ("train", "val", "test"))


def test_kinds_restriction():
    ds = ShapesDataset("val", n=30, kinds=["relational"])
    assert {ds[i]["query_kind"] for i in range(len(ds))} == {"relational"}
    assert ShapesDataset.QUERY_KINDS == ("referring", "relational", "implicit")


def test_masks_are_the_drawn_target(val_items):
    for it in val_items:
        img, mask = it["image"].astype(float), it["mask"]
        assert set(np.unique(mask)) <= {0, 1}
        m = mask.astype(bool)
        assert m.sum() > 200, it["image_id"]
        assert label(m, connectivity=1).max() == 1, it["image_id"]
        inside = img[m].mean(axis=0)
        _, dist = _nearest_colour(inside)
        assert dist < 35, (it["image_id"], inside)  # one palette colour (plus jitter/noise)
        assert img[m].std(axis=0).max() < 10, it["image_id"]  # a single flat colour: no background inside
        background = np.median(img[~m], axis=0)
        assert np.linalg.norm(inside - background) > 60, it["image_id"]
        # Complete mask: the 1-px ring around it does not have the target's colour.
        ring = _dilate4(m) & ~m
        near = np.linalg.norm(img[ring] - inside, axis=1) < 40
        assert near.mean() < 0.05, it["image_id"]


# --------------------------------------------------------------------------------------------------
# queries: kinds, vocabulary
# --------------------------------------------------------------------------------------------------


def test_query_kind_shares(val_items):
    counts = Counter(it["query_kind"] for it in val_items)
    assert set(counts) == set(ShapesDataset.QUERY_KINDS)
    for k in ShapesDataset.QUERY_KINDS:
        assert counts[k] / len(val_items) >= 0.2, counts
    for it in val_items:
        q = it["query"]
        assert it["is_sentence"] == (it["query_kind"] == "implicit")
        if it["is_sentence"]:
            assert q[0].isupper() and q[-1] in ".?", q
        else:
            assert q.startswith("the ") and q == q.lower() and q[-1].isalpha(), q


def test_vocabulary_is_complete_and_modest(val_items, train_items):
    vocab = ShapesDataset.vocabulary()
    assert vocab == sorted(set(vocab)) and all(w == w.lower() and " " not in w for w in vocab)
    assert 30 < len(vocab) < 400
    assert {"?", "."} <= set(vocab)
    seen = set()
    for it in val_items + train_items:
        # The split rule from the spec: whitespace, then . ? , ' as separate tokens.
        toks = re.sub(r"([.?,'])", r" \1 ", it["query"].lower()).split()
        assert toks == tokenize_query(it["query"])
        seen.update(toks)
    assert seen <= set(vocab), seen - set(vocab)
    assert len({it["query"] for it in val_items}) > N_ITEMS // 2  # varied, not a handful of strings


# --------------------------------------------------------------------------------------------------
# unambiguity: read the scene from pixels and resolve the query independently
# --------------------------------------------------------------------------------------------------


class Comp:
    """One shape as read back from the pixels."""

    def __init__(self, region, lab: np.ndarray, img: np.ndarray):
        self.mask = lab == region.label
        self.area = int(region.area)
        self.cy, self.cx = region.centroid
        y0, x0, y1, x1 = region.bbox
        self.x0, self.y0, self.x1, self.y1 = x0, y0, x1 - 1, y1 - 1
        self.colour, _ = _nearest_colour(img[self.mask].mean(axis=0))
        self.kind = _classify(region)


def _classify(region) -> str:
    """Shape type from geometry: stars are non-convex; regular polygons fit a same-area disk better
    the more corners they have (IoU ~0.69 triangle, 0.83 square, 0.89 pentagon, 0.93 hexagon, 0.98 circle)."""
    if region.solidity < 0.8:
        return "star"
    crop = region.image
    cy, cx = region.centroid_local
    rho = math.sqrt(region.area / math.pi)
    yy, xx = np.mgrid[: crop.shape[0], : crop.shape[1]]
    disk = (xx - cx) ** 2 + (yy - cy) ** 2 <= rho**2
    # the disk may poke out of the crop; count that part as disagreement too
    outside = math.pi * rho**2 - disk.sum()
    iou = (disk & crop).sum() / ((disk | crop).sum() + max(outside, 0.0))
    for bound, kind in ((0.76, "triangle"), (0.865, "square"), (0.91, "pentagon"), (0.955, "hexagon")):
        if iou < bound:
            return kind
    return "circle"


def _components(img: np.ndarray) -> list[Comp]:
    # Shapes are saturated, backgrounds near-neutral: chroma separates them, and the drawn gap keeps
    # shapes in separate components.
    chroma = img.max(axis=2).astype(int) - img.min(axis=2).astype(int)
    lab = label(chroma > 80, connectivity=2)
    return [Comp(r, lab, img) for r in regionprops(lab) if r.area >= 60]


COLOUR_RE = "|".join(PALETTE)
KIND_RE = "|".join(CORNERS)
NP = rf"(?:({COLOUR_RE}) )?({KIND_RE}|shape|object)"
SUP = {
    "large": "large", "big": "large", "larger": "large", "bigger": "large", "largest": "large", "biggest": "large",
    "small": "small", "smaller": "small", "little": "small", "smallest": "small",
    "leftmost": "left", "rightmost": "right", "topmost": "top", "uppermost": "top", "highest": "top",
    "bottommost": "bottom", "lowest": "bottom", "nearest": "nearest", "closest": "nearest",
}
REL = {
    "to the left of": "left", "left of": "left", "to the right of": "right", "right of": "right",
    "above": "above", "below": "below", "beneath": "below",
    "closest to": "closest", "nearest to": "closest", "farthest from": "farthest", "furthest from": "farthest",
}
PHRASE_RE = re.compile(
    rf"^the (?:({'|'.join(SUP)}) )?{NP}(?: ({'|'.join(sorted(REL, key=len, reverse=True))}) the {NP})?$"
)
THING_COLOUR = {
    "ripe tomato": "red", "fire truck": "red", "strawberry": "red", "grass": "green", "leaf": "green",
    "sky": "blue", "ocean": "blue", "banana": "yellow", "lemon": "yellow", "grape": "purple",
    "eggplant": "purple", "carrot": "orange", "pumpkin": "orange",
}
KIND_HINTS = {
    "roll": "circle", "wheel": "circle", "no corners": "circle", "no straight edges": "circle", "coin": "circle",
    "pizza": "triangle", "warning sign": "triangle", "chessboard": "square", "window": "square",
    "home plate": "pentagon", "honeycomb": "hexagon", "nut for a bolt": "hexagon", "twinkles": "star",
    "sheriff": "star",
}
AREA_MARGIN = 1.15  # the test's own "clearly bigger" (the generator promises more)
POS_MARGIN = 4.0


def _filt(comps, colour, noun):
    return [c for c in comps if (colour is None or c.colour == colour) and (noun in ("shape", "object") or c.kind == noun)]


def _unique_best(cands, key, margin, lowest):
    """The single candidate that wins ``key`` by ``margin``; None when it is a close call."""
    if not cands:
        return None
    ranked = sorted(cands, key=key, reverse=not lowest)
    if len(ranked) > 1 and abs(key(ranked[0]) - key(ranked[1])) < margin:
        return None
    return ranked[0]


def _best_area(cands, largest):
    if not cands:
        return None
    ranked = sorted(cands, key=lambda c: c.area, reverse=largest)
    if len(ranked) > 1:
        a, b = ranked[0].area, ranked[1].area
        if (largest and a < AREA_MARGIN * b) or (not largest and a * AREA_MARGIN > b):
            return None
    return ranked[0]


def _superlative(cands, sup, anchor=None):
    if sup in ("large", "small"):
        return _best_area(cands, sup == "large")
    if sup == "nearest":
        return _unique_best(cands, lambda c: math.hypot(c.cx - anchor.cx, c.cy - anchor.cy), POS_MARGIN, True)
    key = {"left": lambda c: c.cx, "right": lambda c: c.cx, "top": lambda c: c.cy, "bottom": lambda c: c.cy}[sup]
    return _unique_best(cands, key, POS_MARGIN, sup in ("left", "top"))


def _resolve_phrase(q, comps):
    m = PHRASE_RE.match(q)
    assert m, f"unparsed phrase: {q!r}"
    sup, colour, noun, rel, a_colour, a_noun = m.groups()
    sup = SUP.get(sup)
    anchor = None
    cands = _filt(comps, colour, noun)
    if rel:
        anchors = _filt(comps, a_colour, a_noun)
        assert len(anchors) == 1, f"anchor of {q!r} matches {len(anchors)} shapes"
        anchor = anchors[0]
        cands = [c for c in cands if c is not anchor]
        rel = REL[rel]
        if rel in ("closest", "farthest"):
            dist = lambda c: math.hypot(c.cx - anchor.cx, c.cy - anchor.cy)  # noqa: E731
            return _unique_best(cands, dist, POS_MARGIN, rel == "closest")
        delta = {
            "left": lambda c: anchor.cx - c.cx, "right": lambda c: c.cx - anchor.cx,
            "above": lambda c: anchor.cy - c.cy, "below": lambda c: c.cy - anchor.cy,
        }[rel]
        cands = [c for c in cands if delta(c) > 0]
    if sup:
        if len(cands) < 2:
            return None  # a superlative over a single shape would be a pointless or wrong query
        return _superlative(cands, sup, anchor)
    return cands[0] if len(cands) == 1 else None


def _resolve_sentence(q, comps):
    if "colour that no other" in q or "whose colour appears once" in q:
        counts = Counter(c.colour for c in comps)
        hits = [c for c in comps if counts[c.colour] == 1]
        return hits[0] if len(hits) == 1 else None
    if "only one of its type" in q or "type appears only once" in q:
        counts = Counter(c.kind for c in comps)
        hits = [c for c in comps if counts[c.kind] == 1]
        return hits[0] if len(hits) == 1 else None
    m = re.search(rf"(?:Which|the biggest|the smallest|the) {NP}\b", q)
    assert m, f"unparsed sentence: {q!r}"
    cands = _filt(comps, m.group(1), m.group(2))

    def only(pred):
        hits = [c for c in cands if pred(c)]
        return hits[0] if len(hits) == 1 else None

    if "colour of" in q or "same colour as" in q or "coloured like" in q:
        thing = next(t for t in THING_COLOUR if t in q)
        return only(lambda c: c.colour == THING_COLOUR[thing])
    if "most corners" in q or "largest number of corners" in q:
        return _unique_best(cands, lambda c: CORNERS[c.kind], 1, lowest=False)
    if "fewest corners" in q or "smallest number of corners" in q:
        return _unique_best(cands, lambda c: CORNERS[c.kind], 1, lowest=True)
    n = re.search(rf"({'|'.join(NUMBERS)}) (?:sides|corners|straight edges)", q)
    if n:
        return only(lambda c: CORNERS[c.kind] == NUMBERS[n.group(1)])
    for hint, kind in KIND_HINTS.items():
        if hint in q:
            return only(lambda c, k=kind: c.kind == k)
    if len(cands) < 2:
        return None
    if any(w in q for w in ("biggest", "largest", "most space")):
        return _best_area(cands, True)
    if any(w in q for w in ("smallest", "tiniest", "least space")):
        return _best_area(cands, False)
    for side in ("top", "bottom", "left", "right"):
        if f"the {side} " in q:
            edge = {"top": lambda c: c.y0, "bottom": lambda c: c.y1, "left": lambda c: c.x0, "right": lambda c: c.x1}[side]
            lowest = side in ("top", "left")
            a = _unique_best(cands, edge, POS_MARGIN, lowest)
            b = _superlative(cands, side)
            return a if a is b else None
    size = comps[0].mask.shape[0]
    dist = lambda c: math.hypot(c.cx - size / 2, c.cy - size / 2)  # noqa: E731
    if "centre" in q or "middle" in q:
        return _unique_best(cands, dist, POS_MARGIN, lowest=("farthest" not in q))
    raise AssertionError(f"unhandled sentence: {q!r}")


def test_every_query_resolves_to_exactly_the_mask(val_items, train_items):
    families = Counter()
    for it in val_items + train_items:
        q, mask = it["query"], it["mask"].astype(bool)
        comps = _components(it["image"])
        target = (_resolve_sentence if it["is_sentence"] else _resolve_phrase)(q, comps)
        assert target is not None, f"{it['image_id']}: {q!r} is ambiguous or matches nothing"
        iou = (target.mask & mask).sum() / (target.mask | mask).sum()
        assert iou > 0.95, f"{it['image_id']}: {q!r} resolves to another shape (IoU {iou:.2f})"
        families[it["query_kind"]] += 1
    assert min(families.values()) > 100


def test_implicit_spot_checks(val_items, train_items):
    """Direct pixel checks for two reasoning types, without any parsing."""
    n_roll = n_colour = 0
    sky = {"the sky": "blue", "the ocean": "blue", "grass": "green", "a leaf": "green"}
    for it in val_items + train_items:
        q, m = it["query"], it["mask"].astype(bool)
        if "could roll" in q or "roll away" in q:
            ys, xs = np.nonzero(m)
            w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
            assert abs(w - h) <= 2 and abs(m.sum() / (math.pi * w * h / 4) - 1) < 0.08, q
            n_roll += 1
        for thing, colour in sky.items():
            if f"colour of {thing}" in q or f"colour as {thing}" in q or f"like {thing}" in q:
                assert _nearest_colour(it["image"][m].mean(axis=0))[0] == colour, q
                n_colour += 1
    assert n_roll > 0 and n_colour > 0
