"""Scoring a model on held-out items: answers, confidences and token entropies.

Greedy and, for the student, without privileged context; the LightningModules' validation step
calls `evaluate_items` and accumulates its batches in `EvalScores`. `teacher_conditioned` sets
the teacher's scores with the privileged context beside the student's (the paper's optimism bias
and entropy collapse of the teacher-conditioned target).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torchmetrics import MeanMetric
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_caopd.confidence import PARSERS, answer_confidence_tokens, reference_reading
from lightning_caopd.engines import RolloutEngine
from lightning_caopd.metrics import CalibrationMetrics
from lightning_caopd.readout import expected_confidences
from lightning_caopd.rollout import build_batch, completion_logits, encode_chats, sample
from lightning_caopd.tasks.base import Task, task_scores

log = logging.getLogger(__name__)


@dataclass
class EvalBatch:
    """What one evaluation batch produced.

    Attributes:
        confidence: (N,) parsed confidences, NaN where none could be parsed.
        correct: (N,) verifier verdicts.
        category: (N,) index of each item's category in the task's categories.
        answer_entropy: (sum, count) of the student's token entropy (nats) on answer tokens.
        confidence_entropy: (sum, count) of the same on the confidence value's tokens.
        records: one dict per item (``completions.jsonl``): id, category, the item's answer
            (``gold``), the prompt as the model saw it (after any truncation), the completion
            and its scores; with ``eval.protocol=reference`` also the reference scorer's
            verdict (`reference_record`).
    """

    confidence: torch.Tensor
    correct: torch.Tensor
    category: torch.Tensor
    answer_entropy: tuple[float, int] = (0.0, 0)
    confidence_entropy: tuple[float, int] = (0.0, 0)
    records: list[dict] = field(default_factory=list)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) over the last dimension."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def parse_confidences(texts: list[str], scoring: str = "default") -> torch.Tensor:
    """(N,) stated confidences of `texts`, NaN where none is stated.

    Args:
        texts: completions.
        scoring: ``default`` (`parse_confidence`, float32) or ``reference``
            (`parse_confidence_reference`, float64 as the reference's numpy arrays, so that its
            bins see the values it sees).
    """
    parse = PARSERS[scoring]
    return torch.tensor(
        [c if (c := parse(t)) is not None else float("nan") for t in texts],
        dtype=torch.float64 if scoring == "reference" else None,
    )


def verdicts(task: Task, texts: list[str], items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) whether each text answers its item (at ``task.pass_score``) and (N,) its category.

    A verifier that raises scores 0 (`task_scores`); a category outside ``task.categories``
    is -1 (counted overall only). `evaluate_items` and ``rescore`` share it, so a re-score
    gives the run's verdicts.
    """
    scores, _ = task_scores(task, texts, items)
    cats = list(task.categories)
    category = [cats.index(it["category"]) if it["category"] in cats else -1 for it in items]
    return torch.tensor(scores) >= task.pass_score, torch.tensor(category)


