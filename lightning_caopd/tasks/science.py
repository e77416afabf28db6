"""Science: chemistry multiple choice (SciKnowEval), answered with an option letter.

Completions follow the paper's system prompt (CaOPD, arXiv 2604.16830, Sec. 5)::

    <reasoning>...</reasoning>
    <answer>B</answer>
    Confidence: 0.8

`extract_answer` owns the parsing rules; the task's ``answer_format`` says how much it
accepts.

1. **``"tag"``: the answer format, required (the default, and what training verifies).** The
   *last* closed ``<answer>X</answer>`` wins (a model may echo the format or revise itself),
   as in the paper's training verifier. Tags pair as a left-to-right reading pairs them: an
   opening tag with the first closing tag after it, the innermost opening when several stand
   before it. ``X`` is one letter, any case, spaces and newlines allowed, optionally ``(B)``,
   ``B)``, ``B.`` or markdown ``**B**``; a ``Confidence: ...`` line inside the tag is
   ignored. If the last tag holds anything else the answer is ``None``: the model's final
   statement is not a letter, and earlier statements are not used. Without a closed tag there
   is no answer at all: a random model's bare ``c`` is not option C, so a student that never
   writes the format earns no rollout accuracy (and no P_acc) by chance.
2. **``"lenient"``: fallbacks for scoring models that were never taught the format**, tried
   only when no closed tag exists, in this order:

   a. an unclosed ``<answer>X`` ending the text (a truncated rollout);
   b. ``answer is X`` / ``Answer: X`` (also ``answer is option (X)``), the last one. A
      lowercase ``x`` counts only in parentheses or before punctuation or a line end, so
      ``the answer is a molecule ...`` is no answer;
   c. a letter alone on the last non-empty line.

   Trailing ``Confidence: ...`` lines are not part of the answer and are skipped first.

The paper's evaluation scorer takes the first tag and tries the bare letter before the phrase;
the last-tag rule here matches its training verifier and how the confidence parser reads the
final statement.

Every rule runs in time linear in the completion, whatever the model wrote: the patterns use
possessive quantifiers (a run of spaces is consumed once, never re-split between neighbouring
``\s*``) and tags are paired by forward scans.
"""

from __future__ import annotations

import re
from pathlib import Path

from lightning_caopd import reference
from lightning_caopd.checks import check_choice
from lightning_caopd.data.loading import chat_messages, row_error
from lightning_caopd.tasks.base import Task, check_verifier

ANSWER_FORMATS = ("tag", "lenient")
ANSWER_FROM_DEMO = "answer_from_demo"  # an item key: its answer came from its demonstration
# Possessive quantifiers (`*+`, `?+`): every piece is followed by characters it cannot match,
# so they accept what the plain forms accept, without backtracking.
_CHOICE = re.compile(r"\s*+[*_]*+\s*+\(?+\s*+([A-Za-z])\s*+\)?+\s*+[.:]?+\s*+[*_]*+\s*+")
_OPEN = re.compile(r"<answer>", re.IGNORECASE)
_CLOSE = re.compile(r"</answer>", re.IGNORECASE)
# Anchored at the start, `.*` runs to the end once and backs off to the last opening tag.
_THROUGH_LAST_OPEN = re.compile(r".*<answer>", re.IGNORECASE | re.DOTALL)
_PHRASE = re.compile(
    r"\banswer\b(?:\s*+[*_]*+\s*+:|\s++is\b\s*+:?+)\s*+[*_]*+\s*+(?:option\s++)?(\()?+\s*+"
    r"([A-Za-z])\b",
    re.IGNORECASE,
)
_AFTER_LOWERCASE = re.compile(r"\s*+\)|[ \t]*+(?:[.,;:!\]*_]|$)", re.MULTILINE)
_CONFIDENCE_LINE = re.compile(r"\s*+[*_]*+\s*+(?:confidence\b|<confidence>)", re.IGNORECASE)


def _last_tag(text: str) -> tuple[int, int] | None:
    """The content span of the last closed ``<answer>...</answer>`` (rule 1).

    Each opening tag is tried against the first closing tag after it; an opening tag between
    them takes its place (the innermost pairs). Every search starts where the previous one
    stopped, so each character is scanned a bounded number of times.

    Returns:
        ``(content_start, content_end)``, or ``None`` when no tag is closed.
    """
    found, closing = None, None
    opening = _OPEN.search(text)
    while opening is not None:
        if closing is None or closing.start() < opening.end():
            closing = _CLOSE.search(text, opening.end())
            if closing is None:
                break
        inner = _OPEN.search(text, opening.end(), closing.start())
        if inner is not None:
            opening = inner
            continue
        found = opening.end(), closing.start()
        opening = _OPEN.search(text, closing.end())
    return found


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


def _lenient(completion: str) -> str | None:
    """The fallbacks of rule 2, for a completion without a closed tag."""
    text = _drop_confidence(completion)
    through = _THROUGH_LAST_OPEN.match(text)
    if through is not None:
        letter = _choice(text[through.end() :])
        if letter:
            return letter
    letter = _from_phrase(text)
    if letter:
        return letter
    stripped = text.strip()
    last_line = stripped.rsplit("\n", 1)[-1]
    return _choice(last_line) if last_line.strip() else None


def _check_format(answer_format: str) -> None:
    """Refuse an unknown ``data.task.answer_format`` with a sentence naming the choices."""
    check_choice("data.task.answer_format", answer_format, ANSWER_FORMATS)


