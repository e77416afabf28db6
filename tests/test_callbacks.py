"""Callbacks: teacher EMA, non-finite guard, rollout entropies and table, best checkpoint."""

from __future__ import annotations

import csv
import doctest
import json
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from lightning_caopd import callbacks
from lightning_caopd.callbacks import RolloutTable, TeacherSuccess, ema_update, rollout_entropies
from lightning_caopd.errors import ConfigError, NonFiniteError
from lightning_caopd.models import build_char_tokenizer
from lightning_caopd.runner import run
from tests.fixtures.runs import logged


def test_ema_update_moves_teacher_toward_student():
    s, t = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = t.weight.detach().clone()
    ema_update(t, s, 0.25)
    torch.testing.assert_close(t.weight, 0.75 * before + 0.25 * s.weight.detach())
    ema_update(t, s, 1.0)
    torch.testing.assert_close(t.weight, s.weight)


def test_entropies_split_answer_and_confidence_tokens():
    tok = build_char_tokenizer()
    text = "Answer: b\nConfidence: 0.62"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    conf_start = text.index("0.62")
    v = len(tok)
    logits = torch.zeros(2, len(ids), v)  # uniform: entropy log V everywhere
    # peaked rows on the confidence value's 4 characters of rollout 0: entropy ~ 0 there
    logits[0, conf_start : conf_start + 4, 0] = 1e4
    out = rollout_entropies(logits, [ids, ids[: text.index("\n")]], tok)
    assert out["train/answer_entropy"] == pytest.approx(math.log(v), rel=1e-5)
    # 4 peaked tokens of rollout 0; rollout 1 was cut before its confidence: it adds none
    assert out["train/confidence_entropy"] == pytest.approx(0.0, abs=1e-4)
    only_answers = rollout_entropies(logits[1:], [ids[: text.index("\n")]], tok)
    assert "train/confidence_entropy" not in only_answers


def test_progress_bar_of_a_step_bounded_run_reads_training_not_epoch_0_of_minus_2():
    bar = callbacks.StepProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)  # runs bounded by trainer.max_steps
    assert bar._get_train_description(0).strip() == "Training"
    bar._trainer = SimpleNamespace(max_epochs=3)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"


def test_tracker_rejects_bad_options():
    with pytest.raises(ConfigError, match="callbacks.rollout_table.rows=0 is out of range"):
        RolloutTable(rows=0)
    with pytest.raises(ConfigError, match="callbacks.rollout_table.every=-1 is out of range"):
        RolloutTable(every=-1)


