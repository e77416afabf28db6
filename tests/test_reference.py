"""The reference's evaluation protocol (eval.protocol=reference) against this project's rules.

Each case is a model output, written here, on which the released code's rule and this project's
disagree; it is scored both ways.
"""

import doctest
import json

import pytest

from lightning_caopd import reference
from lightning_caopd.confidence import parse_confidence, reference_reading
from lightning_caopd.scoring import reference_record
from lightning_caopd.tasks.science import ScienceTask
from lightning_caopd.tasks.tooluse import ToolUseTask

SCIENCE_ITEM = {
    "id": "s0",
    "messages": [
        {"role": "system", "content": "Answer in <answer> tags."},
        {"role": "user", "content": "Which? A: x B: y C: z D: w"},
    ],
    "answer": "B",
    "demo": "<answer>B</answer>",
    "category": "science",
}
TOOL_ITEM = {
    "id": "t0",
    "messages": [{"role": "user", "content": "Use the tools.\n\nBegin!\nQuestion: facts?"}],
    "answer": [{"Action": "getFacts", "Action_Input": "{}"}],
    "demo": "Action: getFacts\nAction Input: {}",
    "category": "tooluse",
}


# --- 1. prompts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("task, item", [(ScienceTask(), SCIENCE_ITEM), (ToolUseTask(), TOOL_ITEM)])
def test_reference_prompts_are_the_items_own_and_ours_carry_the_instruction(task, item):
    ours = task.eval_messages(item, "default")
    theirs = task.eval_messages(item, "reference")
    assert theirs == item["messages"]
    assert "Confidence" in ours[-1]["content"] and "Confidence" not in theirs[-1]["content"]
    assert ours == task.student_messages(item)  # training prompts keep the instruction


# --- 2. answer scoring --------------------------------------------------------------------------


def test_science_first_tag_in_evaluation_last_tag_in_training_and_ours():
    text = "<answer>A</answer> on reflection <answer>B</answer>\nConfidence: 0.6"
    assert reference.science_verdict(text, "B") == (False, "A")  # its eval: the first tag
    assert ScienceTask().verify(text, SCIENCE_ITEM)  # ours: the last
    assert ScienceTask(verifier="reference").verify(text, SCIENCE_ITEM)  # its training: the last


def test_science_decorated_letter_counts_for_ours_not_for_the_reference():
    text = "<answer>(B)</answer>"
    assert ScienceTask().verify(text, SCIENCE_ITEM)
    assert not ScienceTask(verifier="reference").verify(text, SCIENCE_ITEM)
    assert reference.science_verdict(text, "B") == (False, None)


def test_science_fallbacks_bare_letter_before_phrase():
    text = "The answer is C.\nOn second thought:\nb"
    assert reference.science_answer(text) == "B"  # a bare letter outranks the phrase
    assert ScienceTask(answer_format="lenient").parse_answer(text) == "C"  # ours: the phrase
    assert ScienceTask().parse_answer(text) is None  # ours requires the tag
    # an unclosed tag ending a line (a truncated output) is read by both evaluations
    assert reference.science_answer("<reasoning>..</reasoning>\n<answer> d \nConfidence") == "D"
    assert reference.science_answer("I think the answer is c") == "C"
    assert reference.science_answer("answer is a molecule") == "A"  # ours refuses a lowercase 'a'
    assert ScienceTask(answer_format="lenient").parse_answer("answer is a molecule") is None


def test_tooluse_missing_input_is_an_empty_object_for_the_reference():
    text = "Thought: no arguments needed\nAction: getFacts\nConfidence: 0.8"
    assert reference.tooluse_verdict(text, TOOL_ITEM["answer"])[0]
    assert ToolUseTask(verifier="reference").verify(text, TOOL_ITEM)
    assert not ToolUseTask().verify(text, TOOL_ITEM)  # ours: a call without an input object


def test_tooluse_invalid_json_is_compared_as_text_by_the_reference():
    golden = [{"Action": "search", "Action_Input": "{q: 1}"}]  # the golden input is not JSON
    text = "Action: search\nAction Input: {q: 1}"
    assert reference.tooluse_verdict(text, golden) == (
        True,
        {"Action": "search", "Action_Input": "{q: 1}"},
    )
    assert (
        reference.first_call('Action: s\nAction Input: {"a": [1, {"b": "}"}]}')["Action_Input"]
        == '{"a": [1, {"b": "}"}'
    )  # braces counted, strings not tracked: cut, kept as text


