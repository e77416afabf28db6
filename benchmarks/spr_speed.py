"""Time StrictPairwiseRanking update + compute on a million samples with ties.

    python benchmarks/spr_speed.py [--n 1000000] [--repeats 5] [--out PATH]

Prints a small table and writes the timings as JSON (default
benchmarks/results/spr_speed.json). Target: median under 2 s on CPU.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from lightning_caopd.metrics import StrictPairwiseRanking


def run_once(
    confidence: torch.Tensor, correct: torch.Tensor, batches: int
) -> tuple[float, float, float]:
    """Return (update+compute seconds, update seconds, SPR)."""
    metric = StrictPairwiseRanking()
    start = time.perf_counter()
    for c, y in zip(confidence.chunk(batches), correct.chunk(batches), strict=True):
        metric.update(c, y)
    updated = time.perf_counter()
    value = float(metric.compute())
    done = time.perf_counter()
    return done - start, updated - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=100, help="update() calls per run")
    parser.add_argument("--out", default="benchmarks/results/spr_speed.json")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    # Two decimals, as models state them: ~100 distinct values, so ties are everywhere.
    confidence = torch.round(torch.rand(args.n, generator=generator), decimals=2)
    correct = torch.rand(args.n, generator=generator) < confidence

    run_once(confidence[:1000], correct[:1000], 1)  # warm-up
    totals, updates, values = [], [], []
    for _ in range(args.repeats):
        total, update, value = run_once(confidence, correct, args.batches)
        totals.append(total)
        updates.append(update)
        values.append(value)

    median = statistics.median(totals)
    print(
        f"StrictPairwiseRanking, n={args.n:,}, {args.batches} update() calls, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'run':>6} | {'update+compute s':>16} | {'update s':>8}")
    for i, (total, update) in enumerate(zip(totals, updates, strict=True)):
        print(f"{i:>6} | {total:>16.3f} | {update:>8.3f}")
    print(f"{'median':>6} | {median:>16.3f} | {statistics.median(updates):>8.3f}")
    print(f"SPR = {values[0]:.6f}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "spr_speed",
                "n": args.n,
                "repeats": args.repeats,
                "batches": args.batches,
                "seconds": totals,
                "update_seconds": updates,
                "median_seconds": median,
                "spr": values[0],
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "machine": platform.machine(),
                "processor": platform.processor(),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
