"""Datasets. Every item is a dict with a stable integer ``idx``, ``image`` (uint8 H×W×3), ``mask``
({0, 1, 255} H×W), ``query``, ``is_sentence`` and ``query_kind``."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from cspexp.utils.instantiate import build

# Keys of a `conf/dataset/*.yaml` that configure the DataLoader rather than the dataset itself.
LOADER_KEYS = ("name", "batch_size", "num_workers")


def build_dataset(cfg: DictConfig):
    """Instantiate the dataset named by ``cfg._target_`` with every key except the loader's."""
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in LOADER_KEYS}
    return build(OmegaConf.create(kwargs))


def vocabulary(dataset) -> list[str]:
    """The words the dataset's queries can contain (empty when it cannot say)."""
    fn = getattr(dataset, "vocabulary", None)
    return list(fn()) if callable(fn) else []
