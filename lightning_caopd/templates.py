"""Teacher-context templates: how the privileged context enters the teacher's prompt.

Two sources of privileged context, as in the paper:

* ``demo``: the item's demonstration followed by ``Confidence: 1.00``.
* ``correct_solution``: a verified correct rollout from the same group (its own confidence line
  replaced by ``Confidence: 1.00``). A group with no correct rollout falls back to the item's
  demonstration; the share of such groups is logged as ``train/no_correct_solution_frac``.

The student and teacher prompts share one chat template: the teacher's messages are the
student's messages (system message kept) with the context appended to the last user turn.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_caopd.confidence import strip_confidence
from lightning_caopd.tasks.base import last_user_index

SOURCES = ("demo", "correct_solution")


def with_confidence(solution: str, confidence_line: str) -> str:
    """Replace any confidence line of `solution` by `confidence_line`."""
    body = strip_confidence(solution).rstrip()
    return f"{body}\n{confidence_line}" if body else confidence_line


@dataclass
class TeacherTemplate:
    """Renders the teacher's privileged prompt.

    Args:
        source: ``"demo"`` or ``"correct_solution"``.
        user_format: format of the teacher's last user turn; fields ``{prompt}`` (the student's
            last user turn), ``{context}`` (the privileged context) and ``{note}`` (the CaOPD
            note, or empty).
        note_format: how a non-empty note is inserted into ``{note}``.
        confidence_line: the confidence stated after the privileged solution.
    """

    source: str = "demo"
    user_format: str = "Reference solution:\n{context}{note}\n\n{prompt}"
    note_format: str = "\n{note}"
    confidence_line: str = "Confidence: 1.00"

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(
                f"Unknown teacher template source {self.source!r}; choose one of {SOURCES} "
                "(set `method.template.source`)."
            )
        for field in ("{prompt}", "{context}", "{note}"):
            if field not in self.user_format:
                raise ValueError(
                    f"`method.template.user_format` must contain {field}; got {self.user_format!r}."
                )

    def context(self, item: dict, solutions: list[str], correct: list[bool]) -> tuple[str, bool]:
        """The privileged context for one prompt group.

        Args:
            item: the dataset item (its ``demo`` is the demonstration).
            solutions: the group's K rollout texts.
            correct: whether each rollout was verified correct.

        Returns:
            The context text, and whether the ``correct_solution`` source had to fall back to the
            demonstration because no rollout in the group was correct.
        """
        if self.source == "correct_solution":
            for text, ok in zip(solutions, correct, strict=True):
                if ok:
                    return with_confidence(text, self.confidence_line), False
            return with_confidence(item["demo"], self.confidence_line), True
        return with_confidence(item["demo"], self.confidence_line), False

    def messages(self, student_messages: list[dict], context: str, note: str = "") -> list[dict]:
        """Teacher chat: the student's messages with the context in the last user turn."""
        last_user = last_user_index(student_messages)
        out = [dict(m) for m in student_messages]
        out[last_user]["content"] = self.user_format.format(
            prompt=student_messages[last_user]["content"],
            context=context,
            note=self.note_format.format(note=note) if note else "",
        )
        return out
