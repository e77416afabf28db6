"""Divergences on a top-k + tail support: k selected tokens plus one bucket for the rest.

Instead of comparing the student and teacher over all V vocabulary entries, both distributions
are coarsened onto k + 1 points: the k tokens the teacher ranks highest, and one tail bucket
holding each model's own remaining mass (1 - the sum of its probabilities of those k tokens).
Each coarsened distribution still sums to 1, so the usual divergences apply unchanged; by the
data-processing inequality they lower-bound the full-vocabulary ones and equal them at k = V.
This is the "top-k distillation with a tail" of SDPO (Huebotter et al., "Reinforcement Learning
via Self-Distillation", arXiv 2601.20802; its verl recipe) and TRL's self-distillation trainers.

The tail is computed in log space as the logsumexp of the log-probabilities outside the support
(not log1p(-sum of top-k), which loses every digit when the top-k mass is close to 1). An empty
tail (k = V, or all remaining entries at -inf) is log 0 = -inf, which the kernels of
``lightning_caopd.divergence.token`` already count as 0 log 0 = 0 with finite gradients.

The support is chosen from the teacher by default (``support="teacher"``, as this project's
brief and SDFT do); ``support="student"`` selects the student's top-k instead, which is what the
SDPO verl code does. Either way the selection itself carries no gradient, and the teacher side
is detached: only the student's logits receive gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_caopd.divergence.token import (
    _KERNELS,
    _log_probs,
    _validate,
    weighted_mean_loss,
)

SUPPORTS = ("teacher", "student")


def _check_topk(k: int, vocab: int, support: str) -> None:
    """Raise ValueError unless 1 <= k <= vocab and ``support`` is one of ``SUPPORTS``."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, V = {vocab}]; got {k!r}.")
    if support not in SUPPORTS:
        raise ValueError(f"Unknown top-k support {support!r}; accepted values are {SUPPORTS}.")


def _tail_log_prob(log_probs: Tensor, index: Tensor) -> Tensor:
    """Return log(1 - sum_{v in index} p_v) as the logsumexp of the log-probs outside ``index``.

    Args:
        log_probs: (..., V) normalised log-probabilities.
        index: (..., k) vocabulary indices of the support.

    Returns:
        (..., 1) log tail mass, -inf where nothing is left outside the support.
    """
    rest = log_probs.scatter(-1, index, float("-inf"))  # (..., V): support entries removed
    empty = torch.isneginf(rest).all(-1, keepdim=True)  # (..., 1)
    # logsumexp over an all -inf row is -inf, but its backward forms exp(-inf - -inf) = NaN,
    # which a zero upstream gradient does not cancel; feed such rows zeros and mask the result.
    lse = torch.logsumexp(torch.where(empty, 0.0, rest), dim=-1, keepdim=True)  # (..., 1)
    return torch.where(empty, float("-inf"), lse)


def topk_tail_log_probs(
    student_log_probs: Tensor,
    teacher_log_probs: Tensor,
    k: int,
    support: str = "teacher",
) -> tuple[Tensor, Tensor]:
    """Coarsen two (..., V) log-distributions onto the same top-k + tail support.

    Args:
        student_log_probs: (..., V) student log-probabilities (log-softmax of its logits).
        teacher_log_probs: (..., V) teacher log-probabilities.
        k: Number of tokens kept, 1 <= k <= V.
        support: "teacher" ranks tokens by the teacher's probabilities, "student" by the
            student's.

    Returns:
        ``(student, teacher)``, each (..., k + 1): the log-probabilities of the k selected
        tokens (in the selecting model's descending order), then the model's own log tail mass.

    Raises:
        ValueError: On k outside [1, V] or an unknown support.
    """
    _check_topk(k, student_log_probs.shape[-1], support)
    ranked = teacher_log_probs if support == "teacher" else student_log_probs
    index = ranked.detach().topk(k, dim=-1).indices  # (..., k)
    student = torch.cat(
        [student_log_probs.gather(-1, index), _tail_log_prob(student_log_probs, index)], dim=-1
    )  # (..., k + 1)
    teacher = torch.cat(
        [teacher_log_probs.gather(-1, index), _tail_log_prob(teacher_log_probs, index)], dim=-1
    )  # (..., k + 1)
    return student, teacher


def topk_tail_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    k: int,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    support: str = "teacher",
) -> Tensor:
    """Per-token divergence of one of ``KINDS`` on the top-k + tail support, zero where masked.

    ``kind`` and ``beta`` follow ``token_divergence``: "forward_kl" is KL(teacher || student),
    "reverse_kl" KL(student || teacher), "jsd" the generalized JSD with TRL's convention (beta = 0
    forward KL, beta = 1 reverse KL), all computed between the two (k + 1)-point distributions of
    ``topk_tail_log_probs``. The teacher's logits are detached.

    Args:
        student_logits: (N, T, V) student logits at the completion positions.
        teacher_logits: (N, T, V) teacher logits at the same positions.
        mask: (N, T) bool or 0/1; positions where it is true count. None counts all.
        k: Size of the support before the tail bucket, 1 <= k <= V; k = V gives the
            full-vocabulary divergence.
        kind: "forward_kl", "reverse_kl" or "jsd".
        beta: JSD weight in [0, 1]; ignored by the KL kinds.
        temperature: Both logits are divided by it before the softmax (no temperature**2).
        support: Which model's top-k tokens form the support: "teacher" or "student".

    Returns:
        (N, T) per-token divergence in float32 (float64 for float64 logits), zero where
        ``mask`` is false.

    Raises:
        ValueError: On an unknown kind or support, mismatched shapes, beta outside [0, 1], a
            non-positive temperature or k outside [1, V].
    """
    mask = _validate(student_logits, teacher_logits, mask, kind, beta, temperature, None)
    _check_topk(k, student_logits.shape[-1], support)
    s_lp = _log_probs(student_logits, temperature)  # (N, T, V)
    t_lp = _log_probs(teacher_logits.detach(), temperature)  # (N, T, V)
    s_sup, t_sup = topk_tail_log_probs(s_lp, t_lp, k, support)  # (N, T, k + 1) each
    per_token = _KERNELS[kind](s_sup, t_sup, float(beta))  # (N, T)
    return torch.where(mask, per_token, 0.0)


def topk_tail_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    k: int,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    support: str = "teacher",
    token_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sequence-mean top-k + tail divergence loss; the counterpart of ``divergence_loss``.

    Args:
        student_logits: (N, T, V) student logits at the completion positions.
        teacher_logits: (N, T, V) teacher logits (detached here).
        mask: (N, T) positions that count (apply ``skip_first_tokens`` beforehand if wanted).
        k: Support size before the tail bucket, 1 <= k <= V.
        kind: "forward_kl", "reverse_kl" or "jsd".
        beta: JSD weight; ignored by the KL kinds.
        temperature: Divides both logits before the softmax.
        support: "teacher" or "student" top-k.
        token_weights: (N, T) constant per-token weights (``divergence_loss``); None: all 1.

    Returns:
        ``(loss, per_token)``: the scalar ``sequence_mean_loss`` and the (N, T) per-token
        divergence, zero at masked positions.

    Raises:
        ValueError: On invalid arguments (see ``topk_tail_divergence``).
    """
    per_token = topk_tail_divergence(
        student_logits,
        teacher_logits,
        mask,
        k=k,
        kind=kind,
        beta=beta,
        temperature=temperature,
        support=support,
    )
    return weighted_mean_loss(per_token, mask, token_weights), per_token
