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

from lightning_caopd.checkpointing import untouched_rng
from lightning_caopd.models import plain_teacher
from lightning_caopd.rollout import Rollouts, sample
from lightning_caopd.scoring import EvalBatch, teacher_conditioned
from lightning_caopd.sharding import gathered


class TeacherDiagnostics:
    """Mixin of `lightning_caopd.module.DistillationModule`: the teacher scored and sampled.

    Uses the module's ``teacher``, ``template``, ``task``, ``tokenizer``, ``rollout``,
    ``engine``, ``eval_cfg``, ``teacher_scores`` and `StudentSystem.score`.
    """

    def validation_step(self, batch: list[dict], batch_idx: int) -> None:  # noqa: D102
        super().validation_step(batch, batch_idx)
        if self.eval_cfg.teacher_conditioned:
            self.teacher_scores.update(self.evaluate_teacher(batch))

    def on_validation_epoch_end(self) -> None:  # noqa: D102
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

    def teacher_chat(self, item: dict) -> list[dict]:
        """The teacher's messages for `item` at evaluation: the student's, with the demonstration.

        OPD's teacher-conditioned target: the demonstration with the template's confidence line
        whatever ``template.source`` (no rollouts to draw a solution or sibling from), and no
        CaOPD note or replacement.
        """
        return self.template.messages(
            self.task.student_messages(item), self.template.demonstration(item)
        )

    def evaluate_teacher(self, items: list[dict]) -> EvalBatch:
        """The teacher's answers to `items` with the privileged context (`teacher_chat`).

        Scored as the student's (`StudentSystem.score`, greedy by default) on the same items;
        every random generator is left as it was, so training does not see it.
        """
        chats = [self.teacher_chat(it) for it in items]
        with untouched_rng(), plain_teacher(self.teacher) as model:
            return self.score(model, items, chats)

    def sample_teacher(self, prompts: list[list[int]]) -> Rollouts:
        """The teacher's own rollouts on a step's teacher prompts, with its rollout settings.

        K per prompt when there is one prompt per group (B prompts), one per prompt when there
        is one per rollout (B*K, ``sdpo_sibling``): B*K rows, prompt-major, as the student's.
        Sampled from the teacher itself (no engine) under ``no_grad``, with every random
        generator saved and restored, so the run's later draws are those of a run without it.
        """
        r = self.rollout
        k = 1 if self.template.per_rollout else r.num_rollouts
        with untouched_rng(), plain_teacher(self.teacher) as model, gathered(model):
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
