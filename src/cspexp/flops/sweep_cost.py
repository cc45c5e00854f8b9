"""The FLOPs of a whole sweep, with and without sharing the vision stage between its points.

Why: every point of a sweep (a method at a keep ratio) re-runs CLIP, the projector and SAM's image
encoder on the same images, though pruning only changes the LLM. Cached per sample, the vision
stage is paid once for the whole sweep, and a point that repeats another (the grid's `none` at
every keep) is not run again. This module prices both ways for LISA's shapes:

    without sharing   samples · Σ_jobs (vision + LLM_job + decoder)
    with sharing      samples · (vision + Σ_distinct points (LLM_point + decoder))

LLM_point is the analytic prefill (`cspexp.flops.analytic`, the method's overhead included) from the
per-layer token trace of the point's method, bound and run on the benchmark's synthetic LISA layout
(`cspexp.bench.lisa_layout`) — the same path as `python -m cspexp.bench`, on a proxy LLaMA of the
shape's depth and a tiny width: token counts depend on the schedule and layout, not on width. The
SAM mask decoder runs per point (its prompt is the pruned LLM's [SEG] state); text_hidden_fcs and
the positional-embedding grid (< 0.05 GFLOPs) are left out.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from cspexp.flops.analytic import LlmDims, sample_flops
from cspexp.flops.vision import LISA_7B_VISION, LISA_13B_VISION, VisionStage, sam_mask_decoder_flops
from cspexp.models.base import ModelShape
from cspexp.models.factory import llm_config
from cspexp.pruning.methods import NoPruning
from cspexp.utils.conf_dir import conf_dir

# The sweeps priced: name → overrides of `eval` whose hydra.sweeper.params hold the grid.
GRIDS = {"default": [], "paper_main": ["experiment=paper_main"]}
VISION = {"lisa_7b": LISA_7B_VISION, "lisa_13b": LISA_13B_VISION}
REASONSEG_TEST = 779  # images in ReasonSeg's test split


@dataclass(frozen=True)
class SweepCost:
    jobs: int
    distinct: int
    samples: int
    without_sharing: int  # FLOPs
    with_sharing: int  # FLOPs

    @property
    def ratio(self) -> float:
        return self.without_sharing / self.with_sharing


def sweep_cost(vision: int, dense_llm: int, pruned_llm: list[int], dense_jobs: int, samples: int,
               decoder: int = 0) -> SweepCost:
    """Totals of a sweep whose `dense_jobs` jobs all run the dense point (prefill `dense_llm` FLOPs)
    and whose other jobs are the distinct pruned points `pruned_llm`; per-sample FLOPs in, sweep FLOPs out."""
    if dense_jobs < 1:
        raise ValueError("the sweep must hold the dense point at least once")
    jobs, distinct = dense_jobs + len(pruned_llm), 1 + len(pruned_llm)
    llm_jobs = dense_jobs * dense_llm + sum(pruned_llm)
    without = samples * (jobs * (vision + decoder) + llm_jobs)
    shared = samples * (vision + distinct * decoder + dense_llm + sum(pruned_llm))
    return SweepCost(jobs, distinct, samples, without, shared)


# ---------------------------------------------------------------- the points of a sweep

def _compose(overrides: list[str], hydra: bool = False) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose(config_name="eval", overrides=overrides, return_hydra_config=hydra)
    finally:
        GlobalHydra.instance().clear()


@functools.cache  # ~0.5 s per composition; specs are frozen
def grid_jobs(grid: str) -> tuple:
    """The pruning specs of every job of `grid`, as `python -m cspexp -m <GRIDS[grid]>` would run them:
    the configured hydra.sweeper.params expanded (the basic sweeper's cartesian product), each job's
    prune config composed and built."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cspexp.utils.instantiate import build

    base = GRIDS[grid]
    params = _compose(base, hydra=True).hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
            else [o.input_line] for o in parsed]
    return tuple(build(_compose([*base, *job]).prune) for job in itertools.product(*axes))


def shape_config(name: str) -> DictConfig:
    return OmegaConf.load(conf_dir() / "model_shape" / f"{name}.yaml")


