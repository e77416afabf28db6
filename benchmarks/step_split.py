"""Where a training step's time goes: sync, rollouts, teacher, student, loss, backward, optimizer.

Builds the module of any experiment exactly as ``train.py`` does (``runner.build``; a base built
on first use) and runs its step's parts by hand on the experiment's own training batches,
timing each:

- ``sync``: the rollout engine's weight sync, once per step as in training (the ``hf`` engine
  takes a reference; vLLM loads the student's full weights, LoRA merged);
- ``rollouts``: the student's prompts encoded, K samples per prompt, verified, the confidence
  targets applied and the teacher's prompts built;
- ``teacher``: the frozen teacher's forward on the completions, with its privileged context;
- ``student``: the student's forward on its own prompts + completions (with gradients);
- ``loss``: the divergence (with ``method.loss.fused``: the output heads, chunk by chunk) and,
  for vLLM's rollouts, the importance weights (their statistics are kept: ``is_logprob_gap``,
  the mean |student - vLLM| log-prob of the sampled tokens, ``is_capped_frac``, ...);
- ``backward`` and ``optimizer`` (the configured optimizer's step and ``zero_grad``).

``--engines hf vllm`` builds one module per engine (``method/engine=<name>``; a name may carry
that engine's own overrides after colons, ``vllm:method.engine.dtype=bfloat16``) and interleaves
their steps on the same batches (the order alternating from step to step); the table gives each
engine's medians and the median of the per-step ratios to the first engine. The first
``--warmup`` steps are not counted; ``--out`` keeps everything (JSON).

Usage:
    python benchmarks/step_split.py experiment=smollm2 method=caopd
    python benchmarks/step_split.py experiment=smollm2 method=opd --engines hf vllm \
        vllm:method.engine.dtype=bfloat16 --steps 5     # docs/results.md's engine table
    python benchmarks/step_split.py experiment=toy method=caopd --steps 5
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

PARTS = ("sync", "rollouts", "teacher", "student", "loss", "backward", "optimizer")


def compose_config(overrides: list[str]):
    """The config ``train.py`` would compose from `overrides` (its base built on first use)."""
    from hydra import compose, initialize_config_module

    from lightning_caopd.runner import prepare_base

    with initialize_config_module("lightning_caopd.conf", version_base="1.3"):
        paths = [f"paths.root_dir={os.getcwd()}", "paths.output_dir=."]  # no Hydra run here
        cfg = compose(config_name="train", overrides=[*paths, *overrides])
        prepare_base(cfg)
    return cfg


def build(overrides: list[str]):
    """The module, the first training batches and the optimizer, as ``train.py`` builds them."""
    from lightning_caopd.runner import build as build_module

    cfg = compose_config(overrides)
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    module, data = build_module(cfg)
    data.setup("fit")
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    return cfg, module, data.train_dataloader(), opt


def timed_parts(module, times: dict[str, float]) -> None:
    """Wrap the loss path's two forward helpers so each call adds its time to teacher or student."""
    path, teacher = module.loss_path, module.teacher
    for name in ("hidden", "logits"):
        inner = getattr(path, name)

        def wrapper(model, *args, _inner=inner, **kwargs):
            start = time.perf_counter()
            out = _inner(model, *args, **kwargs)
            is_teacher = model is teacher or model == teacher.body
            times["teacher" if is_teacher else "student"] += time.perf_counter() - start
            return out

        setattr(path, name, wrapper)


