"""What a run sends its loggers besides scalars: entropies, reliability images, rollout tables.

Each logger gets what it supports: W&B an image and a ``wandb.Table``, TensorBoard an image and a
markdown text, the CSV logger a ``rollouts.csv`` in its ``log_dir`` (its run directory already
holds ``reliability.png``). The module calls `Tracker`; the runner calls `finish_loggers`.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from lightning_caopd.confidence import confidence_span, parse_confidence, strip_confidence
from lightning_caopd.evaluation import char_offsets, span_tokens, token_entropy
from lightning_caopd.metrics import CalibrationMetrics
from lightning_caopd.report_plots import draw_reliability

ROLLOUT_COLUMNS = ["step", "prompt", "completion", "answer", "confidence", "correct", "p_acc"]
ROLLOUTS_CSV = "rollouts.csv"


def answer_confidence_tokens(ids: list[int], tokenizer) -> tuple[list[int], list[int]]:
    """Indices of a completion's answer tokens and of its confidence value's tokens.

    The same spans the evaluation scores (`lightning_caopd.evaluation.evaluate_items`): the
    answer is the text before the confidence statement, the confidence the parsed number.
    """
    text = tokenizer.decode(ids, skip_special_tokens=True)
    offsets = char_offsets(ids, tokenizer)
    answer = span_tokens(offsets, 0, len(strip_confidence(text).rstrip()))
    span = confidence_span(text)
    return answer, span_tokens(offsets, *span) if span else []


@torch.no_grad()
def rollout_entropies(
    logits: torch.Tensor, completions: list[list[int]], tokenizer
) -> dict[str, float]:
    """The student's mean token entropy (nats) on the answer and the confidence tokens of rollouts.

    Args:
        logits: (N, T, V) logits predicting each completion token (``logits[i, t]`` predicts
            ``completions[i][t]``).
        completions: N completion id lists.
        tokenizer: decodes the completions to find the spans.

    Returns:
        ``{"train/answer_entropy", "train/confidence_entropy"}``, token-weighted over the batch;
        a key is left out when no rollout has such tokens (nothing to average).
    """
    sums = {"answer": [0.0, 0], "confidence": [0.0, 0]}
    for i, ids in enumerate(completions):
        for name, idx in zip(sums, answer_confidence_tokens(list(ids), tokenizer), strict=True):
            if idx:  # entropy of these rows only: (len(idx), V), never (T, V) per rollout
                sums[name][0] += token_entropy(logits[i, idx]).sum().item()
                sums[name][1] += len(idx)
    return {f"train/{name}_entropy": s / n for name, (s, n) in sums.items() if n}


def reliability_bins(metrics: CalibrationMetrics) -> dict[str, list]:
    """The overall reliability diagram's bins as JSON-ready lists (None for an empty bin's means).

    Under DDP every rank must call this: the bins are gathered.
    """
    table = metrics.overall.metric("ece").reliability_table()
    return {
        k: [None if isinstance(x, float) and math.isnan(x) else x for x in v.tolist()]
        for k, v in table.items()
    }


def reliability_image(bins: dict[str, list], ece: float, title: str | None = None) -> np.ndarray:
    """The diagram as an (H, W, 3) uint8 array, drawn off-screen (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5.5), dpi=100)
    canvas = FigureCanvasAgg(fig)
    draw_reliability(bins, ece, fig.add_subplot(), title=title)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def rollout_rows(
    step: int,
    items: list[dict],
    task,
    texts: list[str],
    correct: torch.Tensor,
    p_acc: torch.Tensor,
    n_rows: int,
) -> list[list]:
    """Up to `n_rows` rollouts as table rows (`ROLLOUT_COLUMNS`), one per prompt before a second.

    Args:
        step: the global step.
        items: the B prompts' items.
        task: gives the student prompt and the parsed answer.
        texts: the B*K rollout texts, prompt-major.
        correct: (B*K,) verdicts.
        p_acc: (B,) P_acc per prompt.
        n_rows: rows to keep.
    """
    k = len(texts) // len(items)
    order = [b * k + j for j in range(k) for b in range(len(items))][:n_rows]
    rows = []
    for i in order:
        item = items[i // k]
        prompt = task.student_messages(item)[-1]["content"]
        conf = parse_confidence(texts[i])
        rows.append(
            [
                step,
                prompt,
                texts[i],
                task.parse_answer(texts[i]),
                conf,
                bool(correct[i]),
                round(float(p_acc[i // k]), 4),
            ]
        )
    return rows


class Tracker:
    """Per-step and per-evaluation extras for a module's loggers.

    Args:
        rollouts_every: log a table of sample rollouts every this many optimizer steps (0: never).
        rollout_rows: rows per table.
        entropy: log the student's entropy on answer and confidence tokens every step.
    """

    def __init__(
        self, rollouts_every: int = 50, rollout_rows: int = 8, entropy: bool = True
    ) -> None:
        if rollouts_every < 0 or rollout_rows < 1:
            raise ValueError(
                f"method.tracking needs rollouts_every >= 0 and rollout_rows >= 1; got "
                f"rollouts_every={rollouts_every}, rollout_rows={rollout_rows}."
            )
        self.rollouts_every = rollouts_every
        self.rollout_rows = rollout_rows
        self.entropy = entropy
        self._last_table_step = -1

    def step_stats(self, logits: torch.Tensor, completions: list[list[int]], tokenizer) -> dict:
        """Scalars for the step's log_dict (the entropies when switched on)."""
        if not self.entropy:
            return {}
        return {
            k: torch.tensor(v) for k, v in rollout_entropies(logits, completions, tokenizer).items()
        }

    def rollouts(self, module, items: list[dict], texts: list[str], correct, p_acc) -> None:
        """Log a table of this step's rollouts when the step is due (once per optimizer step)."""
        step = module.global_step
        if not self.rollouts_every or step % self.rollouts_every or step == self._last_table_step:
            return
        self._last_table_step = step
        rows = rollout_rows(step, items, module.task, texts, correct, p_acc, self.rollout_rows)
        log_rollouts(module.loggers, rows, step)

    def evaluation(self, module, result: dict) -> None:
        """Log the evaluation's reliability diagram (``result["reliability"]``) as an image."""
        if result.get("ece") is None or not any(
            isinstance(lg, WandbLogger | TensorBoardLogger) for lg in module.loggers
        ):
            return
        title = f"step {module.global_step}"
        log_image(
            module.loggers,
            "val/reliability",
            reliability_image(result["reliability"], result["ece"], title),
            module.global_step,
        )


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
