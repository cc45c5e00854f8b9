"""The feature cache (`cspexp.features`): a batch's vision stage computed once and reused, in memory and
on disk, never changing a result.

Exactness is checked against the uncached run of the same config, bit for bit on CPU in float32:
results.json's metrics and every samples.jsonl row (intersection, union, iou, token counts, FLOPs)
— for `none`, csp with each cluster selector and fastv, with the entries read from memory and from
disk; the multi-process cases (a resumed sweep, two processes sharing one disk cache, trainer=ddp_cpu)
run the real CLI.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cspexp.evaluate
import cspexp.features.cache as feature_cache
from cspexp.evaluate import evaluate
from cspexp.features import keys
from cspexp.features.cache import DiskStore, Entry, FeatureCache, MemoryStore, feature_cache_mode
from cspexp.features.vision import VisionFeatures, encode_vision
from cspexp.models.factory import random_lisa
from cspexp.outputs.files import read_jsonl

BASE = ("model=tiny_random", "dataset.n=5", "dataset.batch_size=2", "logger=none", "++compare_dense=false")
# What a cache must not change: every field of a row but the timing and where the features came from.
TIMING = ("latency_ms", "features")
METHODS = {
    "none": ("prune=none",),
    "csp_uniform": ("prune=csp", "prune.keep=0.3", "prune.cluster.select=uniform"),
    "csp_random": ("prune=csp", "prune.keep=0.3", "prune.cluster.select=random"),
    "csp_cls_attn": ("prune=csp", "prune.keep=0.3", "prune.cluster.select=cls_attn", "prune.cluster.assign=feature"),
    "csp_seg_first": ("prune=csp", "prune.keep=0.3", "prune.cluster.select=seg_first"),
    "fastv": ("prune=fastv", "prune.keep=0.2"),
    "visionzip": ("prune=visionzip", "prune.keep=0.2"),
}


def rows(run_dir: Path) -> dict[int, dict]:
    return {r["idx"]: {k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run_dir / "samples.jsonl")}


def sources(run_dir: Path) -> set[str]:
    return {r["features"] for r in read_jsonl(run_dir / "samples.jsonl")}


def measured(run_dir: Path) -> dict:
    r = json.loads((run_dir / "results.json").read_text())
    return {k: r[k] for k in ("metrics", "metrics_by_kind", "flops", "tokens", "n_samples")}


@pytest.fixture
def fresh_memory(monkeypatch):
    """An empty process-wide memory store for the test (and none left behind)."""
    monkeypatch.setattr(feature_cache, "_memory", MemoryStore(0))
    return lambda: monkeypatch.setattr(feature_cache, "_memory", MemoryStore(0))


# ---------------------------------------------------------------------------------------- exactness

def test_cached_runs_equal_uncached_runs_bit_for_bit(compose_cfg, tmp_path, fresh_memory):
    cache_dir = tmp_path / "cache"
    for name, overrides in METHODS.items():
        evaluate(compose_cfg(*BASE, *overrides, "cache.features=false", f"paths.output_dir={tmp_path / 'plain' / name}"))
    # The first cached run computes and stores every batch; the later ones read them — from memory,
    # or from disk when the memory store was emptied before them (as in a new process).
    for i, (name, overrides) in enumerate(METHODS.items()):
        if i % 2 == 1:
            fresh_memory()
        evaluate(compose_cfg(*BASE, *overrides, "cache.features=true", f"cache.dir={cache_dir}",
                             f"paths.output_dir={tmp_path / 'cached' / name}"))
    for i, name in enumerate(METHODS):
        plain, cached = tmp_path / "plain" / name, tmp_path / "cached" / name
        assert rows(cached) == rows(plain), name
        assert measured(cached) == measured(plain), name
        expected = {"computed"} if i == 0 else {"disk"} if i % 2 == 1 else {"memory"}
        assert sources(cached) == expected, name
        assert sources(plain) == {"computed"}
        cache = json.loads((cached / "results.json").read_text())["cache"]
        assert (cache["misses"], cache["hits"]) == ((5, 0) if i == 0 else (0, 5))
    assert json.loads((tmp_path / "plain" / "none" / "results.json").read_text())["cache"]["features"] == "off"


def test_a_single_runs_dense_reference_reads_the_runs_features(compose_cfg, tmp_path, fresh_memory):
    evaluate(compose_cfg(*BASE[:-1], "prune=none", "cache.features=false", f"paths.output_dir={tmp_path / 'dense'}"))
    results = evaluate(compose_cfg(*BASE[:-1], "prune=fastv", "++compare_dense=true",
                                   f"paths.output_dir={tmp_path / 'run'}"))
    dense = json.loads((tmp_path / "dense" / "results.json").read_text())
    assert results["dense"]["metrics"] == dense["metrics"] and results["dense"]["flops"] == dense["flops"]
    # auto: memory only for a single run; the reference's 5 samples hit what the run computed
    assert results["cache"]["features"] == "memory"
    assert (results["cache"]["misses"], results["cache"]["hits_memory"]) == (5, 5)
    assert results["cost"]["vision_passes"] == 5 + 2  # the run's 5 and the warm-up's first batch of 2
    assert not (tmp_path / "outputs" / "cache").exists()


def test_latency_with_the_cache_is_the_sum_of_the_stages(compose_cfg, tmp_path, fresh_memory):
    for out in ("first", "second"):
        evaluate(compose_cfg(*BASE, "prune=fastv", "cache.features=true", f"paths.output_dir={tmp_path / out}"))
    first, second = (read_jsonl(tmp_path / out / "samples.jsonl") for out in ("first", "second"))
    for a, b in zip(first, second, strict=True):
        lat = b["latency_ms"]
        assert lat["end_to_end"] == pytest.approx(lat["vision"] + lat["llm_prefill"] + lat["mask_decoder"])
        assert lat["vision"] == a["latency_ms"]["vision"]  # measured where computed: by the first run
    results = json.loads((tmp_path / "second" / "results.json").read_text())
    assert results["latency_end_to_end"] == "sum_of_stages"
    assert set(results["latency_ms"]) == {"vision", "llm_prefill", "mask_decoder", "end_to_end"}


# ---------------------------------------------------------------------------------------- stores

def features(batch: int, value: float = 1.0, n: int = 4) -> VisionFeatures:
    return VisionFeatures(image_tokens=torch.full((batch, n, 2), value), sam_embeddings=torch.full((batch, 3, 2, 2), value),
                          cls_attention=torch.full((batch, n), value))


def test_memory_store_evicts_least_recently_used_first():
    one = features(1).nbytes  # 4·2 + 3·4 + 4 = 24 floats = 96 bytes
    assert one == 96
    store = MemoryStore(max_bytes=2 * one)
    store.put("a", Entry(features(1), [1.0]))
    store.put("b", Entry(features(1), [1.0]))
    assert store.get("a") is not None  # a is now the most recent
    store.put("c", Entry(features(1), [1.0]))  # over budget: b, the least recently used, leaves
    assert store.get("b") is None and store.get("a") is not None and store.get("c") is not None
    assert store.nbytes == 2 * one
    store.put("big", Entry(features(3), [1.0] * 3))  # larger than the whole budget: not kept
    assert store.get("big") is None and len(store) == 2
    store.resize(one)
    assert len(store) == 1 and store.get("c") is not None


def test_cache_mode_follows_the_setting():
    assert feature_cache_mode(False, "/d", True, True, True) == "off"
    assert feature_cache_mode(True, "/d", False, False, False) == "memory+disk"
    assert feature_cache_mode(True, None, False, False, False) == "memory"
    assert feature_cache_mode("auto", "/d", True, False, False) == "memory+disk"  # a multirun
    assert feature_cache_mode("auto", "/d", False, True, False) == "memory+disk"  # a W&B sweep agent's run
    assert feature_cache_mode("auto", "/d", False, False, True) == "memory"  # a single run's dense reference
    assert feature_cache_mode("auto", "/d", False, False, False) == "off"


def tiny_model(seed: int = 0):
    """`model=tiny_random` as its config builds it (a `LoadedModel`)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf" / "model" / "tiny_random.yaml"))
    cfg.pop("_target_")
    return random_lisa(**{**cfg, "seed": seed}, words=["the", "square"])


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def batch_of(loaded, seed: int = 0, n: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    items = [{"idx": i, "image": rng.integers(0, 255, (40, 52, 3), dtype=np.uint8), "mask": np.zeros((40, 52)),
              "query": "the square"} for i in range(n)]
    return loaded.processor.collate(items)


def test_keys_name_the_weights_and_the_pixels(tiny):
    b = batch_of(tiny)
    ns = keys.namespace(tiny.model, tiny.processor, torch.device("cpu"))
    assert keys.namespace(tiny.model, tiny.processor, torch.device("cpu")) == ns
    image = b["images"][0].copy()
    before = keys.image_digest(image)
    image[0, 0, 0] ^= 1  # one bit of one pixel
    assert keys.image_digest(image) != before
    other = tiny_model(seed=1).model  # another draw of the same architecture: other weights, other namespace
    assert keys.weights_digest(other) != keys.weights_digest(tiny.model)
    clone = tiny_model(seed=1).model
    with torch.no_grad():
        clone.load_state_dict(tiny.model.state_dict())
    assert keys.weights_digest(clone) == keys.weights_digest(tiny.model)  # content, not identity
    half = {**ns, "dtypes": {**ns["dtypes"], "sam": "torch.bfloat16"}}
    assert keys.digest_of(half) != keys.digest_of(ns)


def test_a_corrupt_or_stale_shard_is_recomputed_with_one_warning(tiny, tmp_path, fresh_memory, caplog):
    b = batch_of(tiny)
    with torch.no_grad():
        computed = encode_vision(tiny.model, b, cls_attention=True)
    cache = FeatureCache(tiny, "cpu", 0, tmp_path)  # no memory: every lookup goes to disk
    cache.store(b, computed, [1.0, 1.0])
    key, images = cache._names(b)
    path = cache.disk.path(key)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))  # written whole, nothing left beside it
    got = cache.lookup(b)
    assert got.source == "disk" and all(torch.equal(got.features.tensors()[k], v) for k, v in computed.tensors().items())

    path.write_bytes(path.read_bytes()[:-10])  # cut short: the data no longer matches its header
    with caplog.at_level(logging.WARNING, logger="cspexp.features.cache"):
        assert cache.lookup(b) is None
    assert len(caplog.records) == 1 and "corrupt or stale" in caplog.records[0].getMessage()

    # A shard written under another namespace (other weights, settings or code) at this path: stale.
    other = DiskStore(tmp_path, cache.namespace, "0" * 16, "x")
    other.dir = cache.disk.dir
    other.put(key, images, [0, 1], Entry(computed, [1.0, 1.0]))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cspexp.features.cache"):
        assert cache.lookup(b) is None
    assert "corrupt or stale" in caplog.text
    # Another batch of the same images in another order is another entry.
    swapped = {**b, "images": b["images"][::-1]}
    assert cache._names(swapped)[0] != key