def extract_answer(completion: str, answer_format: str = "tag") -> str | None:
    """The option letter a completion states, uppercase, or None.

    Args:
        completion: the model's response.
        answer_format: ``"tag"`` (the last closed ``<answer>`` tag, required) or
            ``"lenient"`` (with fallbacks when there is no closed tag); see the module
            docstring.

    Returns:
        The letter, following the rules in the module docstring, or None.

    Raises:
        ConfigError: `answer_format` is neither ``"tag"`` nor ``"lenient"``.

    Examples:
        >>> extract_answer("<answer>A</answer> wait, no: <answer> (c) </answer>")
        'C'
        >>> extract_answer("The answer is D.\\nConfidence: 0.7") is None
        True
        >>> extract_answer("The answer is D.\\nConfidence: 0.7", answer_format="lenient")
        'D'
    """
    _check_format(answer_format)
    tag = _last_tag(completion)
    if tag is not None:
        return _choice(completion[tag[0] : tag[1]])
    return _lenient(completion) if answer_format == "lenient" else None


def verify(completion: str, answer: str, answer_format: str = "tag") -> bool:
    """Whether the completion states the ground-truth letter.

    Args:
        completion: the model's response.
        answer: the correct letter (any case, surrounding spaces ignored).
        answer_format: how the letter must be stated (see `extract_answer`).

    Returns:
        True when `extract_answer` finds exactly that letter.
    """
    return extract_answer(completion, answer_format) == answer.strip().upper()


def demo_from_answer(answer: str) -> str:
    """A minimal demonstration for a row that carries none, in the system prompt's format.

    Args:
        answer: the correct letter.

    Returns:
        For ``"b"``: ``"<reasoning>The correct option is B.</reasoning>\\n<answer>B</answer>"``.
    """
    letter = answer.strip().upper()
    return f"<reasoning>The correct option is {letter}.</reasoning>\n<answer>{letter}</answer>"


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
    carry ``messages`` and ``output_text`` (the demonstration) instead of ``prompt``. A row
    without ``answer`` (the reference's training rows) takes it from the last closed
    ``<answer>X</answer>`` of ``output_text``; such items carry ``ANSWER_FROM_DEMO``.
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
        DataError: the answer (and a demonstration to take it from) or the prompt is missing
            or malformed.
    """
    raw = _raw_answer(row)
    from_demo = False
    if raw is None or not str(raw).strip():
        # the reference's training rows: no `answer`, the demonstration ends in <answer>X</answer>
        demo_text = row.get("output_text")
        raw = extract_answer(demo_text, "tag") if isinstance(demo_text, str) else None
        if raw is None:
            raise row_error(
                source,
                index,
                "answer",
                "is missing or empty, and the row has no `output_text` ending in "
                "<answer>X</answer> to take it from",
                'Every row needs the correct option letter (e.g. "answer": "B") or a '
                "demonstration (`output_text`) whose last <answer> tag holds it; fix the row "
                "or remove it.",
            )
        from_demo = True
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
        messages, tail = chat_messages(row["prompt"], source, index, "prompt"), []
    elif row.get("messages"):
        messages = chat_messages(row["messages"], source, index, "messages")
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
    item = {
        "id": str(row["id"]) if row.get("id") is not None else f"{Path(source).stem}-{index}",
        "messages": messages,
        "answer": answer,
        "demo": demo,
        "category": str(row.get("category") or "science"),
    }
    if from_demo:
        item[ANSWER_FROM_DEMO] = True  # counted (and removed) by RowsDataModule.load_items
    return item


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
        answer_format: ``"tag"`` requires the last closed ``<answer>`` tag (the paper's
            training verifier); ``"lenient"`` also reads answer phrases and a bare letter when
            there is no closed tag, for scoring models never taught the format (see the module
            docstring). Training and evaluation share it.
        verifier: ``"project"`` (`answer_format`'s rules) or ``"reference"``: the released
            code's training verifier, which decides its P_acc: the whole content of the last
            closed tag must be the letter (`lightning_caopd.reference.science_training_answer`;
            ``(B)`` or ``B.`` is wrong there, right here).

    Raises:
        ConfigError: `answer_format` or `verifier` is not one of its choices.
    """

    reports_answer_rate = True

    def __init__(
        self,
        confidence_instruction: str = CONFIDENCE_INSTRUCTION,
        categories: tuple[str, ...] | list[str] = ("science",),
        answer_format: str = "tag",
        verifier: str = "project",
    ) -> None:
        super().__init__(confidence_instruction)
        _check_format(answer_format)
        check_verifier(verifier)
        self.categories = tuple(categories)
        self.answer_format = answer_format
        self.verifier = verifier

    def parse_answer(self, completion: str) -> str | None:
        """See `extract_answer`, in the task's answer format (or the reference's reading)."""
        if self.verifier == "reference":
            return reference.science_training_answer(completion)
        return extract_answer(completion, self.answer_format)

    def verify(self, completion: str, item: dict) -> bool:
        """Whether the completion states the item's letter, under the task's verifier."""
        if self.verifier == "reference":
            return self.parse_answer(completion) == item["answer"].strip().upper()
        return verify(completion, item["answer"], self.answer_format)

    def reference_verdict(self, completion: str, item: dict) -> tuple[bool, str | None]:
        """The reference's evaluation scorer (`lightning_caopd.reference.science_verdict`)."""
        return reference.science_verdict(completion, item["answer"])
