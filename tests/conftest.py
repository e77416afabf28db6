"""Shared fixtures: Hydra configs composed once and shrunk to seconds on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# Small end-to-end settings: few items, short evaluations, two steps.
TINY = [
    "trainer.max_steps=2",
    "data.num_train=16",
    "data.num_eval=24",
    "data.batch_size=2",
    "data.eval_batch_size=12",
    "method.rollout.num_rollouts=2",
    "logger=csv",
    "callbacks=minimal",
]


@pytest.fixture(autouse=True, scope="session")
def _threads():
    # the suite runs on 2 cores; one thread per test avoids oversubscription
    torch.set_num_threads(1)


def compose_cfg(overrides: list[str], output_dir: Path, config_name: str = "train") -> DictConfig:
    """Compose conf/<config_name>.yaml with `overrides`, outputs under `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.cache_dir = str(output_dir / "cache")
            cfg.paths.root_dir = str(output_dir)
    return cfg


@pytest.fixture(scope="session")
def toy_base(tmp_path_factory) -> Path:
    """A toy base student warmed up for a few steps (not trained to any skill)."""
    from lightning_caopd.runner import run

    out = tmp_path_factory.mktemp("toy_base")
    path = out / "base"
    cfg = compose_cfg(
        ["experiment=toy_base", "trainer.max_steps=3", "data.dataset.n=96", "data.num_eval=12",
         f"method.save_dir={path}", "logger=csv", "callbacks=minimal"],
        out / "run",
    )
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        run(cfg)
    return path


@pytest.fixture
def tiny_overrides() -> list[str]:
    """`TINY`: overrides that shrink a run to seconds (few items, short evaluation, 2 steps)."""
    return list(TINY)


@pytest.fixture
def make_cfg():
    """`compose_cfg(overrides, output_dir, config_name="train")`: a composed, shrinkable config."""
    return compose_cfg
