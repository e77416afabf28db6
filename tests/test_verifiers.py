import json
from pathlib import Path

import pytest

from lightning_caopd.data.loading import read_jsonl
from lightning_caopd.errors import DataError
from lightning_caopd.tasks import science, tooluse

FIXTURES = Path(__file__).parent / "fixtures"


# --- science -----------------------------------------------------------------------------


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


# --- tool use ------------------------------------------------------------------------------

GOLD = [{"Action": "getExchangeRates", "Action_Input": '{"base": "USD", "symbols": "CAD"}'}]


def test_parse_first_call_nested_and_braces_in_strings():
    completion = (
        "Thought: report it.\nAction: reportAbusiveIP\n"
        'Action Input: {"ip": "1.2.3.4", "meta": {"tags": ["a}", "{b"]}, "note": "say \\"}\\""}\n'
        "Observation: done"
    )
    name, value = tooluse.parse_first_call(completion)
    assert name == "reportAbusiveIP"
    assert value == {"ip": "1.2.3.4", "meta": {"tags": ["a}", "{b"]}, "note": 'say "}"'}


def test_parse_calls_in_order_with_broken_one():
    completion = (
        'Action: a\nAction Input: {"x": 1}\nObservation: ok\n'
        "Action: b\nAction Input: {x: 1}\n"  # not JSON
        "Action: c\n"  # no input at all
        "Action: `d`\nAction Input: ```json\n{}\n```\n"
        '**action:** e\naction input: {"y": [1]}'
    )
    assert tooluse.parse_calls(completion) == [
        ("a", {"x": 1}),
        ("b", None),
        ("c", None),
        ("d", {}),
        ("e", {"y": [1]}),
    ]


@pytest.mark.parametrize(
    "completion",
    [
        "Thought: I know the answer.\nFinal Answer: 42",  # no action
        'Action: getExchangeRates\nAction Input: {"base": "USD", "symbols": }',  # malformed
        'Action: getExchangeRates\nAction Input: {"base": "USD"',  # unbalanced
        "Action: getExchangeRates\nObservation: nothing",  # no Action Input
        # The input below belongs to the second action, not the first.
        'Action: getExchangeRates\nAction: other\nAction Input: {"base": "USD"}',
    ],
)
def test_parse_first_call_none(completion):
    assert tooluse.parse_first_call(completion) is None
    assert not tooluse.verify(completion, GOLD)


def test_verify_reordered_keys_and_spacing():
    completion = (
        "Thought: rates.\nAction: getExchangeRates\n"
        'Action Input: {"symbols":"CAD",\n  "base" :  "USD"}'
    )
    assert tooluse.verify(completion, GOLD)


def test_verify_wrong_action_or_input():
    assert not tooluse.verify(
        'Action: convertCurrency\nAction Input: {"base": "USD", "symbols": "CAD"}', GOLD
    )
    assert not tooluse.verify(
        'Action: getExchangeRates\nAction Input: {"base": "USD", "symbols": "JPY"}', GOLD
    )
    # An extra key, and a JSON type change, are different inputs.
    assert not tooluse.verify(
        'Action: getExchangeRates\nAction Input: {"base": "USD", "symbols": "CAD", "x": 1}', GOLD
    )
    gold = [{"Action": "a", "Action_Input": '{"flag": 1}'}]
    assert not tooluse.verify('Action: a\nAction Input: {"flag": true}', gold)
    assert tooluse.verify('Action: a\nAction Input: {"flag": 1.0}', gold)


def test_verify_golden_as_json_string_and_dict_inputs():
    as_text = json.dumps(GOLD)
    completion = 'Action: getExchangeRates\nAction Input: {"base": "USD", "symbols": "CAD"}'
    assert tooluse.verify(completion, as_text)
    as_dict = [{"Action": "getExchangeRates", "Action_Input": {"symbols": "CAD", "base": "USD"}}]
    assert tooluse.verify(completion, as_dict)


@pytest.mark.parametrize("golden_input", ["{}", "", "  ", None, {}])
def test_verify_empty_input(golden_input):
    gold = [{"Action": "listCountries", "Action_Input": golden_input}]
    assert tooluse.verify("Action: listCountries\nAction Input: {}", gold)
    assert not tooluse.verify('Action: listCountries\nAction Input: {"x": 1}', gold)


MULTI = [
    {"Action": "getExchangeRates", "Action_Input": '{"base": "SGD", "symbols": "USD"}'},
    {"Action": "convertCurrency", "Action_Input": '{"from": "SGD", "to": "USD", "amount": 340}'},
]
RATES = 'Action: getExchangeRates\nAction Input: {"base": "SGD", "symbols": "USD"}\n'
CONVERT = 'Action: convertCurrency\nAction Input: {"amount": 340, "from": "SGD", "to": "USD"}\n'


def test_verify_strict_several_calls():
    right = f"Thought: rates first.\n{RATES}Observation: 0.74\nThought: now convert.\n{CONVERT}"
    assert tooluse.verify(right, MULTI, strict=True)
    assert not tooluse.verify(CONVERT + RATES, MULTI, strict=True)  # wrong order
    assert not tooluse.verify(RATES, MULTI, strict=True)  # missing call
    assert not tooluse.verify(RATES + CONVERT + CONVERT, MULTI, strict=True)  # one too many
    # The default scores only the first call, as the paper does.
    assert tooluse.verify(RATES, MULTI)
    assert not tooluse.verify(CONVERT + RATES, MULTI)


def test_demo_from_golden_verifies():
    demo = tooluse.demo_from_golden(MULTI)
    assert demo.count("Action Input:") == 2 and demo.startswith("Thought: ")
    assert tooluse.verify(demo, MULTI, strict=True)
    assert tooluse.demo_from_golden(json.dumps(MULTI)) == demo


@pytest.mark.parametrize(
    "golden",
    [[], "not json", [{"Action_Input": "{}"}], [{"Action": "a", "Action_Input": "{bad"}]],
)
def test_malformed_golden_is_a_data_error(golden):
    with pytest.raises(DataError, match="golden_answer"):
        tooluse.verify("Action: a\nAction Input: {}", golden)


def test_tooluse_rows_from_fixture():
    rows = read_jsonl(FIXTURES / "tooluse_small.jsonl")
    items = [tooluse.row_to_item(r, i, "tooluse_small.jsonl") for i, r in enumerate(rows)]
    assert len(items) == 5
    for item, row in zip(items, rows, strict=True):
        assert item["messages"] == [{"role": "user", "content": row["prompt"]}]
        assert item["category"] == "tooluse"
        assert item["answer"] == row["golden_answer"]
        assert tooluse.verify(item["demo"], item["answer"])
    assert len(items[2]["answer"]) == 2
    assert tooluse.verify(items[2]["demo"], items[2]["answer"], strict=True)
    assert items[4]["demo"] == "\n".join(rows[4]["golden_response"])


def test_tooluse_row_golden_as_text_is_decoded():
    item = tooluse.row_to_item({"prompt": "Q", "golden_answer": json.dumps(GOLD)}, 0, "x.jsonl")
    assert item["answer"] == GOLD


def test_tooluse_row_without_golden():
    with pytest.raises(DataError) as err:
        tooluse.row_to_item({"prompt": "Q"}, 2, "tools.jsonl")
    msg = str(err.value)
    assert "tools.jsonl" in msg and "row 3" in msg and "'golden_answer'" in msg
