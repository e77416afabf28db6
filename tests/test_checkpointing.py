"""Checkpoints are loaded without unpickling: a file carrying code is refused, never run."""

import pathlib

import pytest
import torch

from lightning_caopd.checkpointing import load_checkpoint_file, rng_states, set_rng_states
from lightning_caopd.errors import ResumeError
from lightning_caopd.evaluate import evaluate
from lightning_caopd.runner import run


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
    overrides = ["experiment=opd", f"model.path={toy_base}", *tiny_overrides]
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
