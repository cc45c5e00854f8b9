"""Check the command-line overrides before Hydra runs, and explain a bad one in one line.

Hydra's own messages for an unknown key or group option span several lines and do not say what is
allowed. Composing the config once up front (sweep overrides reduced to their first value) catches
the same errors; the message then names the key and lists what exists there.
"""

from __future__ import annotations

import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cspexp.utils.choices import check_config
from cspexp.utils.settings import check_settings
from cspexp.utils.conf_dir import check_conf_dir
from cspexp.utils.environment import check_output_dirs, check_wandb_login
from cspexp.utils.errors import ConfigError, CspexpError
from cspexp.utils.failures import fail

# Flags after which the remaining arguments are not plain overrides: leave those runs to Hydra.
HYDRA_FLAGS = {
    "--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--resolve", "--package", "-p", "--run", "-r",
    "--info", "-i", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
    "--shell-completion", "-sc", "--experimental-rerun",
}
MULTIRUN_FLAGS = {"-m", "--multirun"}


def _sweep_values(override) -> list[str] | None:
    """The values of a sweep override as strings (None when only the running sweeper can list them,
    e.g. ``glob(…)``)."""
    try:
        return list(override.sweep_string_iterator())
    except Exception:  # noqa: BLE001 — Hydra raises several kinds; the sweeper will report it
        return None


def _variants(overrides: list[str]) -> list[list]:
    """The override lists to check: every sweep reduced to its first value, then, for every other
    value of each sweep, the same list with that value in its place — so every value is composed and
    checked once (not every combination)."""
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    values = [(_sweep_values(o) if o.is_sweep_override() else None) for o in parsed]

    def at(o, value):
        return parser.parse_override(f"{o.get_key_element()}={value}")

    first = [at(o, v[0]) if o.is_sweep_override() and v else o for o, v in zip(parsed, values, strict=True)]
    out = [first]
    for i, (o, vs) in enumerate(zip(parsed, values, strict=True)):
        for v in (vs or [])[1:]:
            out.append([*first[:i], at(o, v), *first[i + 1:]])
    return out


def _sweeper_params(cfg: DictConfig) -> list[str]:
    """The basic sweeper's configured grid (``hydra.sweeper.params``, e.g. conf/hydra/sweep_grid/) as
    overrides, so that its values are checked like the command line's."""
    try:
        sweeper = cfg.hydra.sweeper
        if not str(sweeper.get("_target_", "")).endswith("BasicSweeper") or not sweeper.get("params"):
            return []
        return [f"{k}={v}" for k, v in sweeper.params.items()]
    except Exception:  # noqa: BLE001 — no Hydra node or an interpolation: nothing to add
        return []


def check_composed(cfg: DictConfig, config_name: str) -> None:
    """The checks of a composed config, each raising one-line ConfigErrors: allowed values and types
    of every `_target_`'s arguments, the other keys' types and ranges, and the trainer against this
    machine."""
    # The keys a user sets first: a value that reaches a `_target_` by interpolation (train.loss.ce →
    # train.terms.lisa.ce) is then reported under the key the user typed.
    check_settings(cfg, config_name)
    check_config(cfg)
    check_trainer_devices(cfg.get("trainer"))


def check_trainer_devices(trainer) -> None:
    """A GPU trainer on a machine without one fails here, in a second, not after the model loaded."""
    if not isinstance(trainer, DictConfig) or "accelerator" not in trainer:
        return
    devices = trainer.get("devices")
    # Lightning's own forms: "auto", -1 (all), a count ≥ 1, a list of device indices, or those as a string
    valid = (devices in ("auto", -1)
             or (isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1)
             or (isinstance(devices, ListConfig) and all(isinstance(d, int) and d >= 0 for d in devices))
             or (isinstance(devices, str) and re.fullmatch(r"-1|\d+|(\d+,)+\d*", devices) is not None))
    if not valid:
        raise ConfigError(f"trainer.devices={devices!r} is not allowed; use a count >= 1, -1 (all), 'auto' "
                          "or a list of device indices")
    accelerator = str(trainer.get("accelerator"))
    if accelerator not in ("gpu", "cuda"):
        return
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available == 0:
        raise ConfigError(f"trainer.accelerator={accelerator} but this machine has no CUDA GPU "
                          "(torch.cuda.is_available() is False); use trainer=cpu")
    devices = trainer.get("devices")
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > available:
        raise ConfigError(f"trainer.devices={devices} but this machine has {available} CUDA GPU"
                          f"{'s' if available > 1 else ''}; use trainer.devices={available} or fewer")


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
    # `in` is False for a mandatory key still at ??? (model.path): ask for the keys instead
    if isinstance(parent, DictConfig) and leaf not in list(parent.keys()):
        where = f"'{parent_key}'" if parent_key else "the top level"
        known = ", ".join(str(k) for k in parent.keys() if not str(k).startswith("_"))
        return f"unknown config key '{key}' ({where} has: {known}); to add a new key write +{key}=..."
    if parent is None and parent_key:
        return f"unknown config key '{key}': there is no '{parent_key}' in the config"
    return None


def preflight(conf_dir: Path, config_name: str, argv: list[str]) -> None:
    """Exit with one error line (status 2) if the configs are missing, or if the overrides in `argv`
    — every value of every sweep — do not compose or hold a value their key does not allow."""
    try:
        check_conf_dir(conf_dir)
    except CspexpError as exc:
        fail(str(exc))
    if any(a.split("=")[0] in HYDRA_FLAGS for a in argv):
        return
    overrides = [a for a in argv if a not in MULTIRUN_FLAGS]
    try:
        variants = _variants(overrides)
    except HydraException as exc:
        fail(f"cannot parse the overrides: {_one_line(exc)}")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            grid_checked = False
            while variants:
                parsed = variants.pop(0)
                cfg = _compose_or_explain(config_name, parsed)
                try:
                    check_composed(cfg, config_name)
                    check_wandb_login(cfg.get("logger"))  # logger.mode=online needs credentials
                except CspexpError as exc:
                    fail(str(exc))
                if not grid_checked and any(a in MULTIRUN_FLAGS for a in argv):
                    grid_checked = True  # the configured grid of a multirun: its values too
                    grid = _sweeper_params(cfg)
                    if grid:
                        variants += _variants([o.input_line for o in parsed] + grid)
            try:  # the run (or sweep) dir Hydra creates next must be writable
                check_output_dirs(config_name, overrides, any(a in MULTIRUN_FLAGS for a in argv))
            except CspexpError as exc:
                fail(str(exc))
    finally:
        GlobalHydra.instance().clear()


def _compose_or_explain(config_name: str, parsed: list) -> DictConfig:
    """The config composed with the (sweep-free) overrides `parsed`; on failure, exit with one line
    that names the culprit."""
    try:
        return compose(config_name=config_name, overrides=[o.input_line for o in parsed])
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        error = exc
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


def _one_line(exc: BaseException) -> str:
    parts = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # Hydra appends the search path and a HYDRA_FULL_ERROR hint: noise for this message.
    parts = [p for p in parts if not p.startswith(("Config search path", "provider=", "Set the environment"))]
    return "; ".join(parts)

