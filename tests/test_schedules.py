"""The warm-up + cosine schedule of the paper presets."""

import math

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from lightning_caopd.errors import ConfigError
from lightning_caopd.schedules import warmup_cosine


def _optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


@pytest.mark.parametrize("total", [1, 7, 10, 95])
def test_matches_transformers_with_ten_percent_warmup_rounded_up(total):
    ours = warmup_cosine(_optimizer(), total_steps=total, warmup_ratio=0.1)
    ref = get_cosine_schedule_with_warmup(_optimizer(), math.ceil(0.1 * total), total)
    for step in range(total + 1):
        assert ours.lr_lambdas[0](step) == pytest.approx(ref.lr_lambdas[0](step))
    assert ours.lr_lambdas[0](0) == 0.0
    if total > 1:  # one step is all warm-up
        assert ours.lr_lambdas[0](total) == pytest.approx(0.0)


@pytest.mark.parametrize("total, ratio", [(None, 0.1), (0, 0.1), (math.inf, 0.1), (10, 1.0)])
def test_unknown_length_or_bad_ratio_is_refused(total, ratio):
    with pytest.raises(ConfigError, match="total_steps|warmup_ratio"):
        warmup_cosine(_optimizer(), total_steps=total, warmup_ratio=ratio)
