"""The loss path ``method.loss`` chooses: the forwards a step runs and the divergence on them.

* `LogitsPath`: both models' (B*K, T, V) logits on the completions and the full-vocabulary
  divergence (chunked over positions with ``chunk_size``).
* `TopKPath`: the same logits, the divergence on the top-k + tail support (``topk``).
* `FusedPath`: the bodies' last hidden states and the output heads, the divergence computed one
  chunk of positions at a time (``fused``): no (B*K, T, V) logits exist.

`loss_path` picks one from `LossSettings`; its `LossPath.check` refuses at start-up what the
models cannot serve. Each path runs the teacher under ``no_grad`` and frees its logits before
backward; rollouts that carry their sampler's log-probs (vLLM) are weighted by `Importance`.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

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
from lightning_caopd.errors import ConfigError
from lightning_caopd.rollout import (
    Rollouts,
    completion_hidden,
    completion_logits,
    repeated_prefix,
    right_pad,
    shared_prefix_hidden,
    shared_prefix_logits,
)
from lightning_caopd.settings import LossSettings
from lightning_caopd.step.teacher import Teacher

FUSED_CHUNK_SIZE = 256  # positions per chunk of the fused divergence when loss.chunk_size is null

# (B*K, T) token ids, sampling temperature -> the student's (B*K, T) log-probs of them
LogProbs = Callable[[Tensor, float], Tensor]


@dataclass
class LossOutput:
    """What a loss path computed.

    Attributes:
        loss: the scalar loss.
        per_token: (B*K, T) the divergence per completion token, zero outside the mask.
        mask: (B*K, T) bool, the positions in the loss.
        logits: the student's (B*K, T, V) logits; None on the fused path.
        correction: the importance weights' statistics ({} without sampler log-probs).
    """

    loss: Tensor
    per_token: Tensor
    mask: Tensor
    logits: Tensor | None
    correction: dict


@dataclass
class Importance:
    """The truncated importance weights of rollouts another engine sampled (vLLM).

    Attributes:
        sampled: the step's rollouts, with their sampler's log-probs.
        completions: the B*K training completions.
        pad_id: the padding id.
        cap: the weight cap (None: statistics only, no weighting).
        temperature: the sampling temperature (``rollout.temperature``): the student's
            log-probs are taken at it, the distribution the sampler drew from, whatever
            ``loss.temperature`` is.
    """

    sampled: Rollouts
    completions: list[list[int]]
    pad_id: int
    cap: float | None
    temperature: float

    def __call__(self, mask: Tensor, student_log_probs: LogProbs) -> tuple[Tensor | None, dict]:
        """The (B*K, T) weights (None: no weighting) and their statistics.

        Args:
            mask: (B*K, T) the loss mask.
            student_log_probs: the student's log-probs of token ids, from the step's logits or
                hidden states.
        """
        width = mask.shape[1]
        ids, _ = right_pad(self.completions, self.pad_id, mask.device)
        sampler = sampled_log_probs(
            self.sampled.completions, self.sampled.logprobs, self.completions, width
        )
        cap = math.inf if self.cap is None else self.cap
        weights, stats = truncated_importance_weights(
            student_log_probs(ids[:, :width], self.temperature), sampler, mask, cap
        )
        return (None if self.cap is None else weights), stats


@dataclass
class LossBatch:
    """The step's tokens a loss path runs the models on.

    Attributes:
        prompts: B student prompts.
        teacher_prompts: B teacher prompts, or B*K (one per rollout).
        completions: B*K training completions, prompt-major.
        rows: (B*K,) bool, the rollouts that count (None: all).
        importance: the correction of rollouts another engine sampled (None: none).
        device: where the forwards run.
    """

    prompts: list[list[int]]
    teacher_prompts: list[list[int]]
    completions: list[list[int]]
    rows: Tensor | None = None
    importance: Importance | None = None
    device: torch.device | None = None

    def weigh(self, mask: Tensor, student_log_probs: LogProbs) -> tuple[Tensor | None, dict]:
        """The importance weights and their statistics, or (None, {}) without a correction."""
        return (None, {}) if self.importance is None else self.importance(mask, student_log_probs)


class LossPath(ABC):
    """The loss on the completions, from the student, the teacher and the step's tokens.

    Args:
        settings: ``method.loss``.
        pad_id: the tokenizer's padding id.

    Attributes:
        sharding_refusal: why the path cannot run under ``trainer=fsdp`` (None: it can).
    """

    sharding_refusal: str | None = None

    def __init__(self, settings: LossSettings, pad_id: int) -> None:
        self.settings, self.pad_id = settings, pad_id
        # (model, B prompts, B*K completions, pad id, device) -> (B*K, T, V or H), (B*K, T) mask
        if settings.share_prompt_prefix:  # each prompt encoded once for its K completions
            self.logits, self.hidden = shared_prefix_logits, shared_prefix_hidden
        else:
            self.logits = functools.partial(repeated_prefix, completion_logits)
            self.hidden = functools.partial(repeated_prefix, completion_hidden)
        # the divergence's own options, on every path
        self.kernel = {
            "kind": settings.divergence,
            "beta": settings.jsd_beta,
            "temperature": settings.temperature,
        }

    def check(self, student: torch.nn.Module, teacher: Teacher) -> None:
        """Refuse at start-up what the models cannot serve: ``topk`` above the vocabulary.

        Raises:
            ConfigError: naming the key and what to change.
        """
        vocab = student.get_output_embeddings().weight.shape[0]
        topk = self.settings.topk
        if topk is not None and topk > vocab:
            raise ConfigError(
                f"method.loss.topk={topk} exceeds the vocabulary ({vocab} tokens); set it to at "
                f"most {vocab}, or null for the full vocabulary."
            )

    def mask(self, completion_mask: Tensor, rows: Tensor | None) -> Tensor:
        """(B*K, T) positions in the loss: completions, less the skipped first tokens and rows."""
        mask = skip_first_tokens(completion_mask, self.settings.skip_first_tokens)
        return mask if rows is None else mask & rows.to(mask.device)[:, None]

    @abstractmethod
    def __call__(self, student: torch.nn.Module, teacher: Teacher, batch: LossBatch) -> LossOutput:
        """The divergence between teacher and student next-token distributions on completions.

        Both models' logits are divided by ``loss.temperature`` before the divergence; the
        teacher runs under ``no_grad``.
        """


class LogitsPath(LossPath):
    """The divergence over the full vocabulary from materialised logits (chunked or not)."""

    def __call__(  # noqa: D102 - see LossPath.__call__
        self, student: torch.nn.Module, teacher: Teacher, batch: LossBatch
    ) -> LossOutput:
        with torch.no_grad():
            teacher_logits, _ = self.logits(
                teacher, batch.teacher_prompts, batch.completions, self.pad_id, batch.device
            )
        student_logits, completion_mask = self.logits(
            student, batch.prompts, batch.completions, self.pad_id, batch.device
        )
        mask = self.mask(completion_mask, batch.rows)
        weights, correction = batch.weigh(
            mask, lambda ids, t: token_log_probs(student_logits, ids, t)
        )
        loss, per_token = self.divergence(student_logits, teacher_logits, mask, weights)
        del teacher_logits  # free (B*K, T, V) before backward
        return LossOutput(loss, per_token, mask, student_logits, correction)

    def divergence(
        self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, weights: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The loss and the per-token divergence of (B*K, T, V) logits."""
        return divergence_loss(
            student_logits,
            teacher_logits,
            mask,
            **self.kernel,
            chunk_size=self.settings.chunk_size,
            token_weights=weights,
        )


