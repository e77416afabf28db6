"""What a run does around the training step, as Lightning callbacks (``conf/callbacks/``).

* `MetricsWriter`: the run's contract files after each evaluation: ``metrics.json`` (the last
  evaluation, the one before the first training step under ``initial``, and ``run``), the
  reliability diagram, and for ``evaluate`` the scored completions.
* `TeacherEMA`: moves the teacher toward the student once per optimizer step.
* `NonFiniteGuard`: skips an optimizer step whose loss or gradients are NaN or infinite and
  stops the run after too many in a row.
* `RolloutEntropy`, `RolloutTable`, `PAccHistogram`: what the loggers get from each step
  besides the module's scalars.
* `ReliabilityImage`: each evaluation's diagram as an image for W&B and TensorBoard.
* `TeacherSuccess`: every N steps, how often the teacher itself succeeds on the step's
  privileged prompts (the paper's optimism bias, during training).

The modules publish what callbacks read, and nothing else is read: a training step returns its
result beside the loss (``outputs["step"]``, a `lightning_caopd.step.result.StepResult`), an
evaluation leaves its result in ``pl_module.evaluation``; of the module itself a callback reads
what `lightning_caopd.step.result.StudentView` (any system) or
`lightning_caopd.step.result.DistillationView` (a distillation system) names.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar

from lightning_caopd.checks import check_bool, check_int, check_number
from lightning_caopd.confidence import answer_confidence_tokens, decode_all, parse_confidence
from lightning_caopd.errors import ConfigError, NonFiniteError
from lightning_caopd.files import atomic_write_text
from lightning_caopd.loggers import log_histogram, log_image, log_rollouts, logs_step, takes_media
from lightning_caopd.metrics.plot import reliability_image, save_reliability_png
from lightning_caopd.scoring import token_entropy
from lightning_caopd.sharding import full_model_state_dict, is_sharded
from lightning_caopd.step.result import DistillationView, StepResult, StudentView

METRICS_FILE = "metrics.json"


def step_outputs(outputs) -> StepResult | None:
    """A distillation step's `lightning_caopd.step.result.StepResult`, or None for other steps."""
    return outputs.get("step") if isinstance(outputs, dict) else None


class MetricsWriter(Callback):
    """Writes ``metrics.json`` and ``reliability.png`` into the run directory after evaluations.

    An evaluation before the first training step (``trainer.validate`` before ``fit``) is the
    run's ``initial`` evaluation: kept in this callback's state (so in every checkpoint, and a
    resumed run still reports it) and drawn as ``reliability_initial.png``. Every later
    evaluation rewrites ``metrics.json``: its result, ``initial`` and ``run`` (the given keys
    and the optimizer steps taken).

    Args:
        output_dir: the run directory.
        run: what to record under ``run`` (experiment, method, seed, ...).
        record_initial: treat an evaluation before ``fit`` as the initial one (False for
            ``evaluate``, whose one evaluation is its result).
        completions: also write ``completions.jsonl``, one scored completion a line.
    """

    def __init__(
        self,
        output_dir: str,
        run: dict | None = None,
        record_initial: bool = True,
        completions: bool = False,
    ) -> None:
        check_bool("callbacks.metrics.completions", completions)
        self.output_dir = Path(output_dir)
        self.run = dict(run or {})
        self.record_initial = record_initial
        self.completions = completions
        self.initial: dict | None = None
        self.result: dict | None = None  # what metrics.json holds
        self.last_step = -1  # the optimizer step of the last evaluation
        self._fitting = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._fitting = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: StudentView) -> None:
        """Record the evaluation `pl_module` just finished and write the run's files."""
        result = dict(pl_module.evaluation)
        self.last_step = trainer.global_step
        is_initial = self.record_initial and not self._fitting and trainer.global_step == 0
        if is_initial:
            self.initial = result
        else:
            self.result = {**result, "run": {**self.run, "steps": trainer.global_step}}
            if self.record_initial:
                self.result["initial"] = self.initial
        if not trainer.is_global_zero:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        name = "reliability_initial.png" if is_initial else "reliability.png"
        save_reliability_png(
            result["reliability"],
            result["ece"] or 0.0,
            self.output_dir / name,
            title=f"step {trainer.global_step}",
        )
        if is_initial:
            return
        atomic_write_text(
            self.output_dir / METRICS_FILE, json.dumps(self.result, indent=2, sort_keys=True)
        )
        if self.completions:
            lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in pl_module.evaluation_records)
            atomic_write_text(self.output_dir / "completions.jsonl", "".join(lines))

    def state_dict(self) -> dict:  # noqa: D102 - the initial evaluation travels in checkpoints
        return {"initial": self.initial}

    def load_state_dict(self, state_dict: dict) -> None:  # noqa: D102
        self.initial = state_dict.get("initial")


