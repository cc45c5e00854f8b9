"""Allowed config values, declared once and checked in one place.

A parameter (or dataclass field, or `TypedDict` key) declares what it accepts in its annotation, and
nothing else repeats it:
- a closed set of values: `typing.Literal[...]`;
- a plain type: `int`, `float`, `bool`, `str` (and unions of them, `| None`): a value of another type
  is refused (``dataset.n=abc``, ``dataset.n=2.5``, ``compare_dense=maybe``);
- a range: `Annotated[int, Range(0)]` (inclusive bounds; see `Range`).
`check_call` reads those annotations from a `_target_` and rejects a value outside them with one line
that names the key and what is allowed; `check_config` applies it to every node of a composed config
that has a `_target_`; `cspexp.utils.settings.check_settings` does the same for the keys without one, so a
typo fails when the config is composed, before anything is built.

Annotations this module cannot check at run time (a class, a callable, `Any`) accept any value there;
a union with such a member is checked for its Literal values only.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Annotated, Any, Literal

from cspexp.utils.errors import ConfigError

_UNIONS = (typing.Union, types.UnionType)
_SEQUENCES = (list, tuple, Sequence, typing.Sequence)
_PLAIN = {int: "an int", float: "a number", bool: "true or false", str: "a string"}


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a number, as ``Annotated[int, Range(0)]``: inclusive unless `lo_open` (None:
    unbounded on that side)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    def holds(self, value) -> bool:
        above = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        return above and (self.hi is None or value <= self.hi)

    def describe(self) -> str:
        if self.hi is None:
            return f"must be {'>' if self.lo_open else '>='} {self.lo}"
        if self.lo is None:
            return f"must be <= {self.hi}"
        return f"is outside {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"


NonNegativeInt = Annotated[int, Range(0)]
PositiveInt = Annotated[int, Range(1)]
Fraction = Annotated[float, Range(0.0, 1.0)]
KeepFraction = Annotated[float, Range(0.0, 1.0, lo_open=True)]  # a share of tokens kept: (0, 1]


def literal_values(annotation) -> tuple | None:
    """The values a `Literal` annotation allows (also through `Optional` / unions of Literals)."""
    members = _members(annotation)
    values = tuple(v for m in members if typing.get_origin(m) is Literal for v in typing.get_args(m))
    return values or None


def _members(annotation) -> tuple:
    annotation = _strip(annotation)
    if typing.get_origin(annotation) in _UNIONS:
        return tuple(_strip(m) for m in typing.get_args(annotation))
    return (annotation,)


def _strip(annotation):
    """`Annotated[X, ...]` → X."""
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation


def _ranges(annotation) -> list[Range]:
    """The `Range`s of an `Annotated` annotation, or of the `Annotated` members of a union."""
    parts = typing.get_args(annotation) if typing.get_origin(annotation) in _UNIONS else (annotation,)
    return [r for p in parts if typing.get_origin(p) is Annotated for r in p.__metadata__ if isinstance(r, Range)]


def _plain_match(value, member) -> bool:
    if member is bool:
        return isinstance(value, bool)
    if member is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if member is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)


def _is_plain(member) -> bool:
    return member in _PLAIN or typing.get_origin(member) is Literal


def _matches_type(value, annotation) -> bool:
    """Whether `value` is an instance of a non-Literal member of a union (as far as a runtime check goes)."""
    if annotation is Any:
        return True
    cls = typing.get_origin(annotation) or annotation
    return isinstance(cls, type) and isinstance(value, cls)


def check_value(value, annotation, key: str) -> None:
    """Raise ConfigError if `value` is outside the Literal values `annotation` declares for `key`."""
    members = _members(annotation)
    if value is None and type(None) in members:
        return
    allowed = literal_values(annotation)
    others = [m for m in members if typing.get_origin(m) is not Literal and m is not type(None)]
    if allowed is not None and _is_literal_value(value, allowed):
        return
    if isinstance(value, Mapping):
        for m in others:
            if typing.is_typeddict(m):
                _check_mapping(value, m, key)
                return
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        for m in others:
            if typing.get_origin(m) in _SEQUENCES and typing.get_args(m):
                item = typing.get_args(m)[0]
                for i, v in enumerate(value):
                    check_value(v, item, f"{key}[{i}]")
                return
    plain = [m for m in others if m in _PLAIN]
    if plain and all(_is_plain(m) for m in members if m is not type(None)):
        # Only plain types and Literals: the value must be one of them (a checked type).
        if not any(_plain_match(value, m) for m in plain):
            if allowed is not None:
                also = "".join(f" (or any {m.__name__})" for m in plain)
                raise ConfigError(f"{key}={value!r} is not allowed; use one of {list(allowed)}{also}")
            wanted = " or ".join(_PLAIN[m] for m in plain) + (" (or null)" if type(None) in members else "")
            raise ConfigError(f"{key}={value!r} is not allowed; it must be {wanted}")
        for r in _ranges(annotation):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not r.holds(value):
                raise ConfigError(f"{key}={value!r} {r.describe()}")
        return
    if allowed is None or any(_matches_type(value, m) for m in others):
        return
    also = "".join(f" (or any {getattr(m, '__name__', m)})" for m in others)
    raise ConfigError(f"{key}={value!r} is not allowed; use one of {list(allowed)}{also}")


def _is_literal_value(value, allowed: tuple) -> bool:
    # `True == 1`: a bool is never taken for a Literal int, nor an int for a Literal bool.
    return any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed)


def _check_mapping(value: Mapping, typed_dict, key: str) -> None:
    hints = _hints_of(typed_dict)
    for name, v in value.items():
        if name in hints:
            check_value(v, hints[name], f"{key}.{name}" if key else str(name))


@lru_cache(maxsize=None)
def _hints_of(target) -> dict[str, Any]:
    """The resolved annotations of a callable's parameters (a class: its constructor's; a dataclass
    or TypedDict: its fields'). An annotation that does not resolve is left out."""
    if isinstance(target, type) and (dataclasses.is_dataclass(target) or typing.is_typeddict(target)):
        fn = target
    else:
        fn = target.__init__ if isinstance(target, type) else target
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:  # one unresolvable annotation (a TYPE_CHECKING import): resolve the rest one by one
        pass
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    glb = getattr(fn, "__globals__", None) or (vars(module) if module else {})
    out = {}
    for name, ann in (getattr(fn, "__annotations__", None) or {}).items():
        try:
            out[name] = typing.get_type_hints(types.SimpleNamespace(__annotations__={name: ann}), glb,
                                              include_extras=True)[name]
        except Exception:
            continue
    return out


