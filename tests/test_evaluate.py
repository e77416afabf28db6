"""The evaluation entry point (`lightning_caopd.evaluate`): metrics, diagram, checkpoint weights."""

import json
import re
import subprocess
import sys

import pytest
import torch

from lightning_caopd.errors import ResumeError
from lightning_caopd.evaluate import (
    evaluate,
    load_student_weights,
    merge_overrides,
    training_run_overrides,
)
from tests.fixtures.runs import SCIENCE, subprocess_env


@pytest.mark.parametrize("split, n", [("all", 6), ("eval", 2)])
def test_evaluation_entry_point_writes_metrics_and_diagram(split, n, tiny_dir, make_cfg, tmp_path):
    cfg = make_cfg(
        [
            "model=hf",
            f"model.pretrained_model_name_or_path={tiny_dir}",
            "data=science",
            f"data.path={SCIENCE}",
            "data.num_eval=2",
            f"split={split}",
            "eval.max_new_tokens=8",
        ],
        tmp_path,
        config_name="evaluate",
    )
    result = evaluate(cfg)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["n"] == n == result["n"] and written["run"]["split"] == split
    assert {"accuracy", "ece", "brier", "spr", "by_category"} <= written.keys()
    assert written["confidence_readout"] == "greedy"  # how the confidences were read
    assert (tmp_path / "reliability.png").stat().st_size > 10_000
    records = (tmp_path / "completions.jsonl").read_text().splitlines()
    assert len(records) == n
    first = json.loads(records[0])
    # the prompt as the model saw it: the chat template around the system turn and question
    assert "completion" in first and first["prompt"].endswith("<|assistant|>")
    assert first["prompt"].startswith("<|system|>\nGiven a question and four options")
    assert "\nA: " in first["prompt"] and "D: " in first["prompt"]


def test_checkpoint_weights_replace_the_student(tiny_dir, tmp_path):
    from lightning_caopd.models import load_pretrained

    student, trained = load_pretrained(str(tiny_dir)), load_pretrained(str(tiny_dir))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    state = {f"student.{k}": v for k, v in trained.state_dict().items()}
    state["teacher.x"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "last.ckpt")
    load_student_weights(student, tmp_path / "last.ckpt")
    assert all(
        torch.equal(a, b) for a, b in zip(student.parameters(), trained.parameters(), strict=True)
    )
    torch.save({"state_dict": {"teacher.x": torch.zeros(1)}}, tmp_path / "bad.ckpt")
    with pytest.raises(ResumeError, match="checkpoint=.*no student weights"):
        load_student_weights(student, tmp_path / "bad.ckpt")