def test_tooluse_first_action_anywhere_versus_ours_at_a_line_start():
    text = "Thought: the action: none fits\nAction: getFacts\nAction Input: {}"
    assert reference.first_call(text)["Action"] == "none fits"
    assert not ToolUseTask(verifier="reference").verify(text, TOOL_ITEM)
    assert ToolUseTask().verify(text, TOOL_ITEM)
    assert reference.first_call("Action:   \n") == {"Action": "", "Action_Input": "{}"}
    assert reference.first_call("Action:\n\n") is None
    assert reference.first_call("no call") is None


def test_tooluse_reference_verifier_refuses_strict():
    with pytest.raises(ValueError, match="data.task.verifier=project"):
        ToolUseTask(strict=True, verifier="reference")
    with pytest.raises(ValueError, match="data.task.verifier"):
        ScienceTask(verifier="bogus")


# --- 3. which items the headline metrics cover ----------------------------------------------------


def test_confidence_unstated_is_zero_and_tags_are_not_clamped():
    assert reference_reading("<answer>B</answer>") == (False, 0.0)
    assert reference_reading("Confidence: 80") == (True, 1.0)  # clamped, not 0.8
    assert parse_confidence("Confidence: 80") == 0.8  # ours rescales
    assert reference_reading("<confidence>250</confidence>") == (True, 2.5)
    assert reference_reading("<confidence>high</confidence>") == (False, 0.0)
    assert reference_reading("Confidence: 0.85.") == (True, 0.85)  # it raises there
    assert reference_reading("<confidence>7") == (True, 0.7)


def test_headline_metrics_cover_all_items_and_valid_only_the_stated():
    # 4 items: right at 0.9, wrong at 0.6, right with no confidence (0.0), wrong with none
    block = reference.metrics(
        [True, False, True, False], [0.9, 0.6, 0.0, 0.0], [True, True, False, False], None
    )
    assert block["accuracy"] == 0.5 and block["n_samples"] == 4
    assert block["mean_confidence"] == pytest.approx(0.375)  # ours: 0.75 over the stated two
    assert block["brier_score"] == pytest.approx((0.01 + 0.36 + 1.0 + 0.0) / 4)
    # bins: 0.0 twice (acc 0.5), 0.6 (acc 0), 0.9 (acc 1)
    assert block["ece"] == pytest.approx(0.5 * 0.5 + 0.25 * 0.6 + 0.25 * 0.1)
    assert block["spr"] == pytest.approx(2 / 4)  # 0.9 > both wrongs; 0.0 beats neither
    assert block["overconfidence_gap"] == pytest.approx(0.375 - 0.5)
    assert block["confidence_format_adherence"] == 0.5
    assert "answer_parse_rate" not in block
    valid = block["valid_confidence_only"]
    assert valid["n_valid"] == 2 and valid["mean_confidence"] == pytest.approx(0.75)
    assert valid["spr"] == 1.0 and valid["accuracy"] == 0.5
    # 0.6 falls in the bin below (linspace gives 0.6000000000000001 as its edge)
    assert [b["count"] for b in block["bin_stats"]] == [2, 0, 0, 0, 0, 1, 0, 0, 0, 1]


def test_reference_bins_put_point_three_below_and_valid_block_needs_two():
    block = reference.metrics([True], [0.3], [True], [True])
    assert block["bin_stats"][2]["count"] == 1  # linspace/digitize: 0.3 falls in [0.2, 0.3)
    assert "valid_confidence_only" not in block and block["answer_parse_rate"] == 1.0
    assert reference.metrics([], [], []) == {"n_samples": 0, "n_bins": 10}


def test_reference_record_and_block_from_records():
    task = ScienceTask()
    texts = ["<answer>B</answer>\nConfidence: 0.9", "<answer>C</answer>", "nothing"]
    records = [{"reference": reference_record(task, t, SCIENCE_ITEM)} for t in texts]
    assert records[0]["reference"] == {
        "correct": True,
        "parsed": "B",
        "format_ok": True,
        "confidence": 0.9,
    }
    block = reference.block(records, answer_rate=True)
    assert block["answer_parse_rate"] == pytest.approx(2 / 3)
    assert block["accuracy"] == pytest.approx(1 / 3)
    json.dumps(block)  # JSON-ready


def test_every_rule_is_linear_in_the_completion():
    huge = "Action:" + " " * 200_000 + "answer" + " " * 200_000 + "<answer>" * 20_000
    reference.science_answer(huge)
    reference.science_training_answer(huge)
    reference.first_call(huge)
    reference_reading(huge)


def test_doctests():
    assert doctest.testmod(reference).failed == 0
