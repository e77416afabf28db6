"""Full-vocabulary token-level divergences between student and teacher distributions.

Every divergence used by OPD and CaOPD (arXiv 2604.16830) lives here as a pure function of
logits. Names say the KL direction, because that is the field's most common bug:

* ``forward_kl`` is KL(teacher || student) = sum_v p_T (log p_T - log p_S), the default of the
  released CaOPD/SDFT code (mass-covering).
* ``reverse_kl`` is KL(student || teacher) = sum_v p_S (log p_S - log p_T), the direction the
  paper's text describes (mode-seeking).
* ``generalized_jsd`` interpolates between the two with TRL's convention (see its docstring).

Shapes: logits are (N, T, V) for N sequences, T completion positions, V vocabulary entries; a
mask (N, T) marks the positions that count. Per-token results are (N, T), zero where the mask is
false. ``sequence_mean_loss`` reduces them per sequence, then over sequences.

With ``chunk_size`` set, the per-token divergence is computed by ``_ChunkedDivergence``, which
keeps only the input logits for backward and recomputes each chunk's log-softmax there, so the
extra memory is one (N, T, V) gradient plus O(chunk_size * V) instead of several (N, T, V)
temporaries (log-probs and probs of both models, products) held until backward.

Half-precision logits are upcast to float32 for the computation (chunk by chunk in the chunked
path): differences of bfloat16 log-probs lose most of their digits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

KINDS = ("forward_kl", "reverse_kl", "jsd")


# --------------------------------------------------------------------------------------------
# Kernels on log-probabilities (..., V) -> (...,). No masking, no temperature.
# --------------------------------------------------------------------------------------------


def _expect(p: Tensor, x: Tensor) -> Tensor:
    """Return sum_v p_v x_v, counting p_v x_v as 0 where p_v = 0.

    Where p_v = 0 (a -inf logit), x_v may be +-inf or NaN (-inf - -inf). Sanitising ``x`` before
    the product, rather than the product afterwards, keeps autograd from forming 0 * inf = NaN
    in the gradient of the unselected branch.
    """
    return (p * torch.where(p > 0, x, 0.0)).sum(-1)


def _centered(p: Tensor, x: Tensor) -> Tensor:
    """Return p * (x - sum_v p_v x_v), with the same convention as ``_expect`` where p_v = 0.

    This is the gradient of sum_v p_v x_v with respect to the logits of p when d x / d logits
    contributes sum_v p_v (delta - p) = 0, the shape every gradient below takes.
    """
    x = torch.where(p > 0, x, 0.0)
    return p * (x - (p * x).sum(-1, keepdim=True))


def _forward_kl_kernel(s_lp: Tensor, t_lp: Tensor, beta: float) -> Tensor:
    del beta  # uniform kernel signature
    return _expect(t_lp.exp(), t_lp - s_lp)


def _reverse_kl_kernel(s_lp: Tensor, t_lp: Tensor, beta: float) -> Tensor:
    del beta
    return _expect(s_lp.exp(), s_lp - t_lp)


def _mixture_log_probs(s_lp: Tensor, t_lp: Tensor, beta: float) -> Tensor:
    """Return log M = log(beta * p_T + (1 - beta) * p_S), in log space so tiny p survive."""
    dead = torch.isneginf(s_lp) & torch.isneginf(t_lp)  # (..., V): p_S = p_T = M = 0
    if dead.any():
        # Those entries are skipped by _expect/_centered, but logaddexp's backward would form
        # 0 * exp(-inf - -inf) = NaN there; feed it zeros instead (M is then unused garbage).
        s_lp, t_lp = torch.where(dead, 0.0, s_lp), torch.where(dead, 0.0, t_lp)
    return torch.logaddexp(t_lp + math.log(beta), s_lp + math.log1p(-beta))


def _jsd_kernel(s_lp: Tensor, t_lp: Tensor, beta: float) -> Tensor:
    # The ends are special-cased: the formula below tends to 0 there (see generalized_jsd).
    if beta == 0.0:
        return _forward_kl_kernel(s_lp, t_lp, beta)
    if beta == 1.0:
        return _reverse_kl_kernel(s_lp, t_lp, beta)
    m = _mixture_log_probs(s_lp, t_lp, beta)
    return beta * _expect(t_lp.exp(), t_lp - m) + (1.0 - beta) * _expect(s_lp.exp(), s_lp - m)


def _grad_kernel(kind: str, s_lp: Tensor, t_lp: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Gradients of the per-token divergence w.r.t. the tempered student and teacher logits.

    With p = p_S, q = p_T, a = log p, b = log q (all (C, V)):
    forward KL: dS = p - q, dT = q (b - a - KL); reverse KL: dS = p (a - b - KL), dT = q - p;
    JSD (0 < beta < 1, m = log M): dS = (1 - beta) p (a - m - E_p[a - m]),
    dT = beta q (b - m - E_q[b - m]).
    """
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    elif kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    p, q = s_lp.exp(), t_lp.exp()
    if kind == "forward_kl":
        return p - q, _centered(q, t_lp - s_lp)
    if kind == "reverse_kl":
        return _centered(p, s_lp - t_lp), q - p
    m = _mixture_log_probs(s_lp, t_lp, beta)
    return (1.0 - beta) * _centered(p, s_lp - m), beta * _centered(q, t_lp - m)


