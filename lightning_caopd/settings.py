"""The run's knobs without a model of their own, grouped as a user looks for them.

Rollouts (``method.rollout``), the loss (``method.loss``) and the evaluation (``eval``). Each
group is checked when it is built (`lightning_caopd.checks`), so a bad value stops the run at
start-up (`lightning_caopd.runner.check_config`) with one sentence naming the key, the value and
what is allowed. The other groups a user sets are checked by the objects they build, the same
way: the confidence targets (`lightning_caopd.calibration.CaOPD`), the teacher's template
(`lightning_caopd.templates.TeacherTemplate`), the rollout engine (`lightning_caopd.engines`),
the callbacks (`lightning_caopd.callbacks`) and the data (`lightning_caopd.data`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from omegaconf import OmegaConf

from lightning_caopd.checks import check_bool, check_choice, check_int, check_number
from lightning_caopd.divergence.token import KINDS as DIVERGENCES
from lightning_caopd.divergence.topk import SUPPORTS
from lightning_caopd.errors import ConfigError, out_of_range
from lightning_caopd.readout import READOUTS
from lightning_caopd.reference import PROTOCOLS
from lightning_caopd.rollout import PROMPT_OVERFLOW

# eval.scoring: this project's confidence parser and ECE bins, or the reference scorer's
SCORING = ("default", "reference")
# eval.engine: the student's own greedy decoding, or greedy vLLM (the reference's evaluation)
EVAL_ENGINES = ("hf", "vllm")


def from_config(cls: type, values: Mapping | None, key: str):
    """`cls` (a settings dataclass) built from a config node or dict, its keys named in errors.

    Args:
        cls: `RolloutSettings`, `LossSettings` or `EvalSettings`.
        values: the node's keys (None or empty: the defaults; an instance of `cls`: itself); a
            ``_target_`` is ignored.
        key: the node's dotted config key (``eval``), for the messages.

    Raises:
        ConfigError: a key `cls` does not have, or a value out of range.
    """
    if isinstance(values, cls):
        return values
    if OmegaConf.is_config(values):
        values = OmegaConf.to_container(values, resolve=True)
    values = {k: v for k, v in (values or {}).items() if k != "_target_"}
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"{key} has no setting {', '.join(unknown)}: its settings are {', '.join(known)}."
        )
    return cls(**values)


@dataclass
class RolloutSettings:
    """How the student samples its K rollouts per prompt.

    Args:
        num_rollouts: K, rollouts per prompt (P_acc is measured over them).
        max_new_tokens: the rollout length limit.
        min_new_tokens: no rollout ends before this many tokens (the end ids are masked until
            then, as transformers' ``min_new_tokens`` and vLLM's ``min_tokens`` do); 0 lets a
            rollout end at its first end id. Fixes the work per step, e.g. to time long
            completions on a task whose answers are short.
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
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_length: int | None = 2048
    prompt_overflow: str = "truncate"
    row_seeds: bool = False

    def __post_init__(self) -> None:
        check_int("method.rollout.num_rollouts", self.num_rollouts, 1)
        check_int("method.rollout.max_new_tokens", self.max_new_tokens, 1)
        check_int("method.rollout.min_new_tokens", self.min_new_tokens, 0)
        if self.min_new_tokens > self.max_new_tokens:
            raise out_of_range(
                "method.rollout.min_new_tokens",
                self.min_new_tokens,
                f"an integer <= method.rollout.max_new_tokens={self.max_new_tokens}",
            )
        check_int("method.rollout.max_prompt_length", self.max_prompt_length, 1, allow_none=True)
        check_number("method.rollout.temperature", self.temperature, 0, open_low=True)
        check_number("method.rollout.top_p", self.top_p, 0, 1, open_low=True)
        check_choice("method.rollout.prompt_overflow", self.prompt_overflow, PROMPT_OVERFLOW)
        check_bool("method.rollout.row_seeds", self.row_seeds)


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
        check_choice("method.loss.divergence", self.divergence, DIVERGENCES)
        check_number("method.loss.jsd_beta", self.jsd_beta, 0, 1)
        check_int("method.loss.skip_first_tokens", self.skip_first_tokens, 0)
        check_int("method.loss.chunk_size", self.chunk_size, 1, allow_none=True)
        check_bool("method.loss.share_prompt_prefix", self.share_prompt_prefix)
        check_int("method.loss.topk", self.topk, 1, allow_none=True)
        check_bool("method.loss.fused", self.fused)
        check_number("method.loss.temperature", self.temperature, 0, open_low=True)
        check_choice("method.loss.topk_support", self.topk_support, SUPPORTS)
        if self.topk is not None and self.chunk_size is not None and not self.fused:
            raise ConfigError(
                f"method.loss.chunk_size={self.chunk_size} with method.loss.topk={self.topk}: the "
                "top-k + tail divergence on materialised logits is not chunked. Set "
                "method.loss.fused=true (chunked from hidden states) or "
                "method.loss.chunk_size=null."
            )


@dataclass
class EvalSettings:
    """The held-out evaluation (``eval``): greedy, without privileged context.

    The defaults here are the ones a run gets (``conf/train.yaml`` lists the same keys, with
    what they mean, for the command line; a test keeps the two equal).

    Args:
        max_new_tokens: the completion length limit.
        max_prompt_length: a longer prompt loses its left end (counted in the log); None: no
            limit.
        do_sample: sample instead of decoding greedily.
        temperature: the sampling temperature with ``do_sample`` (> 0).
        scoring: ``default``, this project's confidence parser and ECE bins
            (`lightning_caopd.confidence`), or ``reference``, the released CaOPD scorer's.
        protocol: ``default``, this project's evaluation, or ``reference``, the released
            code's end to end (`lightning_caopd.reference`).
        confidence_readout: ``greedy``, the confidence as written, or ``expected``, the mean
            of the model's confidence distribution (`lightning_caopd.readout`; needs
            ``scoring=default``).
        engine: ``hf``, the student generates its answers, or ``vllm``, greedy vLLM.
        teacher_conditioned: also score the teacher with the privileged context
            (distillation runs only).
    """

    max_new_tokens: int = 32
    max_prompt_length: int | None = 2048
    do_sample: bool = False
    temperature: float = 1.0
    scoring: str = "default"
    protocol: str = "default"
    confidence_readout: str = "greedy"
    engine: str = "hf"
    teacher_conditioned: bool = True

    def __post_init__(self) -> None:
        check_int("eval.max_new_tokens", self.max_new_tokens, 1)
        check_int("eval.max_prompt_length", self.max_prompt_length, 1, allow_none=True)
        check_bool("eval.do_sample", self.do_sample)
        check_number("eval.temperature", self.temperature, 0, open_low=True)
        check_choice("eval.scoring", self.scoring, SCORING)
        check_choice("eval.protocol", self.protocol, PROTOCOLS)
        check_choice(
            "eval.confidence_readout",
            self.confidence_readout,
            READOUTS,
            "(greedy: the confidence as written; expected: the mean of the model's confidence "
            "distribution)",
        )
        check_choice(
            "eval.engine",
            self.engine,
            EVAL_ENGINES,
            "(hf: the student's own greedy decoding; vllm: greedy vLLM, as the reference's "
            "evaluation scripts)",
        )
        check_bool("eval.teacher_conditioned", self.teacher_conditioned)
        if self.confidence_readout == "expected" and self.scoring != "default":
            raise ConfigError(
                "eval.confidence_readout=expected reads the confidence this project's parser "
                f"finds; eval.scoring={self.scoring!r} parses another way. Use "
                "eval.scoring=default with it."
            )
