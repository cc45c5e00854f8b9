"""The `results.json` contract (docs/outputs.md), versioned by ``schema``, and the one place that
turns an evaluation's per-sample records into it.

FLOPs are means per sample in `flops.unit` (FLOPs, 2 per multiply-add); latency is the mean per
sample (a batch's time divided by its size) with warm-up passes excluded; memory is the peak.

`SUMMARY_FIELDS` is the flat view of results.json that goes to a W&B run's summary; `cspexp.aggregate
--wandb` reads it back through `results_from_summary`, so the report reads W&B runs and run
directories through the same `cspexp.report.pareto.point_from_results`.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cspexp.flops.analytic import summarize as summarize_flops
from cspexp.flops.vision import summarize_vision

SCHEMA = 1
# Config sections that decide a run's numbers; the hash over them identifies a Pareto point
# (paths, loggers and progress bars do not change results).
HASHED_SECTIONS = ("model", "prune", "dataset", "metrics", "seed")
VERSIONED_PACKAGES = ("cspexp", "torch", "transformers", "lightning", "hydra-core", "torchmetrics", "wandb")


# Sections that decide a run's numbers only in generation (`evaluate.mode=generate`): hashed then, so
# a teacher-forced run keeps the hash it always had and a generation run never resumes from one.
GENERATE_SECTIONS = ("evaluate", "generate")


def hashed_sections(container: dict) -> tuple[str, ...]:
    """The config sections that identify a run's numbers (`HASHED_SECTIONS`, plus `GENERATE_SECTIONS`
    when it generates)."""
    generating = ((container.get("evaluate") or {}).get("mode") or "teacher_forced") != "teacher_forced"
    return (*HASHED_SECTIONS, *GENERATE_SECTIONS) if generating else HASHED_SECTIONS


def config_hash(cfg: DictConfig) -> str:
    container = OmegaConf.to_container(cfg, resolve=True)
    picked = {k: container.get(k) for k in hashed_sections(container)}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Dataset settings that do not decide which samples are evaluated, or whose effect the evaluated idx
# list already shows (`n`, `on_error`, `max_pixels`: samples left out).
SAMPLE_SET_IGNORED = ("batch_size", "num_workers", "on_error", "n", "max_pixels")


def sample_set(dataset_cfg: dict, idx: list) -> str:
    """Which samples a run evaluated: the first 16 hex digits of the SHA-256 of the JSON (sorted
    keys) of the dataset settings (minus `SAMPLE_SET_IGNORED`) and the sorted evaluated idx list.
    Runs with different values are not compared by the sweep report."""
    picked = {k: v for k, v in (dataset_cfg or {}).items() if k not in SAMPLE_SET_IGNORED}
    payload = {"dataset": picked, "idx": sorted(idx, key=lambda i: (str(type(i)), i))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def git_info() -> dict:
    """Commit and dirtiness of the source tree the package runs from (null outside a git checkout)."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=here, capture_output=True, text=True, timeout=5, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


FLOPS_KEYS = ("llm", "llm_dense", "image", "image_dense", "overhead")  # per record: flops_<key>


def mean_image_per_layer(records: list[dict], num_layers: int) -> list[float]:
    """The image tokens entering each layer, averaged over samples."""
    if not records:
        return []
    return [sum(r["image_per_layer"][l] for r in records) / len(records) for l in range(num_layers)]


LATENCY_KEYS = ("vision", "llm_prefill", "mask_decoder", "end_to_end")


def mean_latency(records: list[dict]) -> dict:
    """Mean milliseconds per sample of each stage (`LATENCY_KEYS`, and ``decode`` when the records
    generated) and of the whole pass."""
    if not records:
        return dict.fromkeys(LATENCY_KEYS)
    keys = (*LATENCY_KEYS, "decode") if all("decode" in r["latency_ms"] for r in records) else LATENCY_KEYS
    return {k: sum(r["latency_ms"][k] for r in records) / len(records) for k in keys}