def check_call(target, kwargs: Mapping, prefix: str) -> None:
    """Check the arguments `kwargs` of `target` (a class or function) against the Literal annotations
    of its parameters; keys are reported as ``<prefix>.<name>``."""
    hints = _hints_of(target)
    for name, value in kwargs.items():
        if name in hints:
            check_value(value, hints[name], f"{prefix}.{name}" if prefix else str(name))


def check_config(cfg, prefix: str = "") -> None:
    """Apply `check_call` to every node of the composed config `cfg` that has a `_target_` (nested ones
    too). A target that cannot be imported, or a value that does not resolve yet, is left to
    instantiation, which reports it."""
    from hydra.utils import get_object
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, ListConfig):
        for i in range(len(cfg)):
            child = _get(cfg, i)
            if isinstance(child, (DictConfig, ListConfig)):
                check_config(child, f"{prefix}[{i}]")
        return
    if not isinstance(cfg, DictConfig):
        return
    keys = [k for k in cfg.keys() if prefix or k != "hydra"]  # Hydra's own node (launcher, sweeper) is not ours
    target = _get(cfg, "_target_")
    if isinstance(target, str):
        try:
            resolved = get_object(target)
        except Exception:
            resolved = None
        if resolved is not None:
            kwargs = {}
            for key in keys:
                if str(key).startswith("_"):
                    continue
                value = _get(cfg, key)
                if isinstance(value, (DictConfig, ListConfig)):
                    try:
                        value = OmegaConf.to_container(value, resolve=True)
                    except Exception:
                        continue
                if value is not _UNRESOLVED:
                    kwargs[key] = value
            check_call(resolved, kwargs, prefix)
    for key in keys:
        child = _get(cfg, key)
        if isinstance(child, (DictConfig, ListConfig)):
            check_config(child, f"{prefix}.{key}" if prefix else str(key))


_UNRESOLVED = object()


def _get(node, key):
    """`node[key]` resolved, or `_UNRESOLVED` when it cannot be yet (missing, or a resolver that
    needs the running app)."""
    try:
        return node[key]
    except Exception:
        return _UNRESOLVED
