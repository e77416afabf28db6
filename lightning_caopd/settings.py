"""The method's knobs, grouped as a user looks for them.

Rollouts (``method.rollout``) and the loss (``method.loss``). Each group is checked when it is
built, so a bad value stops the run at start-up with one sentence naming the key, the value
and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_caopd.divergence.topk import SUPPORTS
from lightning_caopd.errors import ConfigError, out_of_range

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
PROMPT_OVERFLOW = ("truncate", "skip")


def _fail(key: str, value: object, allowed: str) -> None:
    raise out_of_range(key, value, allowed)


def _int(key: str, value: object, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(key, value, f"an integer >= {low}" + (" or null" if allow_none else ""))


@dataclass
class RolloutSettings:
    """How the student samples its K rollouts per prompt.

    Args:
        num_rollouts: K, rollouts per prompt (P_acc is measured over them).
        max_new_tokens: the rollout length limit.
        temperature: sampling temperature (> 0).
        top_p: nucleus threshold in (0, 1].
        max_prompt_length: a longer student prompt is cut or skipped (``prompt_overflow``);
            teacher prompts are always cut. None: no limit (a long prompt can take gigabytes).
        prompt_overflow: ``truncate`` (left end) or ``skip`` (the item leaves the step);
            both are counted.
        row_seeds: each prompt's rollouts draw from a generator of their own, seeded by the
            run's seed, the training batch and the prompt's place in the batch of all
            processes: the rollouts do not depend on how a batch is split over processes, so
            N processes (``trainer=ddp|fsdp``) draw what one process with N times the batch
            size draws. False: one draw for the whole batch from torch's generator.
    """

    num_rollouts: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_length: int | None = 2048
    prompt_overflow: str = "truncate"
    row_seeds: bool = False

    def __post_init__(self) -> None:
        _int("method.rollout.num_rollouts", self.num_rollouts, 1)
        _int("method.rollout.max_new_tokens", self.max_new_tokens, 1)
        _int("method.rollout.max_prompt_length", self.max_prompt_length, 1, allow_none=True)
        if not isinstance(self.temperature, int | float) or not self.temperature > 0:
            _fail("method.rollout.temperature", self.temperature, "a number > 0")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            _fail("method.rollout.top_p", self.top_p, "a number in (0, 1]")
        if not isinstance(self.row_seeds, bool):
            _fail("method.rollout.row_seeds", self.row_seeds, "true or false")
        if self.prompt_overflow not in PROMPT_OVERFLOW:
            _fail("method.rollout.prompt_overflow", self.prompt_overflow, "'truncate' or 'skip'")


@dataclass
class LossSettings:
    """The per-token divergence between teacher and student on the completions.

    Args:
        divergence: ``forward_kl`` = KL(teacher || student) (the released CaOPD/SDFT code's
            default), ``reverse_kl`` = KL(student || teacher), or ``jsd``.
        jsd_beta: the JSD's mixing weight in [0, 1] (0 gives forward KL, 1 reverse KL).
        skip_first_tokens: completion tokens left out of the loss at each rollout's start.
        chunk_size: positions per chunk of the memory-bounded divergence (None: unchunked; with
            ``fused`` None means 256).
        share_prompt_prefix: encode each prompt once for its K completions (exact; faster).
        topk: None compares the full vocabulary; an integer k compares the teacher's top-k
            tokens plus one tail bucket holding the rest of each model's mass (SDPO's top-k +
            tail, `lightning_caopd.divergence.topk`), for every ``divergence``.
        fused: the student and teacher run their bodies without the LM head and the divergence
            computes logits one chunk of completion positions at a time from the hidden states
            (`lightning_caopd.divergence.fused`): no (B*K, T, V) logits exist; equal loss and
            gradients.
        temperature: both models' logits are divided by it before the divergence (> 0), as the
            released CaOPD code divides them by its sampling temperature; the domain presets
            set it to ``method.rollout.temperature``. 1.0 compares the models' own
            distributions. The importance weight of vLLM rollouts always takes the student's
            log-probs at the sampling temperature, the distribution the sampler drew from.
        topk_support: whose top-k tokens form the support with ``topk``: ``teacher`` (this
            project's and SDFT's choice) or ``student`` (the SDPO verl code's).
    """

    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    skip_first_tokens: int = 0
    chunk_size: int | None = None
    share_prompt_prefix: bool = True
    topk: int | None = None
    fused: bool = False
    temperature: float = 1.0
    topk_support: str = "teacher"

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            _fail("method.loss.divergence", self.divergence, f"one of {DIVERGENCES}")
        if not isinstance(self.jsd_beta, int | float) or not 0 <= self.jsd_beta <= 1:
            _fail("method.loss.jsd_beta", self.jsd_beta, "a number in [0, 1]")
        _int("method.loss.skip_first_tokens", self.skip_first_tokens, 0)
        _int("method.loss.chunk_size", self.chunk_size, 1, allow_none=True)
        _int("method.loss.topk", self.topk, 1, allow_none=True)
        if not isinstance(self.fused, bool):
            _fail("method.loss.fused", self.fused, "true or false")
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, int | float)
            or not 0 < self.temperature < float("inf")
        ):
            _fail("method.loss.temperature", self.temperature, "a finite number > 0")
        if self.topk_support not in SUPPORTS:
            _fail("method.loss.topk_support", self.topk_support, f"one of {SUPPORTS}")
        if self.topk is not None and self.chunk_size is not None and not self.fused:
            raise ConfigError(
                f"method.loss.chunk_size={self.chunk_size} with method.loss.topk={self.topk}: the "
                "top-k + tail divergence on materialised logits is not chunked. Set "
                "method.loss.fused=true (chunked from hidden states) or "
                "method.loss.chunk_size=null."
            )
