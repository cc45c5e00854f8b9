"""The `results.json` contract (DESIGN §8), versioned by ``schema``.

FLOPs are means per sample in `flops.unit` (FLOPs, 2 per multiply-add); latency is the mean per
sample (a batch's time divided by its size) with warm-up passes excluded; memory is the peak.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

SCHEMA = 1
# Config sections that decide a run's numbers; the hash over them identifies a Pareto point
# (paths, loggers and progress bars do not change results).
HASHED_SECTIONS = ("model", "prune", "dataset", "metrics", "seed")
VERSIONED_PACKAGES = ("cspexp", "torch", "transformers", "lightning", "hydra-core", "torchmetrics", "wandb")


def config_hash(cfg: DictConfig) -> str:
    container = OmegaConf.to_container(cfg, resolve=True)
    picked = {k: container.get(k) for k in HASHED_SECTIONS}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def summarize_records(records: list[dict]) -> dict:
    """gIoU / cIoU recomputed from per-sample records, overall and per query kind."""

    def agg(rows: list[dict]) -> dict:
        n = len(rows)
        inter = sum(r["intersection"] for r in rows)
        union = sum(r["union"] for r in rows)
        return {
            "giou": sum(r["iou"] for r in rows) / n if n else None,
            "ciou": inter / (union + 1e-10) if n else None,
            "n": n,
        }

    kinds = sorted({r.get("query_kind") for r in records if r.get("query_kind")})
    return {"all": agg(records), "by_kind": {k: agg([r for r in records if r.get("query_kind") == k]) for k in kinds}}


def build_results(
    *,
    cfg: DictConfig,
    method_info: dict,
    model_name: str,
    model_dims: dict,
    metrics: dict,
    records: list[dict],
    flops: dict,
    latency_ms: dict,
    memory_mb: float | None,
) -> dict:
    num_layers = model_dims["num_layers"]
    image_per_layer = (
        [sum(r["image_per_layer"][l] for r in records) / len(records) for l in range(num_layers)] if records else []
    )
    per_kind = summarize_records(records)["by_kind"]
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
        "metrics": {"giou": metrics["giou"], "ciou": metrics["ciou"]},
        "metrics_by_kind": per_kind,
        "flops": flops,
        "tokens": {
            "n_image": model_dims["n_image_tokens"],
            "num_layers": num_layers,
            "image_per_layer": image_per_layer,
            "avg_image_per_layer": sum(image_per_layer) / num_layers if image_per_layer else None,
        },
        "latency_ms": latency_ms,
        "memory_mb": memory_mb,
        "model_dims": {k: model_dims[k] for k in ("hidden_size", "intermediate_size", "num_layers")},
        "config": OmegaConf.to_container(cfg, resolve=True),
        "config_hash": config_hash(cfg),
        "versions": versions(),
        "git": git_info(),
    }