class StudentExport(Callback):
    """Writes the final student as a Hugging Face folder, ``<output_dir>/student/``.

    ``save_pretrained`` of the student and its tokenizer, written beside the destination and
    renamed over it (`lightning_caopd.models.save_model`), at the end of fitting (rank 0), so
    ``AutoModelForCausalLM.from_pretrained`` loads it, ``python -m lightning_caopd.evaluate
    student=<run dir>/student`` scores it and ``model.init_from=<run dir>`` starts a new run
    from it. With LoRA the folder holds the adapter (peft's ``save_pretrained``). Under
    ``trainer=fsdp`` the shards are gathered first (every rank takes part) and the folder is the
    same as one process would write; under DeepSpeed use the checkpoint instead.

    Args:
        output_dir: the run directory.
    """

    def __init__(self, output_dir: str | Path) -> None:
        super().__init__()
        self.output_dir = Path(output_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module: StudentView) -> None:  # noqa: D102
        from lightning_caopd.checkpointing import STUDENT_DIR
        from lightning_caopd.models import save_model

        student = pl_module.student
        # sharded (trainer=fsdp): every rank gathers the whole weights (a collective), rank 0 saves
        state = full_model_state_dict(student) if is_sharded(student) else None
        if trainer.is_global_zero:
            save_model(student, pl_module.tokenizer, self.output_dir / STUDENT_DIR, state)
        trainer.strategy.barrier("student_export")


class StepAware(Callback):
    """Remembers the optimizer step a training batch belongs to (as ``train/loss``)."""

    _step = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        self._step = trainer.global_step


# refused at start-up (`runner.check_config`) and again in `TeacherEMA.setup`
EMA_ON_ADAPTER_BASE = (
    "callbacks.teacher_ema.rate > 0 moves the teacher toward the student, but with model.lora "
    "the self-distillation teacher is the student's own base weights (adapter off), which the "
    "EMA would overwrite. Set callbacks.teacher_ema.rate=0, or model.lora=null."
)


