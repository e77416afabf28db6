"""`trainer=fsdp`: FSDP2 (ModelParallelStrategy, fully_shard) on two CPU processes (gloo).

The same run under ``trainer=ddp`` and in one process with twice the batch are the references:
the losses, ``metrics.json`` and the exported student must agree; a run killed after step 2 of 4
resumes from its sharded checkpoint to the same end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from lightning_caopd.checkpointing import student_state_dict
from lightning_caopd.evaluate import evaluate
from tests.fixtures.configs import TINY
from tests.fixtures.runs import assert_json_close, train_process

STEPS, KILL_AT = 4, 2
SCORES = ("n", "accuracy", "ece", "brier", "brier_all", "format_rate", "by_category")
RUN = [
    "experiment=toy",
    "method=caopd",
    *[o for o in TINY if not o.startswith(("callbacks=", "trainer.max_steps", "data.num_eval"))],
    f"trainer.max_steps={STEPS}",
    "data.num_eval=13",  # odd: the ranks score 7 and 6 items
    "method.optimizer.lr=1e-3",
    "callbacks=default",
    "callbacks.progress=null",
    "callbacks.checkpoint.every_n_train_steps=1",
    "callbacks.teacher_ema.rate=0.05",  # the sharded teacher moves too
    "+callbacks.losses._target_=tests.test_fsdp.RecordLosses",
    "threads=1",
    "trainer.log_every_n_steps=1",
    # each prompt's rollouts seeded by its own key: 2 ranks draw what one process draws
    "method.rollout.row_seeds=true",
]
BATCH = 2  # prompts per rank (TINY's data.batch_size)


class RecordLosses(L.Callback):
    """Appends each rank's loss per step to ``<run dir>/losses_rank<r>.jsonl`` (a real callback)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        path = Path(trainer.default_root_dir) / f"losses_rank{trainer.global_rank}.jsonl"
        with open(path, "a") as f:
            f.write(json.dumps([trainer.global_step, float(outputs["loss"])]) + "\n")


def _train(overrides: list[str], cwd: Path):
    # a session of its own: the kill reaches rank 0 and the rank it launched
    return train_process(overrides, cwd, start_new_session=True)


def _finish(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]


def _losses(run_dir: Path, ranks=(0, 1)) -> dict[int, dict[int, float]]:
    """rank -> step -> loss (a later line for a step overrides an earlier one)."""
    out = {}
    for rank in ranks:
        lines = (run_dir / f"losses_rank{rank}.jsonl").read_text().splitlines()
        out[rank] = {step: loss for step, loss in map(json.loads, lines)}
    return out


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "student" / "model.safetensors")


def _run(trainer: str, run_dir: Path, toy_base: Path, extra: list[str] = ()) -> Path:
    overrides = [*RUN, f"trainer={trainer}", f"model.path={toy_base}", f"hydra.run.dir={run_dir}"]
    _finish(_train([*overrides, *extra], run_dir.parent))
    return run_dir


@pytest.fixture(scope="module")
def fsdp_run(toy_base, tmp_path_factory) -> Path:
    return _run("fsdp", tmp_path_factory.mktemp("fsdp") / "run", toy_base)


@pytest.fixture(scope="module")
def ddp_run(toy_base, tmp_path_factory) -> Path:
    return _run("ddp", tmp_path_factory.mktemp("ddp") / "run", toy_base)


