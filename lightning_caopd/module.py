"""The OPD / CaOPD system: a trainable student and a frozen teacher in one LightningModule.

`DistillationModule.training_step` is the paper's algorithm box, one call per line; what
happens around the step (teacher EMA, the non-finite guard, rollout tables, entropies,
reliability diagrams, ``metrics.json``) is in `lightning_caopd.callbacks`.

The teacher side of the paper's diagnosis (the teacher scored with the privileged context) is the
`lightning_caopd.diagnostics.TeacherDiagnostics` mixin.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import lightning as L
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_caopd import reference
from lightning_caopd.calibration import ConfidenceTargets, empirical_accuracy, p_acc_stats
from lightning_caopd.checkpointing import RNG_KEY, rng_states, set_rng_states
from lightning_caopd.confidence import parse_confidence
from lightning_caopd.diagnostics import TeacherDiagnostics
from lightning_caopd.divergence import (
    OutputHead,
    divergence_loss,
    fused_linear_divergence,
    skip_first_tokens,
    topk_tail_loss,
)
from lightning_caopd.divergence.fused import target_log_probs
from lightning_caopd.divergence.importance import (
    sampled_log_probs,
    token_log_probs,
    truncated_importance_weights,
)
from lightning_caopd.engines import HFEngine, RolloutEngine
from lightning_caopd.errors import ConfigError
from lightning_caopd.loggers import logs_step
from lightning_caopd.models import (
    AdapterDisabledTeacher,
    causal_lm,
    make_teacher,
    run_body,
)
from lightning_caopd.rollout import (
    Rollouts,
    build_batch,
    completion_hidden,
    completion_logits,
    encode_chats,
    end_ids,
    right_pad,
    shared_prefix_hidden,
    shared_prefix_logits,
)
from lightning_caopd.scoring import EvalBatch, EvalScores, evaluate_items, gather_records
from lightning_caopd.settings import EvalSettings, LossSettings, RolloutSettings, from_config
from lightning_caopd.sharding import gathered, is_sharded, shard
from lightning_caopd.tasks.base import Task, task_scores
from lightning_caopd.templates import TeacherTemplate

FUSED_CHUNK_SIZE = 256  # positions per chunk of the fused divergence when loss.chunk_size is null


class StepOutputs:
    """What a training step hands the callbacks beside its loss (``outputs["step"]``).

    A plain object on purpose: Lightning walks every dict, list and dataclass a step returns
    (to detach its tensors), and these lists of token ids and texts cost it milliseconds a step.

    Attributes:
        items: the step's B items.
        texts: the B*K rollout texts, prompt-major.
        correct: (B*K,) their verdicts.
        p_acc: (B,) the share correct per prompt.
        completions: the B*K training completions (token ids, after the confidence targets).
        logits: the student's (B*K, T, V) logits on them, detached; None when fused.
        teacher_prompts: the teacher prompts the step trained on (CaOPD's rewritten ones).
        teacher_rows: (B*K,) bool, the rollouts in the loss.
    """

    __slots__ = (
        "items",
        "texts",
        "correct",
        "p_acc",
        "completions",
        "logits",
        "teacher_prompts",
        "teacher_rows",
    )

    def __init__(self, **fields) -> None:
        for name in self.__slots__:
            setattr(self, name, fields[name])


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


class StudentSystem(L.LightningModule):
    """What the OPD system, the warm-up and the evaluator share: the optimizer and evaluation.

    The evaluation (greedy, no privileged context) runs in Lightning's validation loop; its
    result, synced across ranks, is left in ``self.evaluation`` (a dict: the keys of
    ``metrics.json``, with ``n_parameters``, the student's parameter count) and its scored
    completions in ``self.evaluation_records``, for the callbacks that write and log them.

    Args:
        student: the model trained and scored.
        tokenizer: its tokenizer.
        task: the domain (prompts, verifier, categories).
        optimizer: a partial optimizer over the student's parameters (None: no training).
        scheduler: an optional partial LR scheduler over the optimizer (stepped per step).
        eval: the evaluation's settings (`lightning_caopd.settings.EvalSettings`, or a dict of
            some of them; None: the defaults).
        chat_template_kwargs: keyword arguments of every chat-template call (student,
            teacher, evaluation), from ``model.chat_template_kwargs``.
    """

    def __init__(
        self,
        student: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        task: Task,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        eval: EvalSettings | dict | None = None,  # noqa: A002 - the config key users write
        chat_template_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        # from_pretrained returns a model in eval mode; the student trains in train mode
        # (Lightning switches it to eval for the validation loop and back)
        self.student, self.tokenizer, self.task = student.train(), tokenizer, task
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.eval_cfg = from_config(EvalSettings, eval, "eval")
        self._eval_engine: RolloutEngine | None = None
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.val_scores = EvalScores(list(task.categories), self.eval_cfg.scoring)
        # counted before any strategy shards the weights; with LoRA, base and adapter together
        self.n_parameters = sum(p.numel() for p in student.parameters())
        self.evaluation: dict | None = None
        self.evaluation_records: list[dict] = []
        self._held = contextlib.ExitStack()  # whole weights held through an evaluation (FSDP)

    def sharded_models(self) -> list[torch.nn.Module]:
        """The models `configure_model` shards under ``trainer=fsdp``: the student."""
        return [self.student]

    def configure_model(self) -> None:
        """Shard the models under ``trainer=fsdp`` (`lightning_caopd.sharding.shard`).

        Lightning's ``ModelParallelStrategy`` calls this with its device mesh set; other
        strategies have none and nothing changes. Called again by each ``validate``/``fit``:
        models already sharded stay as they are.
        """
        mesh = self.device_mesh
        if mesh is None:
            return
        for model in self.sharded_models():
            if not is_sharded(model):
                shard(model, mesh["data_parallel"])

    def configure_optimizers(self):  # noqa: D102
        optimizer = self.optimizer_factory(params=self.student.parameters())
        if self.scheduler_factory is None:
            return optimizer
        factory = self.scheduler_factory
        # a schedule that needs the run's length and leaves it null gets the trainer's estimate
        keywords = getattr(factory, "keywords", {})
        if "total_steps" in keywords and keywords["total_steps"] is None:
            factory = functools.partial(
                factory, total_steps=self.trainer.estimated_stepping_batches
            )
        scheduler = factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:  # noqa: D102
        # Lightning saves weights, optimizer, scheduler, loop progress and callback states; the
        # generators the next step draws from (rollouts sample from torch's) complete the resume
        checkpoint[RNG_KEY] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:  # noqa: D102
        if RNG_KEY in checkpoint:
            set_rng_states(checkpoint[RNG_KEY])

    def on_validation_epoch_start(self) -> None:  # noqa: D102
        self.evaluation_records = []
        # sharded: the whole weights for the evaluation, so each rank generates on its own
        # (its items and their lengths differ; no collective inside a forward)
        for model in self.sharded_models():
            self._held.enter_context(gathered(model))
        engine = self.eval_engine()
        if engine is not None:  # the engine generates from the student as it is now
            engine.sync_weights(self.student)

    def eval_engine(self) -> RolloutEngine | None:
        """The engine the student's evaluation generates with (``eval.engine``).

        None for ``hf`` (the student decodes itself); for ``vllm``, the run's rollout engine
        when that is vLLM (one engine, one copy of the weights), else a `VLLMEngine` of its own
        with the defaults of ``conf/method/engine/vllm.yaml``.
        """
        if self.eval_cfg.engine != "vllm":
            return None
        if self._eval_engine is None:
            from lightning_caopd.vllm_engine import VLLMEngine

            engine = getattr(self, "engine", None)
            if not isinstance(engine, VLLMEngine):
                engine = VLLMEngine(importance_sampling=False)
                engine.attach(
                    self.tokenizer, end_ids(self.student, self.tokenizer), self.max_sequence()
                )
            self._eval_engine = engine
        return self._eval_engine

    def max_sequence(self) -> int | None:
        """The longest prompt + completion an engine must hold (None: no prompt limit)."""
        prompt = self.eval_cfg.max_prompt_length
        return None if prompt is None else prompt + self.eval_cfg.max_new_tokens

    def score(
        self,
        model: PreTrainedModel,
        items: list[dict],
        chats: list[list[dict]] | None = None,
        engine: RolloutEngine | None = None,
    ) -> EvalBatch:
        """`evaluate_items` with the ``eval`` options: the student's prompts, or `chats`.

        `engine` generates the completions instead of `model` (which still scores them).
        """
        return evaluate_items(
            model,
            self.tokenizer,
            self.task,
            items,
            max_new_tokens=self.eval_cfg.max_new_tokens,
            max_prompt_length=self.eval_cfg.max_prompt_length,
            do_sample=self.eval_cfg.do_sample,
            temperature=self.eval_cfg.temperature,
            scoring=self.eval_cfg.scoring,
            chat_template_kwargs=self.chat_template_kwargs,
            chats=chats,
            confidence_readout=self.eval_cfg.confidence_readout,
            engine=engine,
            protocol=self.eval_cfg.protocol,
        )

    def validation_step(self, batch: list[dict], batch_idx: int) -> None:  # noqa: D102
        out = self.score(self.student, batch, engine=self.eval_engine())
        self.val_scores.update(out)
        self.evaluation_records.extend(out.records)

    def on_validation_epoch_end(self) -> None:  # noqa: D102
        self._held.close()  # every rank is here: the shards are freed together
        result = self.val_scores.compute()
        result["reliability"] = self.val_scores.calibration.reliability_bins()  # every rank
        self.val_scores.reset()
        self.evaluation_records = gather_records(self.evaluation_records)
        if self.eval_cfg.protocol == "reference":
            result["reference"] = reference.block(
                self.evaluation_records, self.task.reports_answer_rate
            )
        self.evaluation = result
        scalars = {f"val/{k}": float(v) for k, v in result.items() if isinstance(v, int | float)}
        for cat, vals in result["by_category"].items():
            scalars.update(
                {
                    f"val/by_category/{cat}/{k}": float(v)
                    for k, v in vals.items()
                    if isinstance(v, int | float)
                }
            )
        self.log_dict(scalars, sync_dist=False)  # already synced by the metrics
        result["n_parameters"] = self.n_parameters  # metrics.json only: no curve to draw
        result["confidence_readout"] = self.eval_cfg.confidence_readout  # how it was read


class DistillationModule(TeacherDiagnostics, StudentSystem):
    """On-policy distillation with a choice of confidence targets (arXiv 2604.16830).

    Args:
        student: the trainable policy.
        tokenizer: the tokenizer shared by student and teacher.
        task: the domain (prompts, verifier).
        optimizer: a partial optimizer (Hydra ``_partial_: true``) over the student's parameters.
        template: how the privileged context enters the teacher's prompt.
        rollout: how the K rollouts per prompt are sampled (`RolloutSettings`).
        loss: the divergence on the completions (`LossSettings`).
        targets: the confidence-target policy: `ConfidenceTargets` (OPD, the default) or
            `lightning_caopd.calibration.CaOPD`.
        teacher: a separately configured frozen teacher; None self-distils from a copy of the
            student's initial weights (or, with LoRA, the base weights with the adapter off).
        scheduler: optional partial LR scheduler over the optimizer.
        engine: what samples the rollouts (`lightning_caopd.engines`); None is `HFEngine`,
            the student's own batched decoding. ``sync_weights`` is called before the first
            rollouts of every optimizer step.
        eval: evaluation options (see `StudentSystem`); with ``teacher_conditioned`` (the
            default) every evaluation also scores the teacher with the privileged context
            (`evaluate_teacher`): ``metrics.json``'s ``teacher_conditioned`` block.
        name: the method's name in logs and metrics.json.
        chat_template_kwargs: see `StudentSystem`.
    """

    def __init__(
        self,
        student: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        task: Task,
        optimizer: Callable,
        template: TeacherTemplate,
        rollout: RolloutSettings | None = None,
        loss: LossSettings | None = None,
        targets: ConfidenceTargets | None = None,
        teacher: PreTrainedModel | None = None,
        scheduler: Callable | None = None,
        engine: RolloutEngine | None = None,
        eval: EvalSettings | dict | None = None,  # noqa: A002 - the config key users write
        name: str = "opd",
        chat_template_kwargs: dict | None = None,
    ) -> None:
        super().__init__(student, tokenizer, task, optimizer, scheduler, eval, chat_template_kwargs)
        self.rollout = rollout or RolloutSettings()
        self.loss = loss or LossSettings()
        self.targets = targets or ConfidenceTargets()
        self.verifier_errors = 0  # completions whose verifier raised (scored 0)
        self.targets.check(self.rollout.num_rollouts)
        self.save_hyperparameters(
            {
                "name": name,
                "rollout": asdict(self.rollout),
                "loss": asdict(self.loss),
                "eval": asdict(self.eval_cfg),
            }
        )
        self.teacher = make_teacher(student, teacher)
        check_loss_support(self.loss, student, self.teacher)
        self.template = template
        self.engine = engine if engine is not None else HFEngine()
        self.engine.attach(tokenizer, end_ids(student, tokenizer), self.max_sequence())
        self._engine_step = -1  # the optimizer step the engine's weights are from
        self.teacher_scores = EvalScores(scoring=self.eval_cfg.scoring)

    def max_sequence(self) -> int | None:
        """The longest prompt + completion of a rollout or an evaluation (None: no limit)."""
        prompts = [self.rollout.max_prompt_length, self.eval_cfg.max_prompt_length]
        if None in prompts:
            return None
        return max(prompts) + max(self.rollout.max_new_tokens, self.eval_cfg.max_new_tokens)

    def on_validation_epoch_start(self) -> None:  # noqa: D102
        super().on_validation_epoch_start()
        if self._eval_engine is self.engine:  # synced for the evaluation: rollouts reuse it
            self._engine_step = self.global_step

    def sharded_models(self) -> list[torch.nn.Module]:
        """The student, and the teacher when it is a model of its own (not LoRA's base)."""
        teacher = [self.teacher] if isinstance(self.teacher, torch.nn.Module) else []
        return [self.student, *teacher]

    def configure_model(self) -> None:  # noqa: D102 - see StudentSystem.configure_model
        if self.device_mesh is not None and self.loss.fused:
            raise ConfigError(
                "method.loss.fused=true runs the models' bodies without their heads "
                "(get_decoder()), outside the forward of the sharded model, whose embeddings and "
                "head are then still sharded: it is not supported under trainer=fsdp. Set "
                "method.loss.fused=false (the loss is the same) or use trainer=ddp."
            )
        super().configure_model()

    def on_fit_start(self) -> None:  # noqa: D102
        # The frozen teacher sits in eval mode on purpose, and Lightning warns about every module
        # in eval mode at the start of training: silence the warning for exactly the teacher's
        # modules, so that it still fires when anything else (the student) is in eval mode.
        if isinstance(self.teacher, torch.nn.Module):
            n = sum(1 for m in self.teacher.modules() if not m.training)
            warnings.filterwarnings(
                "ignore", message=rf"Found {n} module\(s\) in eval mode at the start of training"
            )

    def training_step(self, batch: list[dict], batch_idx: int) -> dict | None:
        """One OPD step, following the paper's algorithm box."""
        start = time.perf_counter()
        batch, prompts, n_cut = self.student_prompts(batch)
        if not batch:  # every prompt too long: no loss, no update (Lightning skips the step)
            return None
        roll = self.sample_rollouts(prompts)  # 1. rollouts
        correct, p_acc = self.verify(batch, roll.texts)  # 2. verify
        completions = self.targets.apply(  # 3. targets
            roll.completions,
            p_acc,
            self.tokenizer,
            self.engine.stop_ids,
            self.rollout.max_new_tokens,
        )
        teacher = self.teacher_prompts(batch, roll, correct, p_acc)  # 4. teacher inputs
        loss, per_token, mask, student_logits, correction = self.divergence(  # 5. divergence
            prompts, teacher.prompts, completions, teacher.in_loss, roll
        )
        self.log_step(  # 6. log
            batch,
            roll,
            correct,
            p_acc,
            loss,
            per_token,
            mask,
            teacher,
            n_cut,
            time.perf_counter() - start,
            correction,
        )
        return {  # the loss, and what the callbacks log from the step (detached)
            "loss": loss,
            "step": StepOutputs(
                items=batch,
                texts=roll.texts,
                correct=correct,
                p_acc=p_acc,
                completions=completions,
                logits=None if student_logits is None else student_logits.detach(),
                teacher_prompts=teacher.prompts,
                teacher_rows=teacher.rows,
            ),
        }

    def student_prompts(self, batch: list[dict]) -> tuple[list[dict], list[list[int]], int]:
        """The student's prompts, encoded; too long ones cut or skipped (counted, logged)."""
        r = self.rollout
        chats = [self.task.student_messages(it) for it in batch]
        prompts, n_cut = encode_chats(
            self.tokenizer,
            chats,
            r.max_prompt_length,
            r.prompt_overflow,
            chat_template_kwargs=self.chat_template_kwargs,
        )
        if r.prompt_overflow == "skip":
            batch = [it for it, p in zip(batch, prompts, strict=True) if p is not None]
            prompts = [p for p in prompts if p is not None]
            self.log("train/prompts_skipped", float(n_cut), batch_size=max(1, len(batch)))
            n_cut = 0
        return batch, prompts, n_cut

    def sample_rollouts(self, prompts: list[list[int]]) -> Rollouts:
        """K rollouts per prompt from the engine, its weights synced once per optimizer step."""
        if self._engine_step != self.global_step:  # the student moved: rollouts stay on-policy
            self.engine.sync_weights(self.student)
            self._engine_step = self.global_step
        r = self.rollout
        return self.engine.sample(prompts, r.num_rollouts, r.max_new_tokens, r.temperature, r.top_p)

    def verify(self, batch: list[dict], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B*K,) verdicts of the rollouts and (B,) P_acc, their mean score per prompt.

        With a verifier of 0/1 scores P_acc is the share correct; a graded one (partial credit)
        gives the mean score, and a rollout is correct at ``task.pass_score`` or above.
        """
        k = self.rollout.num_rollouts
        items = [it for it in batch for _ in range(k)]
        scores, errors = task_scores(self.task, texts, items)
        self.verifier_errors += errors
        score = torch.tensor(scores)
        return score >= self.task.pass_score, empirical_accuracy(score, k)

    def teacher_prompts(
        self, batch: list[dict], roll: Rollouts, correct: torch.Tensor, p_acc: torch.Tensor
    ) -> TeacherInputs:
        """The teacher's prompts: the student's chat with the privileged context.

        The template gives one context per group or one per rollout (SDPO), and the
        confidence-target policy rewrites each with its group's P_acc. A rollout without a
        context (no successful sibling) gets the student's own prompt as a placeholder and
        leaves the loss (``rows``), or, where the policy keeps such rows (``note_only_rows``),
        gets a teacher prompt with the note alone and stays in the loss (``note_rows``).
        """
        k = self.rollout.num_rollouts
        chats, rows, note_rows, fallbacks = [], [], [], 0
        note_only = self.targets.note_only_rows
        for b, item in enumerate(batch):
            group = slice(b * k, (b + 1) * k)
            contexts, fell_back = self.template.contexts(
                item, roll.texts[group], correct[group].tolist()
            )
            fallbacks += fell_back
            p, student_chat = p_acc[b].item(), self.task.student_messages(item)
            note = self.targets.teacher_note(p)
            for context in contexts:  # one per group, or one per rollout
                rows.extend([context is not None] * (k // len(contexts)))
                note_rows.extend([context is None and note_only] * (k // len(contexts)))
                if context is not None:
                    context = self.targets.teacher_context(context, p)
                    chats.append(self.template.messages(student_chat, context, note))
                elif note_only:
                    chats.append(self.template.note_only_messages(student_chat, note))
                else:
                    chats.append(student_chat)
        prompts, n_cut = encode_chats(
            self.tokenizer,
            chats,
            self.rollout.max_prompt_length,
            chat_template_kwargs=self.chat_template_kwargs,
        )
        return TeacherInputs(
            prompts,
            torch.tensor(rows, dtype=torch.bool),
            torch.tensor(note_rows, dtype=torch.bool),
            fallbacks,
            n_cut,
        )

    def divergence(
        self,
        prompts: list[list[int]],
        teacher_prompts: list[list[int]],
        completions: list[list[int]],
        rows: torch.Tensor | None = None,
        sampled: Rollouts | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
        """The divergence between teacher and student next-token distributions on completions.

        ``method.loss`` picks the path: full vocabulary or top-k + tail (``topk``), from
        materialised logits or fused with the output heads (``fused``: the bodies run without
        their heads and no (B*K, T, V) logits exist). Both models' logits are divided by
        ``loss.temperature`` before the divergence. Rollouts that carry their sampler's
        log-probs (`sampled`, from vLLM) get the truncated importance weight (`importance`).

        Args:
            prompts: B student prompts.
            teacher_prompts: B teacher prompts, or B*K (one per rollout).
            completions: B*K training completions, prompt-major.
            rows: (B*K,) bool, the rollouts that count (None: all).
            sampled: the rollouts the completions came from (None: no correction).

        Returns:
            The loss, the (B*K, T) per-token divergence, the loss mask, the student's
            (B*K, T, V) logits (None when fused) and the importance-weight statistics ({} without
            sampler log-probs).
        """
        if self.loss.fused:
            return self.fused_divergence(prompts, teacher_prompts, completions, rows, sampled)
        with torch.no_grad():
            teacher_logits, _ = self.completion_logits(self.teacher, teacher_prompts, completions)
        student_logits, completion_mask = self.completion_logits(self.student, prompts, completions)
        mask = self.loss_mask(completion_mask, rows)
        weights, correction = self.importance(
            sampled,
            completions,
            mask,
            lambda ids: token_log_probs(student_logits, ids, self.rollout.temperature),
        )
        kind, beta, temperature = self.loss.divergence, self.loss.jsd_beta, self.loss.temperature
        if self.loss.topk is None:
            loss, per_token = divergence_loss(
                student_logits,
                teacher_logits,
                mask,
                kind,
                beta,
                temperature=temperature,
                chunk_size=self.loss.chunk_size,
                token_weights=weights,
            )
        else:
            loss, per_token = topk_tail_loss(
                student_logits,
                teacher_logits,
                mask,
                k=self.loss.topk,
                kind=kind,
                beta=beta,
                temperature=temperature,
                token_weights=weights,
            )
        del teacher_logits  # free (B*K, T, V) before backward
        return loss, per_token, mask, student_logits, correction

    def fused_divergence(
        self,
        prompts: list[list[int]],
        teacher_prompts: list[list[int]],
        completions: list[list[int]],
        rows: torch.Tensor | None = None,
        sampled: Rollouts | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, dict]:
        """`divergence` from the bodies' last hidden states and the output heads, chunk by chunk."""
        with torch.no_grad():
            teacher_hidden, _ = self.completion_hidden(self.teacher, teacher_prompts, completions)
        student_hidden, completion_mask = self.completion_hidden(self.student, prompts, completions)
        mask = self.loss_mask(completion_mask, rows)
        student_head = OutputHead.from_causal_lm(self.student)
        chunk = self.loss.chunk_size or FUSED_CHUNK_SIZE
        weights, correction = self.importance(
            sampled,
            completions,
            mask,
            lambda ids: target_log_probs(
                student_hidden, student_head, ids, mask, self.rollout.temperature, chunk
            ),
        )
        loss, per_token = fused_linear_divergence(
            student_hidden,  # (B*K, T, H)
            student_head,
            teacher_hidden,  # (B*K, T, H')
            OutputHead.from_causal_lm(causal_lm(self.teacher)),
            mask,
            kind=self.loss.divergence,
            beta=self.loss.jsd_beta,
            temperature=self.loss.temperature,
            topk=self.loss.topk,
            chunk_size=chunk,
            token_weights=weights,
        )
        return loss, per_token, mask, None, correction

    def importance(
        self,
        sampled: Rollouts | None,
        completions: list[list[int]],
        mask: torch.Tensor,
        student_log_probs: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor | None, dict]:
        """The truncated importance weights of rollouts drawn by another engine (vLLM).

        Args:
            sampled: the step's rollouts; without sampler log-probs (the ``hf`` engine) there is
                nothing to correct.
            completions: the B*K training completions.
            mask: (B*K, T) the loss mask.
            student_log_probs: (B*K, T) token ids -> the student's log-probs of them at the
                sampling temperature (``rollout.temperature``, the sampler's distribution,
                whatever ``loss.temperature`` is), from the step's logits or hidden states.

        Returns:
            The (B*K, T) weights (None: no weighting; also when the engine's correction is
            off) and their statistics (``logprob_gap``, ``capped_frac``, ``weight_mean``).
        """
        if sampled is None or sampled.logprobs is None:
            return None, {}
        width = mask.shape[1]
        ids, _ = right_pad(completions, self.tokenizer.pad_token_id, mask.device)
        sampler = sampled_log_probs(sampled.completions, sampled.logprobs, completions, width)
        cap = self.engine.correction_cap
        weights, stats = truncated_importance_weights(
            student_log_probs(ids[:, :width]), sampler, mask, math.inf if cap is None else cap
        )
        return (None if cap is None else weights), stats

    def loss_mask(self, completion_mask: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """(B*K, T) positions in the loss: completions, less the skipped first tokens and rows."""
        mask = skip_first_tokens(completion_mask, self.loss.skip_first_tokens)
        return mask if rows is None else mask & rows.to(mask.device)[:, None]

    def completion_logits(
        self, model: PreTrainedModel, prompts: list[list[int]], completions: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B*K, T, V) on the completions of B prompts, and the completion mask.

        With ``loss.share_prompt_prefix`` each prompt is encoded once for its K completions.
        """
        pad = self.tokenizer.pad_token_id
        if self.loss.share_prompt_prefix:
            return shared_prefix_logits(model, prompts, completions, pad, self.device)
        k = len(completions) // len(prompts)
        batch = build_batch([p for p in prompts for _ in range(k)], completions, pad, self.device)
        return completion_logits(model, batch), batch["completion_mask"]

    def completion_hidden(
        self, model: PreTrainedModel, prompts: list[list[int]], completions: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden states (B*K, T, H) predicting each completion token, and the mask.

        The body alone (no LM head), otherwise as `completion_logits`.
        """
        pad, body = self.tokenizer.pad_token_id, functools.partial(run_body, model)
        if self.loss.share_prompt_prefix:
            return shared_prefix_hidden(body, prompts, completions, pad, self.device)
        k = len(completions) // len(prompts)
        batch = build_batch([p for p in prompts for _ in range(k)], completions, pad, self.device)
        return completion_hidden(body, batch), batch["completion_mask"]

    def log_step(
        self,
        batch,
        roll,
        correct,
        p_acc,
        loss,
        per_token,
        mask,
        teacher,
        n_cut,
        elapsed,
        correction,
    ) -> None:
        """The step's scalars: loss, divergence, rollout accuracy, P_acc, format, throughput.

        Only at the steps whose logged values reach the loggers (``trainer.log_every_n_steps``,
        `logs_step`); a step called without a Trainer computes them (``self.log`` is then a
        no-op).
        """
        try:
            if not logs_step(self.trainer, self.global_step):
                return
        except RuntimeError:  # not attached to a Trainer
            pass
        n = len(roll.texts)
        fallback_frac = teacher.fallbacks / len(batch)
        formatted = [parse_confidence(t) is not None for t in roll.texts]
        stats = {
            "train/loss": loss.detach(),
            "train/divergence": per_token.detach().sum() / mask.sum().clamp(min=1),
            "train/rollout_accuracy": correct.float().mean(),
            "train/p_acc_mean": p_acc.mean(),
            "train/format_rate": torch.tensor(formatted, dtype=torch.float).mean(),
            "train/truncated_frac": torch.tensor(roll.truncated, dtype=torch.float).mean(),
            "train/no_correct_solution_frac": torch.tensor(fallback_frac),
            # rollouts left out of the loss for want of a successful sibling (SDPO)
            "train/sdpo_masked_frac": (~teacher.in_loss).float().mean(),
            "train/prompts_truncated": torch.tensor(float(n_cut + teacher.n_cut)),
            # completions whose verifier raised (scored 0), so far in this run
            "train/verifier_errors": torch.tensor(float(self.verifier_errors)),
            "train/rollouts_per_s": torch.tensor(n / elapsed),
            "train/tokens_per_s": torch.tensor(sum(len(c) for c in roll.completions) / elapsed),
        }
        stats.update({f"train/{k}": torch.tensor(v) for k, v in p_acc_stats(p_acc).items()})
        if correction:  # rollouts from another engine (vLLM): its sync and the weights
            stats["train/engine_sync_s"] = torch.tensor(self.engine.last_sync_s)
            stats.update(
                {f"train/is_{k}": torch.tensor(v) for k, v in correction.items() if v == v}
            )
        self.log_dict(stats, batch_size=len(batch))
        self.log("loss", loss.detach(), prog_bar=True, batch_size=len(batch), logger=False)
        self.log("p_acc", p_acc.mean(), prog_bar=True, batch_size=len(batch), logger=False)
        self.log("rollouts/s", n / elapsed, prog_bar=True, batch_size=len(batch), logger=False)


def check_loss_support(
    loss: LossSettings, student: PreTrainedModel, teacher: PreTrainedModel | AdapterDisabledTeacher
) -> None:
    """Refuse at start-up a ``method.loss`` the models cannot serve.

    ``topk`` must not exceed the vocabulary; ``fused`` needs each model's output head to be a
    plain ``torch.nn.Linear`` (tied to the input embedding or not; LoRA on the head, or a head
    that is another module, is refused) and a decoder body reachable by ``get_decoder()``.

    Raises:
        ConfigError: naming the key and what to change.
    """
    vocab = student.get_output_embeddings().weight.shape[0]
    if loss.topk is not None and loss.topk > vocab:
        raise ConfigError(
            f"method.loss.topk={loss.topk} exceeds the vocabulary ({vocab} tokens); set it to at "
            f"most {vocab}, or null for the full vocabulary."
        )
    if not loss.fused:
        return
    for role, model in (("student", student), ("teacher", causal_lm(teacher))):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        lora = any("lora" in name.lower() for name, _ in head.named_modules()) if head else False
        if type(head) is not torch.nn.Linear or lora:
            raise ConfigError(
                f"method.loss.fused=true needs the {role}'s output head to be a plain "
                f"torch.nn.Linear; it is {type(head).__name__}"
                + (" with a LoRA adapter" if lora else "")
                + ". Leave the head out of model.lora.target_modules, or set "
                "method.loss.fused=false."
            )
        if not hasattr(model, "get_decoder"):
            raise ConfigError(
                f"method.loss.fused=true runs the {role}'s body without its head through "
                f"get_decoder(), which {type(model).__name__} lacks; set method.loss.fused=false."
            )
