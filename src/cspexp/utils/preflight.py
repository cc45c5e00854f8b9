"""Check the command-line overrides before Hydra runs, and explain a bad one in one line.

Hydra's own messages for an unknown key or group option span several lines and do not say what is
allowed. Composing the config once up front (sweep overrides reduced to their first value) catches
the same errors; the message then names the key and lists what exists there.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cspexp.utils.choices import check_config
from cspexp.utils.conf_dir import check_conf_dir
from cspexp.utils.environment import check_output_dirs, check_wandb_login
from cspexp.utils.errors import CspexpError
from cspexp.utils.failures import fail

# Flags after which the remaining arguments are not plain overrides: leave those runs to Hydra.
HYDRA_FLAGS = {
    "--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--resolve", "--package", "-p", "--run", "-r",
    "--info", "-i", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
    "--shell-completion", "-sc", "--experimental-rerun",
}
MULTIRUN_FLAGS = {"-m", "--multirun"}


def _first_values(overrides: list[str]) -> list:
    """Parsed overrides, each sweep (``a=1,2``, ``choice(..)``, ``range(..)``) reduced to its first value."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    out = []
    for o in parsed:
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()))
            o = OverridesParser.create().parse_override(f"{o.get_key_element()}={first}")
        out.append(o)
    return out


def _explain(cfg: DictConfig, group_options, override) -> str | None:
    """A one-line explanation if `override` does not fit `cfg` (composed without the overrides)."""
    if override.is_add() or override.is_delete() or override.is_force_add():
        return None
    key = override.key_or_group
    if key.startswith("hydra") or override.package:
        return None
    options = group_options(key)
    if options:
        value = override.value()
        if isinstance(value, str) and value not in options:
            return f"{key}={value} is not a known option of '{key}'; choose one of: {', '.join(options)}"
        return None
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if isinstance(parent, DictConfig) and leaf not in parent:
        where = f"'{parent_key}'" if parent_key else "the top level"
        known = ", ".join(str(k) for k in parent.keys() if not str(k).startswith("_"))
        return f"unknown config key '{key}' ({where} has: {known}); to add a new key write +{key}=..."
    if parent is None and parent_key:
        return f"unknown config key '{key}': there is no '{parent_key}' in the config"
    return None


def preflight(conf_dir: Path, config_name: str, argv: list[str]) -> None:
    """Exit with one error line (status 2) if the configs are missing or the overrides in `argv`
    do not compose."""
    try:
        check_conf_dir(conf_dir)
    except CspexpError as exc:
        fail(str(exc))
    if any(a.split("=")[0] in HYDRA_FLAGS for a in argv):
        return
    overrides = [a for a in argv if a not in MULTIRUN_FLAGS]
    try:
        parsed = _first_values(overrides)
    except HydraException as exc:
        fail(f"cannot parse the overrides: {_one_line(exc)}")
    plain = [o.input_line for o in parsed]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            try:
                cfg = compose(config_name=config_name, overrides=plain)
            except (HydraException, OmegaConfBaseException, ValueError) as exc:
                error = exc
            else:
                try:  # values outside the Literal annotations of their `_target_`
                    check_config(cfg)
                    check_wandb_login(cfg.get("logger"))  # logger.mode=online needs credentials
                    # the run (or sweep) dir Hydra creates next must be writable
                    check_output_dirs(config_name, overrides, any(a in MULTIRUN_FLAGS for a in argv))
                except CspexpError as exc:
                    fail(str(exc))
                return
            # Find the culprit against the config composed with the user's group choices only
            # (prune=csp, experiment=…): they decide which keys exist.
            loader = GlobalHydra.instance().config_loader()
            for o in parsed:
                options = loader.get_group_options(o.key_or_group)
                if not options or o.is_delete():
                    continue
                if o.value() is None:
                    fail(f"{o.key_or_group}=null is not an option; choose one of: {', '.join(options)} "
                          f"(or drop the group with ~{o.key_or_group})")
                if isinstance(o.value(), str) and o.value() not in options:
                    fail(f"{o.key_or_group}={o.value()} is not a known option of '{o.key_or_group}'; "
                          f"choose one of: {', '.join(options)}")
            groups = [o.input_line for o in parsed
                      if not o.key_or_group.startswith("hydra") and loader.get_group_options(o.key_or_group)]
            try:
                base = compose(config_name=config_name, overrides=groups)
            except (HydraException, OmegaConfBaseException, ValueError):
                base = None
            for o in parsed:
                msg = _explain(base, lambda g: loader.get_group_options(g), o) if base is not None else None
                if msg:
                    fail(msg)
            fail(_one_line(error))
    finally:
        GlobalHydra.instance().clear()


def _one_line(exc: BaseException) -> str:
    parts = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # Hydra appends the search path and a HYDRA_FULL_ERROR hint: noise for this message.
    parts = [p for p in parts if not p.startswith(("Config search path", "provider=", "Set the environment"))]
    return "; ".join(parts)