@pytest.fixture(scope="module")
def one_process_run(toy_base, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one") / "run"
    return _run("default", run_dir, toy_base, [f"data.batch_size={2 * BATCH}"])


@pytest.mark.slow
def test_fsdp_matches_one_process_with_the_batch_of_both_ranks(fsdp_run, one_process_run):
    # the two ranks' halves of each batch are one process's batch, their rollouts the ones it
    # draws, and their mean loss (equal halves) its loss; the evaluation is the same items
    fsdp, one = _losses(fsdp_run), _losses(one_process_run, ranks=(0,))[0]
    assert sorted(one) == list(range(1, STEPS + 1))
    for step, loss in one.items():
        assert (fsdp[0][step] + fsdp[1][step]) / 2 == pytest.approx(loss, abs=1e-5, rel=0)
    assert_json_close(_metrics(fsdp_run), _metrics(one_process_run), 1e-5)
    for name, tensor in _weights(one_process_run).items():
        torch.testing.assert_close(_weights(fsdp_run)[name], tensor, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_fsdp_matches_ddp_losses_metrics_and_student(fsdp_run, ddp_run, toy_base):
    fsdp, ddp = _losses(fsdp_run), _losses(ddp_run)
    assert sorted(fsdp[0]) == sorted(fsdp[1]) == list(range(1, STEPS + 1))  # after each step
    assert fsdp[0] != fsdp[1]  # each rank trained on its own prompts
    for rank in (0, 1):
        assert fsdp[rank] == pytest.approx(ddp[rank], abs=1e-5, rel=0)
    assert_json_close(_metrics(fsdp_run), _metrics(ddp_run), 1e-5)
    written = _metrics(fsdp_run)
    assert written["n"] == 13 and written["run"]["steps"] == STEPS
    assert written["teacher_conditioned"]["n"] == 13  # the sharded teacher's diagnostics
    assert written["n_parameters"] == _metrics(ddp_run)["n_parameters"]  # counted unsharded
    # the sharded student, gathered, is the DDP replica's: the same whole weights
    fsdp_w, ddp_w = _weights(fsdp_run), _weights(ddp_run)
    assert fsdp_w.keys() == ddp_w.keys()
    for name, tensor in ddp_w.items():
        torch.testing.assert_close(fsdp_w[name], tensor, atol=1e-5, rtol=0)
    # ...and it trained: four steps moved every weight away from the base's
    base = load_file(toy_base / "model.safetensors")
    assert all(not torch.equal(fsdp_w[name], base[name]) for name in base)
    # the checkpoint is sharded: a folder of one distributed-checkpoint file per rank
    last = fsdp_run / "checkpoints" / "last.ckpt"
    assert last.is_dir() and sorted(p.name for p in last.glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]


@pytest.mark.slow
def test_fsdp_export_loads_in_transformers_and_scores_as_in_run(
    fsdp_run, toy_base, make_cfg, tmp_path
):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fsdp_run / "student")
    assert sum(p.numel() for p in model.parameters()) == _metrics(fsdp_run)["n_parameters"]
    data = [o for o in RUN if o.startswith(("data.", "eval.", "experiment=", "method="))]
    cfg = make_cfg(
        [*data, "model=hf", f"model.pretrained_model_name_or_path={fsdp_run / 'student'}"],
        tmp_path,
        config_name="evaluate",
    )
    scored, in_run = evaluate(cfg), _metrics(fsdp_run)
    assert_json_close({k: scored[k] for k in SCORES}, {k: in_run[k] for k in SCORES}, 1e-5)


@pytest.mark.slow
def test_fsdp_killed_run_resumes_from_its_sharded_checkpoint(fsdp_run, toy_base, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "paused"
    overrides = [*RUN, "trainer=fsdp", f"model.path={toy_base}", f"hydra.run.dir={run_dir}"]
    pause = [
        "+callbacks.pause._target_=tests.fixtures.runs.PauseAt",
        f"+callbacks.pause.step={KILL_AT}",
        f"+callbacks.pause.marker={marker}",
    ]
    proc = _train([*overrides, *pause], tmp_path)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "the run never reached the pause"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # both ranks
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    last = run_dir / "checkpoints" / "last.ckpt"
    meta = torch.load(last / "meta.pt", weights_only=True)
    assert meta["global_step"] == KILL_AT and not (run_dir / "metrics.json").exists()

    _finish(_train([*overrides, "ckpt_path=last"], tmp_path))
    resumed, reference = _losses(run_dir), _losses(fsdp_run)
    for rank in (0, 1):  # steps 1-2 from the killed run, 3-4 from the resumed one
        assert resumed[rank] == pytest.approx(reference[rank], abs=1e-5, rel=0)
    assert_json_close(_metrics(run_dir), _metrics(fsdp_run), 1e-5)
    for name, tensor in _weights(fsdp_run).items():
        torch.testing.assert_close(_weights(run_dir)[name], tensor, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_sharded_checkpoint_reads_as_the_whole_student(fsdp_run):
    # evaluate checkpoint=, model.init_from= (and through it a student/ folder, README "Scale")
    weights = student_state_dict(fsdp_run / "checkpoints" / "last.ckpt")
    exported = _weights(fsdp_run)
    assert weights.keys() >= exported.keys()
    for name, tensor in exported.items():
        assert torch.equal(weights[name], tensor)


@pytest.mark.slow
def test_fsdp_lora_trains_the_adapter_over_the_sharded_frozen_base(toy_base, tmp_path):
    lora = "model.lora={r:4,alpha:8,target_modules:[q_proj,v_proj]}"
    run_dir = tmp_path / "run"
    overrides = [
        *[o for o in RUN if not o.startswith(("callbacks", "+callbacks", "trainer.max_steps"))],
        "trainer.max_steps=2",
        "callbacks=minimal",
        "trainer=fsdp",
        lora,
        f"model.path={toy_base}",
        f"hydra.run.dir={run_dir}",
    ]
    _finish(_train(overrides, tmp_path))
    adapter = load_file(run_dir / "student" / "adapter_model.safetensors")
    a = {k: v for k, v in adapter.items() if "lora_A" in k}
    b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert len(a) == len(b) == 4  # q_proj and v_proj of two layers, gathered whole
    assert all(v.shape == (4, 64) for v in a.values())  # rank 4 x the toy's hidden 64
    assert all(v.abs().max() > 0 for v in b.values())  # B starts at zero: the adapter trained
    assert _metrics(run_dir)["run"]["steps"] == 2
