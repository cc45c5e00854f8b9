"""Pictures people ask for: what the model segmented, and which image tokens a method kept.

For each of a few fixed samples, one PNG: the image with the ground-truth mask (green outline) and
the predicted mask (red fill), then one panel per *stage* — a run of layers that saw the same image
tokens — with the 16×16 token grid drawn over the image, dropped cells darkened. For csp that shows
the N_c representatives of the clustering stage, the full grid of the scattering stage, and the
tokens the [SEG] query kept for the pruning stage. Where a method merged tokens (visionzip,
sparsevlm, tome, mustdrop; see `cspexp.pruning.merges`), each merged token's cell is outlined in a
colour and the cells whose content it holds are tinted in that colour instead of darkened.

The kept sets are recorded by an observer of the decoder loop (`KeptRecorder`): after the method
acted before each layer it notes the grid cells of the image tokens entering that layer. An observer
cannot change the token state, and the numbers of the run are not affected (this is an extra pass
over a few samples after the evaluation).
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cspexp.metrics.seg_iou import intersection_and_union, sample_iou  # noqa: E402
from cspexp.models.lisa import IMAGE  # noqa: E402
from cspexp.pruning.engine import Observer  # noqa: E402
from cspexp.pruning.merges import present_merges  # noqa: E402
from cspexp.pruning.pipeline import segment  # noqa: E402


class KeptRecorder(Observer):
    """`kept[l][i]` lists the grid cells of the image tokens of sample i entering layer l (after the
    method acted before that layer); `merges[l][i]` is what the merged ones among them hold,
    {target cell: member cells} (`cspexp.pruning.merges`), empty for a method that merges nothing."""

    def __init__(self) -> None:
        self.kept: list[list[list[int]]] = []
        self.merges: list[list[dict[int, list[int]]]] = []

    def on_setup(self, state, ctx) -> None:
        self.kept, self.merges = [], []

    def before_layer(self, layer: int, state, ctx) -> None:
        is_image = state.kind == IMAGE
        kept = [sorted(state.grid[i][is_image[i]].tolist()) for i in range(state.batch_size)]
        self.kept.append(kept)
        self.merges.append([present_merges(state, i, cells) for i, cells in enumerate(kept)])


def stages(per_layer: list[list[int]], merges: list[dict] | None = None) -> list[tuple[int, int, list[int]]]:
    """Consecutive layers with the same kept cells (and the same merges, when given), as (first layer,
    last layer, cells)."""
    out: list[tuple[int, int, list[int]]] = []
    keys = [(cells, merges[layer] if merges else {}) for layer, cells in enumerate(per_layer)]
    for layer, key in enumerate(keys):
        if out and keys[layer - 1] == key:
            out[-1] = (out[-1][0], layer, key[0])
        else:
            out.append((layer, layer, key[0]))
    return out


#: one colour per merged token of a panel (members tinted, the merged token's own cell outlined)
MERGE_COLOURS = matplotlib.colormaps["tab10"]


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def record(loaded, method, items: list[dict]) -> tuple[list[torch.Tensor], KeptRecorder]:
    """Run the items through the model with `method`; the predicted masks and the recorder."""
    model = loaded.model
    device = next(model.parameters()).device
    batch = _to_device(loaded.processor.collate(items), device)
    recorder = KeptRecorder()
    with torch.inference_mode():
        out = segment(model, batch, method, observers=[recorder])
    return [m.cpu() for m in out.masks], recorder


def _clip_crop(h: int, w: int) -> tuple[float, float, float]:
    """(top, left, side) of the centre square that CLIP's resize-and-crop turns into the token grid."""
    side = min(h, w)
    return (h - side) / 2.0, (w - side) / 2.0, float(side)


def stage_overlay(n_tokens: int, cells: list[int], merged: dict[int, list[int]]):
    """What one panel lays over the image, per grid cell in raster order: an RGBA array [n_tokens, 4]
    (dropped cells darkened, cells held by a merged token tinted in its colour, kept cells clear) and
    the merged tokens' own cells with their colours, to outline."""
    dropped = np.ones(n_tokens, dtype=bool)
    dropped[cells] = False
    shade = np.zeros((n_tokens, 4))
    shade[dropped] = (0.0, 0.0, 0.0, 0.72)
    outlines = []
    for k, (target, members) in enumerate(sorted(merged.items())):
        colour = MERGE_COLOURS(k % MERGE_COLOURS.N)
        shade[members] = (*colour[:3], 0.55)  # held by the merged token: tinted, not darkened
        outlines.append((target, colour))
    return shade, outlines