def llm_dims(shape: DictConfig) -> LlmDims:
    return LlmDims.from_config(llm_config(OmegaConf.to_container(shape), vocab_size=32, pad_token_id=0,
                                          attn_implementation="sdpa"))


def at_width(event: dict, dims, method: str) -> dict:
    """A matmul overhead event measured on the width-8 proxy, with the sizes its `widths` names as the
    LLM's widths ("hidden", "kv") set to the real model's; its other sizes are token counts, which the
    proxy has right. An event that does not say which sizes are widths, or names another model's width
    (CLIP's), cannot be priced here: refuse rather than undercount."""
    widths = event.get("widths")
    if widths is None:
        raise ValueError(f"prune={method}: its overhead event {event.get('what', 'matmul')!r} does not say which "
                         "sizes are model widths (`widths`), so it cannot be priced on the width-8 proxy")
    real = {"hidden": dims.hidden_size, "kv": dims.kv_size}
    out = dict(event)
    for size, width in widths.items():
        if width not in real:
            raise ValueError(f"prune={method}: its overhead event {event.get('what')!r} has a {width} width, "
                             "which the LLM-only proxy does not model")
        out[size] = real[width]
    return out


def point_llm_flops(spec, shape: DictConfig) -> int:
    """Prefill FLOPs (overhead included) of one sample at `shape` with the pruning method `spec`."""
    from cspexp.bench import build_llm, lisa_layout
    from cspexp.pruning.engine import DecoderLoop, TokenState
    from cspexp.pruning.methods import PruningContext
    from cspexp.run import bind_method

    if spec.needs_images:
        raise ValueError(f"prune={spec.name} reads the image (CLIP's attention or the pixels); the synthetic layout has none")
    rows, cols = shape.grid
    n_image = rows * cols
    method = bind_method(spec, ModelShape(shape.num_hidden_layers, n_image))
    proxy = OmegaConf.merge(shape, {"hidden_size": 8, "intermediate_size": 8, "num_attention_heads": 1,
                                    "num_key_value_heads": 1})
    torch.manual_seed(0)
    model = build_llm(proxy, torch.float32, "cpu", "sdpa")
    prompt = lisa_layout(proxy, 1, torch.float32, "cpu", seed=0)
    ctx = PruningContext(layers=model.layers, rotary_emb=model.rotary_emb, grid_size=(rows, cols))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a width-8 model: threads only add start-up and contention
    try:
        with torch.inference_mode():
            trace = DecoderLoop(model).run(TokenState.from_prompt(prompt, len(model.layers)), method, ctx).trace
    finally:
        torch.set_num_threads(threads)
    # feature assignment compares LLM states: its width is the real model's, not the proxy's
    events = [{**e, "dim": shape.hidden_size} if "dim" in e else e for e in trace.sample_overhead(0)]
    events = [at_width(e, llm_dims(shape), spec.name) if e["kind"] == "matmul" else e for e in events]
    f = sample_flops(trace.tokens_per_layer[0].tolist(), trace.image_per_layer[0].tolist(), n_image,
                     llm_dims(shape), events)
    return f["llm"] + f["overhead"]


def grid_cost(grid: str, shape_name: str, samples: int = REASONSEG_TEST, vision: VisionStage | None = None) -> dict:
    """Sweep totals of `grid` at the model shape `shape_name`, and the per-sample figures behind them."""
    shape = shape_config(shape_name)
    vision = vision or VISION[shape_name]
    jobs = grid_jobs(grid)
    dense_jobs = sum(isinstance(s, NoPruning) for s in jobs)  # `none` ignores keep: one point
    specs = [s for s in jobs if not isinstance(s, NoPruning)]
    if len({repr(s) for s in specs}) < len(specs):
        raise ValueError(f"grid {grid!r} repeats a pruned point; sweep_cost counts only the dense point's repeats")
    pruned = [point_llm_flops(s, shape) for s in specs]
    dense = point_llm_flops(NoPruning(), shape)
    parts = vision.flops()
    decoder = sam_mask_decoder_flops(vision.mask_decoder)
    cost = sweep_cost(parts["total"], dense, pruned, dense_jobs, samples, decoder)
    return {"grid": grid, "shape": shape_name, "vision": parts, "decoder": decoder, "dense_llm": dense,
            "pruned_llm": pruned, "cost": cost}
