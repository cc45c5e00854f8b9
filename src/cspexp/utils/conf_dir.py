"""Where cspexp's Hydra configs are: ``$CSPEXP_CONFIG_DIR`` if set, else ``conf/`` of the checkout
this package is installed from.

Every entry point passes this directory to Hydra as an absolute path: a relative ``config_path``
is resolved against the *module* under ``python -m`` and breaks (docs/pitfalls.md, "Hydra: a
relative config_path"). The path is computed at import (``@hydra.main`` needs it then) but checked
only when an entry point starts (`check_conf_dir`), so importing cspexp never exits.
"""

from __future__ import annotations

import os
from pathlib import Path

from cspexp.utils.errors import MissingPathError


def conf_dir() -> Path:
    env = os.environ.get("CSPEXP_CONFIG_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "conf"


def check_conf_dir(path: Path) -> None:
    """Raise a one-line error if `path` holds no cspexp configs."""
    if not (path / "eval.yaml").is_file():
        raise MissingPathError(
            f"cspexp's configs were not found at {path}; install from a clone with `pip install -e .` "
            "or set CSPEXP_CONFIG_DIR to the repository's conf/ directory"
        )
