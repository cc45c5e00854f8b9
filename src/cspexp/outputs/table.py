"""The summary table printed at the end of a run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _fmt(x, spec: str = ".4f") -> str:
    return "—" if x is None else format(x, spec)


def summary_table(results: dict) -> Table:
    table = Table(title=f"cspexp · {results['model']} · {results['dataset']['name']}/{results['dataset']['split']}")
    for col in ("method", "keep", "n", "gIoU", "cIoU", "img tok/layer", "img-FLOPs red.", "latency ms"):
        table.add_column(col, justify="right" if col not in ("method",) else "left")
    dense = results.get("dense")
    if dense:
        table.add_row(
            "none (dense)", "1.00", str(results["n_samples"]), _fmt(dense["metrics"]["giou"]),
            _fmt(dense["metrics"]["ciou"]), _fmt(dense["avg_image_per_layer"], ".1f"), "0.0 %",
            _fmt(dense["latency_ms"]["end_to_end"], ".1f"),
        )
    red = results["flops"].get("reduction_image")
    table.add_row(
        results["method"],
        _fmt(results["prune"].get("keep"), ".2f"),
        str(results["n_samples"]),
        _fmt(results["metrics"]["giou"]),
        _fmt(results["metrics"]["ciou"]),
        _fmt(results["tokens"]["avg_image_per_layer"], ".1f"),
        "—" if red is None else f"{100 * red:.1f} %",
        _fmt(results["latency_ms"]["end_to_end"], ".1f"),
    )
    if dense and dense["latency_ms"]["end_to_end"] and results["latency_ms"]["end_to_end"]:
        speedup = dense["latency_ms"]["end_to_end"] / results["latency_ms"]["end_to_end"]
        llm_speedup = dense["latency_ms"]["llm_prefill"] / results["latency_ms"]["llm_prefill"]
        table.caption = (f"{results['method']} vs dense: gIoU {results['metrics']['giou'] - dense['metrics']['giou']:+.4f}, "
                         f"image-token FLOPs −{100 * (red or 0):.1f} %, LLM prefill {llm_speedup:.2f}× faster, "
                         f"end to end {speedup:.2f}×")
    return table


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """rich exits with status 1 when stdout's reader has gone; the run succeeded, so drop the output."""
        from cspexp.utils.failures import stdout_closed

        stdout_closed()


def print_summary(results: dict, console: Console | None = None) -> None:
    """Print the summary table (to stdout by default; a closed stdout is not an error)."""
    (console or _Console()).print(summary_table(results))