class InjectNaN(L.Callback):
    """NaN in the student's logits on the chosen optimizer steps; records weight changes."""

    records: dict[str, list[dict]] = {}

    def __init__(self, steps: list[int], key: str) -> None:
        self.steps, self.key = set(steps), key
        InjectNaN.records[key] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = [p.detach().clone() for p in pl_module.student.parameters()]
        self._step = trainer.global_step
        self._handle = None
        if self._step in self.steps:
            # only forwards with gradients (the loss), not the no-grad sampling
            self._handle = pl_module.student.get_output_embeddings().register_forward_hook(
                lambda mod, args, out: out * float("nan") if torch.is_grad_enabled() else out
            )

    def _record(self, pl_module) -> None:
        if self._handle is not None:
            self._handle.remove()
        changed = any(
            not torch.equal(a, p)
            for a, p in zip(self._before, pl_module.student.parameters(), strict=True)
        )
        InjectNaN.records[self.key].append(
            {"step": self._step, "nan": self._handle is not None, "changed": changed}
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record(pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._record(pl_module)


def _nan_overrides(toy_base, tiny: list[str], steps: list[int], key: str) -> list[str]:
    return [
        "experiment=toy",
        "method=opd",
        f"model.path={toy_base}",
        *tiny,
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
        "method.optimizer.lr=1e-3",
        "+callbacks.nan._target_=tests.test_callbacks.InjectNaN",
        f"+callbacks.nan.steps={steps}",
        f"+callbacks.nan.key={key}",
    ]


def test_nonfinite_step_is_skipped_logged_and_the_run_goes_on(
    toy_base, tiny_overrides, make_cfg, tmp_path
):
    run(make_cfg(_nan_overrides(toy_base, tiny_overrides, [1], "one"), tmp_path))
    records = InjectNaN.records["one"]
    assert [(r["step"], r["nan"], r["changed"]) for r in records] == [
        (0, False, True),
        (1, True, False),
        (2, False, True),  # the NaN step left the weights alone
    ]
    assert json.loads((tmp_path / "metrics.json").read_text())["run"]["steps"] == 3
    assert logged(tmp_path, "train/skipped_nonfinite") == [0.0, 1.0, 1.0]
    assert math.isnan(logged(tmp_path, "train/loss")[1])


def test_nonfinite_steps_in_a_row_stop_the_run_with_a_clear_message(
    toy_base, tiny_overrides, make_cfg, tmp_path
):
    cfg = make_cfg(
        [
            *_nan_overrides(toy_base, tiny_overrides, [0, 1, 2], "row"),
            "callbacks.nonfinite_guard.max_consecutive=2",
        ],
        tmp_path,
    )
    with pytest.raises(
        NonFiniteError,
        match=r"in 2 steps in a row \(callbacks\.nonfinite_guard\.max_consecutive=2\)",
    ):
        run(cfg)
    records = InjectNaN.records["row"]
    assert [(r["nan"], r["changed"]) for r in records] == [(True, False), (True, False)]
    assert not (tmp_path / "metrics.json").exists()


def test_best_checkpoint_by_a_validation_metric(toy_base, tiny_overrides, make_cfg, tmp_path):
    # validation during training (every step) lets the `best` callback keep the best model by
    # val/brier_all (conf/callbacks/default.yaml); ties keep the earlier one
    cfg = make_cfg(
        [
            "experiment=toy",
            "method=opd",
            f"model.path={toy_base}",
            *tiny_overrides,
            "callbacks=default",
            "callbacks.progress=null",
            "+trainer.val_check_interval=1",
        ],
        tmp_path,
    )
    run(cfg)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["best-step1.ckpt", "last.ckpt"] or ckpts == ["best-step2.ckpt", "last.ckpt"]
    last = torch.load(
        tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    [best] = [v for k, v in last["callbacks"].items() if "val/brier_all" in k]
    scores = logged(tmp_path, "val/brier_all")[1:]  # [0]: the evaluation before training
    assert len(scores) == 2 and best["best_model_score"].item() == pytest.approx(min(scores))
    step = 1 + scores.index(min(scores))
    assert Path(best["best_model_path"]).name == f"best-step{step}.ckpt"
    saved = torch.load(best["best_model_path"], map_location="cpu", weights_only=False)
    assert saved["global_step"] == step and "rng_states" in saved


def test_doctests():
    result = doctest.testmod(callbacks)
    assert result.attempted > 0 and result.failed == 0


def _by_step(run_dir: Path, key: str) -> dict[int, float]:
    """The CSV log's values of `key` by step."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def test_teacher_success_logs_every_n_steps_and_leaves_the_student_rollouts_alone(
    toy_base, tiny_overrides, make_cfg, tmp_path
):
    overrides = [
        "experiment=toy",
        "method=caopd",
        f"model.path={toy_base}",
        *tiny_overrides,
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
        "eval.teacher_conditioned=false",
    ]
    on = [
        "+callbacks.teacher_success._target_=lightning_caopd.callbacks.TeacherSuccess",
        "+callbacks.teacher_success.every_n_steps=2",
    ]
    run(make_cfg([*overrides, *on], tmp_path / "on"))
    run(make_cfg(overrides, tmp_path / "off"))
    success = _by_step(tmp_path / "on", "train/teacher_success")
    assert list(success) == [0, 2]  # once per N steps, from the first, not repeated in between
    assert list(_by_step(tmp_path / "on", "train/teacher_format_rate")) == [0, 2]
    p_acc = _by_step(tmp_path / "on", "train/p_acc_mean")
    for step, gap in _by_step(tmp_path / "on", "train/teacher_optimism_gap").items():
        assert 0 <= success[step] <= 1 and gap == pytest.approx(success[step] - p_acc[step])
    # the teacher's draws left the random state alone: the student sampled the same rollouts
    for key in ("train/loss", "train/rollout_accuracy", "train/format_rate"):
        assert logged(tmp_path / "on", key) == logged(tmp_path / "off", key)
    assert len(logged(tmp_path / "on", "train/loss")) == 3
    on_result = json.loads((tmp_path / "on" / "metrics.json").read_text())
    assert on_result == json.loads((tmp_path / "off" / "metrics.json").read_text())


def test_step_scalars_are_computed_and_logged_every_log_every_n_steps(
    toy_base, tiny_overrides, make_cfg, tmp_path, monkeypatch
):
    """`trainer.log_every_n_steps=3`: the step's scalars, the rollout entropies and the guard's
    count at steps 2 and 5 only (where Lightning writes), with the values of a run logging all."""
    calls = []
    entropies = callbacks.rollout_entropies
    monkeypatch.setattr(callbacks, "rollout_entropies", lambda *a: calls.append(1) or entropies(*a))
    overrides = [
        "experiment=toy",
        "method=caopd",
        f"model.path={toy_base}",
        *tiny_overrides,
        "trainer.max_steps=6",
        "eval.teacher_conditioned=false",
        "+callbacks.entropy._target_=lightning_caopd.callbacks.RolloutEntropy",
    ]
    run(make_cfg([*overrides, "trainer.log_every_n_steps=1"], tmp_path / "every"))
    run(make_cfg([*overrides, "trainer.log_every_n_steps=3"], tmp_path / "third"))
    assert len(calls) == 6 + 2  # computed only at the steps that are logged
    keys = ("train/loss", "train/p_acc_mean", "train/answer_entropy", "train/skipped_nonfinite")
    for key in keys:
        every, third = _by_step(tmp_path / "every", key), _by_step(tmp_path / "third", key)
        assert list(every) == list(range(6)) and list(third) == [2, 5], key
        assert third == {step: every[step] for step in (2, 5)}, key
    assert (tmp_path / "every" / "metrics.json").read_text() == (
        tmp_path / "third" / "metrics.json"
    ).read_text()


def test_teacher_success_rejects_bad_options():
    out_of_range = r"every_n_steps=0 is out of range: it must be an integer >= 1"
    with pytest.raises(ConfigError, match=out_of_range):
        TeacherSuccess(every_n_steps=0)


@pytest.mark.parametrize(
    "grad, finite",
    [([1.0, float("nan")], False), ([float("-inf"), 0.0], False), ([3e38, -3e38], True)],
)
def test_all_finite_sees_nan_and_inf_and_never_overflows(grad, finite):
    from lightning_caopd.callbacks import all_finite

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.tensor(grad), torch.ones(3)
    assert all_finite([a, b]) is finite and all_finite([torch.nn.Parameter(torch.ones(1))])