_KERNELS: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "forward_kl": _forward_kl_kernel,
    "reverse_kl": _reverse_kl_kernel,
    "jsd": _jsd_kernel,
}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 stays float64 (tests); float16/bfloat16 are upcast.
    return torch.promote_types(dtype, torch.float32)


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    logits = logits.to(_compute_dtype(logits.dtype))
    if temperature != 1.0:
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1)


# --------------------------------------------------------------------------------------------
# Memory-bounded path.
# --------------------------------------------------------------------------------------------


class _ChunkedDivergence(torch.autograd.Function):
    """Per-token divergence over chunks of counted positions, recomputed in backward.

    Forward saves only the input logits and the (K,) indices of the K counted positions; each
    chunk of ``chunk_size`` positions is gathered to (C, V), upcast, log-softmaxed and reduced.
    Backward recomputes the chunk's log-probs and writes the analytic gradient (``_grad_kernel``)
    into a zero (N, T, V) buffer. Masked positions are never touched, so their gradient is
    exactly zero whatever their logits hold.
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx,
        student_logits: Tensor,
        teacher_logits: Tensor,
        mask: Tensor,
        kind: str,
        beta: float,
        temperature: float,
        chunk_size: int,
    ) -> Tensor:
        # Advanced indexing with (n, t) pairs gathers rows without first copying a sliced,
        # non-contiguous (N, T, V) view into a contiguous (N*T, V) one.
        n_idx, t_idx = mask.nonzero(as_tuple=True)  # (K,), (K,)
        out = torch.zeros(
            mask.shape, dtype=_compute_dtype(student_logits.dtype), device=student_logits.device
        )
        kernel = _KERNELS[kind]
        for start in range(0, n_idx.numel(), chunk_size):
            n_c, t_c = n_idx[start : start + chunk_size], t_idx[start : start + chunk_size]
            s_lp = _log_probs(student_logits[n_c, t_c], temperature)  # (C, V)
            t_lp = _log_probs(teacher_logits[n_c, t_c], temperature)  # (C, V)
            out[n_c, t_c] = kernel(s_lp, t_lp, beta)
        ctx.save_for_backward(student_logits, teacher_logits, n_idx, t_idx)
        ctx.kind, ctx.beta, ctx.temperature, ctx.chunk_size = kind, beta, temperature, chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # noqa: D102
        student_logits, teacher_logits, n_idx, t_idx = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_s = torch.zeros_like(student_logits) if need_s else None
        grad_t = torch.zeros_like(teacher_logits) if need_t else None
        if need_s or need_t:
            for start in range(0, n_idx.numel(), ctx.chunk_size):
                n_c = n_idx[start : start + ctx.chunk_size]
                t_c = t_idx[start : start + ctx.chunk_size]
                s_lp = _log_probs(student_logits[n_c, t_c], ctx.temperature)  # (C, V)
                t_lp = _log_probs(teacher_logits[n_c, t_c], ctx.temperature)  # (C, V)
                d_s, d_t = _grad_kernel(ctx.kind, s_lp, t_lp, ctx.beta)
                # Chain rule through logits / temperature: (C, 1) upstream grad / temperature.
                g = (grad_out[n_c, t_c].to(s_lp.dtype) / ctx.temperature)[:, None]
                if need_s:
                    grad_s[n_c, t_c] = (g * d_s).to(grad_s.dtype)
                if need_t:
                    grad_t[n_c, t_c] = (g * d_t).to(grad_t.dtype)
        return grad_s, grad_t, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def _check_options(kind: str, beta: float, temperature: float, chunk_size: int | None) -> None:
    """Raise ValueError on an unknown kind, beta outside [0, 1], a bad temperature or chunk."""
    if kind not in KINDS:
        raise ValueError(f"Unknown divergence kind {kind!r}; accepted values are {KINDS}.")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1]; got {beta}.")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be positive; got {temperature}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}.")


def _validate(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    kind: str,
    beta: float,
    temperature: float,
    chunk_size: int | None,
) -> Tensor:
    _check_options(kind, beta, temperature, chunk_size)
    if student_logits.dim() != 3 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must both be (N, T, V) with equal shapes; got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}."
        )
    if mask is None:
        mask = torch.ones(student_logits.shape[:2], dtype=torch.bool, device=student_logits.device)
    elif mask.shape != student_logits.shape[:2]:
        raise ValueError(
            f"mask must be (N, T) = {tuple(student_logits.shape[:2])}; got {tuple(mask.shape)}."
        )
    return mask != 0


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-token divergence of one of ``KINDS``, zero at masked positions.

    Args:
        student_logits: (N, T, V) student logits at the completion positions.
        teacher_logits: (N, T, V) teacher logits at the same positions.
        mask: (N, T) bool or 0/1; positions where it is true count. None counts all.
        kind: "forward_kl" (KL(teacher || student)), "reverse_kl" (KL(student || teacher)) or
            "jsd" (``generalized_jsd`` with weight ``beta``).
        beta: JSD weight in [0, 1]; ignored by the KL kinds.
        temperature: Both logits are divided by it before the softmax. No temperature**2
            rescaling is applied.
        chunk_size: If set, compute over chunks of this many counted positions with
            recomputation in backward (same values and gradients, O(chunk_size * V) extra
            memory). None computes everything at once with plain autograd.

    Returns:
        (N, T) per-token divergence in float32 (float64 for float64 logits), zero where
        ``mask`` is false.

    Raises:
        ValueError: On an unknown kind, mismatched shapes, beta outside [0, 1], a non-positive
            temperature or chunk size.
    """
    mask = _validate(student_logits, teacher_logits, mask, kind, beta, temperature, chunk_size)
    if chunk_size is not None:
        return _ChunkedDivergence.apply(
            student_logits, teacher_logits, mask, kind, float(beta), float(temperature), chunk_size
        )
    s_lp = _log_probs(student_logits, temperature)  # (N, T, V)
    t_lp = _log_probs(teacher_logits, temperature)  # (N, T, V)
    per_token = _KERNELS[kind](s_lp, t_lp, float(beta))  # (N, T)
    return torch.where(mask, per_token, 0.0)


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Forward KL(teacher || student) = sum_v p_T (log p_T - log p_S), per token.

    Mass-covering: the student pays wherever the teacher puts mass. Default of the released
    CaOPD/SDFT code. Equals ``F.kl_div(log p_S, log p_T, log_target=True).sum(-1)``.

    Args:
        student_logits: (N, T, V) student logits.
        teacher_logits: (N, T, V) teacher logits.
        mask: (N, T) positions that count; None counts all.
        temperature: Divides both logits before the softmax.
        chunk_size: See ``token_divergence``.

    Returns:
        (N, T) per-token divergence, zero at masked positions.
    """
    return token_divergence(
        student_logits,
        teacher_logits,
        mask,
        kind="forward_kl",
        temperature=temperature,
        chunk_size=chunk_size,
    )


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Reverse KL(student || teacher) = sum_v p_S (log p_S - log p_T), per token.

    Mode-seeking: the student pays for mass it puts where the teacher has little. The direction
    the CaOPD paper's text describes. Equals ``F.kl_div(log p_T, log p_S, log_target=True)
    .sum(-1)``.

    Args:
        student_logits: (N, T, V) student logits.
        teacher_logits: (N, T, V) teacher logits.
        mask: (N, T) positions that count; None counts all.
        temperature: Divides both logits before the softmax.
        chunk_size: See ``token_divergence``.

    Returns:
        (N, T) per-token divergence, zero at masked positions.
    """
    return token_divergence(
        student_logits,
        teacher_logits,
        mask,
        kind="reverse_kl",
        temperature=temperature,
        chunk_size=chunk_size,
    )


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Generalized Jensen-Shannon divergence with TRL's convention, per token.

    For 0 < beta < 1, with the mixture M = beta * p_T + (1 - beta) * p_S::

        JSD_beta = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M).

    The ends are defined as ``beta = 0``: KL(p_T || p_S) (``forward_kl``) and ``beta = 1``:
    KL(p_S || p_T) (``reverse_kl``), exactly, as in TRL's ``generalized_jsd_loss``. Note these
    are *not* the limits of the formula, which tends to 0 at both ends: JSD_beta / beta ->
    KL(p_T || p_S) as beta -> 0 and JSD_beta / (1 - beta) -> KL(p_S || p_T) as beta -> 1. So the
    loss scale jumps at the ends (e.g. beta = 1e-3 gives about 1e-3 * forward KL); the gradient
    *direction* is continuous. At beta = 0.5 it is the symmetric JSD (swapping student and
    teacher gives the same value).

    Args:
        student_logits: (N, T, V) student logits.
        teacher_logits: (N, T, V) teacher logits.
        mask: (N, T) positions that count; None counts all.
        beta: Teacher weight of the mixture, in [0, 1].
        temperature: Divides both logits before the softmax.
        chunk_size: See ``token_divergence``.

    Returns:
        (N, T) per-token divergence, zero at masked positions.
    """
    return token_divergence(
        student_logits,
        teacher_logits,
        mask,
        kind="jsd",
        beta=beta,
        temperature=temperature,
        chunk_size=chunk_size,
    )


def sequence_mean_loss(per_token: Tensor, mask: Tensor) -> Tensor:
    """Average per sequence over its counted tokens, then over sequences with any counted token.

    Each sequence weighs the same whatever its length (unlike a mean over all counted tokens).
    Sequences with no counted token are left out; if none has any, the result is 0, still
    connected to ``per_token``'s graph so ``backward`` works.

    Args:
        per_token: (N, T) per-token loss.
        mask: (N, T) bool or 0/1; positions where it is true count.

    Returns:
        Scalar loss.
    """
    mask = mask != 0
    counted = torch.where(mask, per_token, 0.0)  # (N, T); also drops inf/NaN at masked spots
    counts = mask.sum(-1)  # (N,)
    per_seq = counted.sum(-1) / counts.clamp(min=1)  # (N,)
    has_tokens = counts > 0  # (N,)
    # Dividing by the number of non-empty sequences in-graph, not via a Python branch, keeps the
    # zero result connected and avoids a device sync.
    return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1)


def skip_first_tokens(mask: Tensor, n: int) -> Tensor:
    """Un-mask the first ``n`` counted positions of each row.

    Counts only positions where ``mask`` is true, so rows with a left offset (e.g. left padding)
    or different lengths each lose their own first ``n`` completion tokens.

    Args:
        mask: (N, T) bool or 0/1 completion mask.
        n: Number of counted positions to drop per row; 0 returns the mask unchanged.

    Returns:
        (N, T) bool mask.

    Raises:
        ValueError: If ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative; got {n}.")
    mask = mask != 0
    rank = mask.long().cumsum(-1)  # (N, T): 1-based rank of each counted position in its row
    return mask & (rank > n)


