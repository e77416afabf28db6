"""Median time per OPD training step: this project vs TRL's SDFTTrainer and GKDTrainer.

The same work for every contestant: P prompts x K rollouts x N new tokens at temperature 1,
one student forward + backward over the completions, one teacher forward with the privileged
context (SDFT, this project) and an optimizer step, fp32, on a tiny Llama (hidden 128, 4 layers,
4 heads, intermediate 256) with the project's character tokenizer. Contestants:

- ``bare``: the naive step timed alone: one batched ``generate`` (transformers' own), one student
  forward+backward and one teacher forward over the full prompt+completion rows,
  full-vocabulary forward KL, an AdamW step;
- ``caopd``: this project's ``DistillationModule.training_step`` + backward + AdamW step;
- ``sdft`` / ``sdft_ckpt``: ``trl.experimental.sdft.SDFTTrainer`` (full logits, forward KL:
  ``distillation_alpha=0``, frozen base teacher), gradient checkpointing off / on (its default);
- ``gkd`` / ``gkd_ckpt``: ``trl.experimental.gkd.GKDTrainer`` on-policy (``lmbda=1``,
  ``beta=0``), each prompt repeated K times, checkpointing off / on. GKD has no privileged
  context: its teacher sees the student's prompt (a separate frozen copy of the student).

Rounds are interleaved: every round runs each contestant for ``--warmup + --steps`` steps in
turn (TRL: one ``train()`` call per round), the round median is taken over the measured steps,
and the reported time is the median of round medians; ratios are against ``caopd``.

Usage:
    pip install -e ".[bench]"          # trl, peft (TRL is a benchmark-only dependency)
    python benchmarks/step_time.py                            # the tiny work, 3 rounds
    python benchmarks/step_time.py --case science   # prompt ~380, teacher ~600, 128 tokens
    python benchmarks/step_time.py --rounds 1 --steps 1 --warmup 0 --prompts 2 --k 2 --new-tokens 4
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lightning_caopd.models import (
    build_char_tokenizer,
    build_tiny_llama,
    load_pretrained,
    load_tokenizer,
)  # noqa: E402
from lightning_caopd.rollout import (  # noqa: E402
    build_batch,
    completion_logits,
    encode_chats,
    sample,
)

ROOT = Path(__file__).resolve().parents[1]
# prompt chars, extra teacher chars, new tokens (the character tokenizer: 1 char = 1 token)
CASES = {
    "tiny": (None, None, 14),
    "science": (380, 220, 128),
}


def make_model_dir(path: Path, max_positions: int) -> Path:
    """Build and save the benchmark's tiny Llama and tokenizer when `path` does not exist."""
    if not (path / "config.json").exists():
        model = build_tiny_llama(128, 4, 4, 256, max_position_embeddings=max_positions, seed=0)
        model.save_pretrained(path)
        build_char_tokenizer().save_pretrained(path)
    return path


def make_prompts(n: int, case: str) -> list[dict]:
    """`n` items: a student question and the privileged context of its teacher."""
    prompt_len, extra, _ = CASES[case]
    items = []
    for i in range(n):
        q = f"next {chr(97 + i % 26)}"
        if prompt_len:  # science-shaped: a long question with options
            q = (f"Question {i}: " + "Which statement about the reaction is correct? " * 20)[
                : prompt_len - 40
            ]
            q += " Options: A B C D. Answer:"
        ctx = f"Answer: {chr(97 + (i + 1) % 26)}"
        if extra:
            ctx = (
                ("Worked solution: " + "the rate depends on the concentration; " * 10)[:extra]
                + "\n"
                + ctx
            )
        items.append({"prompt": [{"role": "user", "content": q}], "privileged_context": ctx})
    return items


