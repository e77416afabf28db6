"""The science task (`lightning_caopd.tasks.science`): answer extraction, rows, prompts, teacher."""

import doctest
import time

import pytest
from hydra.utils import instantiate

from lightning_caopd.data.loading import read_jsonl
from lightning_caopd.errors import ConfigError, DataError
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
        ("<ANSWER>c</Answer>", "C"),  # tags in any case
        ("<answer>x <answer>B</answer>", "B"),  # the innermost opening pairs
        ("<answer>A</answer></answer>", "A"),  # a stray closing tag
        ("<answer>A</answer>\n<answer>B", "A"),  # the unclosed tag is no tag
    ],
)
def test_science_tags(completion, expected):
    assert science.extract_answer(completion) == expected
    assert science.extract_answer(completion, answer_format="lenient") == expected


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
def test_science_fallbacks_only_in_lenient_format(completion, expected):
    assert science.extract_answer(completion, answer_format="lenient") == expected
    assert science.extract_answer(completion) is None  # "tag", the default: no closed tag
    assert not science.verify(completion, expected)
    assert science.verify(completion, expected, answer_format="lenient")


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
    assert science.extract_answer(completion, answer_format="lenient") is None


def test_science_fallbacks_only_without_closed_tag():
    text = "<answer>A</answer>\nThe answer is B.\nC"
    assert science.extract_answer(text, answer_format="lenient") == "A"


@pytest.mark.parametrize(
    "completion, letter", [("c\n", "C"), ("C", "C"), ("b.\nConfidence: 0.9", "B"), ("(a)", "A")]
)
def test_a_bare_letter_is_no_answer_in_the_tag_format(completion, letter):
    """A format-less student must not earn rollout accuracy (and P_acc) by chance."""
    assert not science.ScienceTask().verify(completion, {"answer": letter})
    assert science.ScienceTask().parse_answer(completion) is None
    lenient = science.ScienceTask(answer_format="lenient")
    assert lenient.verify(completion, {"answer": letter})
    assert lenient.parse_answer(completion) == letter


def test_science_unknown_answer_format_is_refused():
    with pytest.raises(ConfigError, match=r"answer_format='strict' is out of.*'tag', 'lenient'"):
        science.ScienceTask(answer_format="strict")
    with pytest.raises(ConfigError, match="data.task.verifier='mine' is out of range"):
        science.ScienceTask(verifier="mine")
    with pytest.raises(ConfigError, match="data.task.answer_format"):
        science.extract_answer("<answer>A</answer>", answer_format="Tag")


def test_science_config_exposes_the_answer_format(make_cfg, tmp_path):
    cfg = make_cfg(["experiment=science", "method=caopd", f"data.path={SCIENCE}"], tmp_path)
    task = instantiate(cfg.data.task)
    assert task.answer_format == "tag" and task.verifier == "reference"  # the preset's
    overrides = [
        "experiment=science",
        "method=caopd",
        f"data.path={SCIENCE}",
        "data.task.verifier=project",
    ]
    cfg = make_cfg([*overrides, "data.task.answer_format=lenient"], tmp_path)
    assert instantiate(cfg.data.task).verify("The answer is B.", {"answer": "B"})


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
    cfg = make_cfg(["experiment=science", "method=caopd", f"data.path={SCIENCE}"], tmp_path)
    task, template = instantiate(cfg.data.task), instantiate(cfg.method.template)
    item = next(it for it in _science_items() if "Water is H2O" in it["demo"])  # a training row
    student = task.student_messages(item)
    context, _ = template.context(item, [], [])
    teacher = template.messages(student, context)
    assert [m["role"] for m in teacher] == ["system", "user"]
    assert teacher[0] == student[0] == item["messages"][0]
    assert teacher[1]["content"].startswith(student[1]["content"])  # question + instruction
    assert item["demo"] in teacher[1]["content"]
    # the reference appends no confidence line to the science demonstration (tool use: 1.00)
    assert "Confidence: 1.00" not in teacher[1]["content"]
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


# --- adversarial completions: linear time, no answer --------------------------------------

