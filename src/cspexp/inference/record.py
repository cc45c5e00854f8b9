"""The files `python -m cspexp.predict` writes for one input, and its JSON record (docs/outputs.md,
"predict: the files of one image").

``<run dir>/<name>/``: ``mask.png`` (one per [SEG]: ``mask_<k>.png`` when an answer has several),
``overlay.png``, ``kept_layers_<a>-<b>.png`` per stage of the decoder loop, and ``record.json``
last. Every file is written atomically (`cspexp.outputs.files`).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from cspexp.inference.infer import Prediction
from cspexp.inference.inputs import PredictInput
from cspexp.outputs.files import write_bytes_atomic, write_json_atomic
from cspexp.report.overlay import draw_overlay, mask_png
from cspexp.report.pictures import render_stages

SCHEMA = 1


def _png(picture) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def mask_names(n: int) -> list[str]:
    return ["mask.png"] if n == 1 else [f"mask_{k}.png" for k in range(n)]


def stage_name(layer0: int, layer1: int, num_layers: int) -> str:
    width = len(str(num_layers - 1))
    return f"kept_layers_{layer0:0{width}d}-{layer1:0{width}d}.png"


def overlay_lines(query: str, prediction: Prediction) -> list[str]:
    """The text above the overlay: the query, and the answer when the model wrote it."""
    lines = [f"“{query}”"]
    if prediction.answer_source == "generated":
        lines.append(f"answer: {prediction.answer}")
    return lines


def build_record(inp: PredictInput, image_hw: tuple[int, int], prediction: Prediction, model_name: str,
                 method_info: dict) -> dict:
    """The JSON record of one input (its fields: docs/outputs.md)."""
    h, w = image_hw
    num_layers = len(prediction.kept)
    return {
        "schema": SCHEMA,
        "name": inp.name,
        "image": inp.source,
        "image_size": {"height": h, "width": w},
        "query": inp.query,
        "is_sentence": inp.is_sentence,
        "mode": prediction.mode,
        "answer": prediction.answer,
        "answer_source": prediction.answer_source,
        "generation": prediction.generation,
        "model": model_name,
        "method": method_info,
        "masks": [{"file": name, "pixels": int(m.sum()), "fraction": float(m.float().mean())}
                  for name, m in zip(mask_names(len(prediction.masks)), prediction.masks)],
        "overlay": "overlay.png",
        "stages": [{"layers": [a, b], "kept": len(cells), "merged": len(prediction.merges[a]),
                    "file": stage_name(a, b, num_layers)} for a, b, cells in prediction.stages],
        "tokens": {"n_image": prediction.n_image, "grid": list(prediction.grid),
                   "image_per_layer": prediction.image_per_layer, "tokens_per_layer": prediction.tokens_per_layer,
                   "avg_image_per_layer": sum(prediction.image_per_layer) / num_layers},
        "flops": prediction.flops,
        "overhead_events": prediction.overhead_events,
        "latency_ms": prediction.latency_ms,
    }


def write_prediction(out_dir: Path, inp: PredictInput, image: np.ndarray, prediction: Prediction, model_name: str,
                     method_info: dict) -> dict:
    """Write the files of one input into ``out_dir/<inp.name>/`` (record.json last); returns the record."""
    folder = Path(out_dir) / inp.name
    record = build_record(inp, image.shape[:2], prediction, model_name, method_info)
    for entry, mask in zip(record["masks"], prediction.masks):
        write_bytes_atomic(folder / entry["file"], _png(mask_png(mask.numpy())))
    overlay = draw_overlay(image, [m.numpy() for m in prediction.masks], overlay_lines(inp.query, prediction))
    write_bytes_atomic(folder / record["overlay"], _png(overlay))
    for entry, run in zip(record["stages"], prediction.stages):
        write_bytes_atomic(folder / entry["file"], render_stages(image, [run], prediction.grid, prediction.merges))
    write_json_atomic(folder / "record.json", record)
    return record
