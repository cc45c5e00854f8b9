"""What sharing the vision stage saves a sweep: analytic FLOPs at LISA-7B / LISA-13B shapes.

    python scripts/sweep_flops.py [--samples 779]

Prints two markdown tables: per image, the vision stage (CLIP ViT-L/14 up to LISA's layer -2, the
projector, SAM ViT-H's image encoder), SAM's mask decoder and the dense LLM prefill; then, for the
default grid (4 methods × 4 keeps, `none` 4 times) and `experiment=paper_main` at each shape, the
sweep's total over `samples` images without and with the vision stage shared between points
(`cspexp.flops.sweep_cost`). No model is loaded and nothing is downloaded.
"""

from __future__ import annotations

import argparse

from cspexp.flops.sweep_cost import GRIDS, REASONSEG_TEST, VISION, grid_cost

T = 1e12


def per_image_table(rows: list[dict]) -> list[str]:
    lines = ["| shape | CLIP ViT-L/14 (23 layers) | projector | SAM ViT-H encoder | vision total | "
             "SAM mask decoder | dense LLM prefill |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        v = r["vision"]
        lines.append(f"| {r['shape']} | {v['clip'] / T:.4f} | {v['projector'] / T:.4f} | {v['sam'] / T:.3f} | "
                     f"{v['total'] / T:.3f} | {r['decoder'] / T:.4f} | {r['dense_llm'] / T:.3f} |")
    return lines


def sweep_table(rows: list[dict]) -> list[str]:
    lines = [f"| grid | shape | jobs | distinct points | without sharing (PFLOPs) | with sharing (PFLOPs) | "
             f"ratio |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        c = r["cost"]
        lines.append(f"| {r['grid']} | {r['shape']} | {c.jobs} | {c.distinct} | {c.without_sharing / 1e15:.2f} | "
                     f"{c.with_sharing / 1e15:.2f} | {c.ratio:.2f}× |")
    return lines


def report(samples: int) -> str:
    rows = [grid_cost(grid, shape, samples) for grid in GRIDS for shape in VISION]
    first = {r["shape"]: r for r in rows}.values()  # per-image figures do not depend on the grid
    return "\n".join([
        "Per image, TFLOPs (2 per multiply-add):", "", *per_image_table(list(first)), "",
        f"Sweep totals over {samples} images (with sharing: vision once per image, LLM + mask decoder once "
        "per distinct point):", "", *sweep_table(rows), "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=REASONSEG_TEST,
                        help=f"images per point (default {REASONSEG_TEST}: ReasonSeg test)")
    args = parser.parse_args()
    if args.samples < 1:
        parser.error("--samples must be at least 1")
    print(report(args.samples))


if __name__ == "__main__":
    main()
