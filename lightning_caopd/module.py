"""The OPD / CaOPD system: a trainable student and a frozen teacher in one LightningModule."""

from __future__ import annotations

import math
import time
from pathlib import Path
from collections.abc import Callable

import lightning as L
import torch
from torchmetrics import MeanMetric
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_caopd.calibration import CaOPD, empirical_accuracy
from lightning_caopd.confidence import parse_confidence
from lightning_caopd.divergence import divergence_loss, skip_first_tokens
from lightning_caopd.evaluation import evaluate_items
from lightning_caopd.metrics import CalibrationMetrics
from lightning_caopd.models import make_teacher
from lightning_caopd.rollout import (
    build_batch,
    completion_logits,
    encode_chats,
    sample,
    shared_prefix_logits,
)
from lightning_caopd.tasks.base import Task
from lightning_caopd.templates import TeacherTemplate


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
        self.last_eval = result
        self.last_eval_step = self.global_step
        if self.eval_output_dir is not None:
            self.val_metrics.save_reliability_diagram(
                Path(self.eval_output_dir) / "reliability.png", title=f"step {self.global_step}"
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
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["student", "teacher", "tokenizer", "task", "template", "caopd"])
        if caopd is not None and num_rollouts < 2:
            raise ValueError(
                f"CaOPD needs K >= 2 rollouts per prompt to measure P_acc; got "
                f"method.num_rollouts={num_rollouts}. Set it to 2 or more (the paper uses 8)."
            )
        if not 0.0 <= teacher_ema <= 1.0:
            raise ValueError(f"method.teacher_ema must be in [0, 1]; got {teacher_ema}.")
        self.student = student
        self.teacher = make_teacher(student, teacher)
        self.tokenizer = tokenizer
        self.task = task
        self.template = template
        self.caopd = caopd
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.setup_eval(task, eval or {})

    def training_step(self, batch: list[dict], batch_idx: int) -> torch.Tensor:
        """One OPD step, following the paper's algorithm box."""
        hp = self.hparams
        k = hp.num_rollouts
        start = time.perf_counter()

        # 1. Rollouts: K samples per prompt from the student, one batched generate call.
        prompts, n_cut = encode_chats(
            self.tokenizer, [self.task.student_messages(it) for it in batch], hp.max_prompt_length
        )
        roll = sample(self.student, self.tokenizer, prompts, k, hp.max_new_tokens, hp.temperature, hp.top_p)

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

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # here, not in on_train_batch_end: with gradient accumulation the teacher moves once
        # per optimizer step, as in the paper (ref_model_sync_steps=1), not once per micro-batch
        if self.hparams.teacher_ema > 0:
            ema_update(self.teacher, self.student, self.hparams.teacher_ema)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.caopd is not None and hasattr(self.logger, "experiment") and hasattr(
            self.logger.experiment, "add_histogram"
        ):
            self.logger.experiment.add_histogram("train/p_acc", self._p_acc_hist, self.global_step)


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, rate: float) -> None:
    """teacher <- (1 - rate) * teacher + rate * student, parameter by parameter."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.lerp_(s.detach(), rate)