def generation_summary(records: list[dict]) -> dict | None:
    """results.json → ``generate``: what the samples' generations add up to (docs/outputs.md); None
    for teacher-forced records. Decode throughput is Σ decoded tokens / Σ decode time (a sample's
    decode time is its batch's divided by the batch size, so this is the batches' throughput)."""
    if not records or not all("generated_ids" in r for r in records):
        return None
    n = len(records)

    def mean(key):  # over the samples that have a value (a sample that decoded nothing has no decode FLOPs)
        values = [r[key] for r in records if r[key] is not None]
        return sum(values) / len(values) if values else None

    decode_s = sum(r["latency_ms"]["decode"] for r in records) / 1000.0
    decode_tokens = sum(r["decode_tokens"] for r in records)
    kv, kv_dense = mean("kv_cache_mb"), mean("kv_cache_dense_mb")
    return {
        "generated_tokens": sum(len(r["generated_ids"]) for r in records) / n,
        "decode_tokens": decode_tokens,
        "seg_per_sample": sum(r["n_seg"] for r in records) / n,
        "with_seg": sum(r["n_seg"] > 0 for r in records) / n,
        "finished": sum(bool(r["finished"]) for r in records) / n,
        "kv_cache_mb": kv,
        "kv_cache_mb_dense": kv_dense,
        "kv_cache_reduction": 1.0 - kv / kv_dense if kv_dense else None,
        "decode_ms": decode_s * 1000.0 / n,
        "decode_tokens_per_s": decode_tokens / decode_s if decode_tokens and decode_s > 0 else None,
        "flops_decode_per_token": mean("flops_decode"),
        "flops_decode_per_token_dense": mean("flops_decode_dense"),
    }


def metrics_by_kind(records: list[dict], metric_factory) -> dict:
    """gIoU / cIoU per query kind: the run's metric class fed each kind's per-sample counts."""
    out = {}
    for kind in sorted({r.get("query_kind") for r in records if r.get("query_kind")}):
        counts = [(r["intersection"], r["union"]) for r in records if r.get("query_kind") == kind]
        metric = metric_factory()
        metric.update(counts=counts)
        out[kind] = {**{k: float(v) for k, v in metric.compute().items()}, "n": len(counts)}
    return out


def measure(records: list[dict], metrics: dict, num_layers: int) -> dict:
    """The measured part of a results dict, from the records and the metric's values: what the
    main run and its dense reference both report."""
    per_layer = mean_image_per_layer(records, num_layers)
    return {
        "metrics": {"giou": metrics["giou"], "ciou": metrics["ciou"]},
        "flops": {**summarize_flops([{k: r[f"flops_{k}"] for k in FLOPS_KEYS} for r in records]),
                  "vision": summarize_vision(records)},  # CLIP + projector: only a method inside CLIP changes it
        "image_per_layer": per_layer,
        "avg_image_per_layer": sum(per_layer) / num_layers if per_layer else None,
        "latency_ms": mean_latency(records),
        "generate": generation_summary(records),
    }


def objective(cfg: DictConfig, results: dict) -> float:
    """One number for W&B's Bayesian sweeps, which optimise a single top-level metric: gIoU minus
    ``objective.penalty`` per unit of image-token FLOPs reduction short of
    ``objective.target_reduction`` (0, the default, leaves plain gIoU)."""
    spec = cfg.get("objective") or {}
    target, penalty = float(spec.get("target_reduction", 0.0)), float(spec.get("penalty", 0.0))
    reduction = results["flops"].get("reduction_image") or 0.0
    return results["metrics"]["giou"] - penalty * max(0.0, target - reduction)