class TopKPath(LogitsPath):
    """The divergence on the top-k tokens and one tail bucket (``topk``, ``topk_support``)."""

    def divergence(self, student_logits, teacher_logits, mask, weights):  # noqa: D102
        return topk_tail_loss(
            student_logits,
            teacher_logits,
            mask,
            **self.kernel,
            k=self.settings.topk,
            support=self.settings.topk_support,
            token_weights=weights,
        )


class FusedPath(LossPath):
    """The divergence from the bodies' last hidden states and the output heads, chunk by chunk.

    Full vocabulary or top-k + tail; no (B*K, T, V) logits exist (`fused_linear_divergence`).
    """

    sharding_refusal = (
        "method.loss.fused=true runs the models' bodies without their heads (get_decoder()), "
        "outside the forward of the sharded model, whose embeddings and head are then still "
        "sharded: it is not supported under trainer=fsdp. Set method.loss.fused=false (the loss "
        "is the same) or use trainer=ddp."
    )

    def check(self, student: torch.nn.Module, teacher: Teacher) -> None:
        """Also: each model's head is a plain ``torch.nn.Linear`` and its body reachable.

        A head tied to the input embedding or not; LoRA on the head, or a head that is another
        module, is refused, and so is a model without ``get_decoder()``.
        """
        super().check(student, teacher)
        for role, model in (("student", student), ("teacher", teacher.model)):
            head = getattr(model, "get_output_embeddings", lambda: None)()
            lora = any("lora" in n.lower() for n, _ in head.named_modules()) if head else False
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
                    f"get_decoder(), which {type(model).__name__} lacks; set "
                    "method.loss.fused=false."
                )

    def __call__(  # noqa: D102 - see LossPath.__call__
        self, student: torch.nn.Module, teacher: Teacher, batch: LossBatch
    ) -> LossOutput:
        s = self.settings
        with torch.no_grad():
            teacher_hidden, _ = self.hidden(
                teacher.body, batch.teacher_prompts, batch.completions, self.pad_id, batch.device
            )
        student_hidden, completion_mask = self.hidden(
            lambda **inputs: student.get_decoder()(**inputs),
            batch.prompts,
            batch.completions,
            self.pad_id,
            batch.device,
        )
        mask = self.mask(completion_mask, batch.rows)
        student_head = OutputHead.from_causal_lm(student)
        chunk = s.chunk_size or FUSED_CHUNK_SIZE
        weights, correction = batch.weigh(
            mask,
            lambda ids, t: target_log_probs(student_hidden, student_head, ids, mask, t, chunk),
        )
        loss, per_token = fused_linear_divergence(
            student_hidden,  # (B*K, T, H)
            student_head,
            teacher_hidden,  # (B*K, T, H')
            OutputHead.from_causal_lm(teacher.model),
            mask,
            **self.kernel,
            topk=s.topk,
            topk_support=s.topk_support,
            chunk_size=chunk,
            token_weights=weights,
        )
        return LossOutput(loss, per_token, mask, None, correction)


def loss_path(settings: LossSettings, pad_id: int) -> LossPath:
    """The path ``method.loss`` chooses: fused, else top-k + tail, else the full vocabulary."""
    if settings.fused:
        return FusedPath(settings, pad_id)
    return (LogitsPath if settings.topk is None else TopKPath)(settings, pad_id)