MB = 1_000_000
ADVERSARIAL = {
    "opening tag, spaces": ("<answer>" + " " * MB, None),
    "label, spaces, a digit": ("answer:" + " " * MB + "1", None),
    "phrase, spaces": ("The answer is" + " " * MB + "!", None),
    "phrase, option, spaces": ("answer is option" + " " * MB + "!", None),
    "phrase, parenthesis, spaces": ("answer is (" + " " * MB, None),
    "unclosed tags": ("<answer>" * (MB // 8), None),
    "unclosed tags, then a letter": ("<answer>" * (MB // 8) + "B", None),
    "opening tags, one closing": ("<answer>" * (MB // 8) + "B</answer>", "B"),
    "closing tags only": ("</answer>" * (MB // 9), None),
    "tag pairs": ("<answer>A</answer>" * (MB // 18), "A"),
    "tag, spaces around the letter": ("<answer>" + " " * MB + "c" + " " * MB + "</answer>", "C"),
    "tag, spaces and stars": ("<answer>" + " *" * (MB // 2) + "x</answer>", None),
    "confidence lines in a tag": ("<answer>" + "Confidence: 1\n" * (MB // 14) + "</answer>", None),
    "repeated phrases": ("answer: " * (MB // 8), None),
    "newlines": ("\n" * MB, None),
    "spaces": (" " * MB, None),
}


def _cpu_seconds(fn, *args) -> float:
    """CPU time of one call (process time: other work on a shared machine does not count)."""
    start = time.process_time()
    fn(*args)
    return time.process_time() - start


@pytest.mark.parametrize("answer_format", ["tag", "lenient"])
@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_completions_are_verified_quickly(name, answer_format):
    # The old verifier took 8 s on 800 spaces after <answer> and 18 s on 1000 after
    # "answer:"; these are a megabyte and take milliseconds. 2 s of CPU is far from both.
    text, expected = ADVERSARIAL[name]
    assert _cpu_seconds(science.verify, text, "A", answer_format) < 2.0
    if answer_format == "tag" or expected is not None:
        assert science.extract_answer(text, answer_format) == expected


def test_verify_time_grows_linearly():
    # Four times the text, about four times the time; the old verifier's runs of spaces grew
    # with the cube. The least of three runs keeps a busy machine's noise out of the ratio.
    def total(n: int) -> float:
        texts = ["<answer>" + " " * n, "answer:" + " " * n + "1", "<answer>" * (n // 8)]
        return sum(
            min(_cpu_seconds(science.verify, t, "A", "lenient") for _ in range(3)) for t in texts
        )

    assert total(1_000_000) < 10 * total(250_000)


def test_doctests():
    result = doctest.testmod(science)
    assert result.attempted > 0
    assert result.failed == 0


REFERENCE_ROW = {  # the reference's training format: messages + output_text, no answer
    "messages": [
        {"role": "system", "content": "Answer with <answer>X</answer>."},
        {"role": "user", "content": "Which option?"},
    ],
    "output_text": "<reasoning>Not <answer>A</answer>.</reasoning>\n<answer>C</answer>",
}


def test_reference_training_row_takes_its_answer_from_the_last_answer_tag():
    item = science.row_to_item(REFERENCE_ROW, 0, "train.jsonl")
    assert item["answer"] == "C"
    assert item["demo"] == REFERENCE_ROW["output_text"]
    assert [m["role"] for m in item["messages"]] == ["system", "user"]
    assert item[science.ANSWER_FROM_DEMO] is True
    with_answer = science.row_to_item({**REFERENCE_ROW, "answer": "B"}, 0, "train.jsonl")
    assert with_answer["answer"] == "B" and science.ANSWER_FROM_DEMO not in with_answer


@pytest.mark.parametrize("demo", [None, "<reasoning>no tag</reasoning>"])
def test_row_with_neither_answer_nor_answer_tag_is_an_error_naming_it(demo):
    row = {**REFERENCE_ROW, "output_text": demo}
    with pytest.raises(DataError) as err:
        science.row_to_item(row, 4, "train.jsonl")
    message = str(err.value)
    assert "train.jsonl" in message and "5" in message  # the source and the 1-based row
    assert "answer" in message and "output_text" in message
