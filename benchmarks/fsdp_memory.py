"""Memory per rank under ``trainer=fsdp`` against ``trainer=ddp``: 2 CPU processes, a ~113M Llama.

The model is a Llama built from a config (no download): hidden 768, 12 layers, 12 heads, MLP
3072, the character tokenizer (vocabulary 102), 113.3M parameters, saved once to ``--model-dir``
and trained by ``python train.py experiment=toy method=caopd`` for a few steps under each
strategy. A callback (`PeakMemory`) records on every rank, at the end of training:

* ``state_gib``: the bytes of the model states this rank holds: the student's and the frozen
  teacher's parameters, the gradients and AdamW's two moments (local shards under FSDP), read
  from the live tensors.
* ``peak_rss_gib``: the process's peak resident memory during training (VmHWM, reset when
  training starts via ``/proc/self/clear_refs``): the states, plus activations, rollouts
  (which hold the student's whole weights while they decode) and the Python/torch baseline.
* ``rss_gib``: the resident memory when training ends.

Each rank first loads the whole model from disk before ``configure_model`` shards it, so the
process's peak over its whole life is not reduced on CPU; on GPUs ``fully_shard`` moves only the
shards to the device.

Usage:
    python benchmarks/fsdp_memory.py                 # ddp and fsdp, 2 steps each
    python benchmarks/fsdp_memory.py --steps 3 --out benchmarks/results/fsdp_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3


def _status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


class PeakMemory(L.Callback):
    """Writes this rank's memory at the end of training to ``<out_dir>/memory_rank<r>.json``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: D102
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: D102
        params = [*pl_module.student.parameters(), *pl_module.teacher.parameters()]
        grads = [p.grad for p in pl_module.student.parameters() if p.grad is not None]
        opt = trainer.optimizers[0]
        moments = [v for s in opt.state.values() for v in s.values() if v.dim() > 0]
        state = sum(_local_bytes(t) for t in [*params, *grads, *moments])
        out = {
            "rank": trainer.global_rank,
            "state_gib": state / GIB,
            "peak_rss_gib": _status("VmHWM") / GIB,
            "rss_gib": _status("VmRSS") / GIB,
            "train_s": time.perf_counter() - self.start,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"memory_rank{trainer.global_rank}.json").write_text(json.dumps(out))


def build_model(path: Path) -> int:
    """Save the ~113M Llama and the char tokenizer to `path` (once); its parameter count."""
    from lightning_caopd.models import build_char_tokenizer, build_tiny_llama, save_model

    if not (path / "config.json").is_file():
        model = build_tiny_llama(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=2048,
        )
        save_model(model, build_char_tokenizer(), path)
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() for p in model.parameters())


def run(strategy: str, model_dir: Path, out_dir: Path, steps: int) -> list[dict]:
    """One ``train.py`` run under `strategy` (2 CPU processes); each rank's memory record."""
    overrides = [
        "experiment=toy",
        "method=caopd",
        f"trainer={strategy}",
        f"model.path={model_dir}",
        f"trainer.max_steps={steps}",
        "data.num_train=16",
        "data.num_eval=2",
        "data.batch_size=2",
        "data.eval_batch_size=1",
        "method.rollout.num_rollouts=2",
        "method.rollout.max_new_tokens=16",
        "eval.max_new_tokens=4",
        "eval.teacher_conditioned=false",
        "eval_before_training=false",
        "callbacks=minimal",
        "callbacks.student_export=null",
        "logger=csv",
        "threads=1",
        "+callbacks.peak._target_=benchmarks.fsdp_memory.PeakMemory",
        f"+callbacks.peak.out_dir={out_dir}",
        f"hydra.run.dir={out_dir}",
    ]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        env=env,
        capture_output=True,
        text=True,
        cwd=out_dir.parent,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return [json.loads((out_dir / f"memory_rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:  # noqa: D103
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--model-dir", type=Path, default=ROOT / ".cache" / "llama113m")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "fsdp_memory")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    n_params = build_model(args.model_dir)
    result = {
        "model": "Llama 768x12, MLP 3072, char tokenizer (vocab 102), fp32",
        "parameters": n_params,
        "steps": args.steps,
        "processes": 2,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "runs": {},
    }
    for strategy in ("ddp", "fsdp"):
        ranks = run(strategy, args.model_dir, args.work_dir / strategy, args.steps)
        result["runs"][strategy] = ranks
        print(
            strategy,
            " | ".join(
                f"rank {r['rank']}: states {r['state_gib']:.3f} GiB, peak RSS "
                f"{r['peak_rss_gib']:.3f} GiB, RSS at end {r['rss_gib']:.3f} GiB"
                for r in ranks
            ),
        )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
