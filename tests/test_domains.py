"""The paper's two domains: tasks, prompts, experiments and the evaluation entry."""

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from lightning_caopd import callbacks as callbacks_lib
from lightning_caopd.evaluate import evaluate, load_student_weights
from lightning_caopd.models import load_tokenizer
from lightning_caopd.rollout import encode_chats
from lightning_caopd.runner import build, run
from lightning_caopd.tasks import science, tooluse
from tests.conftest import compose_cfg
from tests.fixtures.tiny_models import save_tiny_hf_model

FIXTURES = Path(__file__).parent / "fixtures"
SCIENCE = str(FIXTURES / "science_small.jsonl")
TOOLUSE = str(FIXTURES / "tooluse_small.jsonl")

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


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with the char tokenizer, saved as a Hub model would be."""
    return save_tiny_hf_model(tmp_path_factory.mktemp("models") / "tiny")


def _science_items() -> list[dict]:
    from lightning_caopd.data.loading import read_jsonl

    return [science.row_to_item(r, i, SCIENCE) for i, r in enumerate(read_jsonl(SCIENCE))]


# --- tasks -------------------------------------------------------------------------------


def test_science_task_adds_confidence_instruction_to_user_turn_only():
    task = science.ScienceTask()
    item = _science_items()[0]
    chat = task.student_messages(item)
    assert chat[0] == item["messages"][0]  # the system message as the dataset wrote it
    assert chat[1]["content"].startswith(item["messages"][1]["content"])
    assert chat[1]["content"].endswith(task.confidence_instruction)
    assert task.verify("<answer>A</answer>\nConfidence: 0.9", item) is (item["answer"] == "A")
    assert task.parse_answer("<answer>c</answer>") == "C"


def test_tooluse_confidence_instruction_goes_before_begin():
    task = tooluse.ToolUseTask()
    item = {
        "messages": [
            {"role": "user", "content": "Docs.\nAction Input: JSON.\n\nBegin!\nQuestion: q"}
        ],
        "answer": [{"Action": "f", "Action_Input": "{}"}],
    }
    text = task.student_messages(item)[0]["content"]
    assert (
        text == f"Docs.\nAction Input: JSON.\n{task.confidence_instruction}\n\nBegin!\nQuestion: q"
    )
    assert item["messages"][0]["content"].count(task.confidence_instruction) == 0  # not mutated
    no_anchor = {"messages": [{"role": "user", "content": "Q"}]}
    assert task.student_messages(no_anchor)[0]["content"] == f"Q\n{task.confidence_instruction}"
    assert task.verify("Action: f\nAction Input: {}\nConfidence: 0.5", item)
    assert task.parse_answer('Action: f\nAction Input: {"b": 1, "a": 2}') == 'f {"a": 2, "b": 1}'


def test_tooluse_strict_scores_every_call():
    item = {
        "answer": [{"Action": "f", "Action_Input": "{}"}, {"Action": "g", "Action_Input": "{}"}]
    }
    text = "Action: f\nAction Input: {}"
    assert tooluse.ToolUseTask().verify(text, item)
    assert not tooluse.ToolUseTask(strict=True).verify(text, item)


def test_science_teacher_keeps_system_message_and_gets_the_demo_in_the_user_turn(tmp_path):
    """The paper's code rebuilds the teacher prompt from messages[1] alone; ours keeps all."""
    cfg = compose_cfg(["experiment=caopd_science", f"data.path={SCIENCE}"], tmp_path)
    task, template = instantiate(cfg.data.task), instantiate(cfg.method.template)
    item = next(it for it in _science_items() if "Water is H2O" in it["demo"])  # a training row
    student = task.student_messages(item)
    context, _ = template.context(item, [], [])
    teacher = template.messages(student, context)
    assert [m["role"] for m in teacher] == ["system", "user"]
    assert teacher[0] == student[0] == item["messages"][0]
    assert teacher[1]["content"].startswith(student[1]["content"])  # question + instruction
    assert item["demo"] in teacher[1]["content"] and "Confidence: 1.00" in teacher[1]["content"]
    assert item["demo"] not in student[1]["content"]
    # One chat template for both: the rendered teacher prompt shares the system turn.
    tok = load_tokenizer(str(save_tiny_hf_model(tmp_path / "m")))
    (s_ids, t_ids), _ = encode_chats(tok, [student, teacher])
    system_len = len(tok.apply_chat_template(student[:1], tokenize=False))
    assert t_ids[:system_len] == s_ids[:system_len]


