"""Scoring a model on held-out items: answers, confidences and token entropies.

Greedy and without privileged context; the LightningModules' validation step calls
`evaluate_items`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_caopd.confidence import PARSERS, answer_confidence_tokens
from lightning_caopd.rollout import build_batch, completion_logits, encode_chats, sample
from lightning_caopd.tasks.base import Task

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
        records: one dict per item (``completions.jsonl``): id, category, the prompt as the
            model saw it (after any truncation), the completion and its scores.
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
) -> EvalBatch:
    """Answer `items` without privileged context and score every answer and confidence.

    A prompt longer than `max_prompt_length` tokens loses its left end; how many did is logged.
    `scoring` picks the confidence parser (`lightning_caopd.confidence.PARSERS`): ``default``
    or ``reference`` (the released CaOPD scorer's rules; its confidences are kept in float64,
    as the reference's numpy arrays are, so its bins see the same values).
    `chat_template_kwargs` go to every chat-template call (e.g. ``enable_thinking=False``).
    """
    prompts, n_cut = encode_chats(
        tokenizer,
        [task.student_messages(it) for it in items],
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
    roll = sample(model, tokenizer, prompts, 1, max_new_tokens, temperature, do_sample=do_sample)
    conf = parse_confidences(roll.texts, scoring)
    correct = torch.tensor([task.verify(t, it) for t, it in zip(roll.texts, items, strict=True)])
    cats = list(task.categories)
    category = torch.tensor(
        [cats.index(it["category"]) if it["category"] in cats else -1 for it in items]
    )

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
                "prompt": tokenizer.decode(prompts[i]),
                "completion": text,
                "answer": task.parse_answer(text),
                "confidence": None if conf[i].isnan() else conf[i].item(),
                "correct": bool(correct[i]),
                "truncated": roll.truncated[i],
            }
        )
    return EvalBatch(conf, correct, category, (a_sum, int(a_n)), (c_sum, int(c_n)), records)
