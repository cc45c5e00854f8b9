"""The procedural ``shapes`` reasoning-segmentation dataset.

Each item is a small synthetic scene (3-6 coloured, filled, non-overlapping shapes on a mildly
noisy background), a text query that singles out exactly one of the shapes, and the binary mask of
that shape. It needs no files, is deterministic by seed, and is meant both for tests and for
training a tiny model that must *read the query and look at the image* to answer.

Design choices and the reasons behind them:

* **Disjoint, stable splits.** All splits share one global index space (``train`` first, then
  ``val``, then ``test``); item ``i`` of a split is generated from
  ``np.random.default_rng([seed, offset(split) + i])``. Splits therefore never share a generator
  stream, and item ``i`` does not depend on ``n`` or on which other items were generated.
* **Exact masks.** Shapes are placed by rejection sampling so that their circumscribed circles
  (plus a gap) do not intersect. The mask is rasterised with the same PIL call as the image, so it
  is exactly the visible target, with no occlusion to reason about.
* **Unambiguous queries by construction.** Queries are not written first and checked later: for a
  chosen target we enumerate the descriptions that resolve to *exactly that shape* in this scene
  (unique attributes, superlatives that win by a clear margin, relations whose outcome no shape sits
  too close to call) and pick one of them at random. If a scene admits no query of the chosen kind
  it is resampled. Margins (``10 px`` on positions and distances, ``x1.3`` on pixel areas, scaled
  with ``image_size``) keep every decision visually obvious.
* **Queries need the image.** Targets are drawn uniformly among the shapes that admit a query, so
  their location, colour and type vary; relational queries are preferred when the relation is
  actually needed (the filter alone would match several shapes).
* **Three query kinds in equal shares** (``referring``, ``relational``: noun phrases;
  ``implicit``: full sentences that need a small world-knowledge or counting step). LISA uses
  different prompt templates for phrases and sentences, hence ``is_sentence``.
* **Closed vocabulary.** Every query is assembled from the template tables below, so
  :meth:`ShapesDataset.vocabulary` can list every token a word-level tokenizer will ever see.
"""

from __future__ import annotations

import math
import functools
import operator
import re
import typing
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from cspexp.utils.choices import PositiveInt, check_call
from cspexp.utils.errors import ConfigError

__all__ = ["ShapesDataset", "DrawnShape", "Scene", "tokenize_query", "COLOURS", "KINDS", "CORNERS"]

# --------------------------------------------------------------------------------------------------
# Visual vocabulary
# --------------------------------------------------------------------------------------------------

# Saturated, mutually distant colours; backgrounds are near-neutral so no colour blends into them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
}
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "pentagon", "hexagon", "star")
CORNERS: dict[str, int] = {"circle": 0, "triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6, "star": 10}
_POLY_VERTICES = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}
_STAR_INNER = 0.5  # inner/outer radius; fat enough that thin spikes never break into pieces

_REF_SIZE = 224.0  # all pixel constants below are for 224 px and scale with image_size
_R_MIN, _R_MAX = 18.0, 48.0
_GAP = 4.0
_MARGIN = 10.0
_AREA_RATIO = 1.3
_COLOUR_JITTER = 12
_PIXEL_NOISE = 5  # uniform integer noise in [-5, 5] (std ~3)

# --------------------------------------------------------------------------------------------------
# Query templates. Everything a query can contain lives in these tables (see vocabulary()).
# --------------------------------------------------------------------------------------------------

_NOUN = ("shape", "object")  # noun for a filter that does not name a shape type

# referring
_SIZE_WORDS_2 = {"large": ("large", "big", "larger", "bigger"), "small": ("small", "smaller", "little")}
_SIZE_WORDS_N = {"large": ("largest", "biggest"), "small": ("smallest",)}
_POS_WORDS = {
    "left": ("leftmost",),
    "right": ("rightmost",),
    "top": ("topmost", "uppermost", "highest"),
    "bottom": ("bottommost", "lowest"),
}

