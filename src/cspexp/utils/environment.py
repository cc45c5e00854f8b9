"""What a run needs from the machine, checked before anything is built: output directories it can
write, and W&B credentials when it logs online.

- **Run and sweep directories.** Hydra creates ``hydra.run.dir`` (one run) or ``hydra.sweep.dir``
  (``-m``) before cspexp's task starts, so an unwritable one would end in Hydra's traceback.
  `check_output_dirs` resolves the directory from the composed config (``${now:…}``, ``${hydra:…}``
  and all) and is called by the pre-flight check; `OutputDirCheck`, a Hydra callback in
  ``conf/hydra/default.yaml``, checks the directory Hydra itself resolved, just before Hydra creates
  it — the runs the pre-flight check leaves to Hydra (``--config-name`` …) or could not resolve.
- **W&B online.** ``logger.mode=online`` without credentials would end in wandb's ``UsageError``
  after the model loaded; `check_wandb_login` looks the credentials up the way wandb does
  (environment, netrc, settings files; no network) and says how to log in.

Each failure is one `OutputError` / `ConfigError` line, reported by `cspexp.utils.failures`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cspexp.utils.errors import ConfigError, OutputError

RUN_DIR, SWEEP_DIR = "hydra.run.dir", "hydra.sweep.dir"


# --------------------------------------------------------------------------- output directories
def unwritable(path: str | Path) -> str | None:
    """Why the directory `path` cannot be created or written by this process, or None if it can.
    Looks only (creates nothing): the nearest part of `path` that exists must be a directory this
    user may write to."""
    path = Path(os.path.abspath(path))
    existing = next(p for p in (path, *path.parents) if os.path.lexists(p))
    if not existing.is_dir():
        return f"{existing} is not a directory" if existing != path else "it exists and is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return "it is not writable" if existing == path else f"{existing} is not writable"
    return None


def check_output_dir(key: str, path: str | Path) -> None:
    """Raise an `OutputError` naming `key`=`path` if the directory cannot be written."""
    reason = unwritable(path)
    if reason is not None:
        raise OutputError(f"{key}={path} cannot be used: {reason}; set {key}= to a directory you can write to")


def output_dir_key(multirun: bool) -> str:
    return SWEEP_DIR if multirun else RUN_DIR


def resolve_output_dir(cfg: DictConfig, key: str) -> str | None:
    """`key` of the composed config `cfg` (with its ``hydra`` node), resolved with `cfg` as Hydra's
    config; None if it cannot be resolved here (Hydra then resolves or reports it itself)."""
    from hydra.core.hydra_config import HydraConfig

    holder = HydraConfig.instance()
    previous = holder.cfg
    try:
        holder.set_config(cfg)
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
    except Exception:  # noqa: BLE001 — OmegaConf and Hydra's resolvers raise several kinds
        return None
    finally:
        holder.cfg = previous
    return None if value is None else str(value)


def _one_value_each(overrides: list[str]) -> list[str]:
    """`overrides` with each sweep (``a=1,2``, ``range(…)``) reduced to its first value; sweeps only
    the sweeper can list (``glob(…)``) are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for o in parser.parse_overrides(overrides):
        if not o.is_sweep_override():
            out.append(o.input_line)
            continue
        try:
            out.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
        except Exception:  # noqa: BLE001 — Hydra raises several kinds; the sweeper reports them
            continue
    return out


def check_output_dirs(config_name: str, overrides: list[str], multirun: bool) -> None:
    """The run dir (or, with `multirun`, the sweep dir) of `config_name` composed with the command
    line's `overrides` must be writable (an `OutputError` otherwise). Call inside Hydra's
    ``initialize_config_dir``, after the overrides were checked; a directory that cannot be resolved
    here is left to `OutputDirCheck`."""
    from hydra import compose

    try:
        cfg = compose(config_name=config_name, overrides=_one_value_each(overrides), return_hydra_config=True)
    except Exception:  # noqa: BLE001 — the override checks report composition errors; Hydra reports the rest
        return
    key = output_dir_key(multirun)
    path = resolve_output_dir(cfg, key)
    if path is not None:
        check_output_dir(key, path)


class OutputDirCheck(Callback):
    """Hydra callback: the run (or sweep) dir Hydra resolved must be writable, checked just before
    Hydra creates it. One line and exit status 2 otherwise (`cspexp.utils.failures.fail`)."""

    def _check(self, config: DictConfig, key: str) -> None:
        from cspexp.utils.failures import fail

        path = resolve_output_dir(config, key)
        if path is None:
            return  # Hydra's own error follows
        try:
            check_output_dir(key, path)
        except OutputError as exc:
            fail(str(exc))

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, RUN_DIR)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, SWEEP_DIR)


# --------------------------------------------------------------------------- W&B
WANDB_LOGGERS = ("lightning.pytorch.loggers.WandbLogger", "lightning.pytorch.loggers.wandb.WandbLogger",
                 "pytorch_lightning.loggers.WandbLogger")
ONLINE_MODES = ("online", "run", "shared")  # the wandb modes that talk to a server


def wandb_mode(logger_cfg: Mapping) -> str:
    """The mode wandb.init will run in: ``logger.mode`` when set (its default in conf/logger/wandb.yaml
    is ``$WANDB_MODE``, else offline) — wandb lets ``wandb.init(mode=…)`` win over the environment —
    and otherwise wandb's own setting (``WANDB_MODE``, its settings files; online by default)."""
    mode = logger_cfg.get("mode")
    if mode is not None:
        return str(mode)
    from wandb.sdk import wandb_setup

    return str(wandb_setup.singleton().settings.mode)


def wandb_credentials() -> bool:
    """Whether wandb finds credentials without asking: ``WANDB_API_KEY`` (or an identity token
    file), a netrc entry for its host, or its settings. No network call, nothing written."""
    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth
    except ImportError:  # wandb before wbauth: the API key lookup of wandb.sdk.lib.apikey
        from wandb.sdk.lib import apikey

        return bool(apikey.api_key())
    host = wandb_setup.singleton().settings.base_url
    auth = wbauth.authenticate_session(host=host, source="cspexp", prompt=False, update_session=False)
    return auth is not None


def check_wandb_login(logger_cfg) -> None:
    """A W&B logger that will run online needs credentials: a ConfigError saying how to log in, or
    to log offline, before anything is built. Other loggers and modes pass."""
    if not isinstance(logger_cfg, Mapping | DictConfig) or str(logger_cfg.get("_target_", "")) not in WANDB_LOGGERS:
        return
    mode = wandb_mode(logger_cfg)
    if mode not in ONLINE_MODES:
        return
    try:
        found = wandb_credentials()
    except Exception as exc:  # noqa: BLE001 — wandb's AuthenticationError: credentials set but malformed
        raise ConfigError(f"logger.mode={mode}: the W&B credentials are not usable ({exc}); fix them with "
                          "`wandb login --relogin` or WANDB_API_KEY, or use logger.mode=offline") from None
    if not found:
        raise ConfigError(f"logger.mode={mode} needs a W&B login and none is configured (no WANDB_API_KEY, no netrc "
                          "entry): run `wandb login` or set WANDB_API_KEY, or use logger.mode=offline "
                          "(and `wandb sync` the run later)")
