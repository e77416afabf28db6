"""The runner (`lightning_caopd.runner`): runs, a separate teacher, config checks, the run lock."""

import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_caopd import callbacks as callbacks_lib
from lightning_caopd.errors import ResumeError, RunDirError, user_message
from lightning_caopd.runner import build, lock_output_dir, run
from tests.fixtures.runs import ROOT, SCIENCE, TOOLUSE, subprocess_env
from tests.fixtures.tiny_models import save_tiny_hf_model

# Two optimizer steps of two micro-batches each: 4 training rows, one epoch. The tiny model's
# heads (16 wide) are not a size vLLM's CPU attention serves: the domain presets' vLLM engine is
# switched to the student's own sampling here (tests/test_vllm_*.py run the vLLM engine).
SHORT = [
    "method/engine=hf",
    "eval.engine=hf",
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


@pytest.mark.parametrize("method", ["opd", "caopd"])
def test_two_step_run_writes_metrics_json(method, toy_base, tiny_overrides, make_cfg, tmp_path):
    cfg = make_cfg(
        ["experiment=toy", f"method={method}", f"model.path={toy_base}", *tiny_overrides], tmp_path
    )
    result = run(cfg)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["run"]["steps"] == 2 and written["run"]["method"] == method
    assert written["run"]["experiment"] == method  # task_name: the toy's is the method's name
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


@pytest.mark.parametrize(
    "experiment, method, path", [("science", "caopd", SCIENCE), ("tooluse", "opd", TOOLUSE)]
)
def test_two_step_run_on_fixture_rows(
    experiment, method, path, tiny_dir, make_cfg, tmp_path, monkeypatch
):
    n_eval = 2 if experiment == "science" else 1
    ema_calls = []
    real_ema = callbacks_lib.ema_update
    monkeypatch.setattr(callbacks_lib, "ema_update", lambda *a: ema_calls.append(a) or real_ema(*a))
    cfg = make_cfg(
        [
            f"experiment={experiment}",
            f"method={method}",
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
    assert written["run"]["steps"] == 2 and written["run"]["method"] == method
    assert written["run"]["experiment"] == f"{method}_{experiment}"
    assert written["n"] == n_eval and written["initial"]["n"] == n_eval
    assert (tmp_path / "reliability.png").stat().st_size > 10_000
    assert result["accuracy"] == written["accuracy"]
    assert len(ema_calls) == 2  # once per optimizer step, not once per micro-batch


def _teacher_cfg(make_cfg, student_dir: Path, teacher_dir: Path, tmp_path: Path):
    """experiment=science method=opd with a separately configured teacher (model=hf_teacher)."""
    return make_cfg(
        [
            "experiment=science",
            "method=opd",
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
    assert "Could not find 'method/bogus'" in out.stderr
    assert "\tcaopd\n" in out.stderr and "\topd\n" in out.stderr
    assert "Traceback" not in out.stderr
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=r"Could not override 'method\.bogus_key'"):
        make_cfg(["method.bogus_key=1"], tmp_path)


# every bad value of every group: tests/test_schema.py


def test_output_dir_in_use_by_a_live_run_is_refused(no_models, tiny_overrides, make_cfg, tmp_path):
    cfg = make_cfg(tiny_overrides, tmp_path)
    with lock_output_dir(tmp_path):
        with pytest.raises(RunDirError, match=f"{tmp_path} is in use by another run") as info:
            run(cfg)
        assert f"pid {os.getpid()}" in str(info.value)
    # once the other run has stopped the directory is free again (a resume may take it)
    with lock_output_dir(tmp_path):
        pass


def test_output_dir_held_by_another_process_is_refused(tmp_path):
    code = (
        "import sys, time; from pathlib import Path; "
        "from lightning_caopd.runner import lock_output_dir\n"
        f"with lock_output_dir(Path({str(tmp_path)!r})):\n"
        "    print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], env=subprocess_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=f"pid {holder.pid} "):
            with lock_output_dir(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with lock_output_dir(tmp_path):  # a killed run leaves no stale lock
        pass


def _train_science(tiny_dir: Path, run_dir: Path, **popen) -> subprocess.CompletedProcess:
    """`train.py` in a subprocess: a short OPD run of the tiny model on the science fixture rows."""
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "experiment=science",
            "method=opd",
            "model=hf",
            f"model.pretrained_model_name_or_path={tiny_dir}",
            f"data.path={SCIENCE}",
            "data.num_eval=2",
            "callbacks.best=null",
            f"hydra.run.dir={run_dir}",
            *SHORT[:-2],
        ],
        cwd=run_dir.parent,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
        **popen,
    )


def test_full_disk_is_one_paragraph_and_leaves_no_partial_checkpoint(tiny_dir, tmp_path):
    def small_files():  # writes past 60 kB fail as on a full disk (EFBIG instead of ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    run_dir = tmp_path / "run"
    out = _train_science(tiny_dir, run_dir, preexec_fn=small_files)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: Could not write") and "File too large" in last
    assert list((run_dir / "checkpoints").iterdir()) == []  # no truncated last.ckpt, no temp file


def test_train_log_holds_the_console_and_the_console_is_quiet(tiny_dir, tmp_path):
    run_dir = tmp_path / "run"
    out = _train_science(tiny_dir, run_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    console = out.stdout + out.stderr
    log = (run_dir / "train.log").read_text()
    for line in ("GPU available: False", "`Trainer.fit` stopped", "Wrote "):
        assert line in console and line in log
    wrote = next(line for line in out.stdout.splitlines() if line.startswith("Wrote "))
    assert f"{run_dir / 'metrics.json'} (n 2, accuracy " in wrote
    assert not re.search(r"\d\.\d{5,}", wrote)  # rounded
    assert "loss: " in out.stdout  # on the progress bar
    for noise in ("Tip:", "litlogger", "LeafSpec", "Found ", "Traceback"):
        assert noise not in console


# --- the paper's experiments (conf/experiment/paper/) at tiny scale ----------------------------


def _paper_cfg(make_cfg, experiment, model_dir, out, *extra):
    """A paper preset on the tiny model and the fixture rows, 2 steps."""
    science = "science" in experiment or experiment.endswith(
        ("size_sweep", "k_ablation", "continual_stage2")
    )
    data = [f"data.path={SCIENCE}", "data.num_eval=2"]
    if not science:
        data = [f"data.path={TOOLUSE}", "data.num_eval=1"]
    return make_cfg(
        [
            *f"experiment={experiment}".split(),  # "science method=caopd": two overrides
            "model=hf",
            f"model.pretrained_model_name_or_path={model_dir}",
            *data,
            *SHORT,
            *extra,
        ],
        out,
    )


def test_size_sweep_runs_each_size(tiny_dir, make_cfg, tmp_path):
    cfg = _paper_cfg(make_cfg, "paper/size_sweep", tiny_dir, tmp_path / "compose")
    sizes = cfg.hydra.sweeper.params["model.pretrained_model_name_or_path"].split(",")
    assert sizes == [f"Qwen/Qwen3-{s}" for s in ("0.6B", "1.7B", "4B", "8B", "14B", "32B")]
    # the multirun at tiny scale: two "sizes", each its own run
    other = save_tiny_hf_model(tmp_path / "other", seed=1)
    for i, model_dir in enumerate((tiny_dir, other)):
        out = tmp_path / f"size{i}"
        result = run(_paper_cfg(make_cfg, "paper/size_sweep", model_dir, out))
        written = json.loads((out / "metrics.json").read_text())
        assert written["run"]["steps"] == 2 and result["n"] == 2


def test_k_ablation_runs_each_k(tiny_dir, make_cfg, tmp_path):
    cfg = _paper_cfg(make_cfg, "paper/k_ablation", tiny_dir, tmp_path / "compose")
    ks = [int(k) for k in str(cfg.hydra.sweeper.params["method.rollout.num_rollouts"]).split(",")]
    assert ks == [2, 4, 8, 16]
    for k in ks:
        out = tmp_path / f"k{k}"
        run(
            _paper_cfg(
                make_cfg, "paper/k_ablation", tiny_dir, out, f"method.rollout.num_rollouts={k}"
            )
        )
        assert json.loads((out / "metrics.json").read_text())["run"]["steps"] == 2


def test_ood_trains_on_tool_use_and_scores_the_student_on_science(tiny_dir, make_cfg, tmp_path):
    train_dir = tmp_path / "ood"
    run(_paper_cfg(make_cfg, "paper/ood_tooluse", tiny_dir, train_dir))
    assert (train_dir / "student" / "config.json").is_file()
    eval_dir = tmp_path / "ood_eval"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_caopd.evaluate",
            "experiment=paper/ood_science_eval",
            "eval.engine=hf",  # the tiny model's heads: see SHORT
            "split=all",
            f"student={train_dir / 'student'}",
            f"data.eval_path={SCIENCE}",
            "eval.max_new_tokens=8",
            "data.eval_batch_size=6",
            f"hydra.run.dir={eval_dir}",
        ],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = json.loads((eval_dir / "metrics.json").read_text())
    assert written["n"] == 6  # every science row, scored by the tool-use student
    assert written["run"]["model"] == str((train_dir / "student").resolve())


def test_continual_stage_two_starts_from_stage_one_student(tiny_dir, make_cfg, tmp_path):
    from transformers import AutoModelForCausalLM

    stage1 = tmp_path / "stage1"
    first = run(_paper_cfg(make_cfg, "paper/continual_stage1", tiny_dir, stage1))
    # stage 2 on stage 1's evaluation items: its `initial` evaluation is stage 1's final one
    stage2 = tmp_path / "stage2"
    cfg = _paper_cfg(
        make_cfg,
        "paper/continual_stage2",
        tiny_dir,
        stage2,
        f"model.init_from={stage1}",
        "data=tooluse",
        f"data.path={TOOLUSE}",
        "data.num_eval=1",
    )
    run(cfg)
    second = json.loads((stage2 / "metrics.json").read_text())
    keys = ("n", "accuracy", "format_rate", "brier_all", "answer_entropy", "by_category")
    assert {k: second["initial"][k] for k in keys} == {k: first[k] for k in keys}
    assert second["run"]["steps"] == 2  # a fresh step count
    # the tiny model scores alike before and after training: compare the weights themselves
    from lightning_caopd.models import load_pretrained
    from lightning_caopd.runner import build_student

    _, started, _ = build_student(cfg)
    trained = load_pretrained(str(stage1 / "student")).state_dict()
    untrained = load_pretrained(str(tiny_dir)).state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in started.state_dict().items())
    assert any(not torch.equal(v, untrained[k]) for k, v in trained.items())
    # stage 2 as the preset runs it, on science, from stage 1's student/ folder
    science = tmp_path / "stage2_science"
    run(
        _paper_cfg(
            make_cfg,
            "paper/continual_stage2",
            tiny_dir,
            science,
            f"model.init_from={stage1 / 'student'}",
        )
    )
    assert json.loads((science / "metrics.json").read_text())["run"]["steps"] == 2
    # student/ is a plain Hugging Face folder that generates
    model = AutoModelForCausalLM.from_pretrained(stage1 / "student")
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 1 and 3 < out.shape[1] <= 7
    assert (stage1 / "student" / "tokenizer_config.json").is_file()


def test_init_from_a_missing_run_is_a_clear_error(tiny_dir, make_cfg, tmp_path):
    cfg = _paper_cfg(
        make_cfg,
        "paper/continual_stage2",
        tiny_dir,
        tmp_path,
        f"model.init_from={tmp_path / 'none'}",
    )
    with pytest.raises(ResumeError) as err:
        run(cfg)
    assert "model.init_from" in user_message(err.value)


def test_chat_template_kwargs_reach_student_teacher_and_evaluation(
    tiny_dir, make_cfg, tmp_path, monkeypatch
):
    from lightning_caopd import module as module_lib
    from lightning_caopd import rollout
    from lightning_caopd import scoring as scoring_lib
    from lightning_caopd.step import prompts as prompts_lib

    calls = []

    def recording(tokenizer, chats, *args, **kwargs):
        calls.append(kwargs.get("chat_template_kwargs"))
        return rollout.encode_chats(tokenizer, chats, *args, **kwargs)

    monkeypatch.setattr(module_lib, "encode_chats", recording)
    monkeypatch.setattr(scoring_lib, "encode_chats", recording)
    monkeypatch.setattr(prompts_lib, "encode_chats", recording)
    run(
        _paper_cfg(
            make_cfg,
            "science method=caopd",
            tiny_dir,
            tmp_path,
            "model.chat_template_kwargs={enable_thinking: false}",
        )
    )
    # per micro-batch a student and a teacher call, per evaluation batch one: all with the kwargs
    assert len(calls) >= 4 * 2 + 2
    assert all(c == {"enable_thinking": False} for c in calls)
