"""Fake run directories for report tests: a size sweep of OPD and CaOPD, with plausible numbers.

`python -m tests.report.sweep DIR` writes the sweep and its report into DIR (to look at
``scaling.png``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# (size override, n_parameters, base accuracy): the paper's shape on a toy scale
SIZES = ((16, 20_000, 0.45), (32, 60_000, 0.52), (64, 200_000, 0.59), (128, 700_000, 0.65))


def reliability(acc: float, conf: float, n: int = 100) -> dict:
    """Ten reliability bins with every item in the one holding `conf` (None: an empty bin)."""
    hit = min(int(conf * 10), 9)
    return {
        "lower": [i / 10 for i in range(10)],
        "upper": [(i + 1) / 10 for i in range(10)],
        "count": [n if i == hit else 0 for i in range(10)],
        "confidence": [conf if i == hit else None for i in range(10)],
        "accuracy": [acc if i == hit else None for i in range(10)],
    }


def evaluation(acc: float, conf: float, **extra) -> dict:
    """A final or initial evaluation block with the keys the report reads."""
    ece = abs(conf - acc)
    return {
        "accuracy": acc,
        "mean_confidence": conf,
        "ece": ece,
        "brier": ece**2 + acc * (1 - acc),
        "brier_all": ece**2 + acc * (1 - acc),
        "ocg": conf - acc,
        "spr": 0.1,
        "format_rate": 1.0,
        "n": 100,
        "n_stated": 100,
        "confidence_entropy": 0.5 * (1 - conf) + 0.05,
        "by_category": {},
        "reliability": reliability(acc, conf),
        **extra,
    }


def write_run(
    folder: Path,
    method: str,
    seed: int,
    final: dict,
    initial: dict | None,
    overrides: tuple[str, ...] = (),
    n_parameters: int | None = None,
    teacher_conditioned: dict | None = None,
) -> dict:
    """One run directory as `train.py` leaves it: ``metrics.json`` and the Hydra overrides."""
    (folder / ".hydra").mkdir(parents=True)
    lines = ["experiment=toy", f"method={method}", f"seed={seed}", *overrides]
    lines.append(f"paths.output_dir={folder}")
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {x}\n" for x in lines))
    metrics = {**final, "initial": initial, "run": {"method": method, "seed": seed}}
    if n_parameters is not None:
        metrics["n_parameters"] = n_parameters
    if teacher_conditioned is not None:
        metrics["teacher_conditioned"] = teacher_conditioned
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def write_sweep(root: Path, seeds: tuple[int, ...] = (0, 1, 2)) -> list[dict]:
    """OPD and CaOPD at four sizes: OPD states ~1.0 however accurate, CaOPD tracks accuracy."""
    runs = []
    for i, (size, n_params, base_acc) in enumerate(SIZES):
        for seed in seeds:
            noise = 0.01 * (seed - 1)
            initial = evaluation(base_acc + noise, 0.80 + 0.02 * i + noise / 2)
            for method, acc, conf in (
                ("opd", 0.50 + 0.083 * i + noise, 0.997 + 0.001 * seed),
                ("caopd", 0.50 + 0.08 * i + noise, 0.53 + 0.075 * i - noise),
            ):
                runs.append(
                    write_run(
                        root / f"method={method},seed={seed},size={size}",
                        method,
                        seed,
                        evaluation(acc, conf),
                        initial,
                        (f"size={size}",),
                        n_params,
                    )
                )
    return runs


if __name__ == "__main__":
    from lightning_caopd.report import write_report

    out = Path(sys.argv[1])
    write_sweep(out)
    print(write_report([out], out / "report")["table"].read_text())
