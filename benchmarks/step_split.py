"""Where a training step's time goes: rollouts, teacher, student, loss, backward, optimizer.

Builds the module of any experiment exactly as ``train.py`` does (``runner.build``; a base built
on first use) and runs its step's parts by hand on the experiment's own training batches,
timing each:

- ``rollouts``: the student's prompts encoded, K samples per prompt (KV-cached), verified, the
  confidence targets applied and the teacher's prompts built;
- ``teacher``: the frozen teacher's forward on the completions, with its privileged context;
- ``student``: the student's forward on its own prompts + completions (with gradients);
- ``loss``: the divergence (with ``method.loss.fused``: the output heads, chunk by chunk);
- ``backward`` and ``optimizer`` (the configured optimizer's step and ``zero_grad``).

The first ``--warmup`` steps are not counted; the table gives medians over ``--steps`` and
``--out`` keeps them (JSON).

Usage:
    python benchmarks/step_split.py experiment=smollm2_caopd
    python benchmarks/step_split.py experiment=caopd --steps 5
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

PARTS = ("rollouts", "teacher", "student", "loss", "backward", "optimizer")


def build(overrides: list[str]):
    """The module, the first training batches and the optimizer, as ``train.py`` builds them."""
    from hydra import compose, initialize_config_module

    from lightning_caopd.runner import build as build_module
    from lightning_caopd.runner import prepare_base

    with initialize_config_module("lightning_caopd.conf", version_base="1.3"):
        paths = [f"paths.root_dir={os.getcwd()}", "paths.output_dir=."]  # no Hydra run here
        cfg = compose(config_name="train", overrides=[*paths, *overrides])
        prepare_base(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    module, data = build_module(cfg)
    data.setup("fit")
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    return cfg, module, data.train_dataloader(), opt


def timed_parts(module, times: dict[str, float]) -> None:
    """Wrap the module's two forward helpers so each call adds its time to teacher or student."""
    for name in ("completion_hidden", "completion_logits"):
        inner = getattr(module, name)

        def wrapper(model, *args, _inner=inner, **kwargs):
            start = time.perf_counter()
            out = _inner(model, *args, **kwargs)
            times["teacher" if model is module.teacher else "student"] += (
                time.perf_counter() - start
            )
            return out

        setattr(module, name, wrapper)


def step(module, batch: list[dict], opt, times: dict[str, float]) -> None:
    """One training step in the order `DistillationModule.training_step` takes, timed by part."""
    start = time.perf_counter()
    batch, prompts, _ = module.student_prompts(batch)
    roll = module.sample_rollouts(prompts)
    correct, p_acc = module.verify(batch, roll.texts)
    completions = module.targets.apply(roll.completions, p_acc, module.tokenizer)
    teacher = module.teacher_prompts(batch, roll, correct, p_acc)
    times["rollouts"] += time.perf_counter() - start
    start = time.perf_counter()
    loss = module.divergence(prompts, teacher.prompts, completions, teacher.rows)[0]
    times["loss"] += time.perf_counter() - start - times["teacher"] - times["student"]
    start = time.perf_counter()
    loss.backward()
    times["backward"] += time.perf_counter() - start
    start = time.perf_counter()
    opt.step()
    opt.zero_grad()
    times["optimizer"] += time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/step_split.json")
    args = parser.parse_args()
    cfg, module, loader, opt = build(args.overrides)
    rows = []
    times: dict[str, float] = defaultdict(float)
    timed_parts(module, times)
    for i, batch in enumerate(itertools.islice(loader, args.warmup + args.steps)):
        times.clear()
        step(module, batch, opt, times)
        if i >= args.warmup:
            rows.append(dict(times))
        print(f"step {i}: " + ", ".join(f"{p} {times[p]:.2f}s" for p in PARTS), flush=True)
    median = {p: statistics.median(r.get(p, 0.0) for r in rows) for p in PARTS}
    total = sum(median.values())
    print(f"\n{'part':<10} {'median s':>9} {'share':>6}")
    for p in PARTS:
        print(f"{p:<10} {median[p]:>9.2f} {median[p] / total:>6.0%}")
    print(f"{'step':<10} {total:>9.2f}")
    result = {
        "overrides": args.overrides,
        "prompts": cfg.data.batch_size,
        "k": cfg.method.rollout.num_rollouts,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "median_s": median,
        "per_step_s": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
