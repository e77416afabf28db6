"""Step time of this project's OPD training step against K and against completion length.

Each configuration builds a fresh `DistillationModule` from the Hydra config (``experiment=toy
method=opd`` on a randomly initialised tiny Llama: hidden 128, 4 layers, 4 heads, intermediate
256, the character tokenizer), runs ``--warmup + --repeats`` steps through a Lightning
``Trainer`` and reports the median wall time of the measured steps (rollouts, verification,
teacher and student forwards, backward and the optimizer step). A random model rarely stops
early, so the completions run close to ``max_new_tokens``; the mean completion length is
reported too.

Usage:
    python benchmarks/scaling.py                          # K in 1,2,4,8,16; T in 8,16,32,64
    python benchmarks/scaling.py --repeats 2 --warmup 1 --ks 1,2 --lengths 8   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

from lightning_caopd.data.toy import ToyDataModule

ROOT = Path(__file__).resolve().parents[1]
MODEL = [
    "model=tiny_scratch",
    "model.student.hidden_size=128",
    "model.student.num_hidden_layers=4",
    "model.student.num_attention_heads=4",
    "model.student.intermediate_size=256",
]


class StepTimer(L.Callback):
    """Wall time of every training step (batch start to batch end, optimizer step included)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)
        metrics = trainer.callback_metrics
        if "train/tokens_per_s" in metrics and "train/rollouts_per_s" in metrics:
            # tokens per rollout = (tokens/s) / (rollouts/s), both over the same elapsed time
            self.tokens.append(
                float(metrics["train/tokens_per_s"] / metrics["train/rollouts_per_s"])
            )


def step_times(k: int, max_new_tokens: int, prompts: int, warmup: int, repeats: int) -> dict:
    """Median step time of one configuration (a fresh module and trainer)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "experiment=toy",
                "method=opd",
                *MODEL,
                f"method.rollout.num_rollouts={k}",
                f"method.rollout.max_new_tokens={max_new_tokens}",
            ],
            return_hydra_config=True,
        )
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.paths.root_dir = str(ROOT / "outputs" / "bench_scaling")
    L.seed_everything(0, verbose=False)
    module = instantiate(
        cfg.method,
        student=instantiate(cfg.model.student),
        tokenizer=instantiate(cfg.model.tokenizer),
        task=instantiate(cfg.data.task),
    )
    steps = warmup + repeats
    data = ToyDataModule(num_train=prompts * steps, num_eval=1, batch_size=prompts, shuffle=False)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    measured = timer.times[warmup:]
    return {
        "k": k,
        "max_new_tokens": max_new_tokens,
        "prompts": prompts,
        "median_s": statistics.median(measured),
        "times_s": measured,
        "mean_completion_tokens": statistics.mean(timer.tokens[warmup:]) if timer.tokens else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ks", default="1,2,4,8,16", help="K values (at --length)")
    parser.add_argument("--lengths", default="8,16,32,64", help="max_new_tokens values (at --k)")
    parser.add_argument("--k", type=int, default=8, help="K for the length sweep")
    parser.add_argument("--length", type=int, default=16, help="max_new_tokens for the K sweep")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for sweep, values in (("K", args.ks), ("length", args.lengths)):
        for v in (int(x) for x in values.split(",")):
            k, t = (v, args.length) if sweep == "K" else (args.k, v)
            row = {"sweep": sweep, **step_times(k, t, args.prompts, args.warmup, args.repeats)}
            rows.append(row)
            print(f"  {sweep}: K={k} max_new_tokens={t}: {row['median_s']:.3f} s", flush=True)

    print(
        f"\n{args.prompts} prompts per step, median of {args.repeats} steps after {args.warmup} "
        f"warm-up, {args.threads} threads"
    )
    print(
        "| sweep | K | max new tokens | mean completion tokens | step (s) | vs first | x in work |"
    )
    print("|---|---|---|---|---|---|---|")
    for sweep in ("K", "length"):
        sub = [r for r in rows if r["sweep"] == sweep]
        for r in sub:
            first = sub[0]
            work = (
                r["k"] / first["k"]
                if sweep == "K"
                else r["max_new_tokens"] / first["max_new_tokens"]
            )
            r["ratio_to_first"] = r["median_s"] / first["median_s"]
            tokens = f"{r['mean_completion_tokens']:.1f}" if r["mean_completion_tokens"] else "n/a"
            print(
                f"| {sweep} | {r['k']} | {r['max_new_tokens']} | {tokens} | {r['median_s']:.3f} "
                f"| {r['ratio_to_first']:.2f}x | {work:.0f}x |"
            )
    meta = {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
        "args": vars(args),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