def test_rows_without_demo_get_one_from_the_ground_truth():
    items = _science_items()
    eval_row = items[0]  # `prompt` + `answer` only
    assert f"<answer>{eval_row['answer']}</answer>" in eval_row["demo"]


# --- experiments -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "experiment", ["opd_science", "caopd_science", "opd_tooluse", "caopd_tooluse"]
)
def test_experiments_carry_the_paper_hyper_parameters(experiment, tmp_path):
    cfg = compose_cfg([f"experiment={experiment}", "data.path=x"], tmp_path)
    m = cfg.method
    assert (m.rollout.num_rollouts, m.optimizer.lr, m.loss.divergence) == (8, 2e-5, "forward_kl")
    assert cfg.callbacks.teacher_ema.rate == 0.01
    r = m.rollout
    assert (m.loss.skip_first_tokens, r.max_prompt_length, r.max_new_tokens) == (3, 1024, 1024)
    assert cfg.data.batch_size * cfg.trainer.accumulate_grad_batches == 32
    assert m.targets._target_.endswith("CaOPD") == experiment.startswith("caopd")
    assert cfg.data.task._target_.endswith(
        "ScienceTask" if "science" in experiment else "ToolUseTask"
    )


@pytest.mark.parametrize("experiment, path", [("caopd_science", SCIENCE), ("opd_tooluse", TOOLUSE)])
def test_two_step_run_on_fixture_rows(experiment, path, tiny_dir, tmp_path, monkeypatch):
    n_eval = 2 if "science" in experiment else 1
    ema_calls = []
    real_ema = callbacks_lib.ema_update
    monkeypatch.setattr(callbacks_lib, "ema_update", lambda *a: ema_calls.append(a) or real_ema(*a))
    cfg = compose_cfg(
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


# --- teacher -----------------------------------------------------------------------------


def _teacher_cfg(student_dir: Path, teacher_dir: Path, tmp_path: Path):
    """opd_science with a separately configured teacher (model=hf_teacher)."""
    return compose_cfg(
        [
            "experiment=opd_science",
            "model=hf_teacher",
            f"model.pretrained_model_name_or_path={student_dir}",
            f"model.teacher_name_or_path={teacher_dir}",
            f"data.path={SCIENCE}",
        ],
        tmp_path,
    )


def test_tokenizer_mismatch_between_student_and_teacher_is_a_clear_error(tiny_dir, tmp_path):
    other = save_tiny_hf_model(tmp_path / "other", extra_tokens=("<tool>",))
    cfg = _teacher_cfg(tiny_dir, other, tmp_path)
    with pytest.raises(ValueError, match="tokenizers differ"):
        build(cfg)


def test_separately_configured_teacher_with_the_same_tokenizer(tiny_dir, tmp_path):
    other = save_tiny_hf_model(tmp_path / "other", seed=1)
    cfg = _teacher_cfg(tiny_dir, other, tmp_path)
    module, _ = build(cfg)
    s, t = next(module.student.parameters()), next(module.teacher.parameters())
    assert not torch.equal(s, t) and not t.requires_grad


# --- evaluation entry point ----------------------------------------------------------------


@pytest.mark.parametrize("split, n", [("all", 6), ("eval", 2)])
def test_evaluation_entry_point_writes_metrics_and_diagram(split, n, tiny_dir, tmp_path):
    cfg = compose_cfg(
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
    assert (tmp_path / "reliability.png").stat().st_size > 10_000
    records = (tmp_path / "completions.jsonl").read_text().splitlines()
    assert len(records) == n and "completion" in json.loads(records[0])


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
    with pytest.raises(ValueError, match="no student weights"):
        load_student_weights(student, tmp_path / "bad.ckpt")
