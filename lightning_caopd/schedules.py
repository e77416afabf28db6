"""Learning-rate schedules that need the run's length (the paper's warm-up then cosine decay)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_cosine_schedule_with_warmup

from lightning_caopd.checks import check_number
from lightning_caopd.errors import ConfigError


def warmup_cosine(
    optimizer: Optimizer, total_steps: int | None = None, warmup_ratio: float = 0.1
) -> LambdaLR:
    """Linear warm-up over ``ceil(warmup_ratio * total_steps)`` steps, then cosine decay to 0.

    The schedule of the released CaOPD code (``main.py``: ``warmup_ratio=0.1``,
    ``lr_scheduler_type="cosine"``), which transformers builds the same way
    (``get_cosine_schedule_with_warmup``, warm-up steps rounded up).

    Args:
        optimizer: the optimizer whose learning rate it scales.
        total_steps: optimizer steps of the run; ``null`` in a config is filled in by
            ``StudentSystem.configure_optimizers`` with the trainer's estimate.
        warmup_ratio: the share of the steps spent warming up, in [0, 1).

    Raises:
        ConfigError: `total_steps` is unknown or below 1, or `warmup_ratio` is out of range.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> sched = warmup_cosine(opt, total_steps=10)
        >>> [round(sched.lr_lambdas[0](step), 3) for step in (0, 1, 6)]
        [0.0, 1.0, 0.413]
    """
    if total_steps is None or isinstance(total_steps, bool) or not 1 <= total_steps < math.inf:
        raise ConfigError(
            f"The warm-up + cosine schedule needs the run's optimizer steps; got total_steps="
            f"{total_steps!r}. Set trainer.max_steps (or max_epochs), or "
            "method.scheduler.total_steps."
        )
    check_number("method.scheduler.warmup_ratio", warmup_ratio, 0, 1, open_high=True)
    warmup = math.ceil(warmup_ratio * total_steps)
    return get_cosine_schedule_with_warmup(optimizer, warmup, int(total_steps))
