"""Rollout engines: what samples the K completions per prompt, behind one config switch.

``method.engine`` is a config group (``conf/method/engine/``): ``hf`` (`HFEngine`, the default
of the toy experiments) samples from the live student with the project's batched, KV-cached
decoding loop; ``vllm`` (`lightning_caopd.vllm_engine.VLLMEngine`, the default of the paper's
domain presets) runs a colocated ``vllm.LLM`` in the training process, as the paper's released
code and TRL's ``vllm_mode="colocate"`` do. A user switches with one override,
``method/engine=vllm``.

`DistillationModule` calls `RolloutEngine.attach` once, `RolloutEngine.sync_weights` before the
first rollouts of every optimizer step (rollouts are always drawn from the current policy:
strictly on-policy) and `RolloutEngine.sample` in every training step. Every engine keeps one
sampling contract (tested against both): K completions per prompt, prompt-major (row b*K + k),
each up to and including the first of the model's end ids (`lightning_caopd.rollout.end_ids`),
``truncated`` when it hit the length limit first, temperature 0 meaning greedy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_caopd.checks import check_bool
from lightning_caopd.rollout import Rollouts, sample
from lightning_caopd.sharding import gathered


class RolloutEngine(ABC):
    """Samples K completions per prompt from the current student.

    Attributes:
        tokenizer: the tokenizer prompts are encoded with (`attach`).
        stop_ids: the ids that end a completion (`attach`).
        max_model_len: the longest prompt + completion the engine must hold (`attach`; None:
            the model's own limit).
        correction_cap: the cap of the truncated importance weight the loss applies to
            rollouts drawn from this engine (`lightning_caopd.divergence.importance`); None: no
            correction (the engine samples from the student itself).
        last_sync_s: seconds the last `sync_weights` took (``train/engine_sync_s``).
    """

    tokenizer: PreTrainedTokenizerBase | None = None
    stop_ids: list[int] | None = None
    max_model_len: int | None = None
    correction_cap: float | None = None
    last_sync_s: float = 0.0

    def attach(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop_ids: list[int] | None = None,
        max_model_len: int | None = None,
    ) -> None:
        """Give the engine the tokenizer, the end ids and the longest sequence it must hold."""
        self.tokenizer = tokenizer
        self.stop_ids = None if stop_ids is None else list(stop_ids)
        self.max_model_len = max_model_len

    @abstractmethod
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the next `sample` calls draw from `model`'s current weights."""

    @abstractmethod
    def sample(
        self,
        prompts: list[list[int]],
        k: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seeds: list[int] | None = None,
        min_new_tokens: int = 0,
    ) -> Rollouts:
        """K completions for each of the B token-id `prompts`, prompt-major (row b*K + k).

        A `temperature` of 0 decodes greedily. `seeds` (one per prompt; None: drawn from
        torch's generator) make a prompt's samples depend on its seed alone, not on the other
        prompts of the call (``method.rollout.row_seeds``). No completion ends at an end id
        before `min_new_tokens` tokens (``method.rollout.min_new_tokens``).
        """


class HFEngine(RolloutEngine):
    """Rollouts from the student itself: `lightning_caopd.rollout.sample`.

    The engine samples from the live training module, so syncing is taking a reference: the
    weights the optimizer just wrote are the ones the next rollouts read, with no copy and
    no extra memory, and the rollouts are exactly on-policy (no importance correction).

    Args:
        use_generate: decode with transformers' ``generate`` instead of the project's leaner
            loop (`lightning_caopd.rollout.decode`, the same tokens, faster on small models).
    """

    def __init__(self, use_generate: bool = False) -> None:
        check_bool("method.engine.use_generate", use_generate)
        self.model: PreTrainedModel | None = None
        self.use_generate = use_generate

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Sample from `model` (a reference, not a copy)."""
        self.model = model

    def sample(
        self,
        prompts: list[list[int]],
        k: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seeds: list[int] | None = None,
        min_new_tokens: int = 0,
    ) -> Rollouts:
        """See `RolloutEngine.sample`; one `lightning_caopd.rollout.sample` call."""
        if self.model is None or self.tokenizer is None:
            raise RuntimeError(
                "HFEngine.sample was called before attach(tokenizer) and sync_weights(model); "
                "DistillationModule does both: build engines through it (method.engine)."
            )
        greedy = temperature == 0
        with gathered(self.model):  # sharded (trainer=fsdp): the whole weights while it decodes
            return sample(
                self.model,
                self.tokenizer,
                prompts,
                k,
                max_new_tokens,
                1.0 if greedy else temperature,
                top_p,
                do_sample=not greedy,
                use_generate=self.use_generate,
                stop_ids=self.stop_ids,
                seeds=None if greedy else seeds,
                min_new_tokens=min_new_tokens,
            )
