"""The teacher side of the paper's diagnosis (arXiv 2604.16830), for `DistillationModule`.

Teacher-conditioned success is not a valid target for deployment-time confidence: the
privileged context lowers the teacher's entropy and lifts its success above what the student
can reach without it. `TeacherDiagnostics` measures both: every evaluation also scores the
teacher *with* the privileged context (``metrics.json``'s ``teacher_conditioned`` block,
``eval.teacher_conditioned``), and `sample_teacher` serves the
`lightning_caopd.callbacks.TeacherSuccess` callback during training. Neither touches the run's
random state.
"""

from __future__ import annotations

from typing import Protocol

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_caopd.checkpointing import untouched_rng
from lightning_caopd.engines import RolloutEngine
from lightning_caopd.rollout import Rollouts, sample
from lightning_caopd.scoring import EvalBatch, EvalScores, teacher_conditioned
from lightning_caopd.settings import RolloutSettings
from lightning_caopd.sharding import gathered
from lightning_caopd.step.teacher import Teacher
from lightning_caopd.tasks.base import Task
from lightning_caopd.templates import TeacherTemplate


class DiagnosticsHost(Protocol):
    """What `TeacherDiagnostics` reads from the system it is mixed into.

    Attributes:
        teacher: the frozen teacher, run as a causal LM (`Teacher.running`).
        template: gives the teacher's evaluation context (the demonstration).
        task: the student's messages of an item.
        tokenizer: encodes the teacher's prompts.
        rollout: the sampling settings of the teacher's own rollouts.
        engine: the rollout engine (whether it decodes with ``generate``).
        eval_cfg: the evaluation options (``teacher_conditioned``).
        teacher_scores: accumulates the teacher's evaluation.
        evaluation: the student's evaluation result, where the teacher's block is added.
    """

    teacher: Teacher
    template: TeacherTemplate
    task: Task
    tokenizer: PreTrainedTokenizerBase
    rollout: RolloutSettings
    engine: RolloutEngine
    eval_cfg: dict
    teacher_scores: EvalScores
    evaluation: dict | None

    def score(
        self, model: PreTrainedModel, items: list[dict], chats: list[list[dict]] | None = None
    ) -> EvalBatch:
        """`lightning_caopd.module.StudentSystem.score`: `items` answered by `model`, scored."""

    def log_dict(self, dictionary: dict, **kwargs) -> None:
        """Lightning's ``LightningModule.log_dict``."""


class TeacherDiagnostics:
    """Mixin of `lightning_caopd.module.DistillationModule`: the teacher scored and sampled.

    Its methods read only what `DiagnosticsHost` names.
    """

    def validation_step(self: DiagnosticsHost, batch: list[dict], batch_idx: int) -> None:  # noqa: D102
        super().validation_step(batch, batch_idx)
        if self.eval_cfg.teacher_conditioned:
            self.teacher_scores.update(self.evaluate_teacher(batch))

    def on_validation_epoch_end(self: DiagnosticsHost) -> None:  # noqa: D102
        super().on_validation_epoch_end()
        if not self.eval_cfg.teacher_conditioned:
            return
        block = teacher_conditioned(self.teacher_scores.compute(), self.evaluation)
        self.teacher_scores.reset()
        self.evaluation["teacher_conditioned"] = block
        self.log_dict(
            {f"val/teacher_conditioned/{k}": float(v) for k, v in block.items() if v is not None},
            sync_dist=False,  # already synced by the metrics
        )

    def teacher_chat(self: DiagnosticsHost, item: dict) -> list[dict]:
        """The teacher's messages for `item` at evaluation: the student's, with the demonstration.

        OPD's teacher-conditioned target: the demonstration with the template's confidence line
        whatever ``template.source`` (no rollouts to draw a solution or sibling from), and no
        CaOPD note or replacement.
        """
        return self.template.messages(
            self.task.student_messages(item), self.template.demonstration(item)
        )

    def evaluate_teacher(self: DiagnosticsHost, items: list[dict]) -> EvalBatch:
        """The teacher's answers to `items` with the privileged context (`teacher_chat`).

        Scored as the student's (`StudentSystem.score`, greedy by default) on the same items;
        every random generator is left as it was, so training does not see it.
        """
        chats = [self.teacher_chat(it) for it in items]
        with untouched_rng(), self.teacher.running() as model:
            return self.score(model, items, chats)

    def sample_teacher(self: DiagnosticsHost, prompts: list[list[int]]) -> Rollouts:
        """The teacher's own rollouts on a step's teacher prompts, with its rollout settings.

        K per prompt when there is one prompt per group (B prompts), one per prompt when there
        is one per rollout (B*K, ``sdpo_sibling``): B*K rows, prompt-major, as the student's.
        Sampled from the teacher itself (no engine) under ``no_grad``, with every random
        generator saved and restored, so the run's later draws are those of a run without it.
        """
        r = self.rollout
        k = 1 if self.template.per_rollout else r.num_rollouts
        with untouched_rng(), self.teacher.running() as model, gathered(model):
            return sample(
                model,
                self.tokenizer,
                prompts,
                k,
                r.max_new_tokens,
                r.temperature,
                r.top_p,
                use_generate=getattr(self.engine, "use_generate", False),
            )
