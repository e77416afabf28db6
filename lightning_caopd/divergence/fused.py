"""Fused output projection + divergence: logits exist one chunk of positions at a time.

A causal LM's logits at the completion positions are (N, T, V) per model; with V ~ 150k they,
their log-probs and the student's logit gradient dominate a distillation step's memory. Here the
divergence takes the last hidden states (before the output head) and the heads' weights instead,
and for each chunk of C counted positions computes the (C, V) logits of both models, the
divergence and, in the same pass, the chunk's contribution to the gradients of the student's
hidden states (C, H) and head weight (V, H) (and bias). Nothing (N, T, V)-sized is ever formed.
The idea is Liger-Kernel's fused linear JSD / cross-entropy (gradients computed eagerly in the
forward pass, scaled by the upstream gradient in backward), written here in plain PyTorch so it
runs on CPU and GPU alike.

Within a chunk, the (C, V) logits -> per-token divergence step reuses the functions of
``lightning_caopd.divergence.token`` / ``.topk`` through a local autograd call, so the values
and gradients are those of ``divergence_loss`` / ``topk_tail_loss`` on materialised logits.

The teacher side receives no gradient: its hidden states and weights are detached. A head whose
weight is tied to the input embedding needs nothing special: the gradient returned for the
weight lands in that same Parameter and autograd adds the embedding-side gradient that flows
back through the hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_caopd.divergence.token import _KERNELS, _check_options, _compute_dtype
from lightning_caopd.divergence.topk import SUPPORTS, _check_topk, topk_tail_log_probs


@dataclass(frozen=True)
class OutputHead:
    """A causal LM's output head: ``softcap(logit_scale * (hidden @ weight.T + bias))``.

    Attributes:
        weight: (V, H) projection weight, e.g. ``model.get_output_embeddings().weight`` (the
            input embedding matrix when the model ties them).
        bias: (V,) or None.
        logit_scale: Multiplies the logits (Cohere's ``logit_scale``; Granite divides by its
            ``logits_scaling``, i.e. ``logit_scale = 1 / logits_scaling``).
        softcap: Gemma-style final soft-capping ``cap * tanh(logits / cap)``, applied after the
            scale; None disables it.
    """

    weight: Tensor
    bias: Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        if self.weight.dim() != 2:
            raise ValueError(f"weight must be (V, H); got {tuple(self.weight.shape)}.")
        if self.bias is not None and self.bias.shape != self.weight.shape[:1]:
            raise ValueError(
                f"bias must be (V,) = {tuple(self.weight.shape[:1])}; got {tuple(self.bias.shape)}."
            )
        if not self.logit_scale > 0.0:
            raise ValueError(f"logit_scale must be positive; got {self.logit_scale}.")
        if self.softcap is not None and not self.softcap > 0.0:
            raise ValueError(f"softcap must be positive or None; got {self.softcap}.")

    @classmethod
    def from_causal_lm(cls, model: Any) -> OutputHead:
        """Read the head of a Hugging Face causal LM (weight, bias, logit scale, soft-cap).

        Args:
            model: A ``transformers`` ``*ForCausalLM`` (or any module with
                ``get_output_embeddings()`` and a ``config``).

        Returns:
            The head, sharing the model's Parameters (tied or not).
        """
        linear = model.get_output_embeddings()
        config = model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        scale = getattr(config, "logit_scale", None) or 1.0  # Cohere multiplies
        scaling = getattr(config, "logits_scaling", None)  # Granite divides
        if scaling:
            scale = scale / scaling
        return cls(
            weight=linear.weight,
            bias=getattr(linear, "bias", None),
            logit_scale=float(scale),
            softcap=getattr(config, "final_logit_softcapping", None),
        )

    def logits(self, hidden: Tensor) -> Tensor:
        """Materialise the logits, (..., H) -> (..., V), in the weight's dtype."""
        return _apply_post(F.linear(hidden, self.weight, self.bias), self.logit_scale, self.softcap)


def _apply_post(logits: Tensor, scale: float, softcap: float | None) -> Tensor:
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


@dataclass(frozen=True)
class _Spec:
    """Non-tensor arguments of ``_FusedLinearDivergence``."""

    kind: str
    beta: float
    temperature: float
    topk: int | None
    support: str
    student_scale: float
    student_softcap: float | None
    teacher_scale: float
    teacher_softcap: float | None
    chunk_size: int