def build_results(*, cfg: DictConfig, method_info: dict, model_name: str, model_dims: dict, outcome,
                  metric_factory, dense: dict | None, skipped: dict, cache: dict | None = None,
                  cost: dict | None = None, point_identity: str | None = None) -> dict:
    """results.json of an evaluation (`outcome`: the merged `EvalOutcome`; `dense`: the `measure` of
    the dense reference run on the same samples, or None; `cache`: what the feature cache did
    (`cspexp.evaluate.cache_summary`); `cost`: the job's model load, vision passes and wall time;
    `point_identity`: `cspexp.outputs.repeats.point_identity`)."""
    num_layers = model_dims["num_layers"]
    records = outcome.records
    measured = measure(records, outcome.metrics, num_layers)
    return {
        "schema": SCHEMA,
        "method": method_info["name"],
        "prune": method_info,
        "model": model_name,
        "dataset": {
            "name": cfg.dataset.get("name"),
            "split": cfg.dataset.get("split"),
        },
        "n_samples": len(records),
        "sample_set": sample_set(OmegaConf.to_container(cfg.dataset, resolve=True),
                                 [r["idx"] for r in records]),  # which samples: runs to compare share it
        # teacher_forced (LISA's validation pass) or generate (its chat path: the first generated [SEG]'s mask)
        "evaluate_mode": (cfg.get("evaluate") or {}).get("mode", "teacher_forced"),
        "metrics": measured["metrics"],
        "metrics_by_kind": metrics_by_kind(records, metric_factory),
        "flops": measured["flops"],  # the prefill's; decode FLOPs per token are in `generate`
        "generate": None if measured["generate"] is None else {
            "max_new_tokens": (cfg.get("generate") or {}).get("max_new_tokens"), **measured["generate"]},
        "tokens": {
            "n_image": model_dims["n_image_tokens"],
            "num_layers": num_layers,
            "image_per_layer": measured["image_per_layer"],
            "avg_image_per_layer": measured["avg_image_per_layer"],
        },
        "latency_ms": measured["latency_ms"],  # each sample timed on the process that ran it
        # with the feature cache, a sample's vision time is the one measured where its features were
        # computed (maybe an earlier job) and end_to_end is the sum of the stages
        "latency_end_to_end": "measured" if (cache or {}).get("features", "off") == "off" else "sum_of_stages",
        "cache": cache,
        "cost": cost,
        "point_identity": point_identity,
        "repeat_of": None,
        "memory_mb": outcome.memory_mb,
        "model_dims": {k: model_dims[k] for k in ("hidden_size", "intermediate_size", "num_layers")},
        "dense": None if dense is None else {k: dense.get(k) for k in ("metrics", "flops", "avg_image_per_layer",
                                                                       "latency_ms", "generate")},
        "skipped": skipped,  # samples dataset.on_error=skip left out: n_samples counts only what was evaluated
        "distributed": {
            "world_size": len(outcome.samples_per_rank),
            "samples_per_rank": outcome.samples_per_rank,
            "memory_mb_per_rank": outcome.memory_mb_per_rank,
        },
        "objective": objective(cfg, measured),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "config_hash": config_hash(cfg),
        "versions": versions(),
        "git": git_info(),
    }


# W&B summary key → dotted path in results.json. The summary is what W&B's sweep charts and
# `cspexp.aggregate --wandb` see of a run.
SUMMARY_FIELDS = {
    "giou": "metrics.giou",
    "ciou": "metrics.ciou",
    "n_samples": "n_samples",
    "avg_image_tokens_per_layer": "tokens.avg_image_per_layer",
    "flops_image": "flops.image",
    "flops_llm": "flops.llm",
    "flops_image_dense": "flops.image_dense",
    "reduction_image": "flops.reduction_image",
    "reduction_llm": "flops.reduction_llm",
    "latency_ms": "latency_ms.end_to_end",
    "memory_mb": "memory_mb",
    "method": "method",
    "keep": "prune.keep",
    "model": "model",
    "config_hash": "config_hash",
    "objective": "objective",
    "dataset_name": "dataset.name",
    "dataset_split": "dataset.split",
    "sample_set": "sample_set",
    "evaluate_mode": "evaluate_mode",
    "decode_tokens_per_s": "generate.decode_tokens_per_s",
    "kv_cache_mb": "generate.kv_cache_mb",
}


def summary_of(results: dict) -> dict:
    """The flat W&B summary of a results dict (`SUMMARY_FIELDS`)."""
    out = {}
    for key, path in SUMMARY_FIELDS.items():
        node = results
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return out


def results_from_summary(summary) -> dict:
    """The part of results.json a W&B summary holds, nested again (`summary` may be W&B's lazy
    summary object: only ``.get`` is used, and a key it cannot give is left out)."""
    out: dict = {}
    for key, path in SUMMARY_FIELDS.items():
        try:
            value = summary.get(key)
        except Exception:  # noqa: BLE001 — W&B summaries are lazy objects; a missing key must not stop the report
            value = None
        if value is None:
            continue
        *parents, leaf = path.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out
