"""Science: chemistry multiple choice (SciKnowEval), answered with an option letter.

Completions follow the paper's system prompt (CaOPD, arXiv 2604.16830, Sec. 5)::

    <reasoning>...</reasoning>
    <answer>B</answer>
    Confidence: 0.8

`extract_answer` owns the parsing rules:

1. **Closed tags.** The *last* ``<answer>X</answer>`` wins (a model may echo the format or
   revise itself). ``X`` is one letter, any case, spaces and newlines allowed, optionally
   ``(B)``, ``B)``, ``B.`` or markdown ``**B**``; a ``Confidence: ...`` line inside the tag
   is ignored. If the last tag holds anything else the answer is ``None``: the model's final
   statement is not a letter, and earlier statements are not used.
2. **Fallbacks**, only when no closed tag exists, in this order:

   a. an unclosed ``<answer>X`` ending the text (a truncated rollout);
   b. ``answer is X`` / ``Answer: X`` (also ``answer is option (X)``), the last one. A
      lowercase ``x`` counts only in parentheses or before punctuation or a line end, so
      ``the answer is a molecule ...`` is no answer;
   c. a letter alone on the last non-empty line.

   Trailing ``Confidence: ...`` lines are not part of the answer and are skipped first.

The paper's own scorer takes the first tag and tries the bare letter before the phrase; the
last-tag rule here matches how the confidence parser reads the final statement.
"""

from __future__ import annotations

import re
from pathlib import Path

from lightning_caopd.data.loading import row_error
from lightning_caopd.tasks.base import Task

_CHOICE = re.compile(r"\s*[*_]*\s*\(?\s*([A-Za-z])\s*\)?\s*[.:]?\s*[*_]*\s*")
# The innermost <answer>...</answer>: no second opening tag inside.
_TAG = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.IGNORECASE | re.DOTALL)
_OPEN = "<answer>"
_PHRASE = re.compile(
    r"\banswer\b(?:\s*[*_]*\s*:|\s+is\b\s*:?)\s*[*_]*\s*(?:option\s+)?(\()?\s*([A-Za-z])\b",
    re.IGNORECASE,
)
_AFTER_LOWERCASE = re.compile(r"\s*\)|[ \t]*(?:[.,;:!\]*_]|$)", re.MULTILINE)
_CONFIDENCE_LINE = re.compile(r"^\s*[*_]*\s*(?:confidence\b|<confidence>)", re.IGNORECASE)


def _drop_confidence(text: str) -> str:
    """`text` without its trailing blank and ``Confidence`` lines."""
    lines = text.splitlines()
    while lines and (not lines[-1].strip() or _CONFIDENCE_LINE.match(lines[-1])):
        lines.pop()
    return "\n".join(lines)


def _choice(text: str) -> str | None:
    """The letter if `text` is nothing but one (decorated) letter, else None."""
    lines = [ln for ln in text.splitlines() if not _CONFIDENCE_LINE.match(ln)]
    m = _CHOICE.fullmatch("\n".join(lines))
    return m.group(1).upper() if m else None


def _from_phrase(text: str) -> str | None:
    """The letter of the last ``answer is X`` / ``Answer: X`` that names a letter."""
    found = None
    for m in _PHRASE.finditer(text):
        paren, letter = m.group(1), m.group(2)
        if letter.isupper() or paren or _AFTER_LOWERCASE.match(text, m.end()):
            found = letter.upper()
    return found


def extract_answer(completion: str) -> str | None:
    """The option letter a completion states, uppercase, or None.

    Args:
        completion: the model's response.

    Returns:
        The letter, following the rules in the module docstring, or None.

    Examples:
        >>> extract_answer("<answer>A</answer> wait, no: <answer> (c) </answer>")
        'C'
        >>> extract_answer("The answer is D.\\nConfidence: 0.7")
        'D'
    """
    tags = _TAG.findall(completion)
    if tags:
        return _choice(tags[-1])
    text = _drop_confidence(completion)
    start = text.lower().rfind(_OPEN)
    if start >= 0:
        letter = _choice(text[start + len(_OPEN) :])
        if letter:
            return letter
    letter = _from_phrase(text)
    if letter:
        return letter
    last_line = text.strip().rsplit("\n", 1)[-1] if text.strip() else ""
    return _choice(last_line) if last_line.strip() else None


def verify(completion: str, answer: str) -> bool:
    """Whether the completion states the ground-truth letter.

    Args:
        completion: the model's response.
        answer: the correct letter (any case, surrounding spaces ignored).

    Returns:
        True when `extract_answer` finds exactly that letter.
    """
    return extract_answer(completion) == answer.strip().upper()