def test_an_unwritable_cache_dir_warns_once_and_keeps_features_in_memory(tiny, tmp_path, fresh_memory, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = FeatureCache(tiny, "cpu", 2**30, blocker / "cache")
    with caplog.at_level(logging.WARNING, logger="cspexp.features.cache"):
        for seed in (0, 1):
            b = batch_of(tiny, seed)
            with torch.no_grad():
                cache.store(b, encode_vision(tiny.model, b, cls_attention=True), [1.0, 1.0])
    assert len(caplog.records) == 1 and "memory only" in caplog.text
    assert cache.lookup(batch_of(tiny, 1)).source == "memory"


# ---------------------------------------------------------------------------------------- processes

TIMEOUT_S = 300


def cli(*args: str, cwd: Path, wait: bool = True):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cspexp", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    return finish(proc) if wait else proc


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} did not finish in {TIMEOUT_S} s\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


SWEEP = ("-m", "model=tiny_random", "dataset.n=5", "dataset.batch_size=2", "logger=none", "prune=none,fastv",
         "prune.keep=0.1,0.3", "hydra/sweep_grid=none")


@pytest.mark.slow
def test_a_resumed_sweep_reads_the_disk_cache_and_repeats_no_point(tmp_path):
    cache_dir = tmp_path / "cache"
    cli(*SWEEP, "cache.features=false", "cache.points=false", f"hydra.sweep.dir={tmp_path / 'plain'}", cwd=tmp_path)
    cached = tmp_path / "cached"
    cli(*SWEEP, f"cache.dir={cache_dir}", f"hydra.sweep.dir={cached}", cwd=tmp_path)
    # Jobs: 0 none@0.1, 1 none@0.3, 2 fastv@0.1, 3 fastv@0.3. Job 1 is job 0's point again.
    results = {j: json.loads((cached / str(j) / "results.json").read_text()) for j in range(4)}
    assert results[1]["repeat_of"] == "0" and results[1]["cost"]["vision_passes"] == 0
    assert [results[j]["cost"]["model"] for j in range(4)] == ["loaded", "none", "reused", "reused"]
    assert (results[0]["cache"]["misses"], results[2]["cache"]["hits_memory"]) == (5, 5)
    # A resumed sweep: job 3 is evaluated again by a new process, which finds its features on disk.
    (cached / "3" / "results.json").unlink()
    cli(*SWEEP, f"cache.dir={cache_dir}", f"hydra.sweep.dir={cached}", cwd=tmp_path)
    resumed = json.loads((cached / "3" / "results.json").read_text())
    assert (resumed["cache"]["hits_disk"], resumed["cache"]["misses"]) == (5, 0)
    for j in range(4):
        assert rows(cached / str(j)) == rows(tmp_path / "plain" / str(j)), j
        assert measured(cached / str(j)) == measured(tmp_path / "plain" / str(j)), j
    report = (cached / "report.md").read_text()
    assert "Sweep cost" in report and "repeated" in report