class TeacherEMA(StepAware):
    """teacher <- (1 - rate) * teacher + rate * student after every optimizer step.

    With gradient accumulation the teacher moves once per optimizer step, as in the paper's
    SDFT setting (``ref_model_sync_steps=1``), and not after a step `NonFiniteGuard` skipped.

    Args:
        rate: the EMA rate in [0, 1]; 0 keeps the teacher frozen (0.01: the paper's SDFT).
    """

    def __init__(self, rate: float = 0.0) -> None:
        check_number("callbacks.teacher_ema.rate", rate, 0, 1)
        self.rate = rate

    def setup(self, trainer: L.Trainer, pl_module: DistillationView, stage: str) -> None:  # noqa: D102
        if self.rate > 0 and not pl_module.teacher.owns_weights:
            raise ConfigError(EMA_ON_ADAPTER_BASE)

    def on_train_batch_end(  # noqa: D102
        self, trainer, pl_module: DistillationView, outputs, batch, batch_idx
    ) -> None:
        if self.rate == 0 or trainer.global_step == self._step:
            return  # frozen teacher, or a micro-batch without an optimizer step
        if not any(p.grad is not None for p in pl_module.student.parameters()):
            return  # the step was skipped (NonFiniteGuard dropped the gradients)
        ema_update(pl_module.teacher, pl_module.student, self.rate)


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, rate: float) -> None:
    """Teacher <- (1 - rate) * teacher + rate * student, parameter by parameter."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.lerp_(s.detach(), rate)


class NonFiniteGuard(Callback):
    """Skips an optimizer step whose loss or gradients are NaN or infinite.

    The step's gradients are dropped before the optimizer runs, so it passes over every
    parameter: no update and no change to its moments. Skipped steps are logged as
    ``train/skipped_nonfinite``; `max_consecutive` of them in a row stop the run.

    Args:
        max_consecutive: stop after this many skipped steps in a row (None: never stop).
    """

    def __init__(self, max_consecutive: int | None = 3) -> None:
        check_int("callbacks.nonfinite_guard.max_consecutive", max_consecutive, 1, allow_none=True)
        self.max_consecutive = max_consecutive
        self.streak = 0
        self.total = 0
        self._loss_finite = True

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:  # noqa: D102
        self._loss_finite = self._loss_finite and bool(torch.isfinite(loss).all())

    def on_before_optimizer_step(self, trainer, pl_module: StudentView, optimizer) -> None:  # noqa: D102
        # the optimizer's parameters: walking the module tree (teacher, metrics) costs more
        params = (p for group in optimizer.param_groups for p in group["params"])
        finite = self._loss_finite and all_finite(params)
        self._loss_finite = True
        if not finite:
            optimizer.zero_grad(set_to_none=True)
        self.streak = 0 if finite else self.streak + 1
        self.total += not finite
        if logs_step(trainer, trainer.global_step):
            pl_module.log("train/skipped_nonfinite", float(self.total))
        if self.max_consecutive is not None and self.streak >= self.max_consecutive:
            raise NonFiniteError(
                f"Stopped at optimizer step {trainer.global_step}: the loss or the gradients "
                f"were NaN or infinite in {self.streak} steps in a row "
                f"(callbacks.nonfinite_guard.max_consecutive={self.max_consecutive}); each of "
                f"them was skipped without changing the weights ({self.total} skipped in all, "
                "logged as train/skipped_nonfinite). Common causes are a learning rate that is "
                "too high (method.optimizer.lr), fp16 overflow (use bf16 or 32-bit precision) "
                "or a broken model or batch. Fix the cause and resume from the last good "
                "checkpoint (ckpt_path=last), or raise the limit."
            )

    def state_dict(self) -> dict:  # noqa: D102
        return {"streak": self.streak, "total": self.total}

    def load_state_dict(self, state_dict: dict) -> None:  # noqa: D102
        self.streak, self.total = state_dict.get("streak", 0), state_dict.get("total", 0)


@torch.no_grad()
def all_finite(params) -> bool:
    """Whether every gradient of `params` is finite (one device sync).

    From each gradient's largest absolute value: NaN and infinity carry through ``amax``, no
    finite gradient overflows it, and on CPU it is several times faster than ``isfinite().all()``.
    """
    peaks = [p.grad.abs().amax() for p in params if p.grad is not None]
    return bool(torch.isfinite(torch.stack(peaks)).all()) if peaks else True


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, labelled for runs bounded by ``trainer.max_steps``.

    With ``max_epochs=-1`` Lightning's label reads "Epoch 0/-2"; this one reads "Training" (the
    bar counts the steps).
    """

    def _get_train_description(self, current_epoch: int) -> str:  # Lightning's label hook
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            return f"{'Training':{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)


class RolloutEntropy(StepAware):
    """``train/answer_entropy`` and ``train/confidence_entropy`` at the logged steps.

    Computed only at the steps whose scalars reach the loggers (``trainer.log_every_n_steps``).

    The student's token entropy (nats) on its rollouts' answer and confidence tokens; the
    paper's entropy collapse shows in the second. Read from the step's (B*K, T, V) student
    logits; with ``method.loss.fused=true`` those never exist (``outputs["step"].logits`` is
    None) and the two scalars are not logged (the evaluation's ``answer_entropy`` and
    ``confidence_entropy`` in ``metrics.json`` still are).
    """

    def on_train_batch_end(  # noqa: D102
        self, trainer, pl_module: StudentView, outputs, batch, batch_idx
    ) -> None:
        out = step_outputs(outputs)
        if out is None or out.logits is None or not logs_step(trainer, self._step):
            return  # not a distillation step, a fused one (no student logits), or not logged
        stats = rollout_entropies(out.logits, out.completions, pl_module.tokenizer)
        if stats:
            pl_module.log_dict(
                {k: torch.tensor(v) for k, v in stats.items()}, batch_size=len(out.items)
            )


