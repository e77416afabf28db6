"""The truncated importance weight for rollouts sampled by another engine (vLLM).

An engine with its own copy of the weights (vLLM: other kernels, other batching, maybe bf16)
samples from a distribution ``q`` slightly different from the student's ``p``. The paper's
released code (``vllm_importance_sampling_correction=True``, cap 2.0, as TRL) multiplies each
sampled token's loss by the truncated ratio ``w = min(p(y_t) / q(y_t), cap)``, computed from the
student's log-prob of the sampled token (at the sampling temperature, without gradient) and the
sampler's. Tokens the sampler did not draw (CaOPD's rewritten confidence line, appended after the
sampled prefix) keep weight 1. Rollouts from the student itself (the ``hf`` engine) carry no
sampler log-probs and are not weighted at all.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sampled_log_probs(
    rollouts: list[list[int]], logprobs: list[list[float]], targets: list[list[int]], width: int
) -> Tensor:
    """The sampler's log-probs aligned to the training completions, NaN where not sampled.

    Args:
        rollouts: the B*K sampled completions.
        logprobs: the sampler's log-prob of each of their tokens.
        targets: the B*K completions trained on (the rollouts, or CaOPD's rewrite of them).
        width: T, the padded completion width of the loss.

    Returns:
        (B*K, T) float32: position t holds the sampler's log-prob where the training completion
        still has the sampled token at t (the common prefix of rollout and target), else NaN.
    """
    out = torch.full((len(targets), width), math.nan)
    for i, (sampled, lps, target) in enumerate(zip(rollouts, logprobs, targets, strict=True)):
        n = 0
        for a, b in zip(sampled, target, strict=False):
            if a != b:
                break
            n += 1
        n = min(n, width)
        if n:
            out[i, :n] = torch.tensor(lps[:n], dtype=torch.float32)
    return out


def token_log_probs(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """(N, T) log-prob of `ids` (N, T) under softmax(`logits` / `temperature`), no gradient."""
    with torch.no_grad():
        scaled = logits.detach().float()
        if temperature != 1.0:
            scaled = scaled / temperature
        picked = scaled.gather(-1, ids[..., None].to(scaled.device))[..., 0]
        return picked - torch.logsumexp(scaled, dim=-1)


def truncated_importance_weights(
    student: Tensor, sampler: Tensor, mask: Tensor, cap: float
) -> tuple[Tensor, dict[str, float]]:
    """``min(exp(student - sampler), cap)`` per token; 1 where the sampler gave no log-prob.

    Args:
        student: (N, T) the student's log-probs of the sampled tokens.
        sampler: (N, T) the sampler's, NaN where the token was not sampled by it.
        mask: (N, T) the positions in the loss.
        cap: the truncation.

    Returns:
        The (N, T) detached weights, and over the sampled positions in the loss: ``logprob_gap``
        (mean |student - sampler|), ``capped_frac`` (the share of weights cut at the cap) and
        ``weight_mean``; NaN when there is no such position.

    Example:
        >>> w, stats = truncated_importance_weights(
        ...     torch.tensor([[0.0, -1.0, -2.0]]), torch.tensor([[0.0, -2.0, float("nan")]]),
        ...     torch.ones(1, 3, dtype=torch.bool), cap=2.0)
        >>> [round(x, 4) for x in w[0].tolist()], stats["capped_frac"]
        ([1.0, 2.0, 1.0], 0.5)
    """
    sampler = sampler.to(student.device)
    valid = ~torch.isnan(sampler)
    diff = torch.where(valid, student.float() - sampler, 0.0)
    ratio = torch.exp(diff.clamp(-20.0, 20.0))  # the clamp keeps exp finite (as TRL's)
    weights = torch.where(valid, ratio.clamp(max=cap), 1.0).detach()
    counted = valid & mask.to(valid.device).bool()
    n = counted.sum().clamp(min=1)
    none = not bool(counted.any())
    stats = {
        "logprob_gap": math.nan if none else (diff.abs() * counted).sum().item() / n.item(),
        "capped_frac": math.nan if none else ((ratio > cap) & counted).sum().item() / n.item(),
        "weight_mean": math.nan if none else (weights * counted).sum().item() / n.item(),
    }
    return weights, stats