def divergence_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sequence-mean divergence loss between student and teacher.

    Args:
        student_logits: (N, T, V) student logits at the completion positions.
        teacher_logits: (N, T, V) teacher logits (normally computed under ``torch.no_grad``).
        mask: (N, T) positions that count.
        kind: One of ``KINDS``: "forward_kl", "reverse_kl", "jsd".
        beta: JSD weight (``generalized_jsd``); ignored by the KL kinds.
        temperature: Divides both logits before the softmax.
        chunk_size: If set, use the memory-bounded chunked path (see ``token_divergence``).
        token_weights: (N, T) constant weights of the per-token terms in the sequence mean
            (the importance weights of `lightning_caopd.divergence.importance`); None: all 1.

    Returns:
        ``(loss, per_token)``: the scalar ``sequence_mean_loss`` and the (N, T) per-token
        divergence (unweighted), zero at masked positions.

    Raises:
        ValueError: On an unknown kind or invalid arguments.
    """
    per_token = token_divergence(
        student_logits,
        teacher_logits,
        mask,
        kind=kind,
        beta=beta,
        temperature=temperature,
        chunk_size=chunk_size,
    )
    return weighted_mean_loss(per_token, mask, token_weights), per_token


def weighted_mean_loss(per_token: Tensor, mask: Tensor, token_weights: Tensor | None) -> Tensor:
    """``sequence_mean_loss`` of ``per_token * token_weights`` (detached weights; None: 1)."""
    if token_weights is None:
        return sequence_mean_loss(per_token, mask)
    return sequence_mean_loss(per_token * token_weights.detach().to(per_token.device), mask)
