"""`trainer=ddp`: two CPU processes (gloo) through `python train.py`, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_caopd.runner import build

ROOT = Path(__file__).resolve().parents[1]
NUM_EVAL = 23  # odd: a sampler that pads ranks with repeats would score 24 items


class RecordBatches(L.Callback):
    """Writes the item ids each rank trains and evaluates on (a real callback, via Hydra)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def _write(self, trainer: L.Trainer, stage: str, batch: list[dict]) -> None:
        with open(self.out_dir / f"{stage}_rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps([it["id"] for it in batch]) + "\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._write(trainer, "train", batch)

    def on_validation_batch_start(
        self, trainer, pl_module, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._write(trainer, "eval", batch)


def _ids(path: Path) -> list[list[str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_ddp_two_cpu_processes_end_to_end(toy_base, tiny_overrides, make_cfg, tmp_path):
    run_dir, record_dir = tmp_path / "run", tmp_path / "record"
    record_dir.mkdir()
    overrides = [
        "experiment=toy",
        "method=opd",
        "trainer=ddp",
        f"model.path={toy_base}",
        *tiny_overrides,
        f"data.num_eval={NUM_EVAL}",
        "callbacks=default",
        "callbacks.progress=null",
        "+callbacks.record._target_=tests.test_ddp.RecordBatches",
        f"+callbacks.record.out_dir={record_dir}",
        "threads=1",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # cwd=tmp_path: a rank that made its own Hydra run dir would put it under tmp_path/outputs
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # each rank trained on its own prompts: 2 steps x batch 2 per rank, no item on both ranks
    train = {r: _ids(record_dir / f"train_rank{r}.jsonl") for r in (0, 1)}
    assert [len(b) for b in train[0]] == [2, 2] and [len(b) for b in train[1]] == [2, 2]
    flat = {r: {i for b in train[r] for i in b} for r in (0, 1)}
    assert len(flat[0]) == 4 and len(flat[1]) == 4 and not flat[0] & flat[1]

    # evaluation items split without repeats (both evaluations: before and after training)
    evals = {r: [i for b in _ids(record_dir / f"eval_rank{r}.jsonl") for i in b] for r in (0, 1)}
    for r in (0, 1):
        half = len(evals[r]) // 2
        assert evals[r][:half] == evals[r][half:]  # the same split in both evaluations
        evals[r] = evals[r][:half]
    assert not set(evals[0]) & set(evals[1])
    assert sorted(evals[0] + evals[1]) == sorted(f"eval-{i}" for i in range(NUM_EVAL))

    # metrics synced across ranks, metrics.json written once, by rank 0, in one run dir
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written["n"] == NUM_EVAL and written["initial"]["n"] == NUM_EVAL
    assert sum(n["n"] for n in written["by_category"].values()) == NUM_EVAL
    assert written["run"]["steps"] == 2
    assert proc.stdout.count("Wrote ") == 1
    assert not (tmp_path / "outputs").exists()
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert "trainer=ddp" in (run_dir / ".hydra" / "overrides.yaml").read_text()

    # the checkpoint loads into a fresh single-process module
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    cfg = make_cfg(
        ["experiment=toy", "method=opd", f"model.path={toy_base}", *tiny_overrides],
        tmp_path / "single",
    )
    module, _ = build(cfg)
    name = "student.model.layers.0.self_attn.q_proj.weight"
    base = module.state_dict()[name].clone()
    module.load_state_dict(ckpt["state_dict"])
    loaded = module.state_dict()[name]
    assert torch.equal(loaded, ckpt["state_dict"][name])
    assert not torch.equal(loaded, base)  # trained: two optimizer steps moved it
