"""Checkpointing: safe loading, RNG states, atomic writes, exact resume, determinism."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_caopd.checkpointing import (
    AtomicCheckpointIO,
    load_checkpoint_file,
    rng_states,
    set_rng_states,
)
from lightning_caopd.errors import ResumeError
from lightning_caopd.evaluate import evaluate
from lightning_caopd.files import atomic_write
from lightning_caopd.runner import run
from tests.fixtures.configs import TINY
from tests.fixtures.runs import assert_json_close, subprocess_env, train_process

STEPS = 6
KILL_AT = 3  # the run is killed while it waits before its 4th step, after saving step 3
# TINY with checkpoints every step, a moving (EMA) teacher and an LR schedule, so that resuming
# has every piece of state to get right: weights, teacher, optimizer, scheduler, data, RNGs
RESUME = [
    "experiment=toy",
    "method=opd",
    *[o for o in TINY if not o.startswith(("callbacks=", "trainer.max_steps"))],
    f"trainer.max_steps={STEPS}",
    "callbacks=default",
    "callbacks.progress=null",
    "callbacks.checkpoint.every_n_train_steps=1",
    "callbacks.teacher_ema.rate=0.05",
    "method.scheduler={_target_:torch.optim.lr_scheduler.LinearLR,_partial_:true,start_factor:0.5,total_iters:6}",
    "method.optimizer.lr=1e-3",
    "threads=1",
    "trainer.log_every_n_steps=1",
]


@pytest.fixture(scope="module")
def uninterrupted(toy_base, make_cfg, tmp_path_factory) -> Path:
    """The reference: the resume test's run, in one go, in this process; its directory."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run(make_cfg([*RESUME, f"model.path={toy_base}"], out))
    return out


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _losses(*files: Path) -> dict[int, float]:
    """train/loss by step from CSV logs (a later file overrides an earlier one's steps)."""
    out = {}
    for path in files:
        with open(path) as f:
            out.update(
                {
                    int(r["step"]): float(r["train/loss"])
                    for r in csv.DictReader(f)
                    if r.get("train/loss")
                }
            )
    return out


