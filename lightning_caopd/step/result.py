"""A training step's typed result, and what callbacks may read from the module.

`StepResult` is what `lightning_caopd.module.DistillationModule.training_step` computed beside
its loss: the module logs its `StepResult.scalars` and returns it to the callbacks as
``outputs["step"]``. `StudentView` and `DistillationView` name everything a callback may read
from the module (`lightning_caopd.callbacks`); nothing else is promised.
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from lightning_caopd.calibration import p_acc_stats
from lightning_caopd.confidence import parse_confidence
from lightning_caopd.rollout import Rollouts
from lightning_caopd.step.loss import LossOutput
from lightning_caopd.step.prompts import TeacherInputs
from lightning_caopd.step.teacher import Teacher
from lightning_caopd.tasks.base import Task


class StepResult:
    """One distillation step: its rollouts, verdicts, teacher inputs and loss (detached).

    A plain object with slots on purpose: Lightning walks every dict, list and dataclass a step
    returns (to detach its tensors), and these lists of token ids and texts cost it milliseconds
    a step.

    Attributes:
        items: the step's B items.
        rollouts: the B*K rollouts, prompt-major.
        correct: (B*K,) their verdicts.
        p_acc: (B,) the share correct per prompt.
        completions: the B*K training completions (token ids, after the confidence targets).
        teacher: the teacher's inputs (the prompts trained on, the rows in the loss).
        loss: the loss path's output, its tensors detached (``logits`` None when fused).
        n_cut: student prompts cut to ``max_prompt_length``.
        elapsed: the step's seconds so far.
        verifier_errors: completions whose verifier raised (scored 0), so far in this run.
        engine_sync_s: the rollout engine's last weight sync, in seconds.
    """

    __slots__ = (
        "items",
        "rollouts",
        "correct",
        "p_acc",
        "completions",
        "teacher",
        "loss",
        "n_cut",
        "elapsed",
        "verifier_errors",
        "engine_sync_s",
    )

    def __init__(
        self,
        items: list[dict],
        rollouts: Rollouts,
        correct: torch.Tensor,
        p_acc: torch.Tensor,
        completions: list[list[int]],
        teacher: TeacherInputs,
        loss: LossOutput,
        n_cut: int,
        elapsed: float,
        verifier_errors: int,
        engine_sync_s: float | None = None,
    ) -> None:
        self.items, self.rollouts, self.correct, self.p_acc = items, rollouts, correct, p_acc
        self.completions, self.teacher, self.n_cut = completions, teacher, n_cut
        logits = None if loss.logits is None else loss.logits.detach()
        self.loss = LossOutput(
            loss.loss.detach(), loss.per_token.detach(), loss.mask, logits, loss.correction
        )
        self.elapsed, self.verifier_errors, self.engine_sync_s = (
            elapsed,
            verifier_errors,
            engine_sync_s,
        )

    @property
    def texts(self) -> list[str]:
        """The B*K rollout texts, prompt-major."""
        return self.rollouts.texts

    @property
    def logits(self) -> torch.Tensor | None:
        """The student's (B*K, T, V) logits on the completions; None when fused."""
        return self.loss.logits

    @property
    def teacher_prompts(self) -> list[list[int]]:
        """The teacher prompts the step trained on (CaOPD's rewritten ones)."""
        return self.teacher.prompts

    @property
    def teacher_rows(self) -> torch.Tensor:
        """(B*K,) bool, the rollouts whose teacher saw a privileged solution."""
        return self.teacher.rows

    @property
    def rollouts_per_s(self) -> float:
        """Rollouts per second of the step."""
        return len(self.rollouts.texts) / self.elapsed

    def scalars(self) -> dict[str, torch.Tensor]:
        """The step's ``train/`` scalars: loss, divergence, rollout accuracy, P_acc, format, ..."""
        roll, loss, teacher = self.rollouts, self.loss, self.teacher
        formatted = [parse_confidence(t) is not None for t in roll.texts]
        stats = {
            "train/loss": loss.loss,
            "train/divergence": loss.per_token.sum() / loss.mask.sum().clamp(min=1),
            "train/rollout_accuracy": self.correct.float().mean(),
            "train/p_acc_mean": self.p_acc.mean(),
            "train/format_rate": torch.tensor(formatted, dtype=torch.float).mean(),
            "train/truncated_frac": torch.tensor(roll.truncated, dtype=torch.float).mean(),
            "train/no_correct_solution_frac": torch.tensor(teacher.fallbacks / len(self.items)),
            # rollouts left out of the loss for want of a successful sibling (SDPO)
            "train/sdpo_masked_frac": (~teacher.in_loss).float().mean(),
            "train/prompts_truncated": torch.tensor(float(self.n_cut + teacher.n_cut)),
            # completions whose verifier raised (scored 0), so far in this run
            "train/verifier_errors": torch.tensor(float(self.verifier_errors)),
            "train/rollouts_per_s": torch.tensor(self.rollouts_per_s),
            "train/tokens_per_s": torch.tensor(
                sum(len(c) for c in roll.completions) / self.elapsed
            ),
        }
        stats.update({f"train/{k}": torch.tensor(v) for k, v in p_acc_stats(self.p_acc).items()})
        if loss.correction:  # rollouts from another engine (vLLM): its sync and the weights
            stats["train/engine_sync_s"] = torch.tensor(self.engine_sync_s)
            stats.update(
                {f"train/is_{k}": torch.tensor(v) for k, v in loss.correction.items() if v == v}
            )
        return stats


class StudentView(Protocol):
    """What callbacks may read from any system (`lightning_caopd.module.StudentSystem`).

    Attributes:
        student: the trained model.
        tokenizer: its tokenizer.
        task: the domain (prompts, verifier, answer parsing).
        evaluation: the last evaluation's result (the keys of ``metrics.json``).
        evaluation_records: its scored completions.
    """

    student: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    task: Task
    evaluation: dict | None
    evaluation_records: list[dict]

    def log(self, name: str, value, **kwargs) -> None:
        """Lightning's ``LightningModule.log``."""

    def log_dict(self, dictionary: dict, **kwargs) -> None:
        """Lightning's ``LightningModule.log_dict``."""


class DistillationView(StudentView, Protocol):
    """What callbacks may read from a distillation system, beside `StudentView`.

    Attributes:
        teacher: the frozen teacher (`lightning_caopd.step.teacher.Teacher`).
    """

    teacher: Teacher

    def sample_teacher(self, prompts: list[list[int]]) -> Rollouts:
        """The teacher's own rollouts on a step's teacher prompts (random state untouched)."""

    def verify(self, batch: list[dict], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B*K,) verdicts of rollouts and (B,) P_acc."""