def test_training_run_overrides_keep_what_it_trained(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(
        "- experiment=science\n- method=opd\n- model=hf\n- data.path=rows.jsonl\n"
        "- trainer.max_steps=2\n- ckpt_path=last\n- callbacks=minimal\n- +method.x=1\n"
    )
    overrides, folder = training_run_overrides(run / "checkpoints" / "last.ckpt")
    assert folder == run.resolve()
    assert overrides == [
        "experiment=science",
        "method=opd",
        "model=hf",
        "data.path=rows.jsonl",
        "+method.x=1",
    ]
    assert training_run_overrides(tmp_path / "loose.ckpt") == ([], None)
    assert merge_overrides(overrides, ["data.path=other.jsonl", "split=all"]) == [
        "experiment=science",
        "method=opd",
        "model=hf",
        "+method.x=1",
        "data.path=other.jsonl",
        "split=all",
    ]


def test_checkpoint_alone_scores_with_the_runs_own_config(tiny_dir, tmp_path):
    from lightning_caopd.models import load_pretrained

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(
        "\n".join(
            f"- {o}"
            for o in (
                "experiment=science",
                "method=opd",
                # the tiny model's head size (16) is not one vLLM's CPU attention has
                "method/engine=hf",
                "eval.engine=hf",
                "model=hf",
                f"model.pretrained_model_name_or_path={tiny_dir}",
                f"data.path={SCIENCE}",
                "data.num_eval=2",
                "trainer.max_steps=2",
                "ckpt_path=last",
            )
        )
        + "\n"
    )
    (run / "checkpoints").mkdir()
    state = {f"student.{k}": v for k, v in load_pretrained(str(tiny_dir)).state_dict().items()}
    torch.save({"state_dict": state}, run / "checkpoints" / "last.ckpt")
    out_dir = tmp_path / "eval"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_caopd.evaluate",
            f"checkpoint={run / 'checkpoints' / 'last.ckpt'}",
            "eval.max_new_tokens=4",
            "data.eval_batch_size=1",
            f"hydra.run.dir={out_dir}",
        ],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    written = json.loads((out_dir / "metrics.json").read_text())
    assert written["n"] == 2 and written["run"]["data"] == SCIENCE
    log = (out_dir / "evaluate.log").read_text()
    assert "Composing the training run's config" in log and "Scored 1/2 items" in log
    assert "Scored 2/2 items" in log and f"Wrote {out_dir / 'metrics.json'}" in log
    wrote = next(line for line in out.stdout.splitlines() if line.startswith("Wrote "))
    assert not re.search(r"\d\.\d{5,}", wrote)  # rounded
    assert "Traceback" not in out.stderr and "Tip:" not in out.stdout + out.stderr


def test_training_run_search_path_is_read_from_its_hydra_yaml(tmp_path):
    from lightning_caopd.evaluate import training_run_search_path

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    sources = [
        ("hydra.conf", "pkg", "hydra"),
        ("lightning_caopd.conf", "pkg", "main"),
        ("/a/conf", "file", "command-line"),
        ("/b/conf", "file", "hydra.searchpath in command-line"),
        ("", "structured", "schema"),
    ]
    rows = "".join(
        f"    - path: '{p}'\n      schema: {s}\n      provider: {v}\n" for p, s, v in sources
    )
    (run / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    config_sources:\n{rows}")
    assert training_run_search_path(run) == ["file:///a/conf", "file:///b/conf"]
    assert training_run_search_path(None) == training_run_search_path(tmp_path) == []


def test_checkpoint_and_student_of_a_run_find_the_users_own_configs(tiny_dir, tmp_path):
    from tests.fixtures.configs import user_conf

    def app(module, *args, out=None):
        proc = subprocess.run(
            [sys.executable, "-m", module, *args, f"hydra.run.dir={out}"],
            cwd=tmp_path,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((out / "metrics.json").read_text())

    # trained through the module entry point with the user's folder on hydra.searchpath
    user = user_conf(tmp_path / "my_conf", num_eval=3)
    run = tmp_path / "run"
    app(
        "lightning_caopd.train",
        f"hydra.searchpath=[file://{user}]",
        "experiment=mine",
        f"model.pretrained_model_name_or_path={tiny_dir}",
        f"data.path={SCIENCE}",
        "trainer.max_steps=2",
        "method.rollout.num_rollouts=2",
        "method.rollout.max_new_tokens=4",
        "eval.max_new_tokens=4",
        "callbacks.best=null",
        "logger=csv",
        out=run,
    )
    # the checkpoint alone: the run's experiment=mine is found in the run's folder
    ckpt = run / "checkpoints" / "last.ckpt"
    written = app("lightning_caopd.evaluate", f"checkpoint={ckpt}", out=tmp_path / "eval")
    assert written["n"] == 3 and written["run"]["checkpoint"] == str(ckpt)
    # student= with --config-dir of another folder holding experiment/mine: the command line's
    # folder wins over the training run's
    other = user_conf(tmp_path / "other_conf", num_eval=2)
    args = ["--config-dir", str(other), f"student={run / 'student'}"]
    written = app("lightning_caopd.evaluate", *args, out=tmp_path / "eval2")
    assert written["n"] == 2
