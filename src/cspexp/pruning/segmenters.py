"""Instance masks for csp's ``seg_first`` clustering, mapped onto the image-token grid.

- ``superpixel`` (default, no weights): scikit-image SLIC superpixels; each superpixel is an
  "instance". A light, dependency-free stand-in for a detector that still follows image content.
- ``yolo``: an ultralytics segmentation model (e.g. YOLO-tiny-seg weights, the paper's choice) from
  a local weights file; pixels outside every detected instance are background (−1).
The token grid covers the CLIP branch's centre crop, so masks are cropped the same way before each
grid cell takes the majority label of its pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from cspexp.utils.choices import check_value
from cspexp.utils.errors import ConfigError, MissingPathError

Segmenter = Literal["superpixel", "yolo"]


def centre_crop(labels: np.ndarray) -> np.ndarray:
    h, w = labels.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return labels[top : top + side, left : left + side]


def labels_to_grid(labels: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Per-pixel instance labels [H, W] (−1 = none) → per-token labels [rows·cols] by majority vote
    over each grid cell of the centre crop (a cell that is mostly background stays −1)."""
    crop = centre_crop(labels)
    side = crop.shape[0]
    out = np.full(rows * cols, -1, dtype=np.int64)
    ys = np.linspace(0, side, rows + 1).astype(int)
    xs = np.linspace(0, side, cols + 1).astype(int)
    for r in range(rows):
        for c in range(cols):
            cell = crop[ys[r] : max(ys[r + 1], ys[r] + 1), xs[c] : max(xs[c + 1], xs[c] + 1)].reshape(-1)
            values, counts = np.unique(cell, return_counts=True)
            out[r * cols + c] = int(values[np.argmax(counts)])
    return out


class Superpixels:
    """SLIC superpixels as instances."""

    def __init__(self, n_segments: int = 16, compactness: float = 10.0) -> None:
        self.n_segments = n_segments
        self.compactness = compactness

    def __call__(self, image: np.ndarray) -> np.ndarray:
        from skimage.segmentation import slic

        return slic(image, n_segments=self.n_segments, compactness=self.compactness, start_label=0)


class YoloInstances:
    """Instance masks from an ultralytics segmentation model loaded from a local weights file."""

    def __init__(self, weights: str, conf: float = 0.25) -> None:
        if not Path(weights).is_file():
            raise MissingPathError(f"prune.cluster.yolo_weights={weights!r} does not exist")
        try:
            from ultralytics import YOLO
        except ImportError:
            raise ConfigError("prune.cluster.segmenter=yolo needs the ultralytics package: pip install ultralytics") from None
        self.model = YOLO(weights)
        self.conf = conf

    def __call__(self, image: np.ndarray) -> np.ndarray:
        import torch.nn.functional as F

        h, w = image.shape[:2]
        labels = np.full((h, w), -1, dtype=np.int64)
        result = self.model.predict(image, conf=self.conf, verbose=False)[0]
        if result.masks is None:
            return labels
        masks = F.interpolate(result.masks.data[:, None].float().cpu(), size=(h, w), mode="bilinear")[:, 0] > 0.5
        # Smaller instances are drawn last so that they are not swallowed by larger overlapping ones.
        order = np.argsort(-masks.flatten(1).sum(1).numpy(), kind="stable")
        for label, i in enumerate(order):
            labels[masks[i].numpy()] = label
        return labels


def build_segmenter(name: Segmenter, yolo_weights: str | None, n_segments: int):
    check_value(name, Segmenter, "prune.cluster.segmenter")
    if name == "superpixel":
        return Superpixels(n_segments=n_segments)
    if not yolo_weights:
        raise ConfigError("prune.cluster.segmenter=yolo needs prune.cluster.yolo_weights=<path to *-seg.pt>")
    return YoloInstances(yolo_weights)
