"""Rollout engines: what samples the K completions per prompt, behind one config switch.

``method.engine`` selects the engine (``_target_``); ``hf`` (`HFEngine`, the default) runs the
student itself (`lightning_caopd.rollout.sample`: a batched, KV-cached
decoding loop). An engine with its own copy of the weights (a
vLLM server or a colocated ``vllm.LLM``) plugs in behind the same switch by implementing
`RolloutEngine.sample` and `RolloutEngine.sync_weights`; `DistillationModule` calls
``sync_weights(student)`` before the first rollouts of every optimizer step, so rollouts are
always drawn from the current policy (strictly on-policy).

How a vLLM engine would sync weights (not implemented here; vLLM needs CUDA):

- **Colocated** (``vllm.LLM(model=path, gpu_memory_utilization=0.3)`` in the training process,
  as TRL's ``vllm_mode="colocate"``): ``sync_weights`` passes the student's tensors to the
  engine's model, ``llm.collective_rpc`` / ``model.load_weights(student.state_dict().items())``
  (with LoRA: merge the adapter first, or hand vLLM the adapter as a ``LoRARequest``), and
  resets vLLM's prefix cache, since cached KV blocks were computed with the old weights.
  ``sample`` calls ``llm.generate`` with ``TokensPrompt(prompt_token_ids=...)`` and
  ``SamplingParams(n=k, max_tokens=..., temperature=..., top_p=...)`` and maps the outputs
  to `Rollouts` (``finish_reason == "length"`` is ``truncated``).
- **Server** (a ``vllm serve`` process on other GPUs): ``sync_weights`` broadcasts each
  parameter from rank 0 over an NCCL group shared with the server (TRL's
  ``VLLMClient.update_named_param``); only rank 0 talks to the server.

Under FSDP/DeepSpeed ZeRO-3 the parameters must be gathered (``summon_full_params`` /
``GatheredParameters``) inside ``sync_weights`` before they are handed over.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_caopd.rollout import Rollouts, sample


class RolloutEngine(ABC):
    """Samples K completions per prompt from the current student.

    The module calls `attach` once with the tokenizer, `sync_weights` with the student before
    the first rollouts of every optimizer step, and `sample` in every training step.
    """

    tokenizer: PreTrainedTokenizerBase | None = None

    def attach(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Give the engine the tokenizer prompts are encoded with (pad and EOS ids)."""
        self.tokenizer = tokenizer

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
    ) -> Rollouts:
        """K completions for each of the B token-id `prompts`, prompt-major (row b*K + k)."""


class HFEngine(RolloutEngine):
    """Rollouts from the student itself: `lightning_caopd.rollout.sample`.

    The engine samples from the live training module, so syncing is taking a reference: the
    weights the optimizer just wrote are the ones the next rollouts read, with no copy and
    no extra memory. See the module docstring for engines that hold their own weights.

    Args:
        use_generate: decode with transformers' ``generate`` instead of the project's leaner
            loop (`lightning_caopd.rollout.decode`, the same tokens, faster on small models).
    """

    def __init__(self, use_generate: bool = False) -> None:
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
    ) -> Rollouts:
        """See `RolloutEngine.sample`; one `lightning_caopd.rollout.sample` call."""
        if self.model is None or self.tokenizer is None:
            raise RuntimeError(
                "HFEngine.sample was called before attach(tokenizer) and sync_weights(model); "
                "DistillationModule does both: build engines through it (method.engine)."
            )
        return sample(
            self.model,
            self.tokenizer,
            prompts,
            k,
            max_new_tokens,
            temperature,
            top_p,
            use_generate=self.use_generate,
        )
