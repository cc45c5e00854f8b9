"""`evaluate(cfg)`: one Pareto point — build, run, measure, write. The CLI, tests and sweeps call it.

Order matters for fast failure: the pruning method is built and validated against the model's
shape *before* the model loads, so a bad schedule costs a second, not a checkpoint load.
Outputs are written only after everything succeeded, `results.json` last: its existence means the
run is complete (a resumed sweep relies on that).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from cspexp.data import build_dataset, vocabulary
from cspexp.flops.analytic import LlmDims, sample_flops
from cspexp.flops.analytic import summarize as summarize_flops
from cspexp.lit.eval_module import EvalModule
from cspexp.models.factory import model_shape
from cspexp.outputs.files import write_json_atomic, write_jsonl_atomic, write_text_atomic
from cspexp.outputs.results import build_results
from cspexp.utils.errors import ConfigError
from cspexp.utils.instantiate import build

log = logging.getLogger(__name__)


def build_logger(cfg: DictConfig):
    """The Lightning logger of `cfg.logger`, or None for ``logger=none``."""
    if not cfg.get("logger") or "_target_" not in cfg.logger:
        return None
    return build(cfg.logger)


def require_values(cfg: DictConfig) -> None:
    """Mandatory keys (``???``) must be set; say which, in one line."""
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra"))
    if missing:
        raise ConfigError(f"{', '.join(missing)} must be set (e.g. {missing[0]}=...)")


def account_flops(records: list[dict], dims: LlmDims, n_image: int) -> dict:
    """Fill each record's FLOPs from its token trace; return the means and reductions."""
    per_sample = []
    for r in records:
        f = sample_flops(r["tokens_per_layer"], r["image_per_layer"], n_image, dims, r["overhead_events"])
        r["flops_llm"], r["flops_image"], r["flops_overhead"] = f["llm"], f["image"], f["overhead"]
        per_sample.append(f)
    return summarize_flops(per_sample)


def report_breakdown(loaded, method, batch: dict, out_dir: Path) -> dict:
    """fvcore's per-stage FLOPs for the first sample: printed, and saved as flops_breakdown.{json,md}."""
    from rich.console import Console

    from cspexp.flops.breakdown import breakdown, breakdown_table

    result = breakdown(loaded.model, method, batch)
    table = breakdown_table(result, f"FLOPs per stage · {loaded.name} · {method.name} · one sample (fvcore)")
    Console().print(table)
    write_json_atomic(out_dir / "flops_breakdown.json", result)
    lines = ["| stage | GFLOPs |", "|---|---:|"]
    lines += [f"| {k} | {v / 1e9:.4f} |" for k, v in result["stages"].items()]
    lines.append(f"| **total** | {result['total'] / 1e9:.4f} |")
    write_text_atomic(out_dir / "flops_breakdown.md", "\n".join(lines) + "\n")
    return result


def mean_latency(records: list[dict]) -> dict:
    keys = ("llm_prefill", "end_to_end")
    if not records:
        return dict.fromkeys(keys)
    return {k: sum(r["latency_ms"][k] for r in records) / len(records) for k in keys}


def evaluate(cfg: DictConfig) -> dict:
    """Run the configured evaluation and write `samples.jsonl` and `results.json` to
    ``cfg.paths.output_dir``. Returns the results dict."""
    out_dir = Path(cfg.paths.output_dir)
    require_values(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    method = build(cfg.prune)
    shape = model_shape(cfg.model)
    if shape is not None:
        method.validate(*shape)
    dataset = build_dataset(cfg.dataset)
    loaded = build(cfg.model, words=vocabulary(dataset))
    if shape is None:
        method.validate(loaded.model.num_layers, loaded.model.n_image_tokens)

    loader = DataLoader(
        dataset,
        batch_size=cfg.dataset.batch_size,
        shuffle=False,
        num_workers=cfg.dataset.num_workers,
        collate_fn=loaded.processor.collate,
    )
    logger = build_logger(cfg)
    if logger is not None:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer = build(cfg.trainer, logger=logger if logger is not None else False)
    if cfg.flops.report:
        report_breakdown(loaded, method, next(iter(loader)), out_dir)
    module = EvalModule(loaded, method, build(cfg.metrics), warmup=cfg.latency.warmup)
    trainer.test(module, dataloaders=loader, verbose=False)

    records = sorted(module.records, key=lambda r: r["idx"])
    metrics = {k: float(v) for k, v in module.metric.compute().items()}
    flops = account_flops(records, LlmDims.from_config(loaded.model.llm.config), loaded.model.n_image_tokens)
    results = build_results(
        cfg=cfg,
        method_info=method.describe(),
        model_name=loaded.name,
        model_dims=loaded.dims(),
        metrics=metrics,
        records=records,
        flops=flops,
        latency_ms=mean_latency(records),
        memory_mb=module.peak_memory_mb,
    )
    write_jsonl_atomic(out_dir / "samples.jsonl", records)
    write_json_atomic(out_dir / "results.json", results)
    (out_dir / "error.json").unlink(missing_ok=True)  # left by an earlier failed attempt in this dir
    if logger is not None:
        summary = {"giou": results["metrics"]["giou"], "ciou": results["metrics"]["ciou"], "n_samples": len(records),
                   "avg_image_tokens_per_layer": results["tokens"]["avg_image_per_layer"],
                   "flops_image": flops["image"], "flops_llm": flops["llm"],
                   "reduction_image": flops["reduction_image"], "reduction_llm": flops["reduction_llm"],
                   "latency_ms": results["latency_ms"]["end_to_end"], "memory_mb": results["memory_mb"]}
        logger.experiment.summary.update(summary)
    log.info("results written to %s", out_dir / "results.json")
    return results
