"""`hydra.utils.instantiate` with user errors kept readable."""

from __future__ import annotations

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from cspexp.utils.errors import CspexpError


def build(cfg_node, **kwargs):
    """Instantiate ``cfg_node._target_``; a `CspexpError` raised by the target surfaces as itself
    (one line for the user), not wrapped in Hydra's InstantiationException."""
    try:
        return instantiate(cfg_node, _convert_="all", **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, CspexpError):
            raise cause from None
        raise