@pytest.mark.slow
def test_two_processes_share_one_disk_cache(tmp_path):
    cache_dir = tmp_path / "cache"
    common = ("model=tiny_random", "dataset.n=5", "dataset.batch_size=2", "logger=none", "cache.features=true",
              f"cache.dir={cache_dir}")
    for prune in ("csp", "fastv"):
        cli(*common[:4], f"prune={prune}", "cache.features=false", f"hydra.run.dir={tmp_path / 'plain' / prune}",
            cwd=tmp_path)
    # Both at once: each computes what it does not find and writes the same shards, atomically.
    procs = [cli(*common, f"prune={prune}", f"hydra.run.dir={tmp_path / 'first' / prune}", cwd=tmp_path, wait=False)
             for prune in ("csp", "fastv")]
    for proc in procs:
        finish(proc)
    shards = sorted(cache_dir.rglob("*.safetensors"))
    assert len(shards) == 3 and not list(cache_dir.rglob("*.tmp"))  # batches of 2, 2, 1
    # A third process finds everything on disk.
    cli(*common, "prune=csp", f"hydra.run.dir={tmp_path / 'third'}", cwd=tmp_path)
    assert sources(tmp_path / "third") == {"disk"}
    for prune in ("csp", "fastv"):
        assert rows(tmp_path / "first" / prune) == rows(tmp_path / "plain" / prune)
        assert measured(tmp_path / "first" / prune) == measured(tmp_path / "plain" / prune)
    assert rows(tmp_path / "third") == rows(tmp_path / "plain" / "csp")


