"""Duplicate points in a sweep: a job whose *effective* configuration equals an earlier job's — e.g.
``none`` at four keeps, since the dense model ignores keep — reuses that job's results instead of
evaluating again. Effective means: the method as it describes itself (what it does, not how it was
asked for), and every other setting that decides a result or what a run writes.

Only finished jobs count (a results.json is written last), and only jobs of the same sweep directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cspexp.outputs.files import write_bytes_atomic
from cspexp.outputs.results import config_hash, hashed_sections, objective

log = logging.getLogger(__name__)

# Besides HASHED_SECTIONS: what changes the numbers (trainer: batching across processes, precision)
# or what a run writes (dense reference, pictures, the FLOPs breakdown, the warm-up before timing).
EXTRA_SECTIONS = ("trainer", "viz", "flops", "latency")
# Files of a run directory a repeat copies besides results.json.
COPIED = ("samples.jsonl", "flops_breakdown.json", "flops_breakdown.md", "viz")


def point_identity(cfg: DictConfig, method_info: dict, dense_reference: bool) -> str:
    """16 hex digits naming the effective configuration (see the module docstring)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    picked = {k: container.get(k) for k in (*hashed_sections(container), *EXTRA_SECTIONS) if k != "prune"}
    picked["prune"] = method_info
    picked["dense_reference"] = dense_reference
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]


def find_earlier(sweep_dir: Path, identity: str, own_dir: Path) -> tuple[Path, dict] | None:
    """The first finished job under `sweep_dir` (in job order) with this `identity` that is not
    itself a repeat, with its results."""
    own = own_dir.resolve()
    found = []
    for path in Path(sweep_dir).glob("*/results.json"):
        if path.parent.resolve() == own:
            continue
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # unreadable or being replaced: not a point to reuse
        if isinstance(results, dict) and results.get("point_identity") == identity and not results.get("repeat_of"):
            found.append((path.parent, results))
    if not found:
        return None
    return min(found, key=lambda item: (len(item[0].name), item[0].name))  # job 2 before job 10


def repeat_results(cfg: DictConfig, earlier_dir: Path, earlier: dict, out_dir: Path, cost: dict) -> dict:
    """The results of this job as a repeat of the one in `earlier_dir`: its measurements, with this
    job's own config, config_hash and objective, ``repeat_of`` naming the earlier job (relative to
    the sweep dir), and this job's own (small) cost."""
    results = dict(earlier)
    results["config"] = OmegaConf.to_container(cfg, resolve=True)
    results["config_hash"] = config_hash(cfg)
    results["objective"] = objective(cfg, results)
    results["repeat_of"] = os.path.relpath(earlier_dir, out_dir.parent)
    results["cost"] = cost
    results["cache"] = {**(earlier.get("cache") or {}), "hits": 0, "misses": 0, "bytes": 0, "hits_memory": 0,
                        "hits_disk": 0, "bytes_written": 0}
    return results


def copy_outputs(earlier_dir: Path, out_dir: Path) -> None:
    """The earlier job's per-sample rows and pictures, so that this run directory is complete too."""
    for name in COPIED:
        src, dst = earlier_dir / name, out_dir / name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        elif src.is_file():
            write_bytes_atomic(dst, src.read_bytes())
