"""Divergences between student and teacher next-token distributions, as pure functions.

* ``token``: forward KL, reverse KL and generalized JSD over the full vocabulary from (N, T, V)
  logits (optionally chunked), ``sequence_mean_loss``, ``skip_first_tokens``,
  ``divergence_loss``.
* ``topk``: the same divergences on the top-k + tail support (SDPO / SDFT style).
* ``fused``: the output projection fused with any of them, from last hidden states, so the
  (N, T, V) logits are never materialised (Liger-Kernel's fused linear loss idea).
"""

from lightning_caopd.divergence.fused import OutputHead, fused_linear_divergence
from lightning_caopd.divergence.token import (
    KINDS,
    divergence_loss,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    sequence_mean_loss,
    skip_first_tokens,
    token_divergence,
)
from lightning_caopd.divergence.topk import (
    SUPPORTS,
    topk_tail_divergence,
    topk_tail_log_probs,
    topk_tail_loss,
)

__all__ = [
    "KINDS",
    "SUPPORTS",
    "OutputHead",
    "divergence_loss",
    "forward_kl",
    "fused_linear_divergence",
    "generalized_jsd",
    "reverse_kl",
    "sequence_mean_loss",
    "skip_first_tokens",
    "token_divergence",
    "topk_tail_divergence",
    "topk_tail_log_probs",
    "topk_tail_loss",
]