class _Payload:
    """Unpickling this object calls ``Path.touch(marker)``: code from the file runs."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def evil_ckpt(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 0, "x": _Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_loader_refuses_a_pickle_payload(evil_ckpt):
    path, marker = evil_ckpt
    with pytest.raises(ResumeError, match="objects other than tensors"):
        load_checkpoint_file(path)
    assert not marker.exists()


def test_train_and_evaluate_refuse_a_pickle_payload(evil_ckpt, toy_base, tiny_overrides, make_cfg):
    path, marker = evil_ckpt
    overrides = ["experiment=toy", "method=opd", f"model.path={toy_base}", *tiny_overrides]
    with pytest.raises(ResumeError, match="would run code from the file"):
        run(make_cfg([*overrides, f"ckpt_path={path}"], path.parent / "train"))
    assert not marker.exists()
    with pytest.raises(ResumeError, match="would run code from the file"):
        evaluate(make_cfg([*overrides, f"checkpoint={path}"], path.parent / "eval", "evaluate"))
    assert not marker.exists()


def test_a_damaged_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:200])  # truncated
    with pytest.raises(ResumeError, match="not a readable checkpoint"):
        load_checkpoint_file(path)


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    path = tmp_path / "rng.pt"
    torch.save(rng_states(), path)
    want = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_states(torch.load(path, weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


_FAILING_WRITES = """
import resource, signal, sys, torch
from lightning_caopd.files import atomic_write
def save_atomic(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
big = {"w": torch.arange(1_000_000, dtype=torch.float32)}  # 4 MB: each write fails part-way
for save, path in ((save_atomic, sys.argv[1]), (torch.save, sys.argv[2])):
    try:
        save(big, path)
    except Exception as err:  # EFBIG, surfacing from torch's zip writer as a RuntimeError
        print("failed:", type(err).__name__)
"""


def test_failed_checkpoint_write_leaves_the_old_file(tmp_path):
    atomic, plain = tmp_path / "atomic" / "last.ckpt", tmp_path / "plain" / "last.ckpt"
    old = {"w": torch.ones(10)}
    for path in (atomic, plain):
        path.parent.mkdir()
        torch.save(old, path)
    before = atomic.read_bytes()
    out = subprocess.run(
        [sys.executable, "-c", _FAILING_WRITES, str(atomic), str(plain)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.count("failed:") == 2, out.stdout + out.stderr
    assert plain.read_bytes() != before  # what the atomic write prevents: torch.save truncated it
    assert atomic.read_bytes() == before and torch.equal(torch.load(atomic)["w"], old["w"])
    assert [p.name for p in atomic.parent.iterdir()] == ["last.ckpt"]  # no temporary file left
    atomic_write(atomic, lambda f: torch.save({"w": torch.zeros(3)}, f))  # a good write replaces it
    assert torch.equal(torch.load(atomic)["w"], torch.zeros(3))


def test_trainer_config_makes_every_save_of_the_run_atomic(make_cfg, tmp_path):
    from hydra.utils import instantiate

    cfg = make_cfg(["callbacks=default"], tmp_path)
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    io = trainer.strategy.checkpoint_io
    assert isinstance(io, AtomicCheckpointIO)
    io.save_checkpoint({"w": torch.ones(2)}, tmp_path / "x.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "x.ckpt")["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".ckpt") == ["x.ckpt"]


def test_same_run_twice_gives_identical_metrics(uninterrupted, toy_base, make_cfg, tmp_path):
    run(make_cfg([*RESUME, f"model.path={toy_base}"], tmp_path))
    again = _metrics(tmp_path)
    assert again == _metrics(
        uninterrupted
    )  # exactly: deterministic, seeded data order and rollouts
    assert again["run"]["steps"] == STEPS and again["accuracy"] is not None
    assert _losses(tmp_path / "csv" / "metrics.csv") == _losses(
        uninterrupted / "csv" / "metrics.csv"
    )


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(uninterrupted, toy_base, tmp_path):
    run_dir = tmp_path / "run"
    marker = tmp_path / "paused"
    overrides = [*RESUME, f"model.path={toy_base}", f"hydra.run.dir={run_dir}"]
    pause = [
        "+callbacks.pause._target_=tests.fixtures.runs.PauseAt",
        f"+callbacks.pause.step={KILL_AT}",
        f"+callbacks.pause.marker={marker}",
    ]
    proc = train_process([*overrides, *pause], tmp_path)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the pause"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)  # plain values only
    assert ckpt["global_step"] == KILL_AT and not (run_dir / "metrics.json").exists()
    # what the checkpoint holds besides Lightning's own state
    assert {"python", "numpy", "torch"} <= ckpt["rng_states"].keys()
    [writer] = [v for k, v in ckpt["callbacks"].items() if k.startswith("MetricsWriter")]
    assert writer["initial"]["n"] == 24
    [data_position] = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert data_position["batches"] == KILL_AT and data_position["generator"] is not None
    assert any(k.startswith("teacher.") for k in ckpt["state_dict"]) and ckpt["lr_schedulers"]
    initial_png = (run_dir / "reliability_initial.png").stat().st_mtime_ns

    resumed = train_process([*overrides, "ckpt_path=last"], tmp_path)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output[-3000:]
    assert_json_close(_metrics(run_dir), _metrics(uninterrupted), 1e-6)
    # every step's loss: steps 1-3 from the killed run's log (kept), 4-6 from the resumed one
    logs = run_dir / "csv"
    killed, resumed_log = (
        _losses(logs / "metrics.before-resume-1.csv"),
        _losses(logs / "metrics.csv"),
    )
    assert sorted(killed) == [0, 1, 2] and sorted(resumed_log) == [3, 4, 5]
    reference = _losses(uninterrupted / "csv" / "metrics.csv")
    assert {**killed, **resumed_log} == pytest.approx(reference, abs=1e-6, rel=0)
    # the evaluation before the first step came from the checkpoint, not a new evaluation
    assert (run_dir / "reliability_initial.png").stat().st_mtime_ns == initial_png
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == STEPS


def test_resume_without_a_checkpoint_is_a_clear_error(toy_base, make_cfg, tmp_path):
    cfg = make_cfg([*RESUME, f"model.path={toy_base}", "ckpt_path=last"], tmp_path)
    with pytest.raises(
        ResumeError, match=r"no checkpoint to resume from at .*last\.ckpt.*hydra\.run\.dir"
    ):
        run(cfg)
    cfg = make_cfg([*RESUME, f"model.path={toy_base}", f"ckpt_path={tmp_path}/nope.ckpt"], tmp_path)
    with pytest.raises(ResumeError, match="no such checkpoint file"):
        run(cfg)
