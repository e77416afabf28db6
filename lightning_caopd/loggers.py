"""How each Lightning logger takes what is not a scalar: images, histograms, rollout tables.

W&B gets an image, a histogram and a ``wandb.Table``; TensorBoard an image, a histogram and a
markdown text; the CSV logger a ``rollouts.csv`` in its ``log_dir`` (its run directory already
holds ``reliability.png``). The callbacks (`lightning_caopd.callbacks`) decide when.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

ROLLOUT_COLUMNS = ["step", "prompt", "completion", "answer", "confidence", "correct", "p_acc"]
ROLLOUTS_CSV = "rollouts.csv"


def logs_step(trainer, step: int) -> bool:
    """Whether the loggers get what optimizer step `step` (0-based) logs.

    Lightning sends the logged values to the loggers after every `trainer.log_every_n_steps`-th
    optimizer step (steps n - 1, 2n - 1, ...; its logger connector's ``should_update_logs``);
    what is logged at another step reaches no logger, so the step's scalars and the callbacks'
    per-step values are computed and logged only at these steps.
    """
    n = trainer.log_every_n_steps
    return bool(trainer.fast_dev_run or trainer.should_stop or (n > 0 and (step + 1) % n == 0))


def takes_media(loggers: list[Logger]) -> bool:
    """Whether any of `loggers` shows images and histograms (W&B, TensorBoard)."""
    return any(isinstance(lg, WandbLogger | TensorBoardLogger) for lg in loggers)


@rank_zero_only
def log_image(loggers: list[Logger], key: str, image: np.ndarray, step: int) -> None:
    """An (H, W, 3) image to every logger that takes images."""
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            lg.log_image(key, [image], step=step)
        elif isinstance(lg, TensorBoardLogger):
            lg.experiment.add_image(key, image, step, dataformats="HWC")


@rank_zero_only
def log_histogram(loggers: list[Logger], key: str, values: torch.Tensor, step: int) -> None:
    """A histogram of `values` to every logger that takes histograms (W&B, TensorBoard)."""
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            import wandb

            lg.experiment.log({key: wandb.Histogram(values.numpy()), "trainer/global_step": step})
        elif isinstance(lg, TensorBoardLogger):
            lg.experiment.add_histogram(key, values, step)


@rank_zero_only
def log_rollouts(loggers: list[Logger], rows: list[list], step: int) -> None:
    """Rollout rows to W&B (a table), TensorBoard (markdown text) and CSV (``rollouts.csv``)."""
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            lg.log_table("train/rollouts", columns=ROLLOUT_COLUMNS, data=rows, step=step)
        elif isinstance(lg, TensorBoardLogger):
            lg.experiment.add_text("train/rollouts", _markdown(rows), step)
        elif isinstance(lg, CSVLogger):
            path = Path(lg.log_dir) / ROLLOUTS_CSV
            path.parent.mkdir(parents=True, exist_ok=True)
            new = not path.exists()
            with path.open("a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(ROLLOUT_COLUMNS)
                writer.writerows(rows)


def _markdown(rows: list[list]) -> str:
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", "<br>")

    head = ["| " + " | ".join(ROLLOUT_COLUMNS) + " |", "|" + "---|" * len(ROLLOUT_COLUMNS)]
    return "\n".join(head + ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows])


@rank_zero_only
def finish_loggers(loggers: list[Logger]) -> None:
    """Close each W&B run, so the next run of a multirun in this process starts its own."""
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()  # a no-op when no run was started
