"""The two halves of every pruning method — the spec a config builds and the method it binds to a
model's shape — and the dense reference `none`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from cspexp.models.lisa import PAD
from cspexp.pruning.scoring import query_attention, query_mask
from cspexp.pruning.selection import indices_to_mask, topk_indices
from cspexp.utils.choices import KeepFraction, check_call
from cspexp.utils.errors import require


@dataclass
class PruningContext:
    """What a method may read besides the token state."""

    layers: Any  # the LLaMA decoder layers (for a method's own q/k projections)
    rotary_emb: Any  # the LLaMA rotary embedding (position ids → cos, sin)
    grid_size: tuple[int, int]  # image-token grid (rows, cols)
    final_norm: Any = None  # the LLaMA's final RMSNorm (dart compares states after it); None: not given
    cls_attention: torch.Tensor | None = None  # [B, N] CLIP [CLS] attention at the feature layer
    clip_keys: torch.Tensor | None = None  # [B, N, head_dim] CLIP patch keys at the feature layer, heads averaged
    # When the vision stage merged cells into n < N tokens (tome; None otherwise): [B, n] the cell each token
    # stands for (the splice put it there; the other cells are empty until the method's setup drops them),
    # and [B, N] which of the n tokens holds each cell
    image_grid: torch.Tensor | None = None
    image_source: torch.Tensor | None = None
    clip_shape: Any = None  # `cspexp.models.clip_loop.ClipShape` of the CLIP tower (set by the pipeline; tome's schedule)
    images: list | None = None  # per sample uint8 [H, W, 3] originals (for segmenter-based selection)
    sample_ids: list[int] | None = None  # dataset idx per sample (per-sample seeds)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PruningSpec:
    """A pruning method's settings: what ``conf/prune/*.yaml`` instantiates.

    Checked when it is constructed — the allowed values of its `Literal` fields (see
    `cspexp.utils.choices`) and its ranges — and immutable after. It does not run: ``bind(num_layers,
    n_image)`` checks the schedule against a model's depth and image-token count, once at start-up
    before any model is loaded (so a bad schedule fails in a second, not after a 7B load), and returns
    the `PruningMethod` the decoder loop calls.

    Args:
        keep: the fraction of image tokens the method's main pruning step keeps, in (0, 1].
    """

    name: ClassVar[str] = "base"
    #: whether the method needs the CLIP [CLS] attention in the context
    needs_cls_attention: ClassVar[bool] = False
    #: whether the method needs CLIP's patch keys (`PruningContext.clip_keys`) in the context
    needs_clip_keys: ClassVar[bool] = False
    #: whether the method changes the vision stage itself (tome merges tokens inside CLIP): the image
    #: tokens (`count` of them) then come from the bound method's `encode_image`, the feature cache keys
    #: them by the method's `vision_description()`, and `schedule(clip_shape)` (the tokens merged away
    #: in each CLIP layer) gives the tower's FLOPs (`cspexp.flops.vision.lisa_vision_flops`)
    changes_vision: ClassVar[bool] = False

    keep: KeepFraction = 1.0

    def __post_init__(self) -> None:
        check_call(type(self), {f.name: getattr(self, f.name) for f in fields(self)}, "prune")
        keep = self.keep
        require(isinstance(keep, (int, float)) and 0.0 < float(keep) <= 1.0, f"prune.keep={keep!r} is outside (0, 1]")
        self._set(keep=float(keep))

    def _set(self, **values) -> None:
        """Normalise fields in `__post_init__` (the dataclass is frozen)."""
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def bind(self, num_layers: int, n_image: int) -> PruningMethod:
        """The method for a model with `num_layers` decoder layers and `n_image` image tokens; raises
        ConfigError if the schedule does not fit."""
        return PruningMethod(self, num_layers, n_image)

    def describe(self) -> dict:
        """The schedule's parameters, for results.json and tables."""
        return {"name": self.name, "keep": self.keep}

    @property
    def needs_images(self) -> bool:
        """Whether the method reads the image itself (CLIP's [CLS] attention or keys, the pixels), not
        only the token states: the benchmark's synthetic prompts have no image to give it."""
        return self.needs_cls_attention or self.needs_clip_keys or self.changes_vision

    def __getattr__(self, attr: str):
        if attr in ("setup", "before_layer"):
            raise AttributeError(
                f"{type(self).__name__} is a pruning spec, not bound to a model: it has no {attr}; run "
                f"spec.bind(num_layers, n_image_tokens), which checks the schedule and returns the method to run"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}")


