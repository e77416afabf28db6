"""The teacher's inputs of a step: the template's privileged contexts, rewritten by the targets.

`TeacherPrompts` turns a batch, its rollouts and their verdicts into the teacher's prompts
(`TeacherInputs`): the template (`lightning_caopd.templates.TeacherTemplate`) gives one context
per group or one per rollout (SDPO), and the confidence-target policy
(`lightning_caopd.calibration`) rewrites each with its group's P_acc.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from lightning_caopd.calibration import ConfidenceTargets
from lightning_caopd.rollout import encode_chats
from lightning_caopd.tasks.base import Task
from lightning_caopd.templates import TeacherTemplate


@dataclass
class TeacherInputs:
    """The teacher's prompts for one step and what building them counted.

    Attributes:
        prompts: B prompts (one context per group) or B*K (one per rollout, ``sdpo_sibling``).
        rows: (B*K,) bool, the rollouts whose teacher sees a privileged solution (False: no
            successful sibling).
        note_rows: (B*K,) bool, rollouts without a sibling that still count in the loss, their
            teacher seeing the CaOPD note alone (``targets.note_only_rows``).
        fallbacks: groups that fell back to the demonstration (``correct_solution``).
        n_cut: teacher prompts cut to ``max_prompt_length``.
    """

    prompts: list[list[int]]
    rows: torch.Tensor
    note_rows: torch.Tensor
    fallbacks: int
    n_cut: int

    @property
    def in_loss(self) -> torch.Tensor:
        """(B*K,) bool, the rollouts that count in the loss."""
        return self.rows | self.note_rows


@dataclass
class TeacherPrompts:
    """Template + confidence targets -> the teacher's inputs (the step's 4th line).

    A rollout without a context (no successful sibling) gets the student's own prompt as a
    placeholder and leaves the loss (``rows``), or, where the policy keeps such rows
    (``note_only_rows``), gets a teacher prompt with the note alone and stays in the loss
    (``note_rows``).

    Args:
        template: how the privileged context enters the teacher's prompt.
        targets: the confidence-target policy (OPD's or CaOPD's).
        task: gives the student's messages of an item.
        tokenizer: encodes the chats.
        max_prompt_length: longer teacher prompts are cut (None: no limit).
        chat_template_kwargs: keyword arguments of every chat-template call.
    """

    template: TeacherTemplate
    targets: ConfidenceTargets
    task: Task
    tokenizer: PreTrainedTokenizerBase
    max_prompt_length: int | None = None
    chat_template_kwargs: dict = field(default_factory=dict)

    def __call__(
        self, batch: list[dict], texts: list[str], correct: torch.Tensor, p_acc: torch.Tensor
    ) -> TeacherInputs:
        """The teacher's prompts for the B items of `batch` and their B*K rollout `texts`.

        Args:
            batch: the B items.
            texts: the B*K rollout texts, prompt-major.
            correct: (B*K,) their verdicts.
            p_acc: (B,) P_acc per prompt.
        """
        k = len(texts) // len(batch)
        share = 1 if self.template.per_rollout else k  # rollouts each context serves
        chats, rows, note_rows, fallbacks = [], [], [], 0
        note_only = self.targets.note_only_rows
        for b, item in enumerate(batch):
            group = slice(b * k, (b + 1) * k)
            verdicts = correct[group].tolist()
            contexts, fell_back = self.template.contexts(item, texts[group], verdicts)
            fallbacks += fell_back
            p, student_chat = p_acc[b].item(), self.task.student_messages(item)
            note = self.targets.teacher_note(p)
            for context in contexts:  # one per group, or one per rollout
                rows.extend([context is not None] * share)
                note_rows.extend([context is None and note_only] * share)
                chats.append(self.chat(student_chat, context, p, note))
        prompts, n_cut = encode_chats(
            self.tokenizer,
            chats,
            self.max_prompt_length,
            chat_template_kwargs=self.chat_template_kwargs,
        )
        return TeacherInputs(
            prompts,
            torch.tensor(rows, dtype=torch.bool),
            torch.tensor(note_rows, dtype=torch.bool),
            fallbacks,
            n_cut,
        )

    def chat(self, student_chat: list[dict], context: str | None, p: float, note: str):
        """One teacher chat: the context rewritten for P_acc `p`, the note alone, or none."""
        if context is not None:
            context = self.targets.teacher_context(context, p)
            return self.template.messages(student_chat, context, note)
        if self.targets.note_only_rows:
            return self.template.note_only_messages(student_chat, note)
        return student_chat  # a placeholder: the row leaves the loss
