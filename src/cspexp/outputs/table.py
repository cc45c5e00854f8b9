"""The summary table printed at the end of a run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _fmt(x, spec: str = ".4f") -> str:
    return "—" if x is None else format(x, spec)


def _generation_cells(gen: dict | None) -> tuple[str, ...]:
    """evaluate.mode=generate: decode tokens/s, KV-cache MiB, [SEG] per sample."""
    if not gen:
        return ("—", "—", "—")
    return (_fmt(gen.get("decode_tokens_per_s"), ".1f"), _fmt(gen.get("kv_cache_mb"), ".2f"),
            _fmt(gen.get("seg_per_sample"), ".2f"))


def summary_table(results: dict) -> Table:
    generating = results.get("generate") is not None
    mode = " · generate (first [SEG]'s mask)" if generating else ""
    table = Table(title=f"cspexp · {results['model']} · {results['dataset']['name']}/{results['dataset']['split']}{mode}")
    extra = ("decode tok/s", "KV cache MiB", "[SEG]/sample") if generating else ()
    for col in ("method", "keep", "n", "gIoU", "cIoU", "img tok/layer", "img-FLOPs red.", "latency ms", *extra):
        table.add_column(col, justify="right" if col not in ("method",) else "left")
    dense = results.get("dense")
    if dense:
        table.add_row(
            "none (dense)", "1.00", str(results["n_samples"]), _fmt(dense["metrics"]["giou"]),
            _fmt(dense["metrics"]["ciou"]), _fmt(dense["avg_image_per_layer"], ".1f"), "0.0 %",
            _fmt(dense["latency_ms"]["end_to_end"], ".1f"),
            *(_generation_cells(dense.get("generate")) if generating else ()),
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
        *(_generation_cells(results["generate"]) if generating else ()),
    )
    if dense and dense["latency_ms"]["end_to_end"] and results["latency_ms"]["end_to_end"]:
        speedup = dense["latency_ms"]["end_to_end"] / results["latency_ms"]["end_to_end"]
        llm_speedup = dense["latency_ms"]["llm_prefill"] / results["latency_ms"]["llm_prefill"]
        table.caption = (f"{results['method']} vs dense: gIoU {results['metrics']['giou'] - dense['metrics']['giou']:+.4f}, "
                         f"image-token FLOPs −{100 * (red or 0):.1f} %, LLM prefill {llm_speedup:.2f}× faster, "
                         f"end to end {speedup:.2f}×")
    gen = results.get("generate")
    if gen and gen.get("kv_cache_mb_dense"):
        line = (f"KV cache {gen['kv_cache_mb']:.2f} MiB vs {gen['kv_cache_mb_dense']:.2f} MiB unpruned "
                f"(−{100 * (gen['kv_cache_reduction'] or 0):.1f} %)")
        dense_gen = (dense or {}).get("generate") or {}
        if dense_gen.get("decode_tokens_per_s") and gen.get("decode_tokens_per_s"):
            line += f", decoding {gen['decode_tokens_per_s'] / dense_gen['decode_tokens_per_s']:.2f}× dense's tokens/s"
        table.caption = f"{table.caption}\n{line}" if table.caption else line
    return table


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """rich exits with status 1 when stdout's reader has gone; the run succeeded, so drop the output."""
        from cspexp.utils.failures import stdout_closed

        stdout_closed()


def print_summary(results: dict, console: Console | None = None) -> None:
    """Print the summary table (to stdout by default; a closed stdout is not an error)."""
    (console or _Console()).print(summary_table(results))