ENTROPY_ROWS = 1024  # logit rows per entropy batch in `rollout_entropies`


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
    spans: dict[str, tuple[list[int], list[int]]] = {"answer": ([], []), "confidence": ([], [])}
    completions = [list(ids) for ids in completions]
    texts = decode_all(tokenizer, completions)
    for i, (ids, text) in enumerate(zip(completions, texts, strict=True)):
        for (rows, cols), idx in zip(
            spans.values(), answer_confidence_tokens(ids, text, tokenizer), strict=True
        ):
            rows += [i] * len(idx)
            cols += idx
    out = {}
    for name, (rows, cols) in spans.items():
        if rows:  # the spans' rows only, ENTROPY_ROWS at a time: never (N, T, V) more
            total = sum(
                token_entropy(logits[rows[j : j + ENTROPY_ROWS], cols[j : j + ENTROPY_ROWS]])
                .sum()
                .item()
                for j in range(0, len(rows), ENTROPY_ROWS)
            )
            out[f"train/{name}_entropy"] = total / len(rows)
    return out


class EveryNSteps(StepAware):
    """Acts on a distillation step's outputs every `every` optimizer steps (0, N, 2N, ...).

    Once per optimizer step (not per micro-batch), at the step the rollouts belong to (as
    ``train/loss``); steps that are not distillation steps (the warm-up's) are passed over.
    Subclasses implement `on_due_step`.

    Args:
        every: optimizer steps between calls; 0 never calls.
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        step, out = self._step, step_outputs(outputs)
        if out is None or not self.every or step % self.every or step == self._last_step:
            return  # not a distillation step, off the schedule, or a later micro-batch
        self._last_step = step
        self.on_due_step(trainer, pl_module, out, step)

    def on_due_step(self, trainer, pl_module: StudentView, out: StepResult, step: int) -> None:
        """The work of a scheduled step: `out` is its `lightning_caopd.step.result.StepResult`."""
        raise NotImplementedError


class RolloutTable(EveryNSteps):
    """A table of sample rollouts every `every` optimizer steps.

    A W&B table, a TensorBoard text and ``csv/rollouts.csv``: prompt, completion, parsed
    answer, confidence, verdict, P_acc.

    Args:
        every: optimizer steps between tables (0: never).
        rows: rows per table, one rollout per prompt before a second.
    """

    def __init__(self, every: int = 50, rows: int = 8) -> None:
        check_int("callbacks.rollout_table.every", every, 0)
        check_int("callbacks.rollout_table.rows", rows, 1)
        super().__init__(every)
        self.rows = rows

    def on_due_step(self, trainer, pl_module: StudentView, out: StepResult, step: int) -> None:  # noqa: D102
        rows = rollout_rows(
            step, out.items, pl_module.task, out.texts, out.correct, out.p_acc, self.rows
        )
        log_rollouts(trainer.loggers, rows, step)


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
    return [
        [
            step,
            task.student_messages(items[i // k])[-1]["content"],
            texts[i],
            task.parse_answer(texts[i]),
            parse_confidence(texts[i]),
            bool(correct[i]),
            round(float(p_acc[i // k]), 4),
        ]
        for i in order
    ]


class PAccHistogram(StepAware):
    """A histogram of the step's P_acc (one value per prompt) for W&B and TensorBoard.

    At the steps whose scalars reach the loggers (``trainer.log_every_n_steps``).
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        out = step_outputs(outputs)
        if out is not None and takes_media(trainer.loggers) and logs_step(trainer, self._step):
            log_histogram(trainer.loggers, "train/p_acc", out.p_acc.cpu(), trainer.global_step)


