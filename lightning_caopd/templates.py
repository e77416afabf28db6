"""Teacher-context templates: how the privileged context enters the teacher's prompt.

Two sources of privileged context, as in the paper:

* ``demo``: the item's demonstration followed by ``Confidence: 1.00``.
* ``correct_solution``: a verified correct rollout from the same group (its own confidence line
  replaced by ``Confidence: 1.00``). A group with no correct rollout falls back to the item's
  demonstration; the share of such groups is logged as ``train/no_correct_solution_frac``.
* ``sdpo_sibling``: SDPO's context (Huebotter et al., arXiv 2601.20802), one per rollout: the
  first verified correct rollout of the same group other than the rollout itself, with
  ``<think>...</think>`` stripped and its confidence line replaced as above. A rollout is never
  its own context (SDPO's ``dont_reprompt_on_self_success``); a rollout without a successful
  sibling gets no context and leaves the loss (``train/sdpo_masked_frac``), unless the
  confidence targets give its teacher the CaOPD note alone (`note_only_messages`).

The student and teacher prompts share one chat template: the teacher's messages are the
student's messages (system message kept) with the context appended to the last user turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lightning_caopd.checks import check_choice, check_format
from lightning_caopd.confidence import strip_confidence
from lightning_caopd.tasks.base import last_user_index

SOURCES = ("demo", "correct_solution", "sdpo_sibling")
PER_ROLLOUT_SOURCES = ("sdpo_sibling",)
_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)
_THINK_TAIL = re.compile(r"^.*</think>\s*", re.DOTALL)


def strip_thinking(text: str) -> str:
    """Remove the reasoning from a completion, as SDPO does to a sibling it reuses as context.

    Drops ``<think>...</think>`` blocks and, when the ``<think>`` sat in the prompt (a chat
    template that opens it), everything up to a lone ``</think>``.
    """
    text = _THINK_BLOCK.sub("", text)
    return _THINK_TAIL.sub("", text) if "</think>" in text else text


def with_confidence(solution: str, confidence_line: str) -> str:
    """Replace any confidence line of `solution` by `confidence_line`."""
    body = strip_confidence(solution).rstrip()
    return f"{body}\n{confidence_line}" if body else confidence_line


@dataclass
class TeacherTemplate:
    """Renders the teacher's privileged prompt.

    Args:
        source: ``"demo"``, ``"correct_solution"`` (one context per group) or
            ``"sdpo_sibling"`` (one per rollout).
        user_format: format of the teacher's last user turn; fields ``{prompt}`` (the student's
            last user turn), ``{context}`` (the privileged context) and ``{note}`` (the CaOPD
            note, or empty).
        note_format: how a non-empty note is inserted into ``{note}``.
        confidence_line: the confidence stated after the privileged solution (replacing any it
            states); None leaves the solution as written (the reference's science demo).
        note_only_format: the teacher's last user turn when there is a note and no solution
            (fields ``{prompt}`` and ``{note}``); None renders `user_format` with an empty context.
    """

    source: str = "demo"
    user_format: str = "Reference solution:\n{context}{note}\n\n{prompt}"
    note_format: str = "\n{note}"
    confidence_line: str | None = "Confidence: 1.00"
    note_only_format: str | None = None

    def __post_init__(self) -> None:
        check_choice("method.template.source", self.source, SOURCES)
        check_format("method.template.user_format", self.user_format, ["prompt", "context", "note"])
        check_format("method.template.note_format", self.note_format, ["note"])
        if self.note_only_format is not None:
            check_format(
                "method.template.note_only_format", self.note_only_format, ["prompt", "note"]
            )

    @property
    def per_rollout(self) -> bool:
        """Whether each rollout gets its own context (B*K teacher prompts instead of B)."""
        return self.source in PER_ROLLOUT_SOURCES

    def contexts(
        self, item: dict, solutions: list[str], correct: list[bool]
    ) -> tuple[list[str | None], bool]:
        """The privileged contexts of one prompt group: one for the group, or one per rollout.

        Args:
            item: the dataset item.
            solutions: the group's K rollout texts.
            correct: whether each rollout was verified correct.

        Returns:
            ``[context]`` for a group source (`context`), or K entries for ``sdpo_sibling``:
            rollout i's first successful sibling j != i, or None where there is none (that
            rollout leaves the loss); and whether the group fell back to the demonstration.
        """
        if not self.per_rollout:
            context, fell_back = self.context(item, solutions, correct)
            return [context], fell_back
        successes = [j for j, ok in enumerate(correct) if ok]
        out: list[str | None] = []
        for i in range(len(solutions)):
            sibling = next((j for j in successes if j != i), None)
            sibling_text = None if sibling is None else strip_thinking(solutions[sibling])
            out.append(None if sibling_text is None else self._stated(sibling_text))
        return out, False

    def demonstration(self, item: dict) -> str:
        """The item's demonstration as a context, with the template's confidence line.

        What ``demo`` gives every group, and what the other sources fall back to; the
        teacher-conditioned evaluation shows it to the teacher whatever the source.
        """
        return self._stated(item["demo"])

    def _stated(self, solution: str) -> str:
        """A solution with the template's confidence line (as written when there is none)."""
        if self.confidence_line is None:
            return solution
        return with_confidence(solution, self.confidence_line)

    def context(self, item: dict, solutions: list[str], correct: list[bool]) -> tuple[str, bool]:
        """The privileged context for one prompt group.

        Args:
            item: the dataset item (its ``demo`` is the demonstration).
            solutions: the group's K rollout texts.
            correct: whether each rollout was verified correct.

        Returns:
            The context text, and whether the ``correct_solution`` source had to fall back to the
            demonstration because no rollout in the group was correct.

        Raises:
            ValueError: for a per-rollout source (use `contexts`).
        """
        if self.per_rollout:
            raise ValueError(
                f"source {self.source!r} gives one context per rollout: use contexts()."
            )
        if self.source == "correct_solution":
            for text, ok in zip(solutions, correct, strict=True):
                if ok:
                    return self._stated(text), False
            return self._stated(item["demo"]), True
        return self._stated(item["demo"]), False

    def messages(self, student_messages: list[dict], context: str, note: str = "") -> list[dict]:
        """Teacher chat: the student's messages with the context in the last user turn."""
        return self._last_user_as(student_messages, self.user_format, context=context, note=note)

    def note_only_messages(self, student_messages: list[dict], note: str) -> list[dict]:
        """Teacher chat with a note and no solution (`note_only_format`)."""
        if self.note_only_format is None:
            return self.messages(student_messages, "", note)
        return self._last_user_as(student_messages, self.note_only_format, note=note)

    def _last_user_as(
        self, student_messages: list[dict], fmt: str, note: str, **fields
    ) -> list[dict]:
        """The student's messages with the last user turn rendered by `fmt`."""
        last_user = last_user_index(student_messages)
        out = [dict(m) for m in student_messages]
        out[last_user]["content"] = fmt.format(
            prompt=student_messages[last_user]["content"],
            note=self.note_format.format(note=note) if note else "",
            **fields,
        )
        return out
