"""The OPD / CaOPD system: a trainable student and a frozen teacher in one LightningModule."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from collections.abc import Callable

import lightning as L
import torch
from torchmetrics import MeanMetric
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_caopd.calibration import CaOPD, empirical_accuracy
from lightning_caopd.checkpointing import RNG_KEY, rng_states, set_rng_states
from lightning_caopd.confidence import parse_confidence
from lightning_caopd.divergence import divergence_loss, skip_first_tokens
from lightning_caopd.evaluation import evaluate_items
from lightning_caopd.metrics import CalibrationMetrics
from lightning_caopd.errors import NonFiniteError
from lightning_caopd.engines import HFEngine, RolloutEngine
from lightning_caopd.models import AdapterDisabledTeacher, make_teacher
from lightning_caopd.rollout import (
    build_batch,
    completion_logits,
    encode_chats,
    shared_prefix_logits,
)
from lightning_caopd.tasks.base import Task
from lightning_caopd.templates import TeacherTemplate
from lightning_caopd.tracking import Tracker, log_histogram, reliability_bins


class StudentSystem(L.LightningModule):
    """What the OPD system and the warm-up share: the optimizer and held-out evaluation.

    Subclasses set ``student``, ``tokenizer``, ``task``, ``optimizer_factory`` and
    ``scheduler_factory`` and call `setup_eval`.
    """

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.student.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def setup_eval(self, task: Task, eval_cfg: dict) -> None:
        self.eval_cfg = {"max_new_tokens": 32, "do_sample": False, "temperature": 1.0, **eval_cfg}
        self.val_metrics = CalibrationMetrics(categories=list(task.categories))
        self.val_answer_entropy = MeanMetric()
        self.val_confidence_entropy = MeanMetric()
        self.last_eval: dict | None = None
        self.last_eval_step = -1
        self.eval_output_dir: Path | None = None  # where each evaluation's reliability.png goes
        self.eval_records: list[dict] = []
        self.tracker = Tracker()  # reliability images; DistillationModule sets its options
        self.initial_eval: dict | None = None  # the evaluation before the first step (metrics.json)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lightning saves weights, optimizer, scheduler and loop progress; these complete an
        # exact resume: the generators the next step draws from (rollouts sample from torch's)
        # and the evaluation before the first step, which a resumed run cannot recompute
        checkpoint[RNG_KEY] = rng_states()
        checkpoint["initial_eval"] = self.initial_eval

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if RNG_KEY in checkpoint:
            set_rng_states(checkpoint[RNG_KEY])
        self.initial_eval = checkpoint.get("initial_eval")

    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        out = evaluate_items(
            self.student,
            self.tokenizer,
            self.task,
            batch,
            max_new_tokens=self.eval_cfg["max_new_tokens"],
            max_prompt_length=self.eval_cfg.get("max_prompt_length"),
            do_sample=self.eval_cfg["do_sample"],
            temperature=self.eval_cfg["temperature"],
        )
        self.val_metrics.update(out.confidence.to(self.device), out.correct.to(self.device), out.category.to(self.device))
        # token-weighted means: value is the mean entropy of the batch, weight its token count
        for metric, (s, n) in (
            (self.val_answer_entropy, out.answer_entropy),
            (self.val_confidence_entropy, out.confidence_entropy),
        ):
            if n:
                metric.update(torch.tensor(s / n, device=self.device), n)
        self.eval_records.extend(out.records)

    def on_validation_epoch_start(self) -> None:
        self.eval_records = []

    def on_validation_epoch_end(self) -> None:
        result = self.val_metrics.compute()
        for name, metric in (
            ("answer_entropy", self.val_answer_entropy),
            ("confidence_entropy", self.val_confidence_entropy),
        ):
            value = metric.compute().item() if metric.update_count else float("nan")
            result[name] = None if math.isnan(value) else value
            metric.reset()
        result["reliability"] = reliability_bins(self.val_metrics)  # every rank: gathered
        self.tracker.evaluation(self, result)
        self.last_eval = result
        self.last_eval_step = self.global_step
        if self.eval_output_dir is not None or getattr(self._trainer, "world_size", 1) > 1:
            # drawing gathers the bins across ranks, so under DDP every rank draws (else rank 0
            # waits for the others forever); only rank 0 has an eval_output_dir to keep it in
            with tempfile.TemporaryDirectory() as scratch:
                self.val_metrics.save_reliability_diagram(
                    Path(self.eval_output_dir or scratch) / "reliability.png", title=f"step {self.global_step}"
                )
        self.log_dict(
            {f"val/{k}": float(v) for k, v in result.items() if isinstance(v, int | float)},
            sync_dist=False,  # already synced by the metrics
        )
        for cat, vals in result["by_category"].items():
            self.log_dict(
                {f"val/by_category/{cat}/{k}": float(v) for k, v in vals.items() if isinstance(v, int | float)}
            )
        self.val_metrics.reset()


class DistillationModule(StudentSystem):
    """On-policy distillation with an optional CaOPD confidence target (arXiv 2604.16830).

    Args:
        student: the trainable policy.
        tokenizer: the tokenizer shared by student and teacher.
        task: the domain (prompts, verifier).
        optimizer: a partial optimizer (Hydra ``_partial_: true``) over the student's parameters.
        template: how the privileged context enters the teacher's prompt.
        teacher: a separately configured frozen teacher; None self-distils from a copy of the
            student's initial weights.
        caopd: the CaOPD target replacement; None is plain OPD.
        num_rollouts: K, rollouts per prompt.
        max_new_tokens: rollout length limit.
        temperature: rollout sampling temperature.
        top_p: rollout nucleus threshold.
        divergence: ``forward_kl`` (KL(teacher || student), the default of the released
            CaOPD/SDFT code), ``reverse_kl`` (KL(student || teacher)) or ``jsd``.
        jsd_beta: JSD mixing weight (0 gives forward KL, 1 reverse KL).
        skip_first_tokens: completion tokens excluded from the loss at the start of each rollout.
        teacher_ema: EMA rate of the teacher toward the student after each step (0: frozen).
        max_prompt_length: prompts longer than this lose their left end (counted).
        loss_chunk_size: positions per chunk in the memory-bounded divergence (None: unchunked).
        share_prompt_prefix: encode each prompt once for its K rollouts (exact; faster).
        scheduler: optional partial LR scheduler over the optimizer.
        eval: evaluation options (``max_new_tokens``, ``do_sample``, ``temperature``).
        name: the method's name in logs and metrics.json.
        tracking: `lightning_caopd.tracking.Tracker` options (``rollouts_every``,
            ``rollout_rows``, ``entropy``).
        prompt_overflow: a student prompt longer than ``max_prompt_length`` is cut at its left
            end (``truncate``) or its item is left out of the step (``skip``); both are counted.
            Teacher prompts are always truncated.
        max_nonfinite_steps: stop the run after this many optimizer steps in a row with a
            non-finite loss or gradient (each is skipped: no update); None never stops.
        engine: what samples the rollouts (`lightning_caopd.engines`); None is `HFEngine`,
            the student's own batched decoding.
    """

    def __init__(
        self,
        student: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        task: Task,
        optimizer: Callable,
        template: TeacherTemplate,
        teacher: PreTrainedModel | None = None,
        caopd: CaOPD | None = None,
        num_rollouts: int = 8,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        divergence: str = "forward_kl",
        jsd_beta: float = 0.5,
        skip_first_tokens: int = 0,
        teacher_ema: float = 0.0,
        max_prompt_length: int | None = None,
        loss_chunk_size: int | None = None,
        share_prompt_prefix: bool = True,
        scheduler: Callable | None = None,
        eval: dict | None = None,  # noqa: A002 - the config key users write
        name: str = "opd",
        tracking: dict | None = None,
        prompt_overflow: str = "truncate",
        max_nonfinite_steps: int | None = 3,
        engine: RolloutEngine | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["student", "teacher", "tokenizer", "task", "template", "caopd", "engine"])
        if caopd is not None and num_rollouts < 2:
            raise ValueError(
                f"CaOPD needs K >= 2 rollouts per prompt to measure P_acc; got "
                f"method.num_rollouts={num_rollouts}. Set it to 2 or more (the paper uses 8)."
            )
        if not 0.0 <= teacher_ema <= 1.0:
            raise ValueError(f"method.teacher_ema must be in [0, 1]; got {teacher_ema}.")
        if prompt_overflow not in ("truncate", "skip"):
            raise ValueError(
                f"method.prompt_overflow must be 'truncate' or 'skip'; got {prompt_overflow!r}."
            )
        if max_nonfinite_steps is not None and max_nonfinite_steps < 1:
            raise ValueError(
                "method.max_nonfinite_steps must be 1 or more, or null to never stop; got "
                f"{max_nonfinite_steps}."
            )
        self.nonfinite_streak = 0  # optimizer steps in a row skipped for a non-finite loss/gradient
        self.nonfinite_total = 0
        self.student = student
        self.teacher = make_teacher(student, teacher)
        if teacher_ema > 0 and isinstance(self.teacher, AdapterDisabledTeacher):
            raise ValueError(
                "method.teacher_ema > 0 moves the teacher toward the student, but with model.lora "
                "the self-distillation teacher is the student's own base weights (adapter off), "
                "which the EMA would overwrite. Set method.teacher_ema=0, or model.lora=null."
            )
        self.engine = engine if engine is not None else HFEngine()
        self.engine.attach(tokenizer)
        self._engine_step = -1  # the optimizer step the engine's weights are from
        self.tokenizer = tokenizer
        self.task = task
        self.template = template
        self.caopd = caopd
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.setup_eval(task, eval or {})
        self.tracker = Tracker(**(tracking or {}))

    def training_step(self, batch: list[dict], batch_idx: int) -> torch.Tensor:
        """One OPD step, following the paper's algorithm box."""
        hp = self.hparams
        k = hp.num_rollouts
        start = time.perf_counter()

        # 1. Rollouts: K samples per prompt from the student, one batched KV-cached decode.
        prompts, n_cut = encode_chats(
            self.tokenizer, [self.task.student_messages(it) for it in batch], hp.max_prompt_length,
            hp.prompt_overflow,
        )
        n_skipped = 0
        if hp.prompt_overflow == "skip":
            n_skipped, n_cut = n_cut, 0
            batch = [it for it, p in zip(batch, prompts, strict=True) if p is not None]
            prompts = [p for p in prompts if p is not None]
            self.log("train/prompts_skipped", float(n_skipped), batch_size=max(1, len(batch)))
            if not batch:  # every prompt too long: no loss, no update (Lightning skips the step)
                return None
        if self._engine_step != self.global_step:  # the student moved: rollouts stay on-policy
            self.engine.sync_weights(self.student)
            self._engine_step = self.global_step
        roll = self.engine.sample(prompts, k, hp.max_new_tokens, hp.temperature, hp.top_p)

        # 2. Verify each rollout; P_acc per prompt.
        items = [it for it in batch for _ in range(k)]
        correct = torch.tensor([self.task.verify(t, it) for t, it in zip(roll.texts, items, strict=True)])
        p_acc = empirical_accuracy(correct, k)  # (B,)

        # 3. Targets and teacher inputs: privileged context, CaOPD replacements when switched on.
        completions, teacher_chats, fallbacks = [], [], 0
        for b, item in enumerate(batch):
            group = slice(b * k, (b + 1) * k)
            context, fell_back = self.template.context(item, roll.texts[group], correct[group].tolist())
            fallbacks += fell_back
            note = ""
            p = p_acc[b].item()
            if self.caopd is not None:
                context, note = self.caopd.teacher_context(context, p), self.caopd.teacher_note(p)
            teacher_chats.append(self.template.messages(self.task.student_messages(item), context, note))
            for ids in roll.completions[group]:
                completions.append(
                    self.caopd.student_completion(ids, p, self.tokenizer) if self.caopd else list(ids)
                )
        teacher_prompts, n_cut_t = encode_chats(self.tokenizer, teacher_chats, hp.max_prompt_length)

        # 4. Divergence between teacher and student next-token distributions on completions.
        with torch.no_grad():
            teacher_logits, _ = self.completion_logits(self.teacher, teacher_prompts, completions)
        student_logits, completion_mask = self.completion_logits(self.student, prompts, completions)
        mask = skip_first_tokens(completion_mask, hp.skip_first_tokens)
        loss, per_token = divergence_loss(
            student_logits, teacher_logits, mask, kind=hp.divergence, beta=hp.jsd_beta,
            chunk_size=hp.loss_chunk_size,
        )
        del teacher_logits  # free (B*K, T, V) before backward

        # 5. Log.
        elapsed = time.perf_counter() - start
        n_tokens = int(completion_mask.sum())
        stats = {
            "train/loss": loss.detach(),
            "train/divergence": (per_token.detach().sum() / mask.sum().clamp(min=1)),
            "train/rollout_accuracy": correct.float().mean(),
            "train/p_acc_mean": p_acc.mean(),
            "train/format_rate": torch.tensor(
                [parse_confidence(t) is not None for t in roll.texts], dtype=torch.float
            ).mean(),
            "train/truncated_frac": torch.tensor(roll.truncated, dtype=torch.float).mean(),
            "train/no_correct_solution_frac": torch.tensor(fallbacks / len(batch)),
            "train/prompts_truncated": torch.tensor(float(n_cut + n_cut_t)),
            "train/rollouts_per_s": torch.tensor(len(items) / elapsed),
            "train/tokens_per_s": torch.tensor(n_tokens / elapsed),
        }
        stats.update({f"train/{k_}": torch.tensor(v) for k_, v in CaOPD.stats(p_acc).items()})
        stats.update(self.tracker.step_stats(student_logits.detach(), completions, self.tokenizer))
        self.tracker.rollouts(self, batch, roll.texts, correct, p_acc)
        self.log_dict(stats, batch_size=len(batch))
        self.log("p_acc", p_acc.mean(), prog_bar=True, batch_size=len(batch), logger=False)
        self.log("rollouts/s", len(items) / elapsed, prog_bar=True, batch_size=len(batch), logger=False)
        self._p_acc_hist = p_acc.detach().cpu()
        return loss

    def completion_logits(
        self, model: PreTrainedModel, prompts: list[list[int]], completions: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B*K, T, V) on the completions of B prompts, and the completion mask.

        With ``share_prompt_prefix`` each prompt is encoded once for its K completions.
        """
        pad = self.tokenizer.pad_token_id
        if self.hparams.share_prompt_prefix:
            return shared_prefix_logits(model, prompts, completions, pad, self.device)
        k = len(completions) // len(prompts)
        batch = build_batch([p for p in prompts for _ in range(k)], completions, pad, self.device)
        return completion_logits(model, batch), batch["completion_mask"]

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure) -> None:
        finite = True

        def closure():
            # training_step and backward run here, inside optimizer.step as Lightning expects.
            # A non-finite loss or gradient drops every gradient, so the optimizer skips every
            # parameter: no update and no change to its moments (torch optimizers pass over
            # parameters whose .grad is None).
            nonlocal finite
            loss = optimizer_closure()
            finite = all_finite(loss, self.student.parameters())
            if not finite:
                optimizer.zero_grad(set_to_none=True)
            return loss

        optimizer.step(closure=closure)
        self._count_nonfinite(finite)
        # here, not in on_train_batch_end: with gradient accumulation the teacher moves once
        # per optimizer step, as in the paper (ref_model_sync_steps=1), not once per micro-batch
        if finite and self.hparams.teacher_ema > 0:
            ema_update(self.teacher, self.student, self.hparams.teacher_ema)

    def _count_nonfinite(self, finite: bool) -> None:
        """Log skipped steps; stop the run after ``max_nonfinite_steps`` of them in a row."""
        self.nonfinite_streak = 0 if finite else self.nonfinite_streak + 1
        self.nonfinite_total += not finite
        self.log("train/skipped_nonfinite", float(self.nonfinite_total))
        limit = self.hparams.max_nonfinite_steps
        if limit is not None and self.nonfinite_streak >= limit:
            raise NonFiniteError(
                f"Stopped at optimizer step {self.global_step}: the loss or the gradients were "
                f"NaN or infinite in {self.nonfinite_streak} steps in a row "
                f"(method.max_nonfinite_steps={limit}); each of them was skipped without changing "
                f"the weights ({self.nonfinite_total} skipped in all, logged as "
                "train/skipped_nonfinite). Common causes are a learning rate that is too high "
                "(method.optimizer.lr), fp16 overflow (use bf16 or 32-bit precision) or a broken "
                "model or batch. Fix the cause and resume from the last good checkpoint "
                "(ckpt_path=last), or raise method.max_nonfinite_steps."
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["nonfinite"] = {"streak": self.nonfinite_streak, "total": self.nonfinite_total}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("nonfinite", {})
        self.nonfinite_streak, self.nonfinite_total = state.get("streak", 0), state.get("total", 0)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.caopd is not None:
            log_histogram(self.loggers, "train/p_acc", self._p_acc_hist, self.global_step)


@torch.no_grad()
def all_finite(loss: torch.Tensor | None, params) -> bool:
    """Whether the loss (if any) and every gradient of `params` are finite (one device sync)."""
    checks = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    if loss is not None:
        checks.append(torch.isfinite(loss).all())
    return bool(torch.stack(checks).all()) if checks else True


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, rate: float) -> None:
    """teacher <- (1 - rate) * teacher + rate * student, parameter by parameter."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.lerp_(s.detach(), rate)
