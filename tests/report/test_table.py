"""The report's table: a 2x2 Hydra multirun on the tiny model, then the table and the figures."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_caopd.report.__main__ import main
from lightning_caopd.report.figures import pooled_bins
from lightning_caopd.report.table import collect, groups, summary_table, write_report

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_multirun_2x2_then_report_writes_table_and_figures(
    toy_base, tiny_overrides, tmp_path, capsys
):
    sweep = tmp_path / "multirun"
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "method=opd,caopd",
        "seed=0,1",
        f"model.path={toy_base}",
        *tiny_overrides,
        "threads=1",
        "data.num_eval=12",  # one evaluation batch
        f"hydra.sweep.dir={sweep}",
        "logger=[csv,wandb]",  # offline: each run of the multirun must get its own W&B run
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("WANDB_DIR", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(sweep.rglob("metrics.json"))
    assert len(files) == 4, files
    metrics = [json.loads(p.read_text()) for p in files]
    wandb_runs = [sorted((p.parent / "wandb").glob("offline-run-*")) for p in files]
    assert all(len(r) == 1 for r in wandb_runs), wandb_runs
    assert len({r[0].name.rsplit("-", 1)[1] for r in wandb_runs}) == 4  # four distinct run ids
    assert sorted((m["run"]["method"], m["run"]["seed"]) for m in metrics) == [
        ("caopd", 0),
        ("caopd", 1),
        ("opd", 0),
        ("opd", 1),
    ]

    main([str(sweep), "--out", str(tmp_path / "report")])
    printed = capsys.readouterr().out
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| opd | 2 |" in table and "| caopd | 2 |" in table and table in printed + "\n"
    # mean +- std over the two seeds, from the files themselves
    opd = [m for m in metrics if m["run"]["method"] == "opd"]
    ece = [m["ece"] for m in opd]  # None: the student stated no confidence (a 3-step toy_base)
    expected = (
        "n/a" if None in ece else f"{statistics.fmean(ece):.3f} ± {statistics.stdev(ece):.3f}"
    )
    opd_row = next(line for line in table.splitlines() if line.startswith("| opd |"))
    assert opd_row.split(" | ")[4] == expected
    # the base row: each distinct initial evaluation once
    n_base = len(
        {json.dumps(m["initial"]["reliability"]) + str(m["initial"]["ece"]) for m in metrics}
    )
    assert f"| base | {n_base} |" in table

    for name in ("confidence_vs_accuracy", "accuracy_vs_ece", "reliability"):
        png = tmp_path / "report" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    # reliability diagrams are redrawn from the saved bins, pooled over the seeds
    by_group = groups(collect([sweep]))
    pooled, _ = pooled_bins(by_group["opd"])
    assert sum(pooled["count"]) == sum(m["n_stated"] for m in opd)  # bins: stated items only


def _fake_run(folder: Path, method: str, seed: int, lr: str, acc: float, ece: float) -> None:
    folder.mkdir(parents=True)
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text(
        f"- experiment=toy\n- method={method}\n- seed={seed}\n- method.optimizer.lr={lr}\n"
        f"- paths.output_dir={folder}\n"
    )
    evaluation = {
        "accuracy": acc,
        "mean_confidence": 0.9,
        "ece": ece,
        "brier": 0.2,
        "n": 10,
        "by_category": {},
    }
    (folder / "metrics.json").write_text(
        json.dumps(
            {
                **evaluation,
                "initial": {**evaluation, "accuracy": 0.1, "ece": 0.5},
                "run": {"method": method, "seed": seed},
            }
        )
    )


def test_a_swept_override_gets_its_own_row_and_seeds_do_not(tmp_path):
    for seed in (0, 1):
        _fake_run(tmp_path / f"a{seed}", "caopd", seed, "1e-4", 0.6 + seed / 10, 0.1)
        _fake_run(tmp_path / f"b{seed}", "caopd", seed, "3e-5", 0.5, 0.2)
    table = summary_table(collect([tmp_path]))
    assert "| caopd (method.optimizer.lr=1e-4) | 2 | 0.650 ± 0.071 |" in table
    assert "| caopd (method.optimizer.lr=3e-5) | 2 | 0.500 ± 0.000 |" in table
    assert "| base | 1 | 0.100 |" in table  # one base, however many runs evaluated it
    # runs without saved bins (older metrics.json) show the reliability PNGs they saved
    import matplotlib.image as mpimg
    import numpy as np

    for folder in tmp_path.glob("[ab]*"):
        for name in ("reliability.png", "reliability_initial.png"):
            mpimg.imsave(folder / name, np.full((40, 40, 3), 0.5))
    written = write_report([tmp_path], tmp_path / "out")
    assert all(p.exists() for p in written.values())


def test_bad_metrics_json_names_the_file(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.json").write_text('{"accuracy": 0.5,')
    with pytest.raises(SystemExit, match=r"r/metrics.json is not valid JSON"):
        collect([tmp_path])