@pytest.mark.slow
def test_ddp_cpu_runs_with_the_cache_equal_the_uncached_run(tmp_path):
    common = ("model=tiny_random", "dataset.n=7", "dataset.batch_size=2", "prune=fastv", "logger=none",
              "trainer=ddp_cpu", "compare_dense=false")
    cli(*common, "cache.features=false", f"hydra.run.dir={tmp_path / 'plain'}", cwd=tmp_path)
    for out in ("first", "second"):
        cli(*common, "cache.features=true", f"cache.dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / out}",
            cwd=tmp_path)
    assert sources(tmp_path / "first") == {"computed"} and sources(tmp_path / "second") == {"disk"}
    for out in ("first", "second"):
        assert rows(tmp_path / out) == rows(tmp_path / "plain")
        assert measured(tmp_path / out) == measured(tmp_path / "plain")
    second = json.loads((tmp_path / "second" / "results.json").read_text())
    assert second["cache"]["hits_disk"] == 7 and second["distributed"]["world_size"] == 2


# ---------------------------------------------------------------------------------------- what a hit skips

def test_a_batch_collated_without_pixels_gets_the_same_pixels_later(tiny):
    rng = np.random.default_rng(3)
    items = [{"idx": i, "image": rng.integers(0, 255, (30 + 7 * i, 41, 3), dtype=np.uint8),
              "mask": np.zeros((30 + 7 * i, 41)), "query": "the square"} for i in range(3)]
    full = tiny.processor.collate(items)
    lazy = tiny.processor.collate(items, pixels=False)
    assert "clip_pixels" not in lazy and "sam_pixels" not in lazy
    assert torch.equal(lazy["resized_hw"], full["resized_hw"])  # the mask resize needs no pixels
    later = tiny.processor.add_pixels(lazy)
    for key in ("clip_pixels", "sam_pixels"):
        assert torch.equal(later[key], full[key])
    assert tiny.processor.add_pixels(later) is later


def test_shapes_items_are_generated_once_per_process_and_shared_read_only():
    from cspexp.data.shapes import ShapesDataset

    a, b = ShapesDataset(split="val", n=4), ShapesDataset(split="val", n=4)
    first, again = a[2], b[2]
    assert first["image"] is again["image"]  # a second dataset object of the same settings reads the memo
    fresh = a._draw(2)  # generated again, bypassing the memo
    assert np.array_equal(fresh[1], first["image"]) and np.array_equal(fresh[2], first["mask"])
    assert fresh[0].query == first["query"]
    with pytest.raises(ValueError):
        first["image"][0, 0, 0] = 0  # shared: nobody may change it
    other_seed = ShapesDataset(split="val", n=4, seed=1)[2]
    assert not np.array_equal(other_seed["image"], first["image"])
