"""The tool-use task (`lightning_caopd.tasks.tooluse`): parsing calls, verifying, rows, prompts."""

import doctest
import json
import time

import pytest

from lightning_caopd.data.loading import read_jsonl
from lightning_caopd.errors import DataError
from lightning_caopd.tasks import tooluse
from tests.fixtures.runs import FIXTURES

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


# --- adversarial completions: no exception escapes, linear time ---------------------------

MB = 1_000_000
CALL = "Action: a\nAction Input: "
# Each completion, and the first call it makes (None: no call with a parseable input).
ADVERSARIAL = {
    "objects nested 1000 deep": (CALL + '{"a": ' * 1000 + "1" + "}" * 1000, None),  # RecursionError
    "arrays nested 5000 deep": (CALL + '{"a": ' + "[" * 5000 + "]" * 5000 + "}", None),
    "a 5000-digit integer": (CALL + '{"a": ' + "9" * 5000 + "}", None),  # ValueError
    "a 1 MB integer": (CALL + '{"a": ' + "9" * MB + "}", None),
    "a 1 MB exponent": (CALL + '{"a": 1e' + "9" * MB + "}", ("a", {"a": float("inf")})),
    "unclosed braces": (CALL + "{" * MB, None),
    "an unclosed string": (CALL + '{"' + "x" * MB, None),
    "backslashes": (CALL + '{"q": "' + "\\" * MB + '"}', ("a", {"q": "\\" * (MB // 2)})),
    "a backslash before the quote": (CALL + '{"q": "' + "\\" * (MB + 1) + '"}', None),
    "actions without inputs": ("Action: a\n" * (MB // 10), None),
    "inputs without objects": ("Action: a\n" + "Action Input: {\n" * (MB // 16), None),
    "spaces after Action": ("Action" + " " * MB, None),
    "spaces around Action Input": ("Action: a\n" + " " * MB + "Action Input" + " " * MB, None),
    "many calls": ('Action: b\nAction Input: {"x": 1}\n' * (MB // 34), ("b", {"x": 1})),
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_completions_are_wrong_not_errors(name):
    text, first = ADVERSARIAL[name]
    gold = [{"Action": "a", "Action_Input": {"a": 1}}]
    start = time.process_time()  # CPU time: other work on a shared machine does not count
    results = [tooluse.verify(text, gold, strict) for strict in (False, True)]
    results += [tooluse.parse_first_call(text), tooluse.ToolUseTask().parse_answer(text)]
    assert time.process_time() - start < 2.0  # milliseconds here; minutes for a quadratic scan
    assert results[:3] == [False, False, first]
    assert (results[3] is None) is (first is None)


def test_nesting_limit():
    deepest = '{"a": ' * tooluse.MAX_NESTING + "1" + "}" * tooluse.MAX_NESTING
    assert tooluse.parse_first_call(CALL + deepest) is not None
    too_deep = '{"a": ' * tooluse.MAX_NESTING + "[1]" + "}" * tooluse.MAX_NESTING
    assert tooluse.parse_first_call(CALL + too_deep) is None
    # Braces and brackets inside strings are text, not nesting.
    assert tooluse.parse_first_call(CALL + '{"a": "' + "[{" * 500 + '"}') is not None


def test_any_error_json_raises_is_an_unparseable_input(monkeypatch):
    def overflow(text):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(tooluse.json, "loads", overflow)
    gold = [{"Action": "a", "Action_Input": {}}]  # an object: only the completion is decoded
    assert tooluse.parse_calls("Action: a\nAction Input: {}") == [("a", None)]
    assert not tooluse.verify("Action: a\nAction Input: {}", gold)


def test_parse_answer_of_a_lone_surrogate_can_be_saved():
    answer = tooluse.ToolUseTask().parse_answer('Action: a\nAction Input: {"q": "\\ud800 é"}')
    assert answer == 'a {"q": "\\ud800 \\u00e9"}'
    answer.encode("utf-8")  # completions.jsonl is UTF-8
    assert (
        tooluse.ToolUseTask().parse_answer('Action: a\nAction Input: {"q": "é"}') == 'a {"q": "é"}'
    )


def test_parse_time_grows_linearly():
    # Four times the text, about four times the time; a quadratic scan takes sixteen. The
    # least of three runs keeps a busy machine's noise out of the ratio.
    def seconds(text: str) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.process_time()
            tooluse.parse_calls(text)
            best = min(best, time.process_time() - start)
        return best

    def total(n: int) -> float:
        texts = ["Action: a\nAction Input: " + "{" * n, "Action: a\n" * (n // 10)]
        return sum(seconds(t) for t in texts)

    assert total(1_000_000) < 10 * total(250_000)


def test_doctests():
    result = doctest.testmod(tooluse)
    assert result.attempted > 0
    assert result.failed == 0


def test_a_golden_answer_nested_too_deep_is_refused_when_read():
    for depth in (150, 5000):  # past MAX_NESTING, and past the JSON parser's own limit
        value = '{"x": ' + "[" * depth + "]" * depth + "}"
        row = {"prompt": "p", "golden_answer": [{"Action": "a", "Action_Input": value}]}
        with pytest.raises(DataError, match="f.jsonl, row 1: field 'golden_answer' nests"):
            tooluse.row_to_item(row, 0, "f.jsonl")