# relational
_DIRECTION_WORDS = {
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below", "beneath"),
}
_PROXIMITY_WORDS = {"closest": ("closest to", "nearest to"), "farthest": ("farthest from", "furthest from")}
_DISAMBIGUATORS = {"nearest": ("nearest", "closest"), "large": ("largest", "biggest"), "small": ("smallest",)}

# implicit: "{x}" is a noun phrase ("shape", "red object", "triangle", ...)
_ROLL = (
    "Which {x} could roll down a hill?",
    "Which {x} would roll away if you pushed it?",
    "Find the {x} that could be used as a wheel.",
    "Segment the {x} that has no corners.",
    "Which {x} has no straight edges?",
)
_MOST_CORNERS = (
    "Segment the {x} with the most corners.",
    "Which {x} has the most corners?",
    "Find the {x} that has the largest number of corners.",
)
_FEWEST_CORNERS = (
    "Segment the {x} with the fewest corners.",
    "Which {x} has the fewest corners?",
    "Find the {x} that has the smallest number of corners.",
)
_SIDES = (
    "Find the {x} that has exactly {num} sides.",
    "Which {x} has {num} corners?",
    "Segment the {x} with {num} straight edges.",
)
_NUMBER_WORDS = {3: "three", 4: "four", 5: "five", 6: "six", 10: "ten"}
_SHAPE_KNOWLEDGE = {
    "circle": ("Which {x} has the shape of a coin?", "Which {x} looks like a wheel?"),
    "triangle": ("Which {x} has the shape of a slice of pizza?", "Which {x} looks like a warning sign?"),
    "square": ("Which {x} has the shape of a chessboard tile?", "Which {x} looks like a window?"),
    "pentagon": ("Which {x} has the shape of home plate in baseball?",),
    "hexagon": ("Which {x} has the shape of a honeycomb cell?", "Which {x} looks like a nut for a bolt?"),
    "star": ("Which {x} twinkles in the night sky?", "Which {x} looks like a sheriff badge?"),
}
_COLOUR_KNOWLEDGE = (
    "Which {x} is the colour of {thing}?",
    "Segment the {x} that has the same colour as {thing}.",
    "Find the {x} coloured like {thing}.",
)
_COLOUR_THINGS = {
    "red": ("a ripe tomato", "a fire truck", "a strawberry"),
    "green": ("grass", "a leaf"),
    "blue": ("the sky", "the ocean"),
    "yellow": ("a banana", "a lemon"),
    "purple": ("a grape", "an eggplant"),
    "orange": ("a carrot", "a pumpkin"),
}
_BIGGEST = (
    "Segment the biggest {x} in the picture.",
    "Which {x} is the largest?",
    "Which {x} takes up the most space?",
    "Find the {x} with the largest area.",
)
_SMALLEST = (
    "Find the smallest {x} in the image.",
    "Which {x} is the tiniest?",
    "Which {x} takes up the least space?",
    "Segment the {x} with the smallest area.",
)
_ODD_COLOUR = (
    "Which shape has a colour that no other shape has?",
    "Segment the only shape whose colour appears once.",
)
_ODD_KIND = (
    "Which shape is the only one of its type?",
    "Find the shape whose type appears only once.",
)
_EDGE = {
    "top": ("Which {x} is closest to the top of the image?", "Segment the {x} nearest the top edge."),
    "bottom": ("Which {x} is closest to the bottom of the image?", "Segment the {x} nearest the bottom edge."),
    "left": ("Which {x} is closest to the left side of the image?", "Segment the {x} nearest the left edge."),
    "right": ("Which {x} is closest to the right side of the image?", "Segment the {x} nearest the right edge."),
}
_CENTRE = {
    "closest": ("Which {x} is closest to the centre of the image?", "Segment the {x} nearest the middle of the picture."),
    "farthest": ("Which {x} is farthest from the centre of the image?",),
}

_TOKEN_RE = re.compile(r"[a-z0-9]+|[.?,']")


def tokenize_query(text: str) -> list[str]:
    """Lower-case word tokens with ``. ? , '`` split off, the rule :meth:`ShapesDataset.vocabulary` follows."""
    return _TOKEN_RE.findall(text.lower())