class ReliabilityImage(Callback):
    """Each evaluation's reliability diagram as an image (``val/reliability``).

    For W&B and TensorBoard; the CSV logger's run directory has the PNG.
    """

    def on_validation_end(self, trainer, pl_module) -> None:  # noqa: D102
        result = getattr(pl_module, "evaluation", None)
        if not result or not result.get("n") or not takes_media(trainer.loggers):
            return
        if isinstance(result["ece"], float) and math.isnan(result["ece"]):
            return
        image = reliability_image(
            result["reliability"], result["ece"], f"step {trainer.global_step}"
        )
        log_image(trainer.loggers, "val/reliability", image, trainer.global_step)


class TeacherSuccess(EveryNSteps):
    """The teacher's own success on the step's privileged prompts, every `every_n_steps` steps.

    The paper's optimism bias (arXiv 2604.16830) during training: on the teacher prompts the
    step trained on (with CaOPD's rewritten contexts), the teacher samples with the step's
    rollout settings (`TeacherDiagnostics.sample_teacher`: K per group prompt, one per
    per-rollout prompt), the task verifies the samples, and the callback logs
    ``train/teacher_success`` (share correct), ``train/teacher_optimism_gap`` (that minus the
    step's mean student P_acc) and ``train/teacher_format_rate`` (share stating a confidence).
    Rollouts without a context (``sdpo_sibling`` with no successful sibling) are left out. The
    sampling saves and restores every random generator, so the student's later rollouts are
    those of a run without this callback. Written to the loggers (rank 0's batch, as the other
    ``train/`` scalars) at the step the rollouts belong to, as ``train/loss``. With `TeacherEMA`
    listed first (as in ``conf/callbacks/``) the teacher sampled is the one after the step's
    EMA update.

    Args:
        every_n_steps: optimizer steps between measurements (steps 0, N, 2N, ...).
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        check_int("callbacks.teacher_success.every_n_steps", every_n_steps, 1)
        super().__init__(every_n_steps)

    def on_due_step(  # noqa: D102
        self, trainer, pl_module: DistillationView, out: StepResult, step: int
    ) -> None:
        roll = pl_module.sample_teacher(out.teacher_prompts)
        correct, _ = pl_module.verify(out.items, roll.texts)
        stats = teacher_success_stats(correct, roll.texts, out.teacher_rows, out.p_acc)
        for lg in trainer.loggers if stats else ():
            # straight to the loggers: a value given to `self.log` would be repeated at every
            # later step of the epoch, where nothing was measured
            lg.log_metrics(stats, step=step)
            lg.save()  # as Lightning does after each write


def teacher_success_stats(
    correct: torch.Tensor, texts: list[str], rows: torch.Tensor, p_acc: torch.Tensor
) -> dict[str, float]:
    """`TeacherSuccess`'s scalars from the teacher's B*K verified samples.

    Args:
        correct: (B*K,) verdicts of the teacher's samples, prompt-major.
        texts: their B*K texts.
        rows: (B*K,) bool, the samples drawn from a privileged prompt (the step's loss rows).
        p_acc: (B,) the student's P_acc on the step.

    Returns:
        ``train/teacher_success``, ``train/teacher_optimism_gap`` and
        ``train/teacher_format_rate``; empty when no sample had a privileged prompt.

    Example:
        >>> teacher_success_stats(
        ...     torch.tensor([True, True, False, True]),
        ...     ["Answer: a\\nConfidence: 1.00", "Answer: a", "Answer: b", "Answer: c"],
        ...     torch.tensor([True, True, True, False]),
        ...     torch.tensor([0.5, 0.0]),
        ... )  # doctest: +NORMALIZE_WHITESPACE +ELLIPSIS
        {'train/teacher_success': 0.666..., 'train/teacher_optimism_gap': 0.416...,
         'train/teacher_format_rate': 0.333...}
    """
    rows = rows.cpu()
    if not rows.any():
        return {}
    formatted = torch.tensor([parse_confidence(t) is not None for t in texts])
    success = correct.cpu()[rows].float().mean().item()
    return {
        "train/teacher_success": success,
        "train/teacher_optimism_gap": success - p_acc.float().mean().item(),
        "train/teacher_format_rate": formatted[rows].float().mean().item(),
    }
