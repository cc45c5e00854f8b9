"""`build_run(cfg)`: from a composed config to the objects a run works with — the pruning method
bound to the model's shape, the datasets, the loaded model — in the order that fails fastest.

Evaluation, training and the prompt tool start here, so a config is validated one way everywhere:
1. mandatory keys (``???``) are set, and a W&B logger that runs online has credentials;
2. the method is built, and bound to the model's shape read from its config files *before* any
   weight is loaded (a bad schedule costs a second, not a checkpoint load);
3. the datasets are built (the data checks of the caller run here, still before the model);
4. the model is loaded, with the training (or evaluation) data's vocabulary for loaders that build
   their tokenizer from it; a method whose shape only the loaded model could tell is bound now.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cspexp.data import build_dataset, vocabulary
from cspexp.models.base import LoadedModel, ModelShape
from cspexp.models.loaders import build_model, model_shape
from cspexp.utils.environment import check_wandb_login
from cspexp.utils.errors import ConfigError
from cspexp.utils.hydra_mode import in_multirun
from cspexp.utils.instantiate import build

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What a configured run works with. ``datasets`` maps a role (``eval``; ``train`` and ``val``
    for training) to its dataset."""

    method: object  # a pruning method bound to `loaded`'s shape: ready for the forward pass
    datasets: dict
    loaded: LoadedModel
    model_reused: bool = False  # taken from an earlier job of this process rather than loaded

    @property
    def dataset(self):
        """The evaluation dataset (``cfg.dataset``)."""
        return self.datasets["eval"]


def require_values(cfg: DictConfig) -> None:
    """Mandatory keys (``???``) must be set; say which, in one line."""
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra"))
    if missing:
        raise ConfigError(f"{', '.join(missing)} must be set (e.g. {missing[0]}=...)")


def bind_method(spec, shape: ModelShape):
    """The configured method bound to a model of `shape` (its schedule checked against it)."""
    return spec.bind(shape.num_layers, shape.n_image_tokens)


def build_run(
    cfg: DictConfig,
    datasets: Mapping[str, DictConfig] | None = None,
    vocabulary_from: str = "eval",
    check_data: Callable[[dict], None] | None = None,
    reuse_model: bool = False,
) -> Run:
    """Build the run of `cfg` (see the module docstring for the order).

    Args:
        datasets: role → dataset config; default ``{"eval": cfg.dataset}``.
        vocabulary_from: the role whose vocabulary a word-level tokenizer is built over.
        check_data: called with the built datasets before the model loads (raise ConfigError).
        reuse_model: take the model the previous run of this process loaded, if it was loaded from
            the same config and vocabulary (`load_model`); only for runs that never change it.
    """
    require_values(cfg)
    check_wandb_login(cfg.get("logger"))  # logger.mode=online without credentials: one line, before anything loads
    spec = build(cfg.prune)
    shape = model_shape(cfg.model)
    method = bind_method(spec, shape) if shape is not None else None
    built = {role: build_dataset(node) for role, node in (datasets or {"eval": cfg.dataset}).items()}
    if check_data is not None:
        check_data(built)
    loaded, reused = load_model(cfg.model, vocabulary(built[vocabulary_from]), reuse=reuse_model)
    if method is None:
        method = bind_method(spec, loaded.shape)
    method.check_model(loaded.model)  # what only the loaded model tells (tome: CLIP's depth), before any pass
    return Run(method=method, datasets=built, loaded=loaded, model_reused=reused)


@dataclass
class _KeptModel:
    key: str
    loaded: LoadedModel


_kept: _KeptModel | None = None  # the model the last reusing run of this process loaded


def model_key(cfg_model, words: list[str]) -> str:
    """What a loaded model depends on: its resolved config and, for loaders that build their
    tokenizer from the data, the vocabulary."""
    container = OmegaConf.to_container(cfg_model, resolve=True) if isinstance(cfg_model, DictConfig) else dict(cfg_model)
    return json.dumps({"model": container, "words": sorted(words)}, sort_keys=True, default=str)


def load_model(cfg_model, words: list[str], reuse: bool = False) -> tuple[LoadedModel, bool]:
    """The model of `cfg_model`, and whether it was reused rather than loaded. With `reuse`, the model is kept for the next run of this process and
    a run with the same `model_key` takes it instead of loading it again — the jobs of a multirun
    (Hydra's basic launcher runs them one after another in one process) load it once. One model is
    kept at a time: a job with another model config drops it before loading its own. Evaluation never
    changes a model (tests/test_model_reuse.py checks its weights before and after a pruned job);
    training does, so it never reuses."""
    global _kept
    key = model_key(cfg_model, words)
    if reuse and _kept is not None and _kept.key == key:
        log.info("model %s reused from the previous job of this process (cache.model=true)", _kept.loaded.name)
        return _kept.loaded, True
    _kept = None  # free the previous model before the next one loads
    loaded = build_model(cfg_model, words)
    if reuse:
        _kept = _KeptModel(key, loaded)
    return loaded, False


def build_logger(cfg: DictConfig):
    """The Lightning logger of `cfg.logger`, or None for ``logger=none``.

    In a multirun a logger with an unset ``group`` (W&B) is grouped by sweep: the sweep dir's name,
    the group the sweep's Pareto summary run joins too (`cspexp.report.callback.sweep_group`)."""
    if not cfg.get("logger") or "_target_" not in cfg.logger:
        return None
    extra = {}
    if "group" in cfg.logger and cfg.logger.group is None and in_multirun():
        extra["group"] = Path(str(HydraConfig.get().sweep.dir)).name
    return build(cfg.logger, **extra)
