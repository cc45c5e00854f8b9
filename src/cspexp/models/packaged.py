"""Models shipped inside the package (``src/cspexp/assets/<name>/``), loaded offline.

A packaged model is an ordinary cspexp model directory (`cspexp.models.saved`), so its config is
``model=converted`` with ``path: ${packaged:<name>}``; the ``packaged`` resolver turns the name into
the installed directory (``--cfg job --resolve`` shows where the files are).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from omegaconf import OmegaConf


def packaged_path(name: str) -> Path:
    """The directory of the packaged model `name` (it may be missing in a broken install)."""
    return Path(str(files("cspexp") / "assets" / name))


def register_resolvers() -> None:
    """``${packaged:NAME}`` in configs → `packaged_path` (idempotent)."""
    OmegaConf.register_new_resolver("packaged", lambda name: str(packaged_path(name)), replace=True)
