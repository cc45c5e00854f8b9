"""One image and one query through a model under a pruning method: the masks, the answer, which
image tokens each layer kept, the image-token FLOPs (dense and pruned) and the latency.

`infer` is what `python -m cspexp.predict` runs per image and what the demo runs per request. The
answer comes from a *mode* (``evaluate.mode``), one small function each (`MODES`):

- ``teacher_forced``: LISA's evaluation pass (`cspexp.pruning.pipeline.segment`): the prompt already
  holds the answer ``[SEG].``, so the answer is that fixed text (``answer_source: teacher_forced``)
  and there is one mask;
- ``generate``: LISA's chat path (`cspexp.pruning.generate.generate`): the model writes its answer
  greedily on the pruned KV cache (``answer_source: generated``), one mask per ``[SEG]`` it writes
  (none when it writes none); latency gains a ``decode`` section.

FLOPs are `cspexp.flops.analytic`'s, from the pass's token trace, as evaluation computes them per
sample. Latency is measured like evaluation's (`cspexp.utils.timing.Stopwatch` sections ``vision``,
``llm_prefill``, ``mask_decoder``, and ``end_to_end`` around the whole pass) on a pass without
observers; the kept tokens are recorded on an untimed pass before it (`KeptRecorder` reads the state at
every layer, a host sync on a GPU), which also warms the pass up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from cspexp.flops.analytic import LlmDims, sample_flops, summarize
from cspexp.models import prompt as lisa_prompt
from cspexp.pruning.engine import Trace
from cspexp.pruning.generate import generate
from cspexp.pruning.pipeline import segment
from cspexp.report.pictures import KeptRecorder, stages
from cspexp.utils.errors import ConfigError
from cspexp.utils.timing import NullStopwatch, Stopwatch


@dataclass
class ModeOutput:
    """What a mode returns for a batch of one sample."""

    masks: list[torch.Tensor]  # bool [H, W] at the image's size: one per [SEG] of the answer
    answer: str
    answer_source: str  # teacher_forced (the prompt's fixed answer) | generated
    trace: Trace  # the prefill's token trace
    generation: dict | None = None  # generate: the ids, [SEG] count, whether </s> came, the KV-cache sizes


@dataclass
class Prediction:
    """One image and query through the model, ready to write or show."""

    mode: str
    masks: list[torch.Tensor]  # bool [H, W] (CPU), one per [SEG]
    image_hw: tuple[int, int]
    answer: str
    answer_source: str
    generation: dict | None  # `ModeOutput.generation`
    image_per_layer: list[int]  # image tokens entering each layer
    tokens_per_layer: list[int]  # all tokens entering each layer
    overhead_events: list[dict]  # the method's own work (`Trace.sample_overhead`)
    kept: list[list[int]]  # kept[l]: the image-grid cells entering layer l
    merges: list[dict[int, list[int]]]  # merges[l]: {merged token's cell: cells it holds} at layer l
    n_image: int  # image tokens of the dense model
    grid: tuple[int, int]  # the image-token grid (rows, cols)
    flops: dict  # `flops.analytic.summarize` of the one sample: unit, llm, llm_dense, image, image_dense, overhead, reductions
    latency_ms: dict[str, float]  # vision, llm_prefill, mask_decoder, end_to_end

    @property
    def mask(self) -> torch.Tensor:
        """The first [SEG]'s mask, or an empty one when the answer has no [SEG] (what evaluation scores)."""
        return self.masks[0] if self.masks else torch.zeros(self.image_hw, dtype=torch.bool)

    @property
    def stages(self) -> list[tuple[int, int, list[int]]]:
        """Runs of layers that saw the same image tokens: (first layer, last layer, cells)."""
        return stages(self.kept, self.merges)


@dataclass(frozen=True)
class Mode:
    """How a mode answers: whether its prompt holds the answer (`LisaProcessor.collate`'s ``answer``)
    and the function that runs a collated batch of one, ``run(loaded, method, batch, stopwatch,
    observers, **settings) -> ModeOutput``."""

    answer_in_prompt: bool
    run: Callable[..., ModeOutput]


def teacher_forced(loaded, method, batch: dict, stopwatch, observers: Sequence) -> ModeOutput:
    """LISA's evaluation pass: the answer ``[SEG].`` is in the prompt; one mask."""
    out = segment(loaded.model, batch, method, stopwatch=stopwatch, observers=observers)
    return ModeOutput(masks=[out.masks[0]], answer=lisa_prompt.ANSWER, answer_source="teacher_forced",
                      trace=out.trace)


