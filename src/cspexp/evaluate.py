"""`evaluate(cfg)`: one Pareto point — build, run, measure, write. The CLI, tests and sweeps call it.

Order matters for fast failure: the pruning method is built and validated against the model's
shape *before* the model loads, so a bad schedule costs a second, not a checkpoint load.
Outputs are written only after everything succeeded, `results.json` last: its existence means the
run is complete (a resumed sweep relies on that).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cspexp.data import build_dataset, vocabulary
from cspexp.data.files import skipped_summary
from cspexp.data.sampling import EvalData
from cspexp.flops.analytic import LlmDims, sample_flops
from cspexp.flops.analytic import summarize as summarize_flops
from cspexp.lit.distributed import check_processes, process_rank, share_from_rank_zero
from cspexp.lit.eval_module import EvalModule
from cspexp.models.factory import model_shape
from cspexp.outputs.files import write_json_atomic, write_jsonl_atomic, write_text_atomic
from cspexp.outputs.results import build_results, config_hash
from cspexp.utils.errors import ConfigError
from cspexp.utils.hydra_mode import in_multirun
from cspexp.utils.instantiate import build

log = logging.getLogger(__name__)


def build_logger(cfg: DictConfig):
    """The Lightning logger of `cfg.logger`, or None for ``logger=none``.

    In a multirun a logger with an unset ``group`` (W&B) is grouped by sweep: the sweep dir's name,
    the group the sweep's Pareto summary run joins too (`cspexp.report.callback.sweep_group`)."""
    if not cfg.get("logger") or "_target_" not in cfg.logger:
        return None
    extra = {}
    if "group" in cfg.logger and cfg.logger.group is None and in_multirun():
        extra["group"] = Path(str(HydraConfig.get().sweep.dir)).name
    return build(cfg.logger, **extra)


def finished_results(out_dir: Path, cfg: DictConfig) -> dict | None:
    """The results.json already in `out_dir` if it was written for this very config (same
    ``config_hash``), else None. A resumed sweep skips such a job."""
    path = out_dir / "results.json"
    if not path.is_file():
        return None
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable: run again
    return previous if previous.get("config_hash") == config_hash(cfg) else None


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


def wants_dense(cfg: DictConfig, method) -> bool:
    """`compare_dense`: true, false, or auto — a single run of a pruning method also evaluates the
    dense model on the same samples (so its table shows the trade-off); a sweep has its own dense job."""
    setting = cfg.get("compare_dense", "auto")
    if method.name == "none" or setting is False:
        return False
    if setting == "auto":
        return not in_multirun()
    return bool(setting)


def dense_reference(cfg: DictConfig, loaded, data: EvalData, dims: LlmDims) -> dict | None:
    """The dense model on the same samples: the reference row of the summary table. Under
    ``trainer=ddp`` it is a second distributed test on every rank; the row is returned on rank 0,
    None on the others."""
    from cspexp.pruning.methods import NoPruning

    module = EvalModule(loaded, NoPruning(), build(cfg.metrics), warmup=cfg.latency.warmup)
    trainer = build(cfg.trainer, logger=False, enable_progress_bar=False)
    trainer.test(module, datamodule=data, verbose=False)
    outcome = module.collect(trainer.strategy.root_device)
    if outcome is None:
        return None
    records = outcome.records
    flops = account_flops(records, dims, loaded.model.n_image_tokens)
    per_layer = [sum(r["image_per_layer"][l] for r in records) / len(records) for l in range(dims.num_layers)]
    return {
        "metrics": outcome.metrics,
        "flops": flops,
        "avg_image_per_layer": sum(per_layer) / len(per_layer),
        "latency_ms": mean_latency(records),
    }


def mean_latency(records: list[dict]) -> dict:
    keys = ("llm_prefill", "end_to_end")
    if not records:
        return dict.fromkeys(keys)
    return {k: sum(r["latency_ms"][k] for r in records) / len(records) for k in keys}


def objective(cfg: DictConfig, results: dict) -> float:
    """One number for W&B's Bayesian sweeps, which optimise a single top-level metric: gIoU minus
    ``objective.penalty`` per unit of image-token FLOPs reduction short of
    ``objective.target_reduction`` (0, the default, leaves plain gIoU)."""
    spec = cfg.get("objective") or {}
    target, penalty = float(spec.get("target_reduction", 0.0)), float(spec.get("penalty", 0.0))
    reduction = results["flops"].get("reduction_image") or 0.0
    return results["metrics"]["giou"] - penalty * max(0.0, target - reduction)


def draw_pictures(loaded, method, dataset, n: int, out_dir: Path, logger) -> list[Path]:
    """``viz.n_samples`` > 0: masks and kept-token maps of the first n samples, as PNGs in
    ``<run dir>/viz`` and, with W&B, as images in the run."""
    from cspexp.report.pictures import draw_token_pictures

    items = [dataset[i] for i in range(min(n, len(dataset)))]
    paths = draw_token_pictures(loaded, method, items, out_dir / "viz")
    if logger is not None and type(logger).__name__ == "WandbLogger":
        import wandb

        logger.experiment.log({f"viz/{p.stem}": wandb.Image(str(p)) for p in paths})
    return paths


