"""Every config under conf/ composes, and every `_target_` in it binds its arguments.

Nothing is instantiated (no weights are loaded): each `_target_` is located and its keyword
arguments are bound to its signature, so a renamed or misspelt argument fails here rather than
at the start of a long run.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from tests.conftest import CONF_DIR, compose_cfg

GROUPS = [
    "model", "data", "method", "trainer", "logger", "callbacks", "paths", "experiment", "debug"
]
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# Hydra plugins behind the `sweep` extra
PLUGINS = {"launcher/joblib_local": "hydra_plugins.hydra_joblib_launcher",
           "launcher/slurm": "hydra_plugins.hydra_submitit_launcher",
           "sweeper/optuna_lr_k": "hydra_plugins.hydra_optuna_sweeper"}


def _options(group: str) -> list[str]:
    root = Path(CONF_DIR) / group
    # `_name.yaml` files are shared blocks that other options include, not options themselves
    return sorted(
        str(p.relative_to(root).with_suffix(""))
        for p in root.rglob("*.yaml")
        if not p.name.startswith("_")
    )


def _targets(node, path: str = "") -> list[tuple[str, DictConfig]]:
    """(key path, node) for every node with a `_target_`, depth first."""
    found = []
    if isinstance(node, DictConfig):
        if "_target_" in node:
            found.append((path or "<root>", node))
        for key in node:
            if key != "hydra":
                found += _targets(node._get_node(key), f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, child in enumerate(node):
            found += _targets(child, f"{path}[{i}]")
    return found


def _check_binds(cfg: DictConfig) -> int:
    """Bind every `_target_`'s config keys to its signature; returns how many were checked."""
    targets = _targets(cfg)
    for path, node in targets:
        target = get_object(node._target_)
        kwargs = {k: None for k in node if k not in HYDRA_KEYS}
        sig = inspect.signature(target)
        try:
            sig.bind_partial(**kwargs)
        except TypeError as err:
            raise AssertionError(
                f"{path}: {node._target_} does not take {sorted(kwargs)}: {err}"
            ) from err
    return len(targets)


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g in GROUPS for o in _options(g)], ids=lambda s: s
)
def test_config_composes_and_binds(override, tmp_path):
    cfg = compose_cfg([override], tmp_path)
    OmegaConf.to_container(cfg, resolve=False)  # every node is valid YAML/OmegaConf
    assert _check_binds(cfg) >= 4  # model, data, method and trainer at the least


@pytest.mark.parametrize("option", sorted(PLUGINS))
def test_hydra_plugin_configs_compose(option, tmp_path):
    importlib.import_module(PLUGINS[option])  # the `sweep` extra, which `make test` installs
    group, name = option.split("/")
    cfg = compose_cfg([f"hydra/{group}={name}"], tmp_path)
    assert cfg.hydra[group]._target_


def test_bind_check_catches_a_wrong_argument(tmp_path):
    cfg = compose_cfg(["method=opd", "+method.num_rolouts=4"], tmp_path)  # misspelt
    with pytest.raises(AssertionError, match="num_rolouts"):
        _check_binds(cfg)
