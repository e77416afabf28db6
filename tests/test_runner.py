"""The runner (`lightning_caopd.runner`): two-step runs, a separate teacher, config errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_caopd import callbacks as callbacks_lib
from lightning_caopd.runner import build, run
from tests.fixtures.runs import ROOT, SCIENCE, TOOLUSE, subprocess_env
from tests.fixtures.tiny_models import save_tiny_hf_model

# Two optimizer steps of two micro-batches each: 4 training rows, one epoch.
SHORT = [
    "trainer.max_steps=2",
    "trainer.accumulate_grad_batches=2",
    "method.rollout.num_rollouts=2",
    "method.rollout.max_new_tokens=12",
    "eval.max_new_tokens=12",
    "method.rollout.max_prompt_length=1024",
    "data.eval_batch_size=4",
    "logger=csv",
    "callbacks=minimal",
]


@pytest.mark.parametrize("experiment", ["opd", "caopd"])
def test_two_step_run_writes_metrics_json(experiment, toy_base, tiny_overrides, make_cfg, tmp_path):
    cfg = make_cfg(
        [f"experiment={experiment}", f"model.path={toy_base}", *tiny_overrides], tmp_path
    )
    result = run(cfg)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["run"]["steps"] == 2 and written["run"]["method"] == experiment
    keys = {
        "accuracy",
        "mean_confidence",
        "ece",
        "brier",
        "ocg",
        "spr",
        "format_rate",
        "n",
        "answer_entropy",
        "confidence_entropy",
        "by_category",
    }
    assert keys <= written.keys() and keys <= written["initial"].keys()
    assert written["n"] == 24 and written["initial"]["n"] == 24
    assert set(written["by_category"]) <= {"next", "prev", "code"}
    assert (tmp_path / "reliability.png").stat().st_size > 10_000
    assert (tmp_path / "reliability_initial.png").exists()
    assert result["accuracy"] == written["accuracy"]


@pytest.mark.parametrize("experiment, path", [("caopd_science", SCIENCE), ("opd_tooluse", TOOLUSE)])
def test_two_step_run_on_fixture_rows(experiment, path, tiny_dir, make_cfg, tmp_path, monkeypatch):
    n_eval = 2 if "science" in experiment else 1
    ema_calls = []
    real_ema = callbacks_lib.ema_update
    monkeypatch.setattr(callbacks_lib, "ema_update", lambda *a: ema_calls.append(a) or real_ema(*a))
    cfg = make_cfg(
        [
            f"experiment={experiment}",
            "model=hf",
            f"model.pretrained_model_name_or_path={tiny_dir}",
            f"data.path={path}",
            f"data.num_eval={n_eval}",
            *SHORT,
        ],
        tmp_path,
    )
    result = run(cfg)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["run"]["steps"] == 2 and written["run"]["method"] == experiment.split("_")[0]
    assert written["n"] == n_eval and written["initial"]["n"] == n_eval
    assert (tmp_path / "reliability.png").stat().st_size > 10_000
    assert result["accuracy"] == written["accuracy"]
    assert len(ema_calls) == 2  # once per optimizer step, not once per micro-batch


def _teacher_cfg(make_cfg, student_dir: Path, teacher_dir: Path, tmp_path: Path):
    """opd_science with a separately configured teacher (model=hf_teacher)."""
    return make_cfg(
        [
            "experiment=opd_science",
            "model=hf_teacher",
            f"model.pretrained_model_name_or_path={student_dir}",
            f"model.teacher_name_or_path={teacher_dir}",
            f"data.path={SCIENCE}",
        ],
        tmp_path,
    )


def test_tokenizer_mismatch_between_student_and_teacher_is_a_clear_error(
    tiny_dir, make_cfg, tmp_path
):
    other = save_tiny_hf_model(tmp_path / "other", extra_tokens=("<tool>",))
    cfg = _teacher_cfg(make_cfg, tiny_dir, other, tmp_path)
    with pytest.raises(ValueError, match="tokenizers differ"):
        build(cfg)


def test_separately_configured_teacher_with_the_same_tokenizer(tiny_dir, make_cfg, tmp_path):
    other = save_tiny_hf_model(tmp_path / "other", seed=1)
    cfg = _teacher_cfg(make_cfg, tiny_dir, other, tmp_path)
    module, _ = build(cfg)
    s, t = next(module.student.parameters()), next(module.teacher.parameters())
    assert not torch.equal(s, t) and not t.requires_grad


def test_unknown_config_group_and_key_are_one_paragraph_errors(make_cfg, tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "method=bogus", f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "Could not find 'method/bogus'" in out.stderr and "\tcaopd\n\topd\n" in out.stderr
    assert "Traceback" not in out.stderr
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=r"Could not override 'method\.bogus_key'"):
        make_cfg(["method.bogus_key=1"], tmp_path)
