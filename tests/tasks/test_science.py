"""The science task (`lightning_caopd.tasks.science`): answer extraction, rows, prompts, teacher."""

import pytest
from hydra.utils import instantiate

from lightning_caopd.data.loading import read_jsonl
from lightning_caopd.errors import DataError
from lightning_caopd.models import load_tokenizer
from lightning_caopd.rollout import encode_chats
from lightning_caopd.tasks import science
from tests.fixtures.runs import FIXTURES, SCIENCE
from tests.fixtures.tiny_models import save_tiny_hf_model


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<reasoning>\nWater.\n</reasoning>\n<answer>\nC\n</answer>", "C"),
        ("<answer>A</answer> On reflection: <answer>B</answer>", "B"),  # last tag wins
        ("<answer>d</answer>", "D"),  # lowercase
        ("<answer>  \n  b \n </answer>", "B"),  # spaces and newlines
        ("<answer>(C)</answer>", "C"),
        ("<answer>C)</answer>", "C"),
        ("<answer>**A**</answer>", "A"),
        ("<answer>\nB\nConfidence: 0.9\n</answer>", "B"),  # confidence inside the tag
        ("<answer>B</answer>\nConfidence: 0.6", "B"),
        # The format echoed first, the real answer last.
        ("Format: <answer>\n...\n</answer>\n<answer>A</answer>", "A"),
    ],
)
def test_science_tags(completion, expected):
    assert science.extract_answer(completion) == expected


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<reasoning>Two hydrogens.</reasoning>\n<answer>\nB", "B"),  # truncated rollout
        ("<reasoning>x</reasoning>\n<answer> c\nConfidence: 0.3\n", "C"),
        ("I compared the masses.\nB\nConfidence: 0.8", "B"),  # bare letter, confidence after
        ("I compared the masses.\n(D)\n\n**Confidence:** 70%\n", "D"),
        ("So the answer is D.", "D"),
        ("Answer: A\nConfidence: 0.9", "A"),
        ("The answer is B. Hmm, no: the answer is (c).", "C"),  # last phrase wins
        ("**Final Answer:** C", "C"),
        ("The correct answer is option A because of the ester.", "A"),
    ],
)
def test_science_fallbacks(completion, expected):
    assert science.extract_answer(completion) == expected


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "I am not sure.",
        "The answer is a molecule with two rings.",  # an article, not option A
        "<answer>337.310</answer>",  # option text instead of its letter
        # The final tag is not a letter: earlier statements are not used.
        "Answer: B\n<answer>none of these</answer>",
        "B\nActually I cannot decide between them.",  # the letter is not on the last line
        "<answer>B and more words",  # unclosed tag not at a clean end
        "Confidence: 0.9",
    ],
)
def test_science_no_answer(completion):
    assert science.extract_answer(completion) is None


def test_science_fallbacks_only_without_closed_tag():
    assert science.extract_answer("<answer>A</answer>\nThe answer is B.\nC") == "A"


def test_science_verify():
    assert science.verify("<answer>b</answer>", " B ")
    assert not science.verify("<answer>C</answer>", "B")  # wrong letter
    assert not science.verify("no letter here", "B")  # no answer


def test_science_demo_verifies():
    demo = science.demo_from_answer("b")
    assert demo == "<reasoning>The correct option is B.</reasoning>\n<answer>B</answer>"
    assert science.verify(demo, "B")


def test_science_rows_from_fixture():
    rows = read_jsonl(FIXTURES / "science_small.jsonl")
    items = [science.row_to_item(r, i, "science_small.jsonl") for i, r in enumerate(rows)]
    assert len(items) == 6
    for item, row in zip(items, rows, strict=True):
        assert [m["role"] for m in item["messages"]] == ["system", "user"]
        assert item["answer"] == row["answer"]
        assert science.verify(item["demo"], item["answer"])
    assert items[0]["demo"] == science.demo_from_answer("A")  # no output_text: built
    assert items[4]["demo"] == rows[4]["output_text"]  # training row: kept
    assert items[0]["category"] == "science" and items[5]["category"] == "atom_count"
    assert items[0]["id"] == "science_small-0"
    assert len({it["id"] for it in items}) == len(items)


def test_science_row_trailing_assistant_turn_is_the_demo():
    row = {
        "messages": [
            {"role": "user", "content": "Q?\n\nA: 1\nB: 2"},
            {"role": "assistant", "content": "<answer>B</answer>"},
        ],
        "answer": "b",
    }
    item = science.row_to_item(row, 0, "train.jsonl")
    assert item["messages"] == [{"role": "user", "content": "Q?\n\nA: 1\nB: 2"}]
    assert item["demo"] == "<answer>B</answer>" and item["answer"] == "B"


@pytest.mark.parametrize("answer", [None, "", "  "])
def test_science_row_without_answer(answer):
    row = {"prompt": [{"role": "user", "content": "Q?"}]}
    if answer is not None:
        row["answer"] = answer
    with pytest.raises(DataError) as err:
        science.row_to_item(row, 6, "data/science_train.jsonl")
    msg = str(err.value)
    assert "data/science_train.jsonl" in msg and "row 7" in msg and "'answer'" in msg
    assert "fix the row or remove it" in msg


def test_science_row_with_option_text_as_answer():
    with pytest.raises(DataError, match="not an option letter"):
        science.row_to_item({"prompt": "Q?", "answer": "18.015"}, 0, "x.jsonl")


def test_science_row_without_prompt():
    with pytest.raises(DataError, match=r"row 1: field 'prompt'"):
        science.row_to_item({"answer": "A"}, 0, "x.jsonl")


def _science_items() -> list[dict]:
    from lightning_caopd.data.loading import read_jsonl

    return [science.row_to_item(r, i, SCIENCE) for i, r in enumerate(read_jsonl(SCIENCE))]


def test_science_task_adds_confidence_instruction_to_user_turn_only():
    task = science.ScienceTask()
    item = _science_items()[0]
    chat = task.student_messages(item)
    assert chat[0] == item["messages"][0]  # the system message as the dataset wrote it
    assert chat[1]["content"].startswith(item["messages"][1]["content"])
    assert chat[1]["content"].endswith(task.confidence_instruction)
    assert task.verify("<answer>A</answer>\nConfidence: 0.9", item) is (item["answer"] == "A")
    assert task.parse_answer("<answer>c</answer>") == "C"


def test_science_teacher_keeps_system_message_and_gets_the_demo_in_the_user_turn(
    make_cfg, tmp_path
):
    """The paper's code rebuilds the teacher prompt from messages[1] alone; ours keeps all."""
    cfg = make_cfg(["experiment=caopd_science", f"data.path={SCIENCE}"], tmp_path)
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
