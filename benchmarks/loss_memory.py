"""Peak CPU memory of the divergence loss forward + backward: unchunked, chunked and fused.

Each (N x T, path) configuration runs in a fresh subprocess so peaks do not leak between runs.
For ``unchunked`` and ``chunked`` the child allocates the (N, T, V) student (requires grad) and
teacher logits, records its RSS, runs ``divergence_loss`` + ``backward`` and reports
``ru_maxrss`` (the process's peak RSS) minus that baseline. The growth includes the (N, T, V)
gradient of the student logits, which both paths must produce. tracemalloc does not see torch's
allocations, hence RSS.

For ``fused`` the child instead allocates what a model hands over before its output head: the
(N, T, H) last hidden states of both models and their (V, H) head weights (student's requiring
grad), and runs ``fused_linear_divergence`` + ``backward``, which includes the projections. Its
``inputs`` are those tensors and its ``grad`` the student's hidden-state and weight gradients;
no (N, T, V) tensor exists at all. To compare with the logit paths, add their ``inputs`` (the
logits a model would have produced) to their growth; their time excludes the projection.

Before launching a child the parent estimates its peak RSS and skips it, with a note, when the
estimate exceeds ``--max-gb`` or the memory the machine has available now.

Usage:
    python benchmarks/loss_memory.py                      # V = 151,936, 8x256 and 8x1024, all
                                                          # three paths (fused at H = 896)
    python benchmarks/loss_memory.py --vocab 32000 --dtype bfloat16 --shapes 8x256
    python benchmarks/loss_memory.py --shapes 8x256,8x512,8x1024,8x2048 \
        --modes unchunked,chunked,fused --hidden 896
    python benchmarks/loss_memory.py --shapes 8x256 --modes unfused,fused   # like-for-like time
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3
MODES = ("unchunked", "chunked", "fused", "unfused")
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Rough (N, T, V)-sized float32 temporaries alive at the unchunked peak (log-probs of both,
# teacher probs, difference, sanitised difference, product, their gradients; 6.2 measured at
# 8 x 256 and V = 151,936, gradient included) and per chunk row in the chunked path; only used
# to decide whether a run is safe to launch.
UNCHUNKED_TEMPS = 6.5
CHUNK_TEMPS = 10
# The unfused path at its peak, in (N, T, V) float32 tensors: 8.25 measured at 8 x 256 and
# V = 151,936 (9.57 GiB of growth; benchmarks/results/loss_memory_fused_vs_unfused_8x256.json).
UNFUSED_TENSORS = 8.5
# Per chunk row in the fused path: both models' logits and log-probs plus the local autograd's
# saved tensors and gradient.
FUSED_CHUNK_TEMPS = 12


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def child(args: argparse.Namespace) -> None:
    """Run one configuration and print its measurements as one JSON line."""
    import torch

    from lightning_caopd.divergence import divergence_loss

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    n_seq, n_pos = (int(x) for x in args.shape.split("x"))
    if args.mode in ("fused", "unfused"):
        fused_child(args, dtype, n_seq, n_pos)
        return
    chunk = args.chunk_size if args.mode == "chunked" else None

    # Warm up the same code path on a tiny input so kernels, thread pools and autograd
    # machinery are loaded before the baseline.
    tiny = torch.randn(2, 3, 17, dtype=dtype, requires_grad=True)
    tiny_mask = torch.ones(2, 3, dtype=torch.bool)
    tiny_loss, _ = divergence_loss(
        tiny, torch.randn(2, 3, 17, dtype=dtype), tiny_mask, kind=args.kind, chunk_size=chunk
    )
    tiny_loss.backward()
    del tiny, tiny_loss

    student = torch.randn(n_seq, n_pos, args.vocab, dtype=dtype).requires_grad_(True)
    teacher = torch.randn(n_seq, n_pos, args.vocab, dtype=dtype)  # teacher: no grad, as in OPD
    mask = torch.ones(n_seq, n_pos, dtype=torch.bool)
    baseline_rss, baseline_maxrss = _rss_bytes(), _maxrss_bytes()

    start = time.perf_counter()
    loss, _ = divergence_loss(student, teacher, mask, kind=args.kind, chunk_size=chunk)
    loss.backward()
    seconds = time.perf_counter() - start
    assert student.grad is not None and student.grad.shape == student.shape

    peak = _maxrss_bytes()
    print(
        json.dumps(
            {
                "shape": args.shape,
                "mode": args.mode,
                "chunk_size": chunk,
                "inputs_gib": 2 * student.numel() * student.element_size() / GIB,
                "baseline_rss_gib": baseline_rss / GIB,
                "baseline_maxrss_gib": baseline_maxrss / GIB,
                "peak_rss_gib": peak / GIB,
                "peak_growth_gib": (peak - baseline_rss) / GIB,
                "grad_gib": student.numel() * student.element_size() / GIB,
                "seconds": seconds,
                "loss": loss.item(),
            }
        )
    )


def fused_child(args: argparse.Namespace, dtype, n_seq: int, n_pos: int) -> None:
    """The ``fused`` path of ``child``, from hidden states and head weights; ``unfused``: the same
    inputs through the heads whole ((N, T, V) logits) and the unchunked divergence, its
    like-for-like baseline (time and memory include both projections)."""
    import torch

    from lightning_caopd.divergence import divergence_loss, fused_linear_divergence

    def run(s_hidden, s_weight, t_hidden, t_weight, mask):
        if args.mode == "unfused":
            with torch.no_grad():
                t_logits = t_hidden @ t_weight.T
            return divergence_loss(s_hidden @ s_weight.T, t_logits, mask, args.kind)[0]
        return fused_linear_divergence(
            s_hidden, s_weight, t_hidden, t_weight, mask, kind=args.kind, chunk_size=args.chunk_size
        )[0]

    def tensors(n, t, v, h):
        # Weights scaled by 1 / sqrt(H) so the logits have unit scale, as in a trained model.
        s_hidden = torch.randn(n, t, h, dtype=dtype).requires_grad_(True)
        s_weight = (torch.randn(v, h, dtype=dtype) / h**0.5).requires_grad_(True)
        t_hidden = torch.randn(n, t, h, dtype=dtype)
        t_weight = torch.randn(v, h, dtype=dtype) / h**0.5
        return s_hidden, s_weight, t_hidden, t_weight, torch.ones(n, t, dtype=torch.bool)

    run(*tensors(2, 3, 17, 8)).backward()  # warm-up of the same code path
    s_hidden, s_weight, t_hidden, t_weight, mask = tensors(n_seq, n_pos, args.vocab, args.hidden)
    baseline_rss, baseline_maxrss = _rss_bytes(), _maxrss_bytes()

    start = time.perf_counter()
    loss = run(s_hidden, s_weight, t_hidden, t_weight, mask)
    loss.backward()
    seconds = time.perf_counter() - start
    assert s_hidden.grad is not None and s_weight.grad is not None

    peak = _maxrss_bytes()
    size = s_hidden.element_size()
    print(
        json.dumps(
            {
                "shape": args.shape,
                "mode": args.mode,
                "chunk_size": None if args.mode == "unfused" else args.chunk_size,
                "hidden": args.hidden,
                "inputs_gib": 2 * (s_hidden.numel() + s_weight.numel()) * size / GIB,
                "baseline_rss_gib": baseline_rss / GIB,
                "baseline_maxrss_gib": baseline_maxrss / GIB,
                "peak_rss_gib": peak / GIB,
                "peak_growth_gib": (peak - baseline_rss) / GIB,
                "grad_gib": (s_hidden.numel() + s_weight.numel()) * size / GIB,
                "seconds": seconds,
                "loss": loss.item(),
            }
        )
    )


def estimate_peak_bytes(n_seq: int, n_pos: int, args: argparse.Namespace, mode: str) -> int:
    """Rough peak RSS of a child (inputs + temporaries + gradient + ~0.5 GiB of runtime)."""
    elems = n_seq * n_pos * args.vocab
    inputs_and_grad = 3 * elems * BYTES[args.dtype]
    if mode == "unfused":  # the projected logits and the unchunked path's temporaries, plus the
        # heads' inputs (their gradients are among the measured tensors)
        hidden, head = n_seq * n_pos * args.hidden, args.vocab * args.hidden
        heads = (hidden + head) * BYTES[args.dtype]
        return int(UNFUSED_TENSORS * elems * 4) + heads + GIB // 2
    if mode == "fused":
        hidden, head = n_seq * n_pos * args.hidden, args.vocab * args.hidden
        # Inputs and gradients of hidden states and weights, plus the float32 weight accumulator.
        fixed = 3 * (hidden + head) * BYTES[args.dtype] + head * 4
        rows = min(args.chunk_size, n_seq * n_pos)
        return fixed + FUSED_CHUNK_TEMPS * rows * args.vocab * 4 + GIB // 2
    if mode == "unchunked":  # the inputs, then the temporaries (the gradient among them)
        return int((2 * BYTES[args.dtype] + UNCHUNKED_TEMPS * 4) * elems) + GIB // 2
    extra = CHUNK_TEMPS * min(args.chunk_size, n_seq * n_pos) * args.vocab * 4
    return inputs_and_grad + extra + GIB // 2


def parent(args: argparse.Namespace) -> None:
    """Launch one child per configuration, print a table and write JSON."""
    rows = []
    for shape in args.shapes.split(","):
        n_seq, n_pos = (int(x) for x in shape.split("x"))
        for mode in args.modes.split(","):
            estimate = estimate_peak_bytes(n_seq, n_pos, args, mode)
            available = _available_bytes()
            row = {"shape": shape, "mode": mode, "estimate_gib": estimate / GIB}
            if estimate > args.max_gb * GIB or estimate > available - GIB:
                row["skipped"] = (
                    f"estimated peak {estimate / GIB:.1f} GiB exceeds --max-gb {args.max_gb} or "
                    f"available memory {available / GIB:.1f} GiB less 1 GiB margin"
                )
                print(f"skip {shape} {mode}: {row['skipped']}", flush=True)
                rows.append(row)
                continue
            cmd = [sys.executable, __file__, "--child", "--shape", shape, "--mode", mode]
            for key in ("vocab", "dtype", "kind", "chunk_size", "hidden"):
                cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
            print(f"run  {shape} {mode} (estimated peak {estimate / GIB:.1f} GiB)", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            if proc.returncode != 0:
                row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
                print(f"  failed (rc {proc.returncode}): {row['error']}", flush=True)
            else:
                row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            rows.append(row)

    header = (
        f"{'N x T':>8} {'path':>9} {'chunk':>5} {'inputs':>8} {'growth':>8} {'grad':>7} {'s':>6}"
    )
    print(
        f"\nV = {args.vocab:,}, {args.dtype}, kind = {args.kind} "
        "(GiB; growth = peak RSS - RSS after allocating the logits)"
    )
    print(header)
    for r in rows:
        if "peak_growth_gib" in r:
            print(
                f"{r['shape']:>8} {r['mode']:>9} {str(r['chunk_size'] or '-'):>5} "
                f"{r['inputs_gib']:8.2f} {r['peak_growth_gib']:8.2f} {r['grad_gib']:7.2f} "
                f"{r['seconds']:6.1f}"
            )
        else:
            print(f"{r['shape']:>8} {r['mode']:>9}  {r.get('skipped') or r.get('error')}")
    if any(r["mode"] in ("fused", "unfused") for r in rows):
        print(
            f"fused, unfused: from (N, T, H = {args.hidden}) hidden states and (V, H) weights of "
            "both models, projections included; their inputs/grad are those tensors, their "
            "growth excludes them (the logit paths' growth excludes their logits)"
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "vocab": args.vocab,
        "dtype": args.dtype,
        "kind": args.kind,
        "chunk_size": args.chunk_size,
        "hidden": args.hidden,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "measure": "ru_maxrss after loss+backward minus RSS after allocating the logits "
        "(fused: the hidden states and head weights)",
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


def main() -> None:
    """Parse arguments and run as parent or child."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8x256,8x1024", help="comma-separated N x T")
    parser.add_argument("--modes", default="unchunked,chunked,fused", help="subset, any order")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--dtype", default="float32", choices=sorted(BYTES))
    parser.add_argument("--kind", default="forward_kl", choices=("forward_kl", "reverse_kl", "jsd"))
    parser.add_argument("--chunk-size", type=int, default=256, help="positions per chunk")
    parser.add_argument("--hidden", type=int, default=896, help="H of the fused path")
    parser.add_argument("--max-gb", type=float, default=18.0, help="skip runs estimated above")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child")
    parser.add_argument("--out", default="benchmarks/results/loss_memory.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; accepted: {', '.join(MODES)}")
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
