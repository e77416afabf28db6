"""Every config under conf/ composes, and every `_target_` in it binds its arguments.

Nothing is instantiated (no weights are loaded): each `_target_` is located and its keyword
arguments are bound to its signature, so a renamed or misspelt argument fails here rather than
at the start of a long run. The sweep configs, the paper's experiments and its model configs
carry the values the paper's runs need.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from tests.fixtures.configs import CONF_DIR

GROUPS = [
    "model",
    "data",
    "method",
    "trainer",
    "logger",
    "callbacks",
    "paths",
    "experiment",
    "debug",
]
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# Hydra plugins behind the `sweep` extra
PLUGINS = {
    "launcher/joblib_local": "hydra_plugins.hydra_joblib_launcher",
    "launcher/slurm": "hydra_plugins.hydra_submitit_launcher",
    "sweeper/optuna_lr_k": "hydra_plugins.hydra_optuna_sweeper",
}


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
def test_config_composes_and_binds(override, make_cfg, tmp_path):
    cfg = make_cfg([override], tmp_path)
    OmegaConf.to_container(cfg, resolve=False)  # every node is valid YAML/OmegaConf
    assert _check_binds(cfg) >= 4  # model, data, method and trainer at the least


@pytest.mark.parametrize("option", sorted(PLUGINS))
def test_hydra_plugin_configs_compose(option, make_cfg, tmp_path):
    importlib.import_module(PLUGINS[option])  # the `sweep` extra, which `make test` installs
    group, name = option.split("/")
    cfg = make_cfg([f"hydra/{group}={name}"], tmp_path)
    assert cfg.hydra[group]._target_


def test_bind_check_catches_a_wrong_argument(make_cfg, tmp_path):
    cfg = make_cfg(["method=opd", "+method.num_rolouts=4"], tmp_path)  # misspelt
    with pytest.raises(AssertionError, match="num_rolouts"):
        _check_binds(cfg)


@pytest.mark.parametrize(
    "choice", ["hydra/launcher=joblib_local", "hydra/launcher=slurm", "hydra/sweeper=optuna_lr_k"]
)
def test_sweep_configs_compose(choice, make_cfg, tmp_path):
    cfg = make_cfg([choice], tmp_path)
    group = choice.split("=")[0].split("/")[1]
    node = cfg.hydra[group]
    assert node._target_.startswith("hydra_plugins.")
    if group == "sweeper":
        assert set(node.params) == {"method.optimizer.lr", "method.rollout.num_rollouts"}
        assert node.sampler.seed == cfg.seed


@pytest.mark.parametrize(
    "experiment", ["opd_science", "caopd_science", "opd_tooluse", "caopd_tooluse"]
)
def test_experiments_carry_the_paper_hyper_parameters(experiment, make_cfg, tmp_path):
    cfg = make_cfg([f"experiment={experiment}", "data.path=x"], tmp_path)
    m = cfg.method
    assert (m.rollout.num_rollouts, m.optimizer.lr, m.loss.divergence) == (8, 2e-5, "forward_kl")
    assert cfg.callbacks.teacher_ema.rate == 0.01
    r = m.rollout
    assert (m.loss.skip_first_tokens, r.max_prompt_length, r.max_new_tokens) == (3, 1024, 1024)
    assert cfg.data.batch_size * cfg.trainer.accumulate_grad_batches == 32
    assert m.targets._target_.endswith("CaOPD") == experiment.startswith("caopd")
    assert cfg.data.task._target_.endswith(
        "ScienceTask" if "science" in experiment else "ToolUseTask"
    )


@pytest.mark.parametrize(
    "name, hub",
    [
        ("qwen3_8b", "Qwen/Qwen3-8B"),
        ("qwen2_5_7b_instruct", "Qwen/Qwen2.5-7B-Instruct"),
        ("olmo3_7b_instruct", "allenai/Olmo-3-7B-Instruct"),
    ],
)
def test_paper_model_configs_compose_without_loading(name, hub, make_cfg, tmp_path):
    cfg = make_cfg(["experiment=caopd_tooluse", f"model={name}", "data.path=x"], tmp_path)
    assert (
        cfg.model.student.pretrained_model_name_or_path
        == hub
        == cfg.model.tokenizer.pretrained_model_name_or_path
    )
    assert cfg.model.student.dtype == "bfloat16" and cfg.model.teacher is None


def test_toy_base_model_with_another_domain_resolves(make_cfg, tmp_path):
    # model=tiny names its base by data.world_seed, which only the toy data configs have
    cfg = make_cfg(["model=tiny", "data=science", "data.path=rows.jsonl"], tmp_path)
    resolved = OmegaConf.to_container(cfg.model, resolve=True)
    assert resolved["path"].endswith("toy_base/world0")
    assert resolved["base"]["overrides"] == {"data.world_seed": 0}
    toy = make_cfg(["data.world_seed=3"], tmp_path)
    assert OmegaConf.to_container(toy.model, resolve=True)["path"].endswith("toy_base/world3")


def test_safe_prompt_length_and_multirun_dirs_named_by_overrides(make_cfg, tmp_path):
    cfg = make_cfg(["experiment=caopd", "seed=1", "data.num_eval=5"], tmp_path)
    assert cfg.method.rollout.max_prompt_length == 2048 and cfg.eval.max_prompt_length == 2048
    assert cfg.hydra.sweep.subdir == "data.num_eval=5,experiment=caopd,seed=1"
    named = make_cfg(["experiment=caopd", "data=science", "data.path=/x/rows.jsonl"], tmp_path)
    assert named.hydra.sweep.subdir == "data=science,experiment=caopd"  # paths left out
