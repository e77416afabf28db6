"""The training step (`lightning_caopd.module`) on overlong prompts and unfinished rollouts."""

import json
import math

import pytest
import torch

from lightning_caopd.runner import build, run
from lightning_caopd.tasks.toy import make_items
from tests.fixtures.runs import logged


def test_training_step_skips_overflowing_prompts(toy_base, tiny_overrides, make_cfg, tmp_path):
    overrides = [
        "experiment=opd",
        f"model.path={toy_base}",
        *tiny_overrides,
        "method.rollout.prompt_overflow=skip",
    ]
    module, _ = build(make_cfg([*overrides, "method.rollout.max_prompt_length=2"], tmp_path))
    batch = make_items(2, 0, "train", 0)
    assert module.training_step(batch, 0) is None  # every prompt is too long: no loss, no step
    module, _ = build(make_cfg([*overrides, "method.rollout.max_prompt_length=4096"], tmp_path))
    loss = module.training_step(batch, 0)["loss"]
    assert loss.requires_grad and torch.isfinite(loss)
    with pytest.raises(Exception, match="prompt_overflow='drop' is out of range"):
        build(make_cfg([*overrides, "method.rollout.prompt_overflow=drop"], tmp_path))


def test_training_on_length_limited_generations_without_confidence_lines(
    toy_base, tiny_overrides, make_cfg, tmp_path
):
    # one new token: every rollout hits the limit and none has an answer or confidence line
    cfg = make_cfg(
        [
            "experiment=caopd",
            f"model.path={toy_base}",
            *tiny_overrides,
            "method.rollout.max_new_tokens=1",
            "trainer.log_every_n_steps=1",
        ],
        tmp_path,
    )
    result = run(cfg)
    assert (
        result is not None
        and json.loads((tmp_path / "metrics.json").read_text())["run"]["steps"] == 2
    )
    assert logged(tmp_path, "train/format_rate") == [0.0, 0.0]
    assert logged(tmp_path, "train/truncated_frac") == [1.0, 1.0]
    assert logged(tmp_path, "train/rollout_accuracy") == [0.0, 0.0]
    assert all(math.isfinite(v) for v in logged(tmp_path, "train/loss"))
