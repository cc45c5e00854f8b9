"""The model loaders that ``conf/model/*.yaml`` name as ``_target_``, and what a run asks of them:
the model's shape before any weight is read (so that a bad pruning schedule fails in a second, not
after a 7B load), and the model itself.

Adding a loader: write its function (returning `cspexp.models.base.LoadedModel`) and the function
that reads its `ModelShape` from the same config, and register the pair in `SHAPES`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping

from hydra.utils import get_method

from cspexp.models.base import LoadedModel, ModelShape
from cspexp.models.factory import random_lisa, random_shape
from cspexp.models.lisa_checkpoint import lisa_shape, load_lisa
from cspexp.models.saved import load_saved, saved_shape
from cspexp.utils.errors import ConfigError
from cspexp.utils.instantiate import build

#: loader → how it reads its shape from its config without loading weights
SHAPES: dict[Callable, Callable[[Mapping], ModelShape]] = {
    random_lisa: random_shape,
    load_saved: saved_shape,
    load_lisa: lisa_shape,
}


def loader_of(cfg: Mapping) -> Callable:
    """The function a model config's ``_target_`` names."""
    target = cfg.get("_target_") if isinstance(cfg, Mapping) or hasattr(cfg, "get") else None
    if not target:
        raise ConfigError("the model config has no _target_ (choose a model with model=<name>)")
    try:
        return get_method(str(target))
    except Exception:  # Hydra raises a bare Exception subclass with a multi-line message
        raise ConfigError(f"model._target_={target!r} is not an importable function") from None


def model_shape(cfg: Mapping) -> ModelShape | None:
    """The shape the model config `cfg` will load, or None for a loader that cannot tell before loading."""
    shape = SHAPES.get(loader_of(cfg))
    return shape(cfg) if shape is not None else None


def takes_words(loader: Callable) -> bool:
    """Whether the loader builds its tokenizer from the data's vocabulary (it declares ``words``);
    checkpoints bring their own tokenizer."""
    return "words" in inspect.signature(loader).parameters


def build_model(cfg: Mapping, words: Iterable[str] = ()) -> LoadedModel:
    """Load the model of `cfg`; `words` (the dataset's vocabulary) go to loaders that take them."""
    extra = {"words": list(words)} if takes_words(loader_of(cfg)) else {}
    return build(cfg, **extra)
