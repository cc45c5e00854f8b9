"""Layer indices and token counts of a schedule, and their validation.

A layer may be given as an absolute index (an int) or as a fraction of depth (a float in [0, 1]):
``0.25`` of 32 layers is layer 8 (rounded to the nearest layer). Counts of kept tokens round *up*:
``keep·N`` tokens → ⌈keep·N⌉, so any keep > 0 keeps at least one token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from cspexp.utils.errors import ConfigError


def resolve_layer(value, num_layers: int, key: str) -> int:
    """An absolute layer index from an int index or a float fraction of depth."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r} must be a layer index (int) or a fraction of depth (float in [0, 1])")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}={value} is a fraction of depth and must lie in [0, 1]")
        return int(math.floor(value * num_layers + 0.5))
    if not 0 <= value <= num_layers:
        raise ConfigError(f"{key}={value} is outside the model's layers 0..{num_layers}")
    return int(value)


def resolve_layers(values, num_layers: int, key: str, lo: int, hi: int, what: str, why: str = "") -> tuple[int, ...]:
    """A non-empty list of layer indices or fractions (`resolve_layer` each) that must come out
    distinct, increasing and within lo..hi; `what` names them in the error ("drop layers"), `why`
    (optional) says why the range is what it is."""
    given = list(values)
    layers = [resolve_layer(v, num_layers, f"{key}[{i}]") for i, v in enumerate(given)]
    if not layers or any(not lo <= l <= hi for l in layers) or layers != sorted(set(layers)):
        raise ConfigError(f"{key}={given} resolves to {layers}: {what} must be distinct, increasing and within "
                          f"{lo}..{hi}" + (f" ({why})" if why else ""))
    return tuple(layers)


def resolve_span(span, num_layers: int, key: str) -> tuple[int, int]:
    """[start, end) in absolute layers; start ≤ end ≤ num_layers."""
    if isinstance(span, (str, bytes)) or not isinstance(span, Sequence) or len(span) != 2:
        raise ConfigError(f"{key}={span!r} must be a pair [start, end) of layers or fractions of depth")
    start, end = resolve_layer(span[0], num_layers, f"{key}[0]"), resolve_layer(span[1], num_layers, f"{key}[1]")
    if start > end:
        raise ConfigError(f"{key}={list(span)} resolves to layers [{start}, {end}), which is empty backwards")
    return start, end


def n_keep(fraction: float, n: int) -> int:
    """⌈fraction·n⌉ (fraction·n rounded to 6 decimals first, so 0.3·256 is 77 and 0.25·256 is 64)."""
    return min(n, max(1, math.ceil(round(fraction * n, 6))))


def check_fraction(value, key: str) -> float:
    """`value` as a float in (0, 1]; raise ConfigError naming `key` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value <= 1.0):
        raise ConfigError(f"{key}={value!r} is outside (0, 1]")
    return float(value)
