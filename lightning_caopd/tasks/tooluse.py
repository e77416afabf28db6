"""Tool use (ToolAlpaca): the model picks an API call in the Thought/Action format.

A completion reads::

    Thought: I need to look up the rates.
    Action: getExchangeRates
    Action Input: {"base": "USD", "symbols": "CAD"}
    Confidence: 0.8

Parsing rules (`parse_calls`):

* A call starts at a line ``Action: name`` (any case; the name stripped of spaces, backticks,
  quotes and markdown ``*``). Its input is the JSON object after the next ``Action Input:``
  that comes before the next ``Action:`` line; a ```` ```json ```` fence may open it.
* The object is cut out by scanning braces while tracking JSON strings and their escapes, so
  ``{"q": "a } b"}`` and nested objects work, then parsed with `json.loads`. A missing,
  unbalanced or invalid object gives the call the input ``None``; so does an object nested
  more than `MAX_NESTING` levels deep (no API takes one, and deeper ones run into Python's
  recursion limit) and anything else `json.loads` refuses, such as an integer of more than
  4300 digits. Nothing the model writes raises: every rule runs in time linear in the
  completion and every error is a call without an input.

Scoring (`verify`) follows the paper (CaOPD, arXiv 2604.16830; ToolAlpaca): the first
predicted call must name the first golden action and carry an equal input, compared as parsed
JSON (key order and spacing ignored; an empty golden input means ``{}``). ``strict=True``
instead requires the whole sequence of calls to match one to one. Unlike the paper's scorer,
a call whose input is not valid JSON never scores, even against an empty golden input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from lightning_caopd import reference
from lightning_caopd.checks import check_bool
from lightning_caopd.data.loading import row_error
from lightning_caopd.errors import ConfigError, DataError
from lightning_caopd.tasks.base import Task, check_verifier, last_user_index

MAX_NESTING = 100
# Possessive quantifiers (`*+`) never re-split a run of spaces; each run is followed by a
# character it cannot match, so they accept what the plain forms accept.
_ACTION = re.compile(r"^[ \t>*_]*+Action[ \t*_]*+:[ \t]*+(.*)$", re.MULTILINE | re.IGNORECASE)
_ACTION_INPUT = re.compile(r"Action[ _]Input[ \t*_]*+:", re.IGNORECASE)
_FENCE = re.compile(r"\s*(?:```(?:json)?)?\s*", re.IGNORECASE)
_NAME_JUNK = " \t`'\"*_"


def _scan_object(text: str, start: int, end: int) -> str | None:
    """The balanced ``{...}`` in ``text[start:end]`` opening at `start`.

    Returns:
        The object's text, or None when the braces do not close before `end` or objects and
        arrays nest more than `MAX_NESTING` deep.
    """
    depth, nesting, in_string, escaped = 0, 0, False, False
    for i in range(start, end):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += ch == "{"
            nesting += 1
            if nesting > MAX_NESTING:
                return None
        elif ch in "}]":
            nesting -= 1
            if ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start : i + 1]
    return None


def _parse_input(text: str, pos: int, end: int) -> object:
    """The JSON object after the first ``Action Input:`` in ``text[pos:end]``, or None."""
    label = _ACTION_INPUT.search(text, pos, end)
    if label is None:
        return None
    brace = _FENCE.match(text, label.end(), end).end()
    if brace >= end or text[brace] != "{":
        return None
    # JSON strings cannot hold raw newlines, so no real object runs past the next Action line.
    raw = _scan_object(text, brace, end)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        # ValueError: invalid JSON, or an integer longer than Python converts (4300 digits);
        # RecursionError: nesting within MAX_NESTING, but the caller's stack was already deep.
        return None


def _iter_calls(completion: str) -> Iterator[tuple[str, object]]:
    """The calls of `parse_calls`, one at a time (scoring the first reads no further).

    Each call's text runs from its ``Action:`` line to the next one, so the text is read
    once, in order.
    """
    action = _ACTION.search(completion)
    while action is not None:
        following = _ACTION.search(completion, action.end())
        end = following.start() if following else len(completion)
        yield action.group(1).strip(_NAME_JUNK), _parse_input(completion, action.end(), end)
        action = following


def parse_calls(completion: str) -> list[tuple[str, object]]:
    """Every ``Action`` / ``Action Input`` call, in order.

    Args:
        completion: the model's response.

    Returns:
        ``(name, input)`` pairs; ``input`` is the parsed JSON object, or None when the call
        has no parseable ``Action Input`` object.
    """
    return list(_iter_calls(completion))


def parse_first_call(completion: str) -> tuple[str, object] | None:
    """The first call, or None when there is no action or its input is not a JSON object.

    Args:
        completion: the model's response.

    Returns:
        ``(action_name, parsed_input)`` or None.

    Examples:
        >>> parse_first_call('Action: search\\nAction Input: {"q": "a } b", "n": {"k": 1}}')
        ('search', {'q': 'a } b', 'n': {'k': 1}})
    """
    first = next(_iter_calls(completion), None)
    return None if first is None or first[1] is None else first


def _nesting(value: object) -> int:
    """How deep objects and arrays nest in a parsed JSON value (iterative: no recursion)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            if depth > MAX_NESTING:
                return depth
            stack.extend((v, depth) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def _golden_input(value) -> object:
    """A golden ``Action_Input`` (JSON text or an object) as a parsed object."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise ValueError(f"an Action_Input must be a JSON object, not {type(value).__name__}")
    return value


def golden_calls(golden_answer: list[dict] | dict | str) -> list[tuple[str, object]]:
    """The golden calls as ``(action, parsed_input)`` pairs.

    Args:
        golden_answer: a list of ``{"Action": name, "Action_Input": json_text_or_object}``,
            one such dict, or either of those encoded as a JSON string.

    Returns:
        The calls in order.

    Raises:
        DataError: the golden answer is malformed.
    """
    try:
        if isinstance(golden_answer, str):
            golden_answer = json.loads(golden_answer)
        if isinstance(golden_answer, dict):
            golden_answer = [golden_answer]
        if not isinstance(golden_answer, list) or not golden_answer:
            raise ValueError("expected a non-empty list of calls")
        calls = []
        for call in golden_answer:
            action = call.get("Action") if isinstance(call, dict) else None
            if not isinstance(action, str) or not action.strip():
                raise ValueError(f"a call has no Action name: {call!r}"[:120])
            calls.append((action.strip(), _golden_input(call.get("Action_Input"))))
    except (ValueError, AttributeError) as err:
        raise DataError(
            f"Malformed golden_answer ({err}). It must be a list of "
            '{"Action": name, "Action_Input": JSON object or its text}.'
        ) from None
    return calls


def _same_json(a: object, b: object) -> bool:
    """JSON equality: dict key order ignored, but ``true`` is not ``1``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def _same_call(pred: tuple[str, object], gold: tuple[str, object]) -> bool:
    return pred[0] == gold[0] and pred[1] is not None and _same_json(pred[1], gold[1])


def verify(completion: str, golden_answer: list[dict] | str, strict: bool = False) -> bool:
    """Whether the completion makes the golden call(s).

    Args:
        completion: the model's response.
        golden_answer: see `golden_calls`.
        strict: require every golden call, in order, and no other call; by default only the
            first call is scored, as in the paper.

    Returns:
        True when the calls match.

    Raises:
        DataError: the golden answer is malformed (never for a malformed completion).
    """
    gold = golden_calls(golden_answer)
    if strict:
        pred = parse_calls(completion)
        return len(pred) == len(gold) and all(map(_same_call, pred, gold))
    first = parse_first_call(completion)
    return first is not None and _same_call(first, gold[0])


def demo_from_golden(golden_answer: list[dict] | str) -> str:
    """A minimal demonstration of the golden calls in the Thought/Action/Action Input format.

    Args:
        golden_answer: see `golden_calls`.

    Returns:
        One ``Thought`` / ``Action`` / ``Action Input`` block per call, joined by newlines.
    """
    blocks = [
        f"Thought: I should call {name}.\nAction: {name}\n"
        f"Action Input: {json.dumps(value, ensure_ascii=False)}"
        for name, value in golden_calls(golden_answer)
    ]
    return "\n".join(blocks)


def row_to_item(row: dict, index: int, source: str) -> dict:
    """Normalise one raw ToolAlpaca row into an item.

    Args:
        row: the raw row: ``prompt`` (tool documentation and question), ``golden_answer``
            and, in training rows, ``golden_response`` (a list of steps or one string).
        index: its 0-based position in `source` (messages give it 1-based).
        source: the file or dataset name it came from, for error messages.

    Returns:
        ``{"id", "messages", "answer", "demo", "category"}``; ``answer`` is the golden list
        of ``{"Action", "Action_Input"}`` dicts, decoded from JSON text when it came as a
        string; ``demo`` is ``golden_response`` joined by newlines, or `demo_from_golden`.

    Raises:
        DataError: the prompt or the golden answer is missing or malformed.
    """
    golden = row.get("golden_answer")
    if golden is None or golden == "" or golden == []:
        raise row_error(
            source,
            index,
            "golden_answer",
            "is missing or empty",
            'Every row needs the expected calls, e.g. [{"Action": "getX", "Action_Input": '
            '"{}"}]; fix the row or remove it.',
        )
    try:
        calls = golden_calls(golden)
    except DataError as err:
        raise row_error(source, index, "golden_answer", "is malformed", str(err)) from None
    except RecursionError:  # nested past the JSON parser's limit
        calls = None
    if calls is None or any(_nesting(value) > MAX_NESTING for _, value in calls):
        raise row_error(
            source,
            index,
            "golden_answer",
            f"nests objects and arrays more than {MAX_NESTING} deep",
            "No API takes such an input, and scoring it would exhaust Python's recursion "
            "limit; fix the row or remove it.",
        )
    if isinstance(golden, str):
        golden = json.loads(golden)
    if isinstance(golden, dict):
        golden = [golden]
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise row_error(
            source,
            index,
            "prompt",
            "is missing or not a string",
            'Give the tool documentation and question as one string under "prompt".',
        )
    response = row.get("golden_response")
    if isinstance(response, list):
        response = "\n".join(str(step) for step in response)
    if not isinstance(response, str) or not response.strip():
        response = demo_from_golden(golden)
    return {
        "id": str(row["id"]) if row.get("id") is not None else f"{Path(source).stem}-{index}",
        "messages": [{"role": "user", "content": prompt}],
        "answer": golden,
        "demo": response,
        "category": "tooluse",
    }


CONFIDENCE_INSTRUCTION = (
    "Confidence: your confidence level (0.0-1.0) regarding the success of this action, must "
    "be in numerical format, no other words or explanation."
)
_BEGIN = "\n\nBegin!"


class ToolUseTask(Task):
    """Tool use (ToolAlpaca) as a `Task`: one API call in the Thought/Action format.

    As in the paper's code (CaOPD, arXiv 2604.16830), the confidence instruction joins the
    format list just before ``Begin!``, so it reads as one more line of the response format;
    a prompt without ``Begin!`` gets it at the end.

    Args:
        confidence_instruction: the confidence line of the response format.
        strict: score every call in order (see `verify`) instead of the first call only.
        verifier: ``"project"`` (`verify`) or ``"reference"``: the released code's scorer,
            which decides its P_acc and its evaluation (`lightning_caopd.reference.
            tooluse_verdict`: a missing input is ``{}``, an input that is not JSON is compared
            as text, the name is the rest of the first ``Action:`` line).

    Raises:
        ConfigError: `verifier` is not one of its choices, or `strict` with the reference's.
    """

    categories = ("tooluse",)

    def __init__(
        self,
        confidence_instruction: str = CONFIDENCE_INSTRUCTION,
        strict: bool = False,
        verifier: str = "project",
    ) -> None:
        super().__init__(confidence_instruction)
        check_verifier(verifier)
        check_bool("data.task.strict", strict)
        if strict and verifier == "reference":
            raise ConfigError(
                "data.task.strict=true scores every call, the reference's verifier the first "
                "only: set data.task.verifier=project to score every call."
            )
        self.strict = strict
        self.verifier = verifier

    def student_messages(self, item: dict) -> list[dict]:
        """The item's chat with the confidence instruction before ``Begin!`` in the user turn."""
        out = [dict(m) for m in item["messages"]]
        if not self.confidence_instruction:
            return out
        last_user = last_user_index(out)
        text = out[last_user]["content"]
        if _BEGIN in text:
            text = text.replace(_BEGIN, f"\n{self.confidence_instruction}{_BEGIN}", 1)
        else:
            text = f"{text}\n{self.confidence_instruction}"
        out[last_user]["content"] = text
        return out

    def parse_answer(self, completion: str) -> str | None:
        """The first call as ``name {json input}``, or None (see `parse_first_call`).

        The input is written as UTF-8-safe JSON: a lone surrogate (``\\ud800`` escaped in the
        model's JSON) stays escaped, so the record can be saved to ``completions.jsonl``.
        """
        call = parse_first_call(completion)
        if call is None:
            return None
        text = json.dumps(call[1], sort_keys=True, ensure_ascii=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = json.dumps(call[1], sort_keys=True)  # every non-ASCII character escaped
        return f"{call[0]} {text}"

    def verify(self, completion: str, item: dict) -> bool:
        """See `verify` (the module function) with the item's golden calls, or the reference's."""
        if self.verifier == "reference":
            return self.reference_verdict(completion, item)[0]
        return verify(completion, item["answer"], strict=self.strict)

    def reference_verdict(self, completion: str, item: dict) -> tuple[bool, dict | None]:
        """The reference's scorer (`lightning_caopd.reference.tooluse_verdict`)."""
        return reference.tooluse_verdict(completion, item["answer"])