@torch.no_grad()
def evaluate_items(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    items: list[dict],
    max_new_tokens: int = 32,
    max_prompt_length: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    scoring: str = "default",
    chat_template_kwargs: dict | None = None,
    chats: list[list[dict]] | None = None,
    confidence_readout: str = "greedy",
    engine: RolloutEngine | None = None,
    protocol: str = "default",
) -> EvalBatch:
    """Answer `items` and score every answer and confidence.

    The model sees each item's student prompt (no privileged context) unless `chats` gives
    other messages, one chat per item (the teacher's, with the context). A prompt longer than
    `max_prompt_length` tokens loses its left end; how many did is logged.
    `scoring` picks the confidence parser (`lightning_caopd.confidence.PARSERS`): ``default``
    or ``reference`` (the released CaOPD scorer's rules; its confidences are kept in float64,
    as the reference's numpy arrays are, so its bins see the same values).
    `chat_template_kwargs` go to every chat-template call (e.g. ``enable_thinking=False``).
    `confidence_readout` ``expected`` replaces each stated confidence by the mean of the
    model's confidence distribution after its answer (`lightning_caopd.readout`); the records
    keep the written one as ``confidence_greedy``.
    `engine` (a `lightning_caopd.engines.RolloutEngine` synced to `model`, e.g. vLLM's)
    generates the completions instead of `model`; `model` still scores their tokens.
    `protocol` ``reference`` scores the items' own chats (no confidence instruction; see
    `Task.eval_messages`) and keeps the reference scorer's verdict in each record.
    """
    prompts, n_cut = encode_chats(
        tokenizer,
        [task.eval_messages(it, protocol) for it in items] if chats is None else chats,
        max_prompt_length,
        chat_template_kwargs=chat_template_kwargs,
    )
    if n_cut:
        log.warning(
            "%d of %d evaluation prompts were longer than eval.max_prompt_length=%s tokens and "
            "lost their left end (completions.jsonl shows the prompts as the model saw them).",
            n_cut,
            len(items),
            max_prompt_length,
        )
    if engine is None:
        roll = sample(
            model, tokenizer, prompts, 1, max_new_tokens, temperature, do_sample=do_sample
        )
    else:
        roll = engine.sample(prompts, 1, max_new_tokens, temperature if do_sample else 0.0, 1.0)
    conf = parse_confidences(roll.texts, scoring)
    written = conf
    if confidence_readout == "expected":
        conf, mass = expected_confidences(model, tokenizer, prompts, roll.completions, roll.texts)
    correct, category = verdicts(task, roll.texts, items)

    batch = build_batch(
        prompts, roll.completions, tokenizer.pad_token_id, next(model.parameters()).device
    )
    ent = token_entropy(completion_logits(model, batch)).cpu()  # (N, T)
    a_sum = a_n = c_sum = c_n = 0.0
    records = []
    for i, (ids, text) in enumerate(zip(roll.completions, roll.texts, strict=True)):
        a_idx, c_idx = answer_confidence_tokens(ids, text, tokenizer)
        a_sum += ent[i, a_idx].sum().item()
        a_n += len(a_idx)
        c_sum += ent[i, c_idx].sum().item()
        c_n += len(c_idx)
        records.append(
            {
                "id": items[i]["id"],
                "category": items[i]["category"],
                "gold": items[i]["answer"],
                "prompt": tokenizer.decode(prompts[i]),
                "completion": text,
                "answer": task.parse_answer(text),
                "confidence": None if conf[i].isnan() else conf[i].item(),
                "correct": bool(correct[i]),
                "truncated": roll.truncated[i],
            }
        )
        if confidence_readout == "expected":
            records[-1]["confidence_greedy"] = None if written[i].isnan() else written[i].item()
            records[-1]["confidence_grid_mass"] = None if mass[i].isnan() else mass[i].item()
        if protocol == "reference":
            records[-1]["reference"] = reference_record(task, text, items[i])
    return EvalBatch(conf, correct, category, (a_sum, int(a_n)), (c_sum, int(c_n)), records)


def reference_record(task: Task, completion: str, item: dict) -> dict:
    """The reference scorer's verdict on one completion, as ``completions.jsonl`` keeps it.

    Returns:
        ``{"correct", "parsed", "format_ok", "confidence"}``: `Task.reference_verdict` and
        `lightning_caopd.confidence.reference_reading` (0.0 where none is stated).
    """
    correct, parsed = task.reference_verdict(completion, item)
    format_ok, confidence = reference_reading(completion)
    return {
        "correct": bool(correct),
        "parsed": parsed,
        "format_ok": format_ok,
        "confidence": confidence,
    }


