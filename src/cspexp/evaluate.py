"""`evaluate(cfg)`: one Pareto point — build, run, measure, write. The CLI, tests and sweeps call it.

`evaluate` is the list of steps; each step is one function here or one module elsewhere:
resume (`finished_results`) → a repeat of an earlier job of the sweep (`earlier_point`: its results
are reused) → build (`cspexp.run.build_run`: method, data, model, fastest failure first) → the
feature cache (`build_feature_cache`) → test (`run_test_loop`, the Lightning loop of
`cspexp.lit.eval_module`, which returns the per-sample records once) → the dense reference on the
same samples (`wants_dense`) → results (`cspexp.outputs.results.build_results`) → pictures → files
(`samples.jsonl`, then `results.json` last: its existence means the run is complete, which a resumed
sweep relies on) → the logger.
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cspexp.data.files import skipped_summary
from cspexp.data.sampling import EvalData
from cspexp.features.cache import FeatureCache, feature_cache_mode, in_sweep_agent
from cspexp.lit.distributed import check_processes, process_rank, share_from_rank_zero
from cspexp.lit.eval_module import EvalModule, EvalOutcome
from cspexp.outputs.files import write_json_atomic, write_jsonl_atomic, write_text_atomic
from cspexp.outputs.repeats import copy_outputs, find_earlier, point_identity, repeat_results
from cspexp.outputs.results import build_results, config_hash, measure, summary_of
from cspexp.run import Run, build_logger, build_run, require_values
from cspexp.utils.errors import ConfigError
from cspexp.utils.hydra_mode import in_multirun
from cspexp.utils.instantiate import build

log = logging.getLogger(__name__)


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


def earlier_point(cfg: DictConfig, out_dir: Path) -> tuple[str, tuple[Path, dict] | None]:
    """This job's `point_identity` and, in a multirun with ``cache.points`` on, the finished job of
    the same sweep dir it repeats (None when it repeats none)."""
    spec = build(cfg.prune)
    identity = point_identity(cfg, spec.describe(), wants_dense(cfg, spec))
    if not in_multirun() or not bool((cfg.get("cache") or {}).get("points", True)) or cfg.get("force"):
        return identity, None
    sweep_dir = Path(str(HydraConfig.get().sweep.dir)).resolve()
    if out_dir.resolve().parent != sweep_dir:
        return identity, None  # a job dir outside the sweep dir (hydra.sweep.subdir nested): no siblings to read
    return identity, find_earlier(sweep_dir, identity, out_dir)


def max_new_tokens(cfg: DictConfig) -> int | None:
    """``generate.max_new_tokens`` when ``evaluate.mode=generate`` (LISA's chat path, README
    "Generation"), None for the teacher-forced pass. Bad values — and ``prune.query=seg_token``, which
    needs a [SEG] a generation prompt does not have — are one ConfigError line (the pre-flight check
    catches them first on the command line)."""
    from cspexp.utils.choices import PositiveInt, check_value
    from cspexp.utils.settings import EvalMode

    mode = (cfg.get("evaluate") or {}).get("mode", "teacher_forced")
    check_value(mode, EvalMode, "evaluate.mode")
    if mode == "teacher_forced":
        return None
    tokens = (cfg.get("generate") or {}).get("max_new_tokens")
    check_value(tokens, PositiveInt, "generate.max_new_tokens")
    if (cfg.get("prune") or {}).get("query") == "seg_token":
        raise ConfigError("prune.query=seg_token needs [SEG] in the prompt, and evaluate.mode=generate's prompt has "
                          "none; use prune.query=seg, last or text_mean")
    return int(tokens)


def wants_dense(cfg: DictConfig, method) -> bool:
    """`compare_dense`: true, false, or auto — a single run of a pruning method also evaluates the
    dense model on the same samples (so its table shows the trade-off); a sweep has its own dense job."""
    setting = cfg.get("compare_dense", "auto")
    if method.name == "none" or setting is False:
        return False
    if setting == "auto":
        return not in_multirun()
    return bool(setting)


def cache_mode(cfg: DictConfig, dense_reference: bool) -> str:
    """``off``, ``memory`` or ``memory+disk``: `cspexp.features.cache.feature_cache_mode` of ``cache``."""
    spec = cfg.get("cache") or {}
    return feature_cache_mode(spec.get("features", "auto"), spec.get("dir"), in_multirun(), in_sweep_agent(),
                              dense_reference)


def build_feature_cache(cfg: DictConfig, run: Run, device, dense_reference: bool) -> FeatureCache | None:
    """The feature cache of ``cache.features`` (`cache_mode`), or None."""
    spec = cfg.get("cache") or {}
    directory = spec.get("dir")
    mode = cache_mode(cfg, dense_reference)
    if mode == "off":
        return None
    max_bytes = int(float(spec.get("max_memory_gb", 2.0)) * 2**30)
    return FeatureCache(run.loaded, device, max_bytes, directory if mode == "memory+disk" else None)


def run_test_loop(cfg: DictConfig, run: Run, method, data: EvalData, trainer,
                  features: FeatureCache | None = None) -> EvalOutcome | None:
    """One Lightning test loop of `method` over `data`. Under ``trainer=ddp`` every rank runs its
    slice; the merged outcome is returned on rank 0, None on the others."""
    module = EvalModule(run.loaded, method, build(cfg.metrics), warmup=cfg.latency.warmup, features=features,
                        max_new_tokens=max_new_tokens(cfg))
    trainer.test(module, datamodule=data, verbose=False)
    return module.collect(trainer.strategy.root_device)


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
    started = time.time()
    out_dir = Path(cfg.paths.output_dir)
    require_values(cfg)
    generating = max_new_tokens(cfg) is not None
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
    identity, earlier = earlier_point(cfg, out_dir) if main_process else (None, None)
    if earlier is not None:
        return reuse_point(cfg, out_dir, *earlier, started)

    # A multirun's jobs share one model load (`cspexp.run.load_model`): evaluation never changes it.
    run = build_run(cfg, reuse_model=bool((cfg.get("cache") or {}).get("model", True)) and in_multirun())
    with_dense = wants_dense(cfg, run.method)
    # With the feature cache, batches come without preprocessed pixels: only a miss needs them.
    # generation prompts end at "ASSISTANT:" (no answer)
    collate = partial(run.loaded.processor.collate, pixels=cache_mode(cfg, with_dense) == "off", answer=not generating)
    data = EvalData(run.dataset, cfg.dataset.batch_size, cfg.dataset.num_workers, collate)
    # One W&B run (or CSV log) per evaluation: rank 0's (docs/pitfalls.md, "W&B: one run per evaluation").
    logger = build_logger(cfg) if main_process else None
    if logger is not None:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer = build(cfg.trainer, logger=logger if logger is not None else False)
    check_processes(trainer, len(run.dataset))
    if cfg.flops.report and main_process:
        # Before the test, hence before trainer=ddp starts its other processes: nobody waits on it.
        report_breakdown(run.loaded, run.method, run.loaded.processor.add_pixels(data.first_batch()), out_dir)
    features = build_feature_cache(cfg, run, trainer.strategy.root_device, with_dense)
    outcome = run_test_loop(cfg, run, run.method, data, trainer, features)
    dense_outcome = dense_reference(cfg, run, data, features) if with_dense else None
    if not main_process:
        return share_from_rank_zero(None)  # this process is done: rank 0 writes the outputs

    outcomes = [o for o in (outcome, dense_outcome) if o is not None]
    results = build_results(
        cfg=cfg, method_info=run.method.describe(), model_name=run.loaded.name, model_dims=run.loaded.dims(),
        # per-kind metrics are computed on rank 0 alone: a sync inside compute() would wait for the others forever
        outcome=outcome, metric_factory=lambda: build(cfg.metrics, sync_on_compute=False),
        dense=None if dense_outcome is None else measure(dense_outcome.records, dense_outcome.metrics,
                                                         run.loaded.model.num_layers),
        skipped=skipped_summary(run.dataset),
        cache=cache_summary(features, outcomes),
        cost={"model": "reused" if run.model_reused else "loaded",
              "vision_passes": sum(o.vision_passes for o in outcomes),
              **job_times(started)},
        point_identity=identity,
    )
    results = share_from_rank_zero(results)
    n_viz = int((cfg.get("viz") or {}).get("n_samples", 0) or 0)
    if n_viz > 0:
        draw_pictures(run.loaded, run.method, run.dataset, n_viz, out_dir, logger)
    write_jsonl_atomic(out_dir / "samples.jsonl", outcome.records)
    finish(out_dir, results, logger)
    return results


def job_times(started: float) -> dict:
    """The job's wall time and its span in Unix seconds (the sweep report's wall time is the span of its jobs)."""
    now = time.time()
    return {"wall_s": now - started, "started_at": started, "finished_at": now}


def cache_summary(features: FeatureCache | None, outcomes: list[EvalOutcome]) -> dict:
    """results.json's ``cache`` block: the mode, and the counts of the run's loops summed (the run
    and its dense reference)."""
    counts = {"hits": 0, "misses": 0, "bytes": 0, "hits_memory": 0, "hits_disk": 0, "bytes_written": 0}
    for o in outcomes:
        for k, v in (o.cache or {}).items():
            counts[k] += v
    directory = None if features is None or features.disk is None else str(features.disk.dir)
    return {"features": "off" if features is None else features.mode, **counts, "dir": directory}


def reuse_point(cfg: DictConfig, out_dir: Path, earlier_dir: Path, earlier: dict, started: float) -> dict:
    """This job repeats the finished job in `earlier_dir` (`earlier_point`): its outputs, copied,
    with this job's config; logged like any run."""
    log.info("this job repeats the point of %s (the same effective configuration): its results are reused "
             "(cache.points=false evaluates it again)", earlier_dir)
    copy_outputs(earlier_dir, out_dir)
    logger = build_logger(cfg)
    if logger is not None:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    results = repeat_results(cfg, earlier_dir, earlier, out_dir,
                             cost={"model": "none", "vision_passes": 0, **job_times(started)})
    finish(out_dir, results, logger)
    return results