# --------------------------------------------------------------------------------------------------
# Scene
# --------------------------------------------------------------------------------------------------


@dataclass
class DrawnShape:
    """One shape as drawn: geometry in pixels, its visible pixel ``area`` filled in after rasterising."""

    kind: str
    colour: str
    cx: float
    cy: float
    r: float  # circumradius
    angle: float
    rgb: tuple[int, int, int]
    area: int = 0
    points: list[tuple[float, float]] = field(default_factory=list)  # polygon outline (empty for circles)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        if not self.points:
            return (self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r)
        xs = [p[0] for p in self.points]
        ys = [p[1] for p in self.points]
        return (min(xs), min(ys), max(xs), max(ys))

    def draw(self, draw: ImageDraw.ImageDraw, fill) -> None:
        if self.kind == "circle":
            draw.ellipse([self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r], fill=fill)
        else:
            draw.polygon(self.points, fill=fill)


@dataclass
class Scene:
    """Shapes of one item, the target's position in ``shapes`` and the query that picks it."""

    shapes: list[DrawnShape]
    target: int
    query: str
    query_kind: str
    family: str
    anchor: int | None = None  # relational queries: the shape the relation is relative to


def _outline(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "circle":
        return []
    if kind == "star":
        radii = [r if j % 2 == 0 else r * _STAR_INNER for j in range(10)]
        angles = [angle + math.pi * j / 5 for j in range(10)]
    else:
        k = _POLY_VERTICES[kind]
        radii = [r] * k
        angles = [angle + 2 * math.pi * j / k for j in range(k)]
    return [(cx + rr * math.cos(a), cy + rr * math.sin(a)) for rr, a in zip(radii, angles)]


def _place_shapes(rng: np.random.Generator, n: int, size: int) -> list[DrawnShape]:
    """Rejection-sample up to ``n`` shapes whose circumcircles keep a gap, so none overlap."""
    s = size / _REF_SIZE
    r_min, r_max, gap = _R_MIN * s, _R_MAX * s, _GAP * s
    # Big shapes first: they are the hard ones to fit, small ones slot into what is left.
    radii = np.sort(rng.uniform(r_min, r_max, n))[::-1]
    colour_names = list(COLOURS)
    placed: list[DrawnShape] = []
    for r0 in radii:
        for attempt in range(40):
            r = max(r_min, r0 * 0.9 ** (attempt // 8))  # shrink slowly when the canvas is crowded
            cx, cy = rng.uniform(r + 2, size - r - 2, 2)
            if all(math.hypot(cx - p.cx, cy - p.cy) >= r + p.r + gap for p in placed):
                break
        else:
            continue
        kind = KINDS[rng.integers(len(KINDS))]
        colour = colour_names[rng.integers(len(colour_names))]
        rgb = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3), 0, 255))
        angle = float(rng.uniform(0, 2 * math.pi))
        placed.append(DrawnShape(kind, colour, float(cx), float(cy), float(r), angle, rgb, points=_outline(kind, cx, cy, r, angle)))
    # Shuffle so list order carries no size information.
    order = rng.permutation(len(placed))
    return [placed[i] for i in order]


def _label_map(shapes: list[DrawnShape], size: int) -> np.ndarray:
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for i, sh in enumerate(shapes):
        sh.draw(draw, i + 1)
    labels = _drop_stray_pixels(np.array(img))
    areas = np.bincount(labels.ravel(), minlength=len(shapes) + 1)
    for i, sh in enumerate(shapes):
        sh.area = int(areas[i + 1])
    return labels