def step(module, batch: list[dict], opt, times: dict[str, float]) -> None:
    """One training step in the order `DistillationModule.training_step` takes, timed by part."""
    from lightning_caopd.step.loss import LossBatch

    start = time.perf_counter()
    module.engine.sync_weights(module.student)  # training syncs once per optimizer step
    times["sync"] += time.perf_counter() - start
    start = time.perf_counter()
    batch, prompts, _ = module.student_prompts(batch)
    r = module.rollout
    roll = module.engine.sample(
        prompts, r.num_rollouts, r.max_new_tokens, r.temperature, r.top_p, None, r.min_new_tokens
    )
    correct, p_acc = module.verify(batch, roll.texts)
    completions = module.targets.apply(
        roll.completions, p_acc, module.tokenizer, module.engine.stop_ids, r.max_new_tokens
    )
    teacher = module.teacher_inputs(batch, roll.texts, correct, p_acc)
    times["rollouts"] += time.perf_counter() - start
    start = time.perf_counter()
    importance = module.importance(roll, completions)
    tokens = LossBatch(prompts, teacher.prompts, completions, teacher.in_loss, importance)
    out = module.loss_path(module.student, module.teacher, tokens)
    loss, correction = out.loss, out.correction
    times["loss"] += time.perf_counter() - start - times["teacher"] - times["student"]
    for key, value in correction.items():  # vLLM's rollouts: the importance-weight statistics
        times[f"is_{key}"] = float(value)
    start = time.perf_counter()
    loss.backward()
    times["backward"] += time.perf_counter() - start
    start = time.perf_counter()
    opt.step()
    opt.zero_grad()
    times["optimizer"] += time.perf_counter() - start


def table(name: str, rows: list[dict]) -> dict[str, float]:
    """Print one engine's per-part medians and shares; return the medians (with ``step``)."""
    median = {p: statistics.median(r.get(p, 0.0) for r in rows) for p in PARTS}
    median["step"] = statistics.median(sum(r.get(p, 0.0) for p in PARTS) for r in rows)
    for key in sorted({k for r in rows for k in r if k.startswith("is_")}):
        median[key] = statistics.median(r[key] for r in rows)
    print(f"\n{name}\n{'part':<10} {'median s':>9} {'share':>6}")
    for p in PARTS:
        print(f"{p:<10} {median[p]:>9.2f} {median[p] / median['step']:>6.0%}")
    print(f"{'step':<10} {median['step']:>9.2f}")
    for key in (k for k in median if k.startswith("is_")):
        print(f"{key:<18} {median[key]:.3e}")
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    parser.add_argument("--engines", nargs="+", default=None, help="e.g. hf vllm (interleaved)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/step_split.json")
    args = parser.parse_args()
    names = args.engines or ["config"]
    systems = {}
    for name in names:
        group, *knobs = name.split(":")  # e.g. vllm:method.engine.dtype=bfloat16
        engine = [] if args.engines is None else [f"method/engine={group}", *knobs]
        systems[name] = build([*args.overrides, *engine])
    cfg, _, loader, _ = systems[names[0]]
    rows: dict[str, list[dict]] = {name: [] for name in names}
    times = {name: defaultdict(float) for name in names}
    for name, (_, module, _, _) in systems.items():
        timed_parts(module, times[name])
    for i, batch in enumerate(itertools.islice(loader, args.warmup + args.steps)):
        order = names if i % 2 == 0 else names[::-1]  # no engine always goes first
        for name in order:
            _, module, _, opt = systems[name]
            times[name].clear()
            step(module, batch, opt, times[name])
            if i >= args.warmup:
                rows[name].append(dict(times[name]))
            parts = ", ".join(f"{p} {times[name][p]:.2f}s" for p in PARTS)
            if "is_logprob_gap" in times[name]:
                parts += f"; |student - sampler| log-prob gap {times[name]['is_logprob_gap']:.2e}"
            print(f"step {i} [{name}]: {parts}", flush=True)
    medians = {name: table(name, rows[name]) for name in names}
    ratios = {}
    for name in names[1:]:
        ratios[name] = {
            part: statistics.median(
                sum(r.get(p, 0.0) for p in (PARTS if part == "step" else (part,)))
                / max(1e-9, sum(b.get(p, 0.0) for p in (PARTS if part == "step" else (part,))))
                for r, b in zip(rows[name], rows[names[0]], strict=True)
            )
            for part in ("step", "rollouts", "sync")
        }
        print(
            f"\n{name} / {names[0]}, median of per-step ratios: "
            + ", ".join(f"{k} {v:.3f}" for k, v in ratios[name].items())
        )
    result = {
        "overrides": args.overrides,
        "engines": names,
        "prompts": cfg.data.batch_size,
        "k": cfg.method.rollout.num_rollouts,
        "max_new_tokens": cfg.method.rollout.max_new_tokens,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "median_s": medians,
        "ratio_to_first": ratios,
        "per_step_s": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