def demo_from_answer(answer: str) -> str:
    """A minimal demonstration for a row that carries none, in the system prompt's format.

    Args:
        answer: the correct letter.

    Returns:
        For ``"b"``: ``"<reasoning>The correct option is B.</reasoning>\\n<answer>B</answer>"``.
    """
    letter = answer.strip().upper()
    return f"<reasoning>The correct option is {letter}.</reasoning>\n<answer>{letter}</answer>"


def _chat(value, source: str, index: int, field: str) -> list[dict]:
    """A chat list (or a bare string as one user turn) as plain ``{role, content}`` dicts."""
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )
    if not ok:
        raise row_error(
            source,
            index,
            field,
            "is not a chat list",
            'It must be a non-empty list of {"role": ..., "content": ...} messages.',
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _raw_answer(row: dict):
    """The answer field; the paper's ``[{"Answer": "B"}]`` ground-truth form is accepted."""
    raw = row.get("answer")
    if isinstance(raw, list) and raw and isinstance(raw[0], dict):
        raw = raw[0]
    if isinstance(raw, dict):
        raw = raw.get("Answer")
    return raw


def row_to_item(row: dict, index: int, source: str) -> dict:
    """Normalise one raw science row into an item.

    Evaluation rows carry ``prompt`` (a chat [system, user]) and ``answer``; training rows
    carry ``messages`` and ``output_text`` (the demonstration) instead of ``prompt``.
    Assistant turns ending ``messages`` are not part of the prompt; their text is the
    demonstration when ``output_text`` is absent.

    Args:
        row: the raw row.
        index: its 0-based position in `source` (messages give it 1-based).
        source: the file or dataset name it came from, for error messages.

    Returns:
        ``{"id", "messages", "answer", "demo", "category"}``; ``messages`` keep the system
        turn; ``answer`` is the uppercase letter.

    Raises:
        DataError: the answer or the prompt is missing or malformed.
    """
    raw = _raw_answer(row)
    if raw is None or not str(raw).strip():
        raise row_error(
            source,
            index,
            "answer",
            "is missing or empty",
            'Every row needs the correct option letter (e.g. "answer": "B"); fix the row '
            "or remove it.",
        )
    answer = _choice(str(raw))
    if answer is None:
        raise row_error(
            source,
            index,
            "answer",
            f"is {str(raw)[:40]!r}, not an option letter",
            "Give the letter of the correct option (A, B, C, ...), not the option's text.",
        )
    if row.get("prompt"):
        messages, tail = _chat(row["prompt"], source, index, "prompt"), []
    elif row.get("messages"):
        messages = _chat(row["messages"], source, index, "messages")
        cut = len(messages)
        while cut and messages[cut - 1]["role"] == "assistant":
            cut -= 1
        messages, tail = messages[:cut], messages[cut:]
    else:
        raise row_error(
            source,
            index,
            "prompt",
            "is missing (and so is 'messages')",
            'Give the question as a chat list [system, user] under "prompt".',
        )
    if not any(m["role"] == "user" for m in messages):
        raise row_error(
            source, index, "prompt", "has no user turn", "Put the question in a user message."
        )
    demo = row.get("output_text")
    if not isinstance(demo, str) or not demo.strip():
        demo = tail[-1]["content"] if tail else demo_from_answer(answer)
    return {
        "id": str(row["id"]) if row.get("id") is not None else f"{Path(source).stem}-{index}",
        "messages": messages,
        "answer": answer,
        "demo": demo,
        "category": str(row.get("category") or "science"),
    }


CONFIDENCE_INSTRUCTION = (
    "After </answer>, add one line:\n"
    "Confidence: your confidence level (0.0-1.0) that your answer is correct, must be in "
    "numerical format, no other words or explanation."
)


class ScienceTask(Task):
    """Science multiple choice as a `Task`: the student answers a letter and a confidence.

    Items come from `row_to_item`: ``messages`` are [system, user]; the confidence instruction
    joins the user turn, so the system message stays as the dataset wrote it (CaOPD, arXiv
    2604.16830, Sec. 5).

    Args:
        confidence_instruction: appended to the user turn of the student's prompt.
        categories: item categories reported separately; other categories count only overall.
    """

    def __init__(
        self,
        confidence_instruction: str = CONFIDENCE_INSTRUCTION,
        categories: tuple[str, ...] | list[str] = ("science",),
    ) -> None:
        super().__init__(confidence_instruction)
        self.categories = tuple(categories)

    def parse_answer(self, completion: str) -> str | None:
        """See `extract_answer`."""
        return extract_answer(completion)

    def verify(self, completion: str, item: dict) -> bool:
        """See `verify` (the module function) with the item's letter."""
        return verify(completion, item["answer"])