def _drop_stray_pixels(labels: np.ndarray) -> np.ndarray:
    """Remove pixels with no 4-neighbour of their own shape.

    PIL's polygon fill sometimes leaves a lone pixel touching a sharp tip only diagonally; dropping
    it keeps every shape (and so every mask) one 4-connected piece.
    """
    padded = np.pad(labels, 1)
    centre = padded[1:-1, 1:-1]
    same = (
        (padded[:-2, 1:-1] == centre) | (padded[2:, 1:-1] == centre) | (padded[1:-1, :-2] == centre) | (padded[1:-1, 2:] == centre)
    )
    labels[(labels > 0) & ~same] = 0
    return labels


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Near-neutral base colour + a soft gradient + low-frequency blotches (float32, H×W×3)."""
    base = rng.uniform(110, 235) + rng.uniform(-15, 15, 3)
    phi = rng.uniform(0, 2 * math.pi)
    amp = rng.uniform(0, 25)
    t = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    grad = amp * (t[None, :] * math.cos(phi) + t[:, None] * math.sin(phi))
    blot = rng.normal(0, 8, (6, 6)).astype(np.float32)
    blot = np.asarray(Image.fromarray(blot).resize((size, size), Image.Resampling.BILINEAR))
    return base.astype(np.float32)[None, None, :] + (grad + blot)[..., None]


def _render(rng: np.random.Generator, shapes: list[DrawnShape], labels: np.ndarray) -> np.ndarray:
    # Paint from the label map rather than drawing again: image and mask then agree pixel for pixel.
    img = _background(rng, labels.shape[0])
    fg = labels > 0
    lut = np.array([(0, 0, 0)] + [sh.rgb for sh in shapes], dtype=np.float32)
    img[fg] = lut[labels[fg]]
    # Mild sensor-like noise everywhere, so flat colour is not a give-away of "shape pixel".
    img += rng.integers(-_PIXEL_NOISE, _PIXEL_NOISE + 1, img.shape, dtype=np.int16)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Query generation: enumerate descriptions that resolve to exactly one shape
# --------------------------------------------------------------------------------------------------

Filter = tuple  # (colour | None, kind | None)


class _Candidate(NamedTuple):
    family: str
    target: int
    necessary: bool  # the part that needs reasoning (relation, superlative) is actually needed
    render: Callable[[np.random.Generator], str]
    anchor: int | None = None  # relational queries: the shape the relation is relative to


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _matches(f: Filter, s: DrawnShape) -> bool:
    return (f[0] is None or s.colour == f[0]) and (f[1] is None or s.kind == f[1])


def _noun_phrases(f: Filter) -> tuple[str, ...]:
    colour, kind = f
    if kind is not None:
        return (f"{colour} {kind}",) if colour else (kind,)
    return tuple(f"{colour} {n}" for n in _NOUN) if colour else _NOUN


def _beats(t: float, others: list[float], margin: float, lower: bool) -> bool:
    """``t`` is the strict extreme of ``others`` by at least ``margin``."""
    if lower:
        return all(t <= o - margin for o in others)
    return all(t >= o + margin for o in others)


def _area_extreme(t: DrawnShape, others: list[DrawnShape], largest: bool) -> bool:
    if not others:
        return False
    if largest:
        return t.area >= _AREA_RATIO * max(o.area for o in others)
    return t.area * _AREA_RATIO <= min(o.area for o in others)


def _edge_extreme(t: DrawnShape, others: list[DrawnShape], side: str, m: float) -> bool:
    # Both the centre and the outer edge must win: a big shape can reach the border first
    # while its centre is further in, and then a human could answer either way.
    if not others:
        return False
    axis, lower = {"left": (0, True), "right": (0, False), "top": (1, True), "bottom": (1, False)}[side]
    centre = (lambda s: s.cx) if axis == 0 else (lambda s: s.cy)
    edge_idx = axis if lower else axis + 2
    return _beats(centre(t), [centre(o) for o in others], m, lower) and _beats(
        t.bbox[edge_idx], [o.bbox[edge_idx] for o in others], m, lower
    )


class _QueryGenerator:
    def __init__(self, shapes: list[DrawnShape], size: int):
        self.shapes = shapes
        self.size = size
        self.m = _MARGIN * size / _REF_SIZE

    def group(self, f: Filter, exclude: tuple[int, ...] = ()) -> list[int]:
        return [i for i, s in enumerate(self.shapes) if i not in exclude and _matches(f, s)]

    def target_filters(self, t: int) -> list[Filter]:
        s = self.shapes[t]
        return [(None, None), (s.colour, None), (None, s.kind), (s.colour, s.kind)]

    def unique_filters(self, t: int) -> list[Filter]:
        """Attribute filters (no superlatives) that match ``t`` alone."""
        return [f for f in self.target_filters(t)[1:] if self.group(f) == [t]]

    # ---------------------------------------------------------------- referring (noun phrases)
    def referring(self, t: int) -> list[_Candidate]:
        sh = self.shapes
        out: list[_Candidate] = []
        for f in self.unique_filters(t):
            out.append(_Candidate("attribute", t, True, lambda rng, f=f: "the " + _pick(rng, _noun_phrases(f))))
        for f in self.target_filters(t):
            g = self.group(f)
            if len(g) < 2:
                continue
            others = [sh[i] for i in g if i != t]
            words = _SIZE_WORDS_2 if len(g) == 2 else _SIZE_WORDS_N
            for which in ("large", "small"):
                if _area_extreme(sh[t], others, which == "large"):
                    out.append(_Candidate("size", t, True, lambda rng, f=f, w=words[which]: f"the {_pick(rng, w)} {_pick(rng, _noun_phrases(f))}"))
            for side, w in _POS_WORDS.items():
                if _edge_extreme(sh[t], others, side, self.m):
                    out.append(_Candidate("position", t, True, lambda rng, f=f, w=w: f"the {_pick(rng, w)} {_pick(rng, _noun_phrases(f))}"))
        return out

    # ---------------------------------------------------------------- relational (noun phrases)
    def _delta(self, s: DrawnShape, a: DrawnShape, direction: str) -> float:
        """How far ``s`` lies in ``direction`` from anchor ``a`` (centres; image y grows downwards)."""
        return {"left": a.cx - s.cx, "right": s.cx - a.cx, "above": a.cy - s.cy, "below": s.cy - a.cy}[direction]

    def relational(self, t: int) -> list[_Candidate]:
        sh = self.shapes
        m = self.m
        out: list[_Candidate] = []
        for a in range(len(sh)):
            if a == t:
                continue
            anchor_nps = [np_ for f in self.unique_filters(a) for np_ in _noun_phrases(f)]
            if not anchor_nps:
                continue
            dist = {i: math.hypot(sh[i].cx - sh[a].cx, sh[i].cy - sh[a].cy) for i in range(len(sh)) if i != a}
            for f in self.target_filters(t):
                group = self.group(f, exclude=(a,))
                necessary = len(group) > 1
                nps = _noun_phrases(f)

                def phrase(rng, pre, rel_words, nps=nps, anchor_nps=anchor_nps):
                    head = f"the {_pick(rng, pre)} " if pre else "the "
                    return f"{head}{_pick(rng, nps)} {_pick(rng, rel_words)} the {_pick(rng, anchor_nps)}"

                for direction, rel_words in _DIRECTION_WORDS.items():
                    deltas = {i: self._delta(sh[i], sh[a], direction) for i in group}
                    if deltas[t] < m or any(abs(d) < m for d in deltas.values()):
                        continue  # target not clearly there, or some shape too close to call
                    sat = [i for i in group if deltas[i] >= m]
                    if len(sat) == 1:
                        out.append(_Candidate(direction, t, necessary, lambda rng, w=rel_words, p=phrase: p(rng, (), w), a))
                        continue
                    rest = [i for i in sat if i != t]
                    if _beats(dist[t], [dist[i] for i in rest], m, lower=True):
                        out.append(_Candidate(direction, t, True, lambda rng, w=rel_words, p=phrase: p(rng, _DISAMBIGUATORS["nearest"], w), a))
                    for which in ("large", "small"):
                        if _area_extreme(sh[t], [sh[i] for i in rest], which == "large"):
                            out.append(_Candidate(direction, t, True, lambda rng, w=rel_words, d=_DISAMBIGUATORS[which], p=phrase: p(rng, d, w), a))
                rest = [dist[i] for i in group if i != t]
                for prox, rel_words in _PROXIMITY_WORDS.items():
                    if not rest and prox == "farthest":
                        continue  # "farthest" of a single candidate reads oddly
                    if _beats(dist[t], rest, m, lower=(prox == "closest")):
                        out.append(_Candidate(prox, t, necessary, lambda rng, w=rel_words, p=phrase: p(rng, (), w), a))
        return out

    # ---------------------------------------------------------------- implicit (sentences)
    def implicit(self) -> list[_Candidate]:
        sh = self.shapes
        out: list[_Candidate] = []
        colour_filters = [(None, None)] + [(c, None) for c in sorted({s.colour for s in sh})]
        kind_filters = [(None, None)] + [(None, k) for k in sorted({s.kind for s in sh})]
        centre = self.size / 2

        def add(family: str, t: int, f: Filter, templates, **fmt):
            out.append(
                _Candidate(family, t, True, lambda rng: _pick(rng, templates).format(x=_pick(rng, _noun_phrases(f)), **fmt))
            )

        def unique_by(group: list[int], pred) -> int | None:
            hits = [i for i in group if pred(sh[i])]
            return hits[0] if len(hits) == 1 else None

        for f in colour_filters:
            g = self.group(f)
            if not g:
                continue
            t = unique_by(g, lambda s: s.kind == "circle")
            if t is not None:
                add("roll", t, f, _ROLL)
            corners = [CORNERS[sh[i].kind] for i in g]
            if len(set(corners)) > 1:  # "most corners" needs something to compare against
                for templates, best in ((_MOST_CORNERS, max(corners)), (_FEWEST_CORNERS, min(corners))):
                    t = unique_by(g, lambda s, b=best: CORNERS[s.kind] == b)
                    if t is not None:
                        add("corners", t, f, templates)
            for kind in KINDS:
                t = unique_by(g, lambda s, k=kind: s.kind == k)
                if t is None:
                    continue
                if kind != "circle":
                    add("sides", t, f, _SIDES, num=_NUMBER_WORDS[CORNERS[kind]])
                add("shape_knowledge", t, f, _SHAPE_KNOWLEDGE[kind])
            if len(g) >= 2:
                for side, templates in _EDGE.items():
                    for t in g:
                        if _edge_extreme(sh[t], [sh[i] for i in g if i != t], side, self.m):
                            add("position", t, f, templates)
                d = {i: math.hypot(sh[i].cx - centre, sh[i].cy - centre) for i in g}
                for which, templates in _CENTRE.items():
                    for t in g:
                        if _beats(d[t], [d[i] for i in g if i != t], self.m, lower=(which == "closest")):
                            add("position", t, f, templates)
        for f in kind_filters:
            g = self.group(f)
            for colour in COLOURS:
                t = unique_by(g, lambda s, c=colour: s.colour == c)
                if t is not None:
                    things = _COLOUR_THINGS[colour]
                    out.append(
                        _Candidate(
                            "colour_knowledge",
                            t,
                            True,
                            lambda rng, f=f, things=things: _pick(rng, _COLOUR_KNOWLEDGE).format(
                                x=_pick(rng, _noun_phrases(f)), thing=_pick(rng, things)
                            ),
                        )
                    )
        for f in colour_filters + kind_filters[1:]:
            g = self.group(f)
            if len(g) < 2:
                continue
            for t in g:
                others = [sh[i] for i in g if i != t]
                if _area_extreme(sh[t], others, True):
                    add("size", t, f, _BIGGEST)
                if _area_extreme(sh[t], others, False):
                    add("size", t, f, _SMALLEST)
        if len(sh) >= 3:
            for attr, templates in (("colour", _ODD_COLOUR), ("kind", _ODD_KIND)):
                counts = Counter(getattr(s, attr) for s in sh)
                t = unique_by(list(range(len(sh))), lambda s, a=attr, c=counts: c[getattr(s, a)] == 1)
                if t is not None:
                    add("odd_one_out", t, (None, None), templates)
        return out


def _choose(rng: np.random.Generator, cands: list[_Candidate], prefer_necessary: float) -> _Candidate:
    """Family uniformly (so rare-but-valid templates are not drowned), then a candidate."""
    families = sorted({c.family for c in cands})
    fam = _pick(rng, families)
    pool = [c for c in cands if c.family == fam]
    needed = [c for c in pool if c.necessary]
    if needed and len(needed) < len(pool) and rng.random() < prefer_necessary:
        pool = needed
    return _pick(rng, pool)


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------

Split = Literal["train", "val", "test"]
QueryKind = Literal["referring", "relational", "implicit"]
_SPLITS = typing.get_args(Split)  # in the order the splits' item ranges follow each other
_DEFAULT_SPLIT_SIZES = {"train": 20000, "val": 1000, "test": 1000}
_MAX_SCENE_TRIES = 200


@functools.lru_cache(maxsize=1024)  # ≈ 200 MB of 224 px items at most
def _generated(seed: int, index: int, split: str, image_size: int, min_shapes: int, max_shapes: int,
               kinds: tuple) -> tuple[Scene, np.ndarray, np.ndarray]:
    """Item `index` (of all splits) of a generator with these settings; the arrays are read-only,
    since every caller shares them."""
    gen = ShapesDataset.__new__(ShapesDataset)
    gen.seed, gen.split, gen.image_size, gen.min_shapes, gen.max_shapes, gen.kinds = (seed, split, image_size,
                                                                                        min_shapes, max_shapes, kinds)
    gen.offset = 0
    scene, image, mask = gen._draw(index)
    image.setflags(write=False)
    mask.setflags(write=False)
    return scene, image, mask


class ShapesDataset(torch.utils.data.Dataset):
    """Procedural reasoning-segmentation dataset; see the module docstring for the design."""

    QUERY_KINDS = typing.get_args(QueryKind)

    def __init__(
        self,
        split: Split = "val",
        n: PositiveInt | None = None,
        seed: int = 0,
        image_size: int = 224,
        min_shapes: int = 3,
        max_shapes: int = 6,
        split_sizes: dict | None = None,
        kinds: list[QueryKind] | None = None,
    ):
        check_call(ShapesDataset, {"split": split, "kinds": kinds}, "dataset")
        sizes = dict(_DEFAULT_SPLIT_SIZES)
        if split_sizes:
            unknown = set(split_sizes) - set(_SPLITS)
            if unknown:
                raise ConfigError(f"dataset.split_sizes has unknown splits {sorted(unknown)}; allowed: {list(_SPLITS)}")
            sizes.update({k: int(v) for k, v in split_sizes.items()})
        if any(v < 0 for v in sizes.values()):
            raise ConfigError(f"dataset.split_sizes must be non-negative, got {sizes}")
        if n is not None and int(n) < 1:
            raise ConfigError(f"dataset.n must be >= 1 or None, got {n}")
        if kinds is None:
            kinds = list(self.QUERY_KINDS)
        if not kinds:
            raise ConfigError(f"dataset.kinds must be a non-empty subset of {list(self.QUERY_KINDS)}, got {list(kinds)}")
        if not 2 <= min_shapes <= max_shapes <= 8:
            raise ConfigError(f"dataset.min_shapes/max_shapes must satisfy 2 <= min <= max <= 8, got {min_shapes}, {max_shapes}")
        if image_size < 64:
            raise ConfigError(f"dataset.image_size must be >= 64, got {image_size}")

        self.split = split
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.min_shapes = int(min_shapes)
        self.max_shapes = int(max_shapes)
        self.kinds = tuple(k for k in self.QUERY_KINDS if k in kinds)  # canonical order: same rng use for same set
        self.split_sizes = sizes
        self.offset = sum(sizes[s] for s in _SPLITS[: _SPLITS.index(split)])
        self.length = sizes[split] if n is None else min(int(n), sizes[split])

    def __len__(self) -> int:
        return self.length

    def _check_index(self, i) -> int:
        i = operator.index(i)
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for ShapesDataset({self.split!r}) of length {self.length}")
        return i

    def _generate(self, i: int) -> tuple[Scene, np.ndarray, np.ndarray]:
        # Memoised across dataset objects of the process: a sweep's jobs build the dataset anew and
        # read the same items (rendering them is a quarter of an embedded-model job's time).
        return _generated(self.seed, self.offset + i, self.split, self.image_size, self.min_shapes, self.max_shapes,
                          self.kinds)

    def _draw(self, i: int) -> tuple[Scene, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.offset + i])
        # The kind is fixed before any scene is drawn, so resampling cannot skew the kind shares.
        kind = self.kinds[int(rng.integers(len(self.kinds)))]
        for _ in range(_MAX_SCENE_TRIES):
            n_shapes = int(rng.integers(self.min_shapes, self.max_shapes + 1))
            shapes = _place_shapes(rng, n_shapes, self.image_size)
            if len(shapes) < self.min_shapes:
                continue
            labels = _label_map(shapes, self.image_size)
            gen = _QueryGenerator(shapes, self.image_size)
            cand = self._pick_query(rng, gen, kind)
            if cand is None:
                continue
            query = cand.render(rng)
            image = _render(rng, shapes, labels)
            mask = (labels == cand.target + 1).astype(np.uint8)
            return Scene(shapes, cand.target, query, kind, cand.family, cand.anchor), image, mask
        raise RuntimeError(f"could not generate a {kind} query for item {i} of split {self.split!r}")

    @staticmethod
    def _pick_query(rng: np.random.Generator, gen: _QueryGenerator, kind: str) -> _Candidate | None:
        if kind == "implicit":
            cands = gen.implicit()
            if not cands:
                return None
            # Reasoning type first: otherwise the always-available ones (size, position) would drown
            # the rarer ones (roll, odd one out); the target is then uniform among that type's answers.
            fam = _pick(rng, sorted({c.family for c in cands}))
            cands = [c for c in cands if c.family == fam]
            t = _pick(rng, sorted({c.target for c in cands}))
            return _pick(rng, [c for c in cands if c.target == t])
        build = gen.referring if kind == "referring" else gen.relational
        # First target of a random order that admits a query = uniform over answerable targets.
        for t in rng.permutation(len(gen.shapes)):
            cands = build(int(t))
            if cands:
                return _choose(rng, cands, 0.85)
        return None

    def scene(self, i: int) -> Scene:
        """Generation metadata of item ``i`` (shapes, target index, query); for tests and debugging."""
        return self._generate(self._check_index(i))[0]

    def __getitem__(self, i) -> dict:
        i = self._check_index(i)
        scene, image, mask = self._generate(i)
        return {
            "idx": i,
            "image": image,
            "mask": mask,
            "query": scene.query,
            "is_sentence": scene.query_kind == "implicit",
            "query_kind": scene.query_kind,
            "image_id": f"shapes-{self.split}-{i}",
        }

    @staticmethod
    def vocabulary() -> list[str]:
        """Sorted list of every token (see :func:`tokenize_query`) any query can contain."""
        texts: list[str] = []
        texts += ["the"] + list(COLOURS) + list(KINDS) + list(_NOUN)
        for table in (_SIZE_WORDS_2, _SIZE_WORDS_N, _POS_WORDS, _DIRECTION_WORDS, _PROXIMITY_WORDS, _DISAMBIGUATORS,
                      _SHAPE_KNOWLEDGE, _COLOUR_THINGS, _EDGE, _CENTRE):
            for words in table.values():
                texts += list(words)
        texts += list(_NUMBER_WORDS.values())
        for templates in (_ROLL, _MOST_CORNERS, _FEWEST_CORNERS, _SIDES, _COLOUR_KNOWLEDGE, _BIGGEST, _SMALLEST,
                          _ODD_COLOUR, _ODD_KIND):
            texts += list(templates)
        vocab: set[str] = set()
        for text in texts:
            # Placeholders are always separated from neighbouring words, so dropping them loses nothing.
            vocab.update(tokenize_query(re.sub(r"\{\w+\}", " ", text)))
        return sorted(vocab)
