"""Every config group option composes, and the pieces it names can be built (LHT's test_configs)."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from conftest import CONF_DIR


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_group_is_present():
    for group in ("model", "prune", "dataset", "metrics", "trainer", "logger", "paths", "hydra", "experiment"):
        assert options(group), f"conf/{group}/ has no option"


@pytest.mark.parametrize("group", ["model", "prune", "dataset", "metrics", "trainer", "logger", "paths", "experiment"])
def test_every_option_composes(compose_cfg, group):
    for option in options(group):
        cfg = compose_cfg(f"{group}={option}")
        assert cfg is not None
        if group == "experiment":
            assert cfg.model and cfg.prune and cfg.dataset


def test_buildable_groups_instantiate(compose_cfg, tmp_path):
    from cspexp.data import build_dataset
    from test_folder import write_folder
    from test_reasonseg import write_reasonseg
    from test_refcoco import write_refer

    data_root = write_folder(tmp_path / "folder")
    roots = {"folder": data_root, "reasonseg": write_reasonseg(tmp_path / "reasonseg"),
             "refcoco": write_refer(tmp_path / "refcoco")}

    cfg = compose_cfg("dataset.n=2")
    for option in options("prune"):
        instantiate(compose_cfg(f"prune={option}").prune).bind(8, 256)
    for option in options("dataset"):
        overrides = [f"dataset={option}", "dataset.n=2"]
        if option in roots:
            overrides.append(f"dataset.root={roots[option]}")
        assert len(build_dataset(compose_cfg(*overrides).dataset)) == 2
    from cspexp.metrics import SegIoU

    assert isinstance(instantiate(cfg.metrics), SegIoU)
    for option in options("trainer"):
        tcfg = compose_cfg(f"trainer={option}").trainer
        assert tcfg._target_ == "lightning.pytorch.Trainer"
    instantiate(compose_cfg("trainer=cpu").trainer, logger=False)
    for option in options("logger"):
        lcfg = compose_cfg(f"logger={option}").logger
        if lcfg and "_target_" in lcfg:
            instantiate(lcfg)
