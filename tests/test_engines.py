"""The rollout-engine switch (`method.engine`) and the HF engine."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from lightning_caopd.engines import HFEngine, RolloutEngine
from lightning_caopd.models import build_char_tokenizer, build_tiny_llama
from lightning_caopd.rollout import sample
from lightning_caopd.runner import build


class CountingEngine(HFEngine):
    """The HF engine, recording the optimizer step of every weight sync."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)  # the config's HFEngine keys (use_generate) still apply
        self.synced_at: list[int] = []
        self.sample_calls = 0

    def sync_weights(self, model: torch.nn.Module) -> None:
        super().sync_weights(model)
        self.synced_at.append(self._module.global_step)

    def sample(self, *args, **kwargs):
        self.sample_calls += 1
        return super().sample(*args, **kwargs)


def _prompts(tok) -> list[list[int]]:
    return [tok("next k")["input_ids"], tok("prev q!")["input_ids"]]


def test_hf_engine_is_rollout_sample_on_the_synced_model():
    tok = build_char_tokenizer()
    a, b = (
        build_tiny_llama(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, seed=1
        ),
        build_tiny_llama(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, seed=2
        ),
    )
    engine = HFEngine()
    assert isinstance(engine, RolloutEngine)
    engine.attach(tok)
    with pytest.raises(RuntimeError, match="sync_weights"):
        engine.sample(_prompts(tok), 3, 8, 1.0, 1.0)
    outs = {}
    for name, model in (("a", a), ("b", b)):
        engine.sync_weights(model)
        torch.manual_seed(0)
        got = engine.sample(_prompts(tok), 3, 8, 1.0, 1.0)
        torch.manual_seed(0)
        want = sample(model, tok, _prompts(tok), 3, 8, 1.0, 1.0)
        assert got.completions == want.completions and len(got.completions) == 6
        outs[name] = got.completions
    assert outs["a"] != outs["b"]  # the sync switched the weights sampled from


def test_engine_is_chosen_by_config_and_synced_once_per_optimizer_step(
    toy_base, tiny_overrides, make_cfg, tmp_path
):
    cfg = make_cfg(
        [
            "experiment=toy",
            "method=opd",
            f"model.path={toy_base}",
            *tiny_overrides,
            "method.engine._target_=tests.test_engines.CountingEngine",
            "+trainer.accumulate_grad_batches=2",
            "method.rollout.max_new_tokens=8",
        ],
        tmp_path,
    )
    module, datamodule = build(cfg)
    engine = module.engine
    assert type(engine) is CountingEngine and engine.tokenizer is module.tokenizer
    engine._module = module
    trainer = instantiate(
        cfg.trainer,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)
    # 2 optimizer steps x 2 micro-batches: 4 rollout calls, weights synced at each step's start
    assert trainer.global_step == 2 and engine.sample_calls == 4
    assert engine.synced_at == [0, 1] and engine.model is module.student


def test_default_engine_is_hf(toy_base, tiny_overrides, make_cfg, tmp_path):
    cfg = make_cfg(
        ["experiment=toy", "method=caopd", f"model.path={toy_base}", *tiny_overrides], tmp_path
    )
    assert cfg.method.engine._target_ == "lightning_caopd.engines.HFEngine"
    module, _ = build(cfg)
    assert type(module.engine) is HFEngine