def evaluate(cfg: DictConfig) -> dict:
    """Run the configured evaluation and write `samples.jsonl` and `results.json` to
    ``cfg.paths.output_dir``. Returns the results dict.

    Under ``trainer=ddp`` every process runs this function, each on its own slice of the samples
    (`EvalData`); only rank 0 reads or writes the run directory and talks to the logger, and every
    rank returns rank 0's results."""
    out_dir = Path(cfg.paths.output_dir)
    require_values(cfg)
    main_process = process_rank() == 0
    if main_process:  # the other processes of trainer=ddp exist only once rank 0 has got past this
        # Resume: a job whose results.json holds this config is done (`force=true` runs it again).
        previous = None if cfg.get("force") else finished_results(out_dir, cfg)
        if previous is not None:
            log.info("skipped: %s already holds the results of this config (config_hash %s); force=true re-runs it",
                     out_dir, previous["config_hash"])
            return previous
        # Anything an earlier attempt left here is about to be replaced; if this run fails, no stale
        # results.json may remain to be read as its outcome.
        for name in ("results.json", "samples.jsonl"):
            (out_dir / name).unlink(missing_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    method = build(cfg.prune)
    shape = model_shape(cfg.model)
    if shape is not None:
        method.validate(*shape)
    dataset = build_dataset(cfg.dataset)
    loaded = build(cfg.model, words=vocabulary(dataset))
    if shape is None:
        method.validate(loaded.model.num_layers, loaded.model.n_image_tokens)

    data = EvalData(dataset, cfg.dataset.batch_size, cfg.dataset.num_workers, loaded.processor.collate)
    # One W&B run (or CSV log) per evaluation: rank 0's (framework.md W6).
    logger = build_logger(cfg) if main_process else None
    if logger is not None:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer = build(cfg.trainer, logger=logger if logger is not None else False)
    check_processes(trainer, len(dataset))
    if cfg.flops.report and main_process:
        # Before the test, hence before trainer=ddp starts its other processes: nobody waits on it.
        report_breakdown(loaded, method, data.first_batch(), out_dir)
    module = EvalModule(loaded, method, build(cfg.metrics), warmup=cfg.latency.warmup)
    trainer.test(module, datamodule=data, verbose=False)
    outcome = module.collect(trainer.strategy.root_device)  # every rank; the merged records on rank 0

    dims = LlmDims.from_config(loaded.model.llm.config)
    dense = dense_reference(cfg, loaded, data, dims) if wants_dense(cfg, method) else None
    if not main_process:
        return share_from_rank_zero(None)  # this process is done: rank 0 writes the outputs
    records = outcome.records
    flops = account_flops(records, dims, loaded.model.n_image_tokens)
    results = build_results(
        cfg=cfg,
        method_info=method.describe(),
        model_name=loaded.name,
        model_dims=loaded.dims(),
        metrics=outcome.metrics,
        records=records,
        flops=flops,
        latency_ms=mean_latency(records),  # each sample timed on the process that ran it
        memory_mb=outcome.memory_mb,
    )
    results["dense"] = dense
    # Samples dataset.on_error=skip left out: n_samples counts only what was evaluated.
    results["skipped"] = skipped_summary(dataset)
    results["distributed"] = {
        "world_size": len(outcome.samples_per_rank),
        "samples_per_rank": outcome.samples_per_rank,
        "memory_mb_per_rank": outcome.memory_mb_per_rank,
    }
    results = share_from_rank_zero(results)
    n_viz = int((cfg.get("viz") or {}).get("n_samples", 0) or 0)
    if n_viz > 0:
        draw_pictures(loaded, method, dataset, n_viz, out_dir, logger)
    write_jsonl_atomic(out_dir / "samples.jsonl", records)
    write_json_atomic(out_dir / "results.json", results)
    for stale in (out_dir / "error.json", *out_dir.glob("error_rank*.json")):  # an earlier failed attempt's
        stale.unlink(missing_ok=True)
    if logger is not None:
        # Logged here, not in the test loop: only now are the metrics reduced over all processes.
        logger.log_metrics({f"test/{k}": v for k, v in results["metrics"].items()})
        logger.save()
        summary = {"giou": results["metrics"]["giou"], "ciou": results["metrics"]["ciou"], "n_samples": len(records),
                   "avg_image_tokens_per_layer": results["tokens"]["avg_image_per_layer"],
                   "flops_image": flops["image"], "flops_llm": flops["llm"],
                   "reduction_image": flops["reduction_image"], "reduction_llm": flops["reduction_llm"],
                   "latency_ms": results["latency_ms"]["end_to_end"], "memory_mb": results["memory_mb"],
                   # for `python -m cspexp.aggregate --wandb` and W&B's sweep charts
                   "method": results["method"], "keep": results["prune"].get("keep"),
                   "flops_image_dense": flops["image_dense"], "config_hash": results["config_hash"],
                   "objective": objective(cfg, results)}
        run_summary = getattr(logger.experiment, "summary", None)  # a W&B run's; the CSV logger has none
        if run_summary is not None:
            run_summary.update(summary)
    log.info("results written to %s", out_dir / "results.json")
    return results