class PruningMethod:
    """A `PruningSpec` bound to a model's shape, ready to run: its constructor resolves and checks
    the schedule and sets every field the hooks read. Per batch the decoder loop calls
    ``setup(state, ctx)`` and then ``before_layer(l, state, ctx)`` for every layer l. A method edits
    the state through `TokenState.drop_image` / `TokenState.insert`; the engine rebuilds mask and RoPE.

    This base class is the dense pass (`NoPruning.bind`): its hooks do nothing.
    """

    def __init__(self, spec: PruningSpec, num_layers: int, n_image: int) -> None:
        self.spec, self.num_layers, self.n_image = spec, num_layers, n_image
        self.name = spec.name
        self.needs_cls_attention = spec.needs_cls_attention
        self.needs_clip_keys = spec.needs_clip_keys
        # an instance attribute: a bound method whose schedule changes nothing (tome at keep 1) is the dense tower
        self.changes_vision = spec.changes_vision
        self.keep = spec.keep

    def setup(self, state, ctx: PruningContext) -> None:
        """Called once per batch before layer 0."""

    def before_layer(self, layer: int, state, ctx: PruningContext) -> None:
        """Called before every decoder layer."""

    def describe(self) -> dict:
        """The spec's parameters, for results.json and tables."""
        return self.spec.describe()

    def check_model(self, model) -> None:
        """Check what only the loaded model tells (tome: the CLIP tower's depth); raise ConfigError."""

    def vision_description(self) -> dict | None:
        """What the vision stage depends on besides the model and the images, for the feature cache's
        keys: None for a method that leaves it alone (`changes_vision` False)."""
        return None

    def encode_image(self, model, clip_pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The image tokens of a method that `changes_vision` and the per-token tensors that describe them
        (`cspexp.features.vision.MERGED_FIELDS`)."""
        raise NotImplementedError(f"prune={self.name} leaves the vision stage to the model")


@dataclass(frozen=True)
class NoPruning(PruningSpec):
    """The dense model: every image token passes every layer."""

    name: ClassVar[str] = "none"

    def describe(self) -> dict:
        # keep 1.0 whatever was asked: `none` ignores keep, and two dense runs must describe the
        # same method (a sweep's duplicate-point check compares descriptions)
        return {"name": self.name, "keep": 1.0}


def score_image_tokens(layer: int, state, ctx: PruningContext, query: str) -> torch.Tensor:
    """Query attention [B, n_image] at `layer` (the state being that layer's input); the call is
    recorded in the trace so that accounting can charge it as the method's overhead."""
    n_queries = query_mask(state, query).sum(1).tolist()
    state.trace.overhead.append(
        {"kind": "query_attention", "layer": layer, "tokens": (state.kind != PAD).sum(1).tolist(), "queries": n_queries}
    )
    with torch.no_grad():  # selections are constants, also when fine-tuning under a schedule
        return query_attention(ctx.layers[layer], ctx.rotary_emb, state, query)


def keep_top(state, scores: torch.Tensor, count: int) -> None:
    """Keep the `count` image tokens with the highest scores [B, n_image]; drop the rest for good."""
    if count >= scores.shape[1]:
        return
    state.drop_image(indices_to_mask(topk_indices(scores, count), scores.shape[1]))


def sample_ids(state, ctx: PruningContext) -> list[int]:
    """The dataset idx of each sample (0..B-1 when the caller gave none)."""
    return list(ctx.sample_ids) if ctx.sample_ids is not None else list(range(state.batch_size))