def finish(out_dir: Path, results: dict, logger) -> None:
    """results.json (last: its existence means the run is complete), stale error files of an earlier
    failed attempt removed, then the logger."""
    write_json_atomic(out_dir / "results.json", results)
    for stale in (out_dir / "error.json", *out_dir.glob("error_rank*.json")):  # an earlier failed attempt's
        stale.unlink(missing_ok=True)
    if logger is not None:
        log_results(logger, results)
    log.info("results written to %s", out_dir / "results.json")


def dense_reference(cfg: DictConfig, run: Run, data: EvalData, features: FeatureCache | None = None) -> EvalOutcome | None:
    """The dense model on the same samples (`wants_dense`): the reference row of the summary table,
    measured like the run itself, with the run's feature cache (its batches' vision stage is then
    computed once for both). Under ``trainer=ddp`` it is a second distributed test on every rank;
    the outcome is returned on rank 0, None elsewhere."""
    from cspexp.pruning.methods import NoPruning

    trainer = build(cfg.trainer, logger=False, enable_progress_bar=False)
    return run_test_loop(cfg, run, NoPruning().bind(*run.loaded.shape), data, trainer, features)


def log_results(logger, results: dict) -> None:
    """The metrics to the logger and, for W&B, the run summary (`cspexp.outputs.results.SUMMARY_FIELDS`).
    Logged here, not in the test loop: only now are the metrics reduced over all processes."""
    logger.log_metrics({f"test/{k}": v for k, v in results["metrics"].items()})
    logger.save()
    run_summary = getattr(logger.experiment, "summary", None)  # a W&B run's; the CSV logger has none
    if run_summary is not None:
        run_summary.update(summary_of(results))
