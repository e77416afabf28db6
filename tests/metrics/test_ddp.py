"""Two CPU processes (gloo) must compute exactly what one process computes on the union."""

import json
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_caopd.metrics import CalibrationMetrics, ExpectedCalibrationError
from tests.fixtures.metric_references import TOL, ref_ece_uniform

CATEGORIES = ["math", "code", "only_rank0", "never", "silent", "stated_on_rank0"]
SPLIT = 37  # rank 0 gets 37 items, rank 1 gets 64


def _data():
    rng = np.random.default_rng(7)
    n = SPLIT + 64
    confidence = np.round(rng.random(n), 1)  # heavy ties
    correct = rng.random(n) < confidence
    confidence[rng.random(n) < 0.2] = np.nan
    category = rng.integers(0, 2, size=n)
    category[[3, 10, 20]] = 2  # a category that only rank 0 ever sees
    category[[5, 40, 70]] = 4  # items on both ranks, none with a stated confidence
    confidence[[5, 40, 70]] = np.nan
    category[[8, 12, 45, 55, 60]] = 5  # stated on rank 0 only; rank 1's items state nothing
    confidence[[8, 12]] = [0.3, 0.8]
    confidence[[45, 55, 60]] = np.nan
    confidence[SPLIT + 20 : SPLIT + 30] = np.nan  # a batch of rank 1 that states nothing
    return confidence, correct, category


def _metrics_for(confidence, correct, category, batches):
    metrics = CalibrationMetrics(CATEGORIES, n_bins=10)
    quantile = ExpectedCalibrationError(n_bins=6, strategy="quantile")
    for lo, hi in batches:
        c, y = torch.tensor(confidence[lo:hi]), torch.tensor(correct[lo:hi])
        metrics.update(c, y, torch.tensor(category[lo:hi]))
        stated = ~torch.isnan(c)
        quantile.update(c[stated], y[stated])
    return metrics, quantile


def _summary(metrics, quantile):
    result = metrics.compute()
    result["quantile_ece"] = float(quantile.compute())
    result["quantile_counts"] = quantile.reliability_table()["count"].tolist()
    result["reliability_counts"] = metrics.reliability_bins()["count"]
    return result


def _worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        confidence, correct, category = _data()
        part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        c, y, k = confidence[part], correct[part], category[part]
        # rank 1's batch (20, 30) states no confidence at all
        batches = (
            [(0, 10), (10, len(c))] if rank == 0 else [(0, 20), (20, 30), (30, 30), (30, len(c))]
        )
        result = _summary(*_metrics_for(c, y, k, batches))
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_close(got, want, path="result"):
    if isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for key in want:
            _assert_close(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert got == want, path
    elif want is None or isinstance(want, int):
        assert got == want, path
    else:
        assert got == pytest.approx(want, abs=1e-6), path


def test_two_processes_match_single_process(tmp_path):
    confidence, correct, category = _data()
    expected = _summary(*_metrics_for(confidence, correct, category, [(0, len(confidence))]))
    assert expected["n"] == 101 and 0 < expected["n_stated"] < 101
    assert set(expected["by_category"]) == {
        "math",
        "code",
        "only_rank0",
        "silent",
        "stated_on_rank0",
    }
    assert expected["by_category"]["only_rank0"]["auroc"] is None  # 3 items, one class
    silent = expected["by_category"]["silent"]
    assert silent["n"] == 3 and silent["n_stated"] == 0 and silent["brier_all"] == 1.0
    assert silent["ece"] is None and silent["brier"] is None and silent["format_rate"] == 0.0
    assert expected["by_category"]["stated_on_rank0"]["n_stated"] == 2
    assert sum(expected["quantile_counts"]) == expected["n_stated"]
    assert sum(expected["reliability_counts"]) == expected["n_stated"]
    stated = ~np.isnan(confidence)  # the independent reference, over the stated items
    want_brier_all = np.where(stated, (np.nan_to_num(confidence) - correct) ** 2, 1.0).mean()
    assert expected["ece"] == pytest.approx(
        ref_ece_uniform(list(confidence[stated]), list(correct[stated])), abs=TOL
    )
    assert expected["brier_all"] == pytest.approx(want_brier_all, abs=TOL)

    # torch.multiprocessing's launcher, as mp.spawn, but forked where the OS allows: a spawned
    # child re-imports torchmetrics (5-15 s on this machine), a forked one starts at once.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method=method
    )

    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            got = json.load(f)
        _assert_close(got, expected, path=f"rank{rank}")
    assert not dist.is_initialized()