def _chunk_log_probs(
    raw: Tensor, scale: float, softcap: float | None, temperature: float
) -> Tensor:
    """(C, V) raw head outputs -> (C, V) tempered log-probs in the compute dtype."""
    logits = _apply_post(raw.to(_compute_dtype(raw.dtype)), scale, softcap)
    if temperature != 1.0:
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1)


def _chunk_divergence(s_lp: Tensor, t_lp: Tensor, spec: _Spec) -> Tensor:
    """(C, V) log-probs of both models -> (C,) per-token divergence."""
    if spec.topk is not None:
        s_lp, t_lp = topk_tail_log_probs(s_lp, t_lp, spec.topk, spec.support)  # (C, k + 1)
    return _KERNELS[spec.kind](s_lp, t_lp, spec.beta)


class _FusedLinearDivergence(torch.autograd.Function):
    """Weighted sum of per-token divergences from hidden states, one chunk of rows at a time.

    Forward returns ``(loss, per_token)`` with loss = sum_k weights_k * d_k over the K rows and
    per_token the (K,) d_k (not differentiable). When gradients are wanted, each chunk's
    gradient w.r.t. its (C, V) raw student logits is formed by a local autograd call and pushed
    through the projection at once: grad_hidden[rows] = g @ W, grad_W += g.T @ hidden[rows],
    grad_b += g.sum(0). Backward only scales these by the upstream gradient of ``loss``.
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx,
        s_hidden: Tensor,
        s_weight: Tensor,
        s_bias: Tensor | None,
        t_hidden: Tensor,
        t_weight: Tensor,
        t_bias: Tensor | None,
        weights: Tensor,
        spec: _Spec,
        want_grad: bool,
    ) -> tuple[Tensor, Tensor]:
        n_rows = s_hidden.shape[0]
        cdtype = _compute_dtype(torch.promote_types(s_hidden.dtype, s_weight.dtype))
        need_h = want_grad and ctx.needs_input_grad[0]
        need_w = want_grad and ctx.needs_input_grad[1]
        need_b = want_grad and s_bias is not None and ctx.needs_input_grad[2]
        # The weight's gradient is accumulated over chunks in the compute dtype (float32 for
        # half-precision weights) and cast once at the end.
        grad_h = torch.zeros_like(s_hidden) if need_h else None  # (K, H)
        grad_w = (
            torch.zeros(s_weight.shape, dtype=cdtype, device=s_weight.device) if need_w else None
        )
        grad_b = (
            torch.zeros(s_weight.shape[0], dtype=cdtype, device=s_weight.device) if need_b else None
        )
        per_token = torch.zeros(n_rows, dtype=cdtype, device=s_hidden.device)  # (K,)

        for start in range(0, n_rows, spec.chunk_size):
            rows = slice(start, start + spec.chunk_size)
            h_c = s_hidden[rows]  # (C, H)
            t_lp = _chunk_log_probs(
                F.linear(t_hidden[rows], t_weight, t_bias),
                spec.teacher_scale,
                spec.teacher_softcap,
                spec.temperature,
            )  # (C, V)
            raw = F.linear(h_c, s_weight, s_bias)  # (C, V) student logits before scale/cap
            if not (need_h or need_w or need_b):
                s_lp = _chunk_log_probs(
                    raw, spec.student_scale, spec.student_softcap, spec.temperature
                )
                per_token[rows] = _chunk_divergence(s_lp, t_lp, spec)
                continue
            # Upcast before the leaf so g (C, V) keeps float32 digits for the weight gradient.
            raw = raw.to(cdtype).detach().requires_grad_(True)
            with torch.enable_grad():
                s_lp = _chunk_log_probs(
                    raw, spec.student_scale, spec.student_softcap, spec.temperature
                )
                d = _chunk_divergence(s_lp, t_lp, spec)  # (C,)
                (g,) = torch.autograd.grad((d * weights[rows]).sum(), raw)  # (C, V)
            per_token[rows] = d.detach()
            if need_h:
                grad_h[rows] = g.to(s_weight.dtype) @ s_weight  # (C, H)
            if need_w:
                grad_w.addmm_(g.to(cdtype).T, h_c.to(cdtype))  # (V, C) @ (C, H)
            if need_b:
                grad_b += g.to(cdtype).sum(0)  # (V,)
            del raw, s_lp, d, g, t_lp

        loss = (per_token * weights.to(cdtype)).sum()
        ctx.mark_non_differentiable(per_token)
        ctx.save_for_backward(
            grad_h,
            None if grad_w is None else grad_w.to(s_weight.dtype),
            None if grad_b is None else grad_b.to(s_bias.dtype),
        )
        return loss, per_token

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, grad_per_token: Tensor):  # noqa: D102
        del grad_per_token  # per_token is marked non-differentiable
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return grads[0], grads[1], grads[2], None, None, None, None, None, None


def _as_head(head: OutputHead | Tensor) -> OutputHead:
    return head if isinstance(head, OutputHead) else OutputHead(head)


def fused_linear_divergence(
    student_hidden: Tensor,
    student_head: OutputHead | Tensor,
    teacher_hidden: Tensor,
    teacher_head: OutputHead | Tensor,
    mask: Tensor | None = None,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    topk: int | None = None,
    topk_support: str = "teacher",
    chunk_size: int = 256,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sequence-mean divergence from last hidden states, never materialising (N, T, V) logits.

    Equal (values and gradients) to computing ``logits = head.logits(hidden)`` for both models
    and calling ``divergence_loss`` (or ``topk_tail_loss`` when ``topk`` is set), with memory
    O(chunk_size * V) for the logits instead of O(N * T * V).

    Args:
        student_hidden: (B, T, H) student last hidden states (after the final norm, before the
            head) at the completion positions, or (N, H) for the positions of one sequence.
        student_head: The student's ``OutputHead`` (or its (V, H) weight alone).
        teacher_hidden: (B, T, H') or (N, H') teacher hidden states at the same positions;
            detached here.
        teacher_head: The teacher's ``OutputHead`` (or (V, H') weight); detached here, so it
            may be the student's own Parameter (self-distillation).
        mask: (B, T) (or (N,)) bool or 0/1; positions where it is true count. None counts all.
            Apply ``skip_first_tokens`` to it beforehand if wanted.
        kind: "forward_kl" (KL(teacher || student)), "reverse_kl" (KL(student || teacher)) or
            "jsd" (generalized JSD with weight ``beta``).
        beta: JSD weight in [0, 1]; ignored by the KL kinds.
        temperature: Divides both models' (scaled, capped) logits before the softmax.
        topk: If set, compute ``kind`` on the top-k + tail support of ``topk_tail_log_probs``
            (the "topk_tail" divergence); None uses the full vocabulary.
        topk_support: "teacher" or "student": whose top-k tokens form the support.
        chunk_size: Counted positions per chunk; the (chunk_size, V) logits are the largest
            temporaries.
        token_weights: (B, T) (or (N,)) constant weights of the per-token terms in the sequence
            mean (importance weights); None: all 1.

    Returns:
        ``(loss, per_token)``: the scalar sequence-mean loss (mean over each sequence's counted
        positions, then over sequences with any, as ``sequence_mean_loss``), differentiable
        w.r.t. ``student_hidden``, the student's weight and bias; and the detached per-token
        divergence, (B, T) (or (N,)), zero at masked positions.

    Raises:
        ValueError: On an unknown kind or support, mismatched shapes, beta outside [0, 1], a
            non-positive temperature or chunk size, or topk outside [1, V].

    Note:
        When grad mode is on and the student side requires grad, the gradients are computed
        during this call (and only scaled in ``backward``), so evaluate under
        ``torch.no_grad()``. Only ``loss`` is differentiable: a per-token weighting of the loss
        other than the sequence mean is not supported through this path.
    """
    s_head, t_head = _as_head(student_head), _as_head(teacher_head)
    _check_options(kind, beta, temperature, chunk_size)
    flat = student_hidden.dim() == 2
    if flat:  # (N, H): one sequence
        student_hidden, teacher_hidden = student_hidden[None], teacher_hidden[None]
        mask = None if mask is None else mask[None]
    if student_hidden.dim() != 3 or teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            "student_hidden and teacher_hidden must be (B, T, H) and (B, T, H') (or (N, H) and "
            f"(N, H')); got {tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}."
        )
    vocab = s_head.weight.shape[0]
    if s_head.weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(
            f"student head weight {tuple(s_head.weight.shape)} does not match hidden size "
            f"{student_hidden.shape[-1]}."
        )
    if t_head.weight.shape != (vocab, teacher_hidden.shape[-1]):
        raise ValueError(
            f"teacher head weight must be (V, H') = {(vocab, teacher_hidden.shape[-1])}; got "
            f"{tuple(t_head.weight.shape)}."
        )
    if topk is not None:
        _check_topk(topk, vocab, topk_support)
    elif topk_support not in SUPPORTS:
        raise ValueError(f"Unknown top-k support {topk_support!r}; accepted values are {SUPPORTS}.")
    if mask is None:
        mask = torch.ones(student_hidden.shape[:2], dtype=torch.bool, device=student_hidden.device)
    elif mask.shape != student_hidden.shape[:2]:
        raise ValueError(
            f"mask must be (B, T) = {tuple(student_hidden.shape[:2])} (or (N,) for (N, H) "
            f"inputs); got {tuple(mask.shape[1:] if flat else mask.shape)}."
        )
    mask = mask != 0

    # Sequence mean as a weighted sum: position (b, t) weighs 1 / (count_b * non-empty rows).
    counts = mask.sum(-1)  # (B,)
    n_rows = (counts > 0).sum().clamp(min=1)
    cdtype = _compute_dtype(student_hidden.dtype)
    row_weight = 1.0 / (counts.clamp(min=1) * n_rows).to(cdtype)  # (B,)
    weights = row_weight[:, None].expand(mask.shape)[mask]  # (K,)
    if token_weights is not None:
        token_weights = token_weights[None] if flat else token_weights
        weights = weights * token_weights.detach().to(weights.device, cdtype)[mask]

    spec = _Spec(
        kind=kind,
        beta=float(beta),
        temperature=float(temperature),
        topk=topk,
        support=topk_support,
        student_scale=float(s_head.logit_scale),
        student_softcap=s_head.softcap,
        teacher_scale=float(t_head.logit_scale),
        teacher_softcap=t_head.softcap,
        chunk_size=chunk_size,
    )
    with torch.no_grad():
        t_rows = teacher_hidden[mask]  # (K, H')
    t_bias = None if t_head.bias is None else t_head.bias.detach()
    loss, per_row = _FusedLinearDivergence.apply(
        student_hidden[mask],  # (K, H): autograd scatters its gradient back to (B, T, H)
        s_head.weight,
        s_head.bias,
        t_rows,
        t_head.weight.detach(),
        t_bias,
        weights,
        spec,
        torch.is_grad_enabled(),
    )
    per_token = torch.zeros(mask.shape, dtype=per_row.dtype, device=per_row.device)  # (B, T)
    per_token[mask] = per_row
    return loss, (per_token[0] if flat else per_token)


