"""A predicted mask and its query drawn on the image (PIL): what `python -m cspexp.predict` writes
as ``overlay.png`` and the demo shows.

The image keeps its size; outside the masks it is dimmed, and each mask is tinted in its own colour
with a two-pixel outline, so a mask stays visible whatever the colour of the object under it (the
`shapes` objects come in the mask colours too); the query (and, for a generated answer, the answer)
is written in a band above the image, wrapped to its width.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# red first (the mask of a teacher-forced pass), then distinct colours for further [SEG] masks
MASK_COLOURS = ((230, 30, 30), (30, 110, 240), (40, 180, 60), (240, 170, 20), (160, 60, 210))
FILL_ALPHA = 0.35
DIM = 0.45  # the share of the image's brightness kept outside every mask


def mask_png(mask: np.ndarray) -> Image.Image:
    """A boolean mask as the 8-bit grey image predict writes: 255 target, 0 background."""
    return Image.fromarray(np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8), mode="L")


def _outline(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary, two pixels wide: in the mask, within two pixels of a pixel outside it."""
    m = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    eroded = np.asarray(m.filter(ImageFilter.MinFilter(5))) > 0
    return mask & ~eroded


def wrap(text: str, font, width: float) -> list[str]:
    """`text` in lines no wider than `width` pixels in `font` (a longer word stands alone)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines or [""]


def draw_overlay(image: np.ndarray, masks: list[np.ndarray], lines: list[str]) -> Image.Image:
    """`image` (uint8 [H, W, 3]) with `masks` (bool [H, W] each) filled and outlined, below a band with
    `lines` of text (each wrapped to the image's width)."""
    out = np.asarray(image, dtype=np.float32).copy()
    masks = [np.asarray(mask, dtype=bool) for mask in masks]
    if any(mask.any() for mask in masks):
        out[~np.logical_or.reduce(masks)] *= DIM
    for k, mask in enumerate(masks):
        colour = np.asarray(MASK_COLOURS[k % len(MASK_COLOURS)], dtype=np.float32)
        out[mask] = (1 - FILL_ALPHA) * out[mask] + FILL_ALPHA * colour
        out[_outline(mask)] = colour
    picture = Image.fromarray(out.round().clip(0, 255).astype(np.uint8), mode="RGB")
    h, w = picture.height, picture.width
    size = max(14, min(28, w // 32))  # below 14 px Pillow's default font runs its words together
    font = ImageFont.load_default(size=size)
    pad = max(3, size // 3)
    wrapped = [part for line in lines for part in wrap(line, font, w - 2 * pad)]
    band = pad * 2 + len(wrapped) * (size + pad)
    canvas = Image.new("RGB", (w, h + band), (255, 255, 255))
    canvas.paste(picture, (0, band))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(wrapped):
        draw.text((pad, pad + i * (size + pad)), text, fill=(20, 20, 20), font=font)
    return canvas