def gather_records(records: list[dict]) -> list[dict]:
    """Every rank's records, rank by rank (the records themselves with one process).

    Under DDP each rank scores its share of the items; ``completions.jsonl`` and the
    ``reference`` block need them all. Every rank must call this together.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return records
    shares: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shares, records)
    return [r for share in shares for r in share]


class EvalScores(nn.Module):
    """An evaluation's running scores: `CalibrationMetrics` and the token-weighted entropies.

    Every state is a torchmetrics state, so `compute` gives each rank the scores of all ranks'
    items; all ranks must call it together.

    Args:
        categories: the task's categories (``by_category``); empty for none.
        scoring: ``default`` or ``reference`` (the ECE's bins, as `evaluate_items`'s parser).
    """

    def __init__(self, categories: list[str] | None = None, scoring: str = "default") -> None:
        super().__init__()
        self.calibration = CalibrationMetrics(
            categories=list(categories or []),
            binning="reference" if scoring == "reference" else "uniform",
        )
        self.answer_entropy = MeanMetric()
        self.confidence_entropy = MeanMetric()

    def update(self, out: EvalBatch) -> None:
        """Add one `evaluate_items` batch."""
        dev = self.answer_entropy.device
        category = out.category.to(dev) if self.calibration.categories else None
        self.calibration.update(out.confidence.to(dev), out.correct.to(dev), category)
        # token-weighted means: value is the mean entropy of the batch, weight its token count
        for metric, (s, n) in (
            (self.answer_entropy, out.answer_entropy),
            (self.confidence_entropy, out.confidence_entropy),
        ):
            if n:
                metric.update(torch.tensor(s / n, device=dev), n)

    def compute(self) -> dict:
        """`CalibrationMetrics.compute` with ``answer_entropy`` and ``confidence_entropy``.

        An entropy is None when no item had such tokens.
        """
        result = self.calibration.compute()
        for name, metric in (
            ("answer_entropy", self.answer_entropy),
            ("confidence_entropy", self.confidence_entropy),
        ):
            value = metric.compute().item() if metric.update_count else float("nan")
            result[name] = None if math.isnan(value) else value
        return result

    def reset(self) -> None:
        """Forget all batches."""
        for metric in (self.calibration, self.answer_entropy, self.confidence_entropy):
            metric.reset()


# the teacher's own scores kept in metrics.json's `teacher_conditioned` block
TEACHER_KEYS = (
    "n",
    "accuracy",
    "format_rate",
    "mean_confidence",
    "confidence_entropy",
    "answer_entropy",
)


def teacher_conditioned(teacher: dict, student: dict) -> dict:
    """The ``teacher_conditioned`` block of ``metrics.json``: the teacher beside the student.

    The teacher answers the held-out items with the privileged context, the student without
    (arXiv 2604.16830): ``optimism_gap`` = teacher accuracy - student accuracy (positive: the
    context lifts the teacher above what the student can reach without it) and
    ``entropy_gap`` = teacher confidence entropy - student confidence entropy (negative: the
    teacher is the more certain, the entropy collapse). A gap is None where an input is.

    Args:
        teacher: `EvalScores.compute` of the teacher's evaluation.
        student: that of the student's, on the same items.

    Returns:
        `TEACHER_KEYS` of the teacher, ``student_accuracy``, ``student_confidence_entropy``,
        ``optimism_gap`` and ``entropy_gap``.

    Example:
        >>> block = teacher_conditioned(
        ...     {"n": 4, "accuracy": 1.0, "format_rate": 1.0, "mean_confidence": 1.0,
        ...      "confidence_entropy": 0.25, "answer_entropy": 0.5},
        ...     {"accuracy": 0.75, "confidence_entropy": None},
        ... )
        >>> block["optimism_gap"], block["entropy_gap"]
        (0.25, None)
    """
    block = {k: teacher[k] for k in TEACHER_KEYS}
    block["student_accuracy"] = student["accuracy"]
    block["student_confidence_entropy"] = student["confidence_entropy"]
    block["optimism_gap"] = _difference(block["accuracy"], block["student_accuracy"])
    block["entropy_gap"] = _difference(
        block["confidence_entropy"], block["student_confidence_entropy"]
    )
    return block


def _difference(a: float | None, b: float | None) -> float | None:
    """The difference a - b, or None when either is None."""
    return None if a is None or b is None else a - b