@torch.no_grad()
def target_log_probs(
    hidden: Tensor,
    head: OutputHead | Tensor,
    targets: Tensor,
    mask: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> Tensor:
    """Log-probs of `targets` from last hidden states, one chunk of positions at a time.

    What ``log_softmax(head(hidden) / temperature).gather(targets)`` gives, without (N, T, V)
    logits (the importance weight of a fused step reads the student's log-probs of the sampled
    tokens this way).

    Args:
        hidden: (B, T, H) last hidden states predicting each position.
        head: the model's ``OutputHead`` (or (V, H) weight).
        targets: (B, T) token ids.
        mask: (B, T) positions to compute; the others are 0.
        temperature: divides the (scaled, capped) logits.
        chunk_size: positions per chunk.

    Returns:
        (B, T) float32 log-probs.
    """
    head = _as_head(head)
    mask = mask != 0
    rows = hidden[mask]  # (K, H)
    picked = targets.to(hidden.device)[mask]  # (K,)
    out = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    values = torch.empty(rows.shape[0], dtype=torch.float32, device=hidden.device)
    bias = None if head.bias is None else head.bias.detach()
    for start in range(0, rows.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        lp = _chunk_log_probs(
            F.linear(rows[chunk].detach(), head.weight.detach(), bias),
            head.logit_scale,
            head.softcap,
            temperature,
        )  # (C, V)
        values[chunk] = lp.gather(1, picked[chunk, None])[:, 0].float()
    out[mask] = values
    return out