def render_sample(item: dict, pred: torch.Tensor, per_layer: list[list[int]], grid: tuple[int, int],
                  method_name: str, merges: list[dict[int, list[int]]] | None = None) -> bytes:
    """The PNG of one sample: `per_layer[l]` the image cells entering layer l, `merges[l]` (optional)
    what the merged tokens among them hold ({target cell: member cells})."""
    image = np.asarray(item["image"])
    gt = np.asarray(item["mask"])
    pred_np = pred.numpy().astype(bool)
    inter, union = intersection_and_union(pred, torch.from_numpy(gt.astype(np.uint8)))
    iou = sample_iou(inter, union)
    runs = stages(per_layer, merges)
    rows, cols = grid
    n_tokens = rows * cols
    h, w = image.shape[:2]

    n_panels = 1 + len(runs)
    fig, axes = plt.subplots(1, n_panels, figsize=(3.1 * n_panels, 3.7), squeeze=False)
    axes = axes[0]
    ax = axes[0]
    ax.imshow(image)
    red = np.zeros((h, w, 4))
    red[pred_np] = (1.0, 0.1, 0.1, 0.45)
    ax.imshow(red)
    valid = gt != 255  # LISA's ignore label
    ax.contour((gt == 1) & valid, levels=[0.5], colors=["lime"], linewidths=1.8)
    ax.set_title(f"idx {item['idx']} · IoU {iou:.2f}\nred: predicted, green: ground truth", fontsize=8.5)
    for ax, (layer0, layer1, cells) in zip(axes[1:], runs):
        merged = merges[layer0] if merges else {}
        draw_stage(ax, image, cells, merged, grid)
        ax.set_title(stage_title(layer0, layer1, cells, merged, n_tokens), fontsize=8.5)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    query = textwrap.shorten(str(item.get("query", "")), width=110)
    fig.suptitle(f"{method_name} · “{query}”", fontsize=9.5)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return png_bytes(fig)


def draw_stage(ax, image: np.ndarray, cells: list[int], merged: dict[int, list[int]], grid: tuple[int, int]) -> None:
    """One stage's panel on `ax`: `image` with the token grid laid over CLIP's centre crop, the cells
    not in `cells` darkened and the merged tokens' cells tinted and outlined (`stage_overlay`)."""
    rows, cols = grid
    top, left, side = _clip_crop(*image.shape[:2])
    ax.imshow(image)
    shade, outlines = stage_overlay(rows * cols, cells, merged)
    cell_w = side / cols
    for target, colour in outlines:
        r, c = divmod(target, cols)
        ax.add_patch(plt.Rectangle((left + c * cell_w, top + r * cell_w), cell_w, cell_w, fill=False,
                                   edgecolor=colour, linewidth=1.4))
    ax.imshow(shade.reshape(rows, cols, 4), extent=(left, left + side, top + side, top), interpolation="nearest")


def stage_title(layer0: int, layer1: int, cells: list[int], merged: dict[int, list[int]], n_tokens: int) -> str:
    layers = f"layer {layer0}" if layer0 == layer1 else f"layers {layer0}–{layer1}"
    title = f"{layers}\n{len(cells)}/{n_tokens} image tokens kept"
    if merged:
        title += f", {len(merged)} merged ({sum(map(len, merged.values()))} cells in)"
    return title


def render_stages(image: np.ndarray, runs: list[tuple[int, int, list[int]]], grid: tuple[int, int],
                  merges: list[dict[int, list[int]]] | None = None, title: str | None = None) -> bytes:
    """PNG bytes of the kept-token maps of one sample's pass: one panel per stage of `runs` (`stages`
    of its per-layer cells), side by side; `merges[l]` as in `render_sample`. Predict writes each
    stage alone, the demo all of them."""
    n_tokens = grid[0] * grid[1]
    fig, axes = plt.subplots(1, len(runs), figsize=(3.1 * len(runs), 3.7 if title else 3.4), squeeze=False)
    for ax, (layer0, layer1, cells) in zip(axes[0], runs):
        merged = merges[layer0] if merges else {}
        draw_stage(ax, image, cells, merged, grid)
        ax.set_title(stage_title(layer0, layer1, cells, merged, n_tokens), fontsize=8.5)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9.5)
    fig.tight_layout(rect=(0, 0, 1, 0.93) if title else None)
    return png_bytes(fig)


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (110 dpi), and closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def draw_token_pictures(loaded, method, items: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per item, ``<out_dir>/sample_<idx>.png``; returns the paths."""
    from cspexp.outputs.files import write_bytes_atomic

    if not items:
        return []
    masks, recorder = record(loaded, method, items)
    paths = []
    for i, item in enumerate(items):
        per_layer = [layer[i] for layer in recorder.kept]
        merges = [layer[i] for layer in recorder.merges]
        png = render_sample(item, masks[i], per_layer, loaded.model.grid_size, method.name, merges)
        path = Path(out_dir) / f"sample_{item['idx']}.png"
        write_bytes_atomic(path, png)
        paths.append(path)
    return paths
