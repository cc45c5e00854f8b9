"""One schema for results.json, the W&B run summary and `cspexp.aggregate`: a results dict, flattened
to a W&B summary and read back, gives the report the same point as the results.json itself; and the
results builder takes its numbers from the records and the metric, computed here by hand."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from cspexp.aggregate import point_from_wandb_run
from cspexp.lit.eval_module import EvalOutcome
from cspexp.metrics.seg_iou import SegIoU
from cspexp.outputs.results import SUMMARY_FIELDS, build_results, results_from_summary, summary_of
from cspexp.report.pareto import point_from_results


def record(idx, kind, inter, union, image_per_layer, flops_image, latency):
    return {
        "idx": idx, "query_kind": kind, "intersection": inter, "union": union,
        "iou": 1.0 if union == 0 else inter / (union + 1e-5),
        "image_per_layer": image_per_layer, "tokens_per_layer": [n + 10 for n in image_per_layer],
        "overhead_events": [],
        "latency_ms": {"vision": latency / 4, "llm_prefill": latency / 2, "mask_decoder": latency / 4, "end_to_end": latency},
        "flops_llm": 2 * flops_image, "flops_llm_dense": 400.0, "flops_image": flops_image,
        "flops_image_dense": 300.0, "flops_overhead": 1.0,
    }


@pytest.fixture
def results():
    records = [
        record(0, "referring", 30, 60, [4, 4, 2, 1], 100.0, 10.0),
        record(1, "referring", 0, 0, [4, 4, 2, 1], 120.0, 20.0),
        record(2, "relational", 10, 40, [4, 4, 2, 1], 140.0, 30.0),
    ]
    metric = SegIoU()
    metric.update(counts=[(r["intersection"], r["union"]) for r in records])
    outcome = EvalOutcome(records=records, metrics={k: float(v) for k, v in metric.compute().items()},
                          samples_per_rank=[3], memory_mb_per_rank=[12.5])
    cfg = OmegaConf.create({"dataset": {"name": "shapes", "split": "val"}, "model": {"name": "m"},
                            "prune": {"keep": 0.3}, "metrics": {}, "seed": 0,
                            "objective": {"target_reduction": 0.8, "penalty": 1.0}})
    return build_results(cfg=cfg, method_info={"name": "csp", "keep": 0.3}, model_name="m",
                         model_dims={"hidden_size": 8, "intermediate_size": 16, "num_layers": 4, "n_image_tokens": 4},
                         outcome=outcome, metric_factory=SegIoU, dense=None, skipped={"n": 0})


def test_results_numbers_come_from_the_records_by_hand(results):
    ious = [30 / 60.00001, 1.0, 10 / 40.00001]
    assert results["metrics"]["giou"] == pytest.approx(sum(ious) / 3, rel=1e-6)
    assert results["metrics"]["ciou"] == pytest.approx(40 / 100, rel=1e-6)
    assert results["metrics_by_kind"]["referring"]["giou"] == pytest.approx((ious[0] + 1.0) / 2, rel=1e-6)
    assert results["metrics_by_kind"]["relational"] == pytest.approx({"giou": ious[2], "ciou": 0.25, "n": 1}, rel=1e-6)
    assert results["flops"]["image"] == pytest.approx(120.0) and results["flops"]["reduction_image"] == pytest.approx(0.6)
    assert results["tokens"]["image_per_layer"] == [4, 4, 2, 1] and results["tokens"]["avg_image_per_layer"] == 2.75
    assert results["latency_ms"] == {"vision": 5.0, "llm_prefill": 10.0, "mask_decoder": 5.0, "end_to_end": 20.0}
    # objective: gIoU minus the penalty for the reduction short of the target (0.8 − 0.6)
    assert results["objective"] == pytest.approx(results["metrics"]["giou"] - 0.2)
    json.dumps(results)  # what results.json holds must be JSON


def test_a_wandb_summary_reads_back_as_the_same_report_point(results):
    summary = summary_of(results)
    assert set(summary) == set(SUMMARY_FIELDS)
    assert summary["flops_image"] == results["flops"]["image"] and summary["keep"] == 0.3
    nested = results_from_summary(summary)
    assert nested["metrics"]["giou"] == results["metrics"]["giou"] and nested["flops"]["image_dense"] == 300.0
    run = SimpleNamespace(id="r1", url="https://wandb/r1", state="finished", name="r1", summary=summary,
                          config={"prune": {"_target_": "cspexp.pruning.methods.ClusterScatterPrune", "keep": 0.3,
                                            "cluster": {"ratio": 0.25}}})
    from_wandb = point_from_wandb_run(run, "e/p")
    from_dir = point_from_results(results, "https://wandb/r1")
    for field in ("method", "keep", "flops_image", "giou", "ciou", "flops_image_dense", "reduction_image",
                  "n_samples", "model", "config_hash"):
        assert getattr(from_wandb, field) == getattr(from_dir, field), field
    assert from_wandb.prune["cluster"] == {"ratio": 0.25}  # the configured settings tell variants apart


def test_a_summary_without_numbers_is_an_incomplete_run(results):
    summary = {k: v for k, v in summary_of(results).items() if k != "flops_image"}
    run = SimpleNamespace(id="r2", url=None, state="finished", name="r2", summary=summary, config={})
    failure = point_from_wandb_run(run, "e/p")
    assert failure.error == "incomplete" and "flops_image" in failure.message