def generated(loaded, method, batch: dict, stopwatch, observers: Sequence, max_new_tokens: int = 32) -> ModeOutput:
    """LISA's chat path: the model writes the answer (at most `max_new_tokens` tokens, greedy, up to
    ``</s>``) on the KV cache of the pruned prefill; one mask per [SEG] it wrote."""
    tokenizer = loaded.processor.tokenizer
    out = generate(loaded.model, batch, method, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                   stopwatch=stopwatch, observers=observers, tokenizer=tokenizer)
    sample = out.samples[0]
    return ModeOutput(masks=list(sample.masks), answer=sample.text, answer_source="generated", trace=out.trace,
                      generation={"ids": sample.ids, "n_seg": sample.n_seg, "finished": sample.finished,
                                  "max_new_tokens": max_new_tokens, "kv_cache_mb": sample.kv_cache_mb,
                                  "kv_cache_dense_mb": sample.kv_cache_dense_mb})


MODES: dict[str, Mode] = {
    "teacher_forced": Mode(answer_in_prompt=True, run=teacher_forced),
    "generate": Mode(answer_in_prompt=False, run=generated),
}


def mode_function(mode: str) -> Mode:
    """The `Mode` of ``evaluate.mode``; a one-line ConfigError for another value."""
    if mode not in MODES:
        raise ConfigError(f"evaluate.mode={mode!r} is not allowed; use one of {list(MODES)}")
    return MODES[mode]


def mode_settings(mode: str, cfg) -> dict:
    """The config's settings of `mode` (``generate.max_new_tokens`` for generate), as `infer` takes them."""
    return {"max_new_tokens": int(cfg.generate.max_new_tokens)} if mode == "generate" else {}


def pick_device(name: str) -> torch.device:
    """``device``: auto (cuda when this machine has a GPU), cpu or cuda."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but this machine has no CUDA GPU (torch.cuda.is_available() is False); "
                          "use device=cpu or device=auto")
    return torch.device(name)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def infer(loaded, method, item: dict, mode: str = "teacher_forced", warmup: int = 0, **settings) -> Prediction:
    """Run `item` (a dataset item: ``image``, ``query``, ``is_sentence``, ``idx``, ``mask``) through
    `loaded` under the bound `method`. `warmup`: untimed passes before the two of every call (the
    first call of a process pays for lazy initialisation); `settings` go to the mode's function."""
    spec = mode_function(mode)
    model = loaded.model
    device = next(model.parameters()).device
    collated = loaded.processor.collate([item]) if spec.answer_in_prompt else \
        loaded.processor.collate([item], answer=False)
    batch = _to_device(collated, device)
    recorder = KeptRecorder()

    def run(stopwatch, observers) -> ModeOutput:
        return spec.run(loaded, method, batch, stopwatch, observers, **settings)

    with torch.inference_mode():
        for _ in range(warmup):
            run(NullStopwatch(), ())
        run(NullStopwatch(), [recorder])
        watch = Stopwatch(device)
        with watch.section("end_to_end"):
            out = run(watch, ())
    latency = watch.collect()
    image_per_layer = out.trace.image_per_layer[0].tolist()
    tokens_per_layer = out.trace.tokens_per_layer[0].tolist()
    overhead = out.trace.sample_overhead(0)
    dims = LlmDims.from_config(model.llm.config)
    flops = summarize([sample_flops(tokens_per_layer, image_per_layer, model.n_image_tokens, dims, overhead)])
    return Prediction(
        mode=mode,
        masks=[m.detach().cpu() for m in out.masks],
        image_hw=tuple(int(v) for v in item["image"].shape[:2]),
        answer=out.answer,
        answer_source=out.answer_source,
        generation=out.generation,
        image_per_layer=image_per_layer,
        tokens_per_layer=tokens_per_layer,
        overhead_events=overhead,
        kept=[layer[0] for layer in recorder.kept],
        merges=[layer[0] for layer in recorder.merges],
        n_image=model.n_image_tokens,
        grid=tuple(model.grid_size),
        flops=flops,
        latency_ms={k: float(v) for k, v in latency.items()},
    )