# ---------------------------------------------------------------- contestants: each returns step()
def bare_step(
    student,
    teacher,
    tok,
    prompts,
    t_prompts,
    k,
    new_tokens,
    opt,
    max_grad_norm=None,
    min_new_tokens=0,
):
    """The naive OPD step: one `generate` of the B*K rollouts at temperature 1 (none ending
    before `min_new_tokens`), the teacher's forward over its full prompt + completion rows, the
    student's forward and backward, forward KL over the full vocabulary, an optimizer step (the
    gradient clipped at `max_grad_norm`).

    `teacher` is any callable causal LM (a frozen copy, or a LoRA student's base with the
    adapter off: `lightning_caopd.step.teacher.AdapterDisabledTeacher`). Returns the completions.
    """
    roll = sample(
        student,
        tok,
        prompts,
        k,
        new_tokens,
        1.0,
        1.0,
        use_generate=True,
        min_new_tokens=min_new_tokens,
    )
    rep = lambda rows: [r for r in rows for _ in range(k)]  # noqa: E731
    sb = build_batch(rep(prompts), roll.completions, tok.pad_token_id)
    with torch.no_grad():
        tl = completion_logits(
            teacher, build_batch(rep(t_prompts), roll.completions, tok.pad_token_id)
        )
    sl = completion_logits(student, sb)  # (B*K, T, V)
    mask = sb["completion_mask"]
    kl = F.kl_div(sl.log_softmax(-1), tl.log_softmax(-1), reduction="none", log_target=True).sum(-1)
    loss = ((kl * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(
            [p for p in student.parameters() if p.requires_grad], max_grad_norm
        )
    opt.step()
    opt.zero_grad()
    return roll.completions


class BatchTimes:
    """A Lightning callback keeping `time.perf_counter()` at every training batch's start and
    end and at the end of `fit` (`starts`, `ends`, `train_end`), and each step's mean completion
    length (`completion_tokens`) when the module's step returns its completions."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        class Times(Callback):
            def __init__(self):
                self.starts, self.ends, self.train_end = [], [], None
                self.completion_tokens = []

            def on_train_batch_start(self, *a):
                self.starts.append(time.perf_counter())

            def on_train_batch_end(self, trainer, pl_module, outputs, *a):
                self.ends.append(time.perf_counter())
                done = getattr(outputs.get("step"), "completions", None) if outputs else None
                if done:
                    self.completion_tokens.append(statistics.fmean(len(c) for c in done))

            def on_train_end(self, *a):
                self.train_end = time.perf_counter()

        return Times()


def bare_contestant(args, model_dir, items):
    tok = load_tokenizer(str(model_dir))
    student = load_pretrained(str(model_dir), attn_implementation="eager")
    teacher = (
        load_pretrained(str(model_dir), attn_implementation="eager").requires_grad_(False).eval()
    )
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6)
    prompts, _ = encode_chats(tok, [it["prompt"] for it in items])
    t_chats = [
        [{"role": "user", "content": f"{it['privileged_context']}\n\n{it['prompt'][0]['content']}"}]
        for it in items
    ]
    t_prompts, _ = encode_chats(tok, t_chats)
    k = args.k

    def step():
        bare_step(student, teacher, tok, prompts, t_prompts, k, args.new_tokens, opt)

    return step


def _caopd_module(args, model_dir, items, overrides=()):
    """The project's module from its configs (`runner.build`, as train.py), and one batch."""
    from hydra import compose, initialize_config_module

    from lightning_caopd.runner import build

    overrides = [
        "model=hf",
        f"model.pretrained_model_name_or_path={model_dir}",
        "model.attn_implementation=eager",
        "data.task.confidence_instruction=''",
        "data.task.instruction_role=user",
        f"method.rollout.num_rollouts={args.k}",
        f"method.rollout.max_new_tokens={args.new_tokens}",
        *overrides,
        *args.overrides,
    ]
    with initialize_config_module("lightning_caopd.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    cfg.method.template.user_format = "{context}{note}\n\n{prompt}"  # the bare/TRL teacher prompt
    module, _ = build(cfg)  # the project's one builder, as train.py uses it
    batch = [
        {
            "id": str(i),
            "messages": it["prompt"],
            "answer": "x",
            "demo": it["privileged_context"],
            "category": "next",
        }
        for i, it in enumerate(items)
    ]
    return cfg, module, batch


def caopd_contestant(args, model_dir, items):
    _, module, batch = _caopd_module(args, model_dir, items)
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt

    def step():
        loss = module.training_step(batch, 0)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def caopd_fit_contestant(args, model_dir, items, extra=()):
    """The same module as users run it: `L.Trainer.fit` with the default trainer, callbacks and
    CSV logger (checkpointing off, as for TRL); a step is the time from one batch's start to the
    next one's (everything Lightning and the callbacks do per step). `extra`: more overrides
    (``caopd_fit:NAME`` rows, ``--variant NAME OVERRIDE...``)."""
    from omegaconf import open_dict

    from lightning_caopd.runner import build_trainer

    cfg, module, batch = _caopd_module(
        args, model_dir, items, ["callbacks.checkpoint=null", *extra]
    )
    n = args.warmup + args.steps

    def step_round():
        starts = BatchTimes()
        with open_dict(cfg):
            cfg.paths.output_dir = tempfile.mkdtemp()
        trainer = build_trainer(cfg, max_steps=n)
        trainer.callbacks.append(starts)
        loader = torch.utils.data.DataLoader([batch] * n, batch_size=None, collate_fn=lambda b: b)
        trainer.fit(module, train_dataloaders=loader)
        return [b - a for a, b in itertools.pairwise([*starts.starts, starts.train_end])]

    return step_round


class _StepTimes:
    """A transformers TrainerCallback collecting the wall time of each optimizer step (`times`,
    from ``on_step_begin`` to ``on_step_end``) and the time each step began (`begins`)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self):
                self.times, self.begins = [], []

            def on_step_begin(self, args, state, control, **kw):
                self.t0 = time.perf_counter()
                self.begins.append(self.t0)

            def on_step_end(self, args, state, control, **kw):
                self.times.append(time.perf_counter() - self.t0)

        return Timer()


def _trl_common(args, out_dir, checkpointing):
    return dict(
        output_dir=out_dir,
        per_device_train_batch_size=args.prompts * args.k,
        gradient_accumulation_steps=1,
        learning_rate=1e-6,
        max_steps=args.warmup + args.steps,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=checkpointing,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )


def sdft_contestant(args, model_dir, items, checkpointing=False):
    from datasets import Dataset
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    tok = load_tokenizer(str(model_dir))
    data = Dataset.from_list(items * (args.warmup + args.steps))
    cfg = SDFTConfig(
        **_trl_common(args, tempfile.mkdtemp(), checkpointing),
        num_generations=args.k,
        max_completion_length=args.new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        distillation_mode="full_logits",
        distillation_alpha=0.0,
        teacher_model_kind="base",
        distillation_is_clip=None,
        teacher_prompt_template="{privileged_context}\n\n{prompt}",
    )

    def step_round():
        model = load_pretrained(str(model_dir), attn_implementation="eager")
        timer = _StepTimes()
        trainer = SDFTTrainer(
            model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[timer]
        )
        trainer.train()
        return timer.times

    return step_round


def gkd_contestant(args, model_dir, items, checkpointing=False):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok = load_tokenizer(str(model_dir))
    rows = [
        {"messages": it["prompt"] + [{"role": "assistant", "content": "Answer: x"}]} for it in items
    ]
    data = Dataset.from_list([r for r in rows for _ in range(args.k)] * (args.warmup + args.steps))
    cfg = GKDConfig(
        **_trl_common(args, tempfile.mkdtemp(), checkpointing),
        lmbda=1.0,
        beta=0.0,
        temperature=1.0,
        max_new_tokens=args.new_tokens,
        max_length=4096,
    )

    def step_round():
        model = load_pretrained(str(model_dir), attn_implementation="eager")
        teacher = load_pretrained(str(model_dir), attn_implementation="eager")
        timer = _StepTimes()
        trainer = GKDTrainer(
            model=model,
            teacher_model=teacher,
            args=cfg,
            train_dataset=data,
            processing_class=tok,
            callbacks=[timer],
        )
        trainer.train()
        return timer.times

    return step_round


CONTESTANTS = {
    "bare": bare_contestant,
    "caopd": caopd_contestant,
    "caopd_fit": caopd_fit_contestant,
    "sdft": sdft_contestant,
    "sdft_ckpt": partial(sdft_contestant, checkpointing=True),
    "gkd": gkd_contestant,
    "gkd_ckpt": partial(gkd_contestant, checkpointing=True),
}
TRL = {"sdft", "sdft_ckpt", "gkd", "gkd_ckpt"}
ROUNDS = TRL | {"caopd_fit"}  # contestants that run a whole round and return its step times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", choices=sorted(CASES), default="tiny")
    parser.add_argument(
        "--model-dir", default=None, help="a saved model + tokenizer (built when missing)"
    )
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=None, help="default: the case's")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="measured steps per round")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=",".join(CONTESTANTS), help="comma-separated contestants")
    parser.add_argument(
        "--overrides", nargs="*", default=[], help="train.py overrides for caopd and caopd_fit"
    )
    parser.add_argument(
        "--rotate", action="store_true", help="rotate the contestants' order every round"
    )
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar=("NAME", "OVERRIDE"),
        help="a contestant caopd_fit:NAME, caopd_fit with these train.py overrides (repeatable)",
    )
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/step_time_<case>.json)"
    )
    args = parser.parse_args()
    args.new_tokens = args.new_tokens or CASES[args.case][2]
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    model_dir = Path(args.model_dir or ROOT / ".cache" / "bench_tiny_llama")
    make_model_dir(model_dir, max_positions=1024)
    items = make_prompts(args.prompts, args.case)

    for name, *overrides in args.variant:
        CONTESTANTS[f"caopd_fit:{name}"] = partial(caopd_fit_contestant, extra=overrides)
        ROUNDS.add(f"caopd_fit:{name}")
    names = [n for n in args.only.split(",") if n]
    steps = {}
    for name in names:
        torch.manual_seed(0)
        steps[name] = CONTESTANTS[name](args, model_dir, items)
    medians: dict[str, list[float]] = {n: [] for n in names}
    means: dict[str, list[float]] = {n: [] for n in names}  # logging steps count here
    # a whole fit / train() call's wall time over all its steps, warm-up and set-up included
    calls: dict[str, list[float]] = {n: [] for n in names if n in ROUNDS}
    for r in range(args.rounds):
        shift = r % len(names) if args.rotate else 0
        for name in names[shift:] + names[:shift]:  # interleaved: every contestant once per round
            torch.manual_seed(r)
            if name in ROUNDS:
                t0 = time.perf_counter()
                times = steps[name]()
                calls[name].append((time.perf_counter() - t0) / len(times))
                times = times[args.warmup :]
            else:
                times = []
                for i in range(args.warmup + args.steps):
                    t0 = time.perf_counter()
                    steps[name]()
                    if i >= args.warmup:
                        times.append(time.perf_counter() - t0)
            medians[name].append(statistics.median(times))
            means[name].append(statistics.fmean(times))
            print(
                f"  round {r}: {name} {medians[name][-1]:.3f} s/step (mean {means[name][-1]:.3f})",
                flush=True,
            )

    result = {n: statistics.median(v) for n, v in medians.items()}
    mean_result = {n: statistics.median(v) for n, v in means.items()}
    ref = result.get("caopd")
    print(
        f"\ncase={args.case}: {args.prompts} prompts x K={args.k} x {args.new_tokens} new tokens, "
        "fp32, "
        f"{args.threads} threads, median of {args.rounds} round medians ({args.steps} steps each)"
    )
    print("(mean s/step: the median over rounds of each round's mean step, logging steps included)")
    print("| contestant | s/step | mean s/step | x caopd | caopd / it |")
    print("|---|---|---|---|---|")
    for n, v in result.items():
        rel = f"{v / ref:.2f}" if ref else "n/a"
        inv = f"{ref / v:.2f}" if ref else "n/a"
        print(f"| {n} | {v:.3f} | {mean_result[n]:.3f} | {rel} | {inv} |")
    pairs = [("caopd_fit", "caopd"), ("caopd_fit", "sdft"), ("caopd", "sdft"), ("sdft", "bare")]
    pairs += [(n, ref) for n in names if n.startswith("caopd_fit") for ref in ("caopd_fit", "bare")]
    pairs += [(n, "sdft") for n in names if n.startswith("caopd_fit:")]
    paired = {  # the same round's contestants shared the machine's state: their ratio is steadier
        f"{a}/{b}": statistics.median(x / y for x, y in zip(medians[a], medians[b], strict=True))
        for a, b in pairs
        if a != b and a in medians and b in medians
    }
    for pair, ratio in paired.items():
        print(f"{pair}: {ratio:.3f} (median of the per-round ratios)")
    for n, v in calls.items():
        print(f"{n}: whole call / steps {statistics.median(v):.3f} s (set-up and warm-up in)")
    import transformers

    meta = {
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "args": {**vars(args), "model_dir": str(model_dir)},
    }
    try:
        import trl

        meta["trl"] = trl.__version__
    except ImportError:
        pass
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"step_time_{args.case}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "meta": meta,
                "round_medians": medians,
                "round_means": means,
                "median_s": result,
                "mean_s": mean_result,
                "whole_call_s_per_step": {n: statistics.median(v) for n, v in calls.items()},
                "paired_ratio_median": paired,
            },
            indent=2,
        )
    )
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
