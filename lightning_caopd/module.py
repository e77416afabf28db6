"""The OPD / CaOPD system: a trainable student and a frozen teacher in one LightningModule.

`DistillationModule.training_step` is the paper's algorithm box, one call per line; the step's
parts are objects the configuration chooses (`lightning_caopd.step`: the teacher, the teacher's
inputs, the loss path, the step's result), and what happens around the step (teacher EMA, the
non-finite guard, rollout tables, entropies, reliability diagrams, ``metrics.json``) is in
`lightning_caopd.callbacks`.

The teacher side of the paper's diagnosis (the teacher scored with the privileged context) is the
`lightning_caopd.diagnostics.TeacherDiagnostics` mixin.
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import asdict

import lightning as L
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_caopd import reference
from lightning_caopd.calibration import ConfidenceTargets, empirical_accuracy
from lightning_caopd.checkpointing import RNG_KEY, rng_states, set_rng_states
from lightning_caopd.diagnostics import TeacherDiagnostics
from lightning_caopd.engines import HFEngine, RolloutEngine
from lightning_caopd.errors import ConfigError
from lightning_caopd.loggers import logs_step
from lightning_caopd.rollout import Rollouts, encode_chats, end_ids
from lightning_caopd.scoring import EvalBatch, EvalScores, evaluate_items, gather_records
from lightning_caopd.settings import EvalSettings, LossSettings, RolloutSettings, from_config
from lightning_caopd.sharding import gathered, is_sharded, shard
from lightning_caopd.step.loss import Importance, LossBatch, loss_path
from lightning_caopd.step.prompts import TeacherPrompts
from lightning_caopd.step.result import StepResult
from lightning_caopd.step.teacher import make_teacher
from lightning_caopd.tasks.base import Task, task_scores
from lightning_caopd.templates import TeacherTemplate


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
        loss: the divergence on the completions (`LossSettings`); it chooses the loss path
            (`lightning_caopd.step.loss.loss_path`), checked against the models here.
        targets: the confidence-target policy: `ConfidenceTargets` (OPD, the default) or
            `lightning_caopd.calibration.CaOPD`.
        teacher: a separately configured frozen teacher; None self-distils from a copy of the
            student's initial weights (or, with LoRA, the base weights with the adapter off).
            Either way ``self.teacher`` is a `lightning_caopd.step.teacher.Teacher`.
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
        self.rollout, loss = rollout or RolloutSettings(), loss or LossSettings()
        targets = targets or ConfidenceTargets()
        targets.check(self.rollout.num_rollouts)
        self.verifier_errors = 0  # completions whose verifier raised (scored 0)
        hparams = {"name": name, "rollout": asdict(self.rollout), "loss": asdict(loss)}
        self.save_hyperparameters({**hparams, "eval": asdict(self.eval_cfg)})
        self.teacher = make_teacher(student, teacher)
        self.loss_path = loss_path(loss, tokenizer.pad_token_id)
        self.loss_path.check(student, self.teacher)
        self.teacher_inputs = TeacherPrompts(
            template,
            targets,
            task,
            tokenizer,
            self.rollout.max_prompt_length,
            self.chat_template_kwargs,
        )
        self.engine = engine if engine is not None else HFEngine()
        self.engine.attach(tokenizer, end_ids(student, tokenizer), self.max_sequence())
        self._engine_step = -1  # the optimizer step the engine's weights are from
        self.teacher_scores = EvalScores(scoring=self.eval_cfg.scoring)

    @property
    def template(self) -> TeacherTemplate:
        """How the privileged context enters the teacher's prompt (`teacher_inputs`')."""
        return self.teacher_inputs.template

    @property
    def targets(self) -> ConfidenceTargets:
        """The confidence-target policy (`teacher_inputs`'): completions and contexts."""
        return self.teacher_inputs.targets

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
        """The student, and the teacher's own weights (none for LoRA's base)."""
        return [self.student, *self.teacher.own_models()]

    def configure_model(self) -> None:  # noqa: D102 - see StudentSystem.configure_model
        if self.device_mesh is not None and self.loss_path.sharding_refusal:
            raise ConfigError(self.loss_path.sharding_refusal)
        super().configure_model()

    def on_fit_start(self) -> None:  # noqa: D102
        # The frozen teacher sits in eval mode on purpose, and Lightning warns about every module
        # in eval mode at the start of training: silence the warning for exactly the teacher's
        # modules, so that it still fires when anything else (the student) is in eval mode.
        n = self.teacher.modules_in_eval()
        if n:
            warnings.filterwarnings(
                "ignore", message=rf"Found {n} module\(s\) in eval mode at the start of training"
            )

    def training_step(self, batch: list[dict], batch_idx: int) -> dict | None:
        """One OPD step, following the paper's algorithm box."""
        start = time.perf_counter()
        batch, prompts, n_cut = self.student_prompts(batch)
        if not batch:  # every prompt too long: no loss, no update (Lightning skips the step)
            return None
        roll = self.sample_rollouts(prompts, self.rollout_seeds(batch, batch_idx))  # 1. rollouts
        correct, p_acc = self.verify(batch, roll.texts)  # 2. verify
        completions = self.targets.apply(  # 3. targets
            roll.completions,
            p_acc,
            self.tokenizer,
            self.engine.stop_ids,
            self.rollout.max_new_tokens,
        )
        teacher = self.teacher_inputs(batch, roll.texts, correct, p_acc)  # 4. teacher inputs
        loss = self.loss_path(  # 5. divergence
            self.student,
            self.teacher,
            LossBatch(
                prompts,
                teacher.prompts,
                completions,
                teacher.in_loss,
                self.importance(roll, completions),
                self.device,
            ),
        )
        result = StepResult(
            items=batch,
            rollouts=roll,
            correct=correct,
            p_acc=p_acc,
            completions=completions,
            teacher=teacher,
            loss=loss,
            n_cut=n_cut,
            elapsed=time.perf_counter() - start,
            verifier_errors=self.verifier_errors,
            engine_sync_s=self.engine.last_sync_s if loss.correction else None,
        )
        self.log_step(result)  # 6. log
        return {"loss": loss.loss, "step": result}  # the loss, and what the callbacks read

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

    def sample_rollouts(self, prompts: list[list[int]], seeds: list[int] | None = None) -> Rollouts:
        """K rollouts per prompt from the engine, its weights synced once per optimizer step."""
        if self._engine_step != self.global_step:  # the student moved: rollouts stay on-policy
            self.engine.sync_weights(self.student)
            self._engine_step = self.global_step
        r = self.rollout
        return self.engine.sample(
            prompts,
            r.num_rollouts,
            r.max_new_tokens,
            r.temperature,
            r.top_p,
            seeds,
            r.min_new_tokens,
        )

    def rollout_seeds(self, batch: list[dict], batch_idx: int) -> list[int] | None:
        """Per-item rollout seeds (``method.rollout.row_seeds``), else None.

        Keyed by the run's seed, the epoch, the batch and the item's id: the same on every
        process layout, and again on resume.
        """
        if not self.rollout.row_seeds:
            return None
        key = f"{torch.initial_seed()}|{self.current_epoch}|{batch_idx}"
        return [zlib.crc32(f"{key}|{item['id']}".encode()) >> 1 for item in batch]

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

    def importance(self, roll: Rollouts, completions: list[list[int]]) -> Importance | None:
        """The importance correction of rollouts that carry their sampler's log-probs (vLLM)."""
        if roll.logprobs is None:  # the student sampled them itself: nothing to correct
            return None
        pad, cap = self.tokenizer.pad_token_id, self.engine.correction_cap
        return Importance(roll, completions, pad, cap, self.rollout.temperature)

    def log_step(self, result: StepResult) -> None:
        """The step's scalars (`StepResult.scalars`) and the progress bar's.

        Only at the steps whose logged values reach the loggers (``trainer.log_every_n_steps``,
        `logs_step`); a step called without a Trainer computes them (``self.log`` is then a
        no-op).
        """
        try:
            if not logs_step(self.trainer, self.global_step):
                return
        except RuntimeError:  # not attached to a Trainer
            pass
        n = len(result.items)
        self.log_dict(result.scalars(), batch_size=n)
        self.log("loss", result.loss.loss, prog_bar=True, batch_size=n, logger=False)
        self.log("p_acc", result.p_acc.mean(), prog_bar=True, batch_size=n, logger=False)
        self.log("rollouts/s", result.rollouts_per_s, prog_bar=True, batch_size=n, logger=False)
