"""What every task (domain) provides to the training loop."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

from lightning_caopd.checks import check_choice
from lightning_caopd.errors import VerifierError

log = logging.getLogger(__name__)
ON_VERIFIER_ERROR = ("count", "raise")

VERIFIERS = ("project", "reference")  # data.task.verifier of the domains the reference scores


def check_verifier(verifier: str) -> None:
    """Refuse an unknown ``data.task.verifier`` with a sentence naming the choices."""
    check_choice("data.task.verifier", verifier, VERIFIERS)


def last_user_index(messages: list[dict]) -> int:
    """The index of the last user turn of a chat (where instructions and contexts go)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user":
            return i
    raise ValueError(f"The chat has no user turn: {[m['role'] for m in messages]}.")


class Task(ABC):
    """A domain: its items' prompts, their verifier and their answer parser.

    Items are dicts with at least ``id``, ``messages`` (the chat without the confidence
    instruction), ``answer``, ``demo`` (a demonstration) and ``category``.

    Args:
        confidence_instruction: the instruction to state a confidence.
        instruction_role: ``"user"`` appends it to the last user turn; ``"system"`` puts it in
            the system message (appended to one the item has, or as a new first message).
    """

    categories: tuple[str, ...] = ()
    # a rollout (and an evaluated answer) counts as correct at this score or above; P_acc is
    # the mean score of a prompt's rollouts (the share correct when scores are 0 or 1)
    pass_score: float = 1.0
    # a verifier that raises: "count" scores the completion 0 (logged, train/verifier_errors),
    # "raise" stops the run
    on_verifier_error: str = "count"
    # the reference's evaluation script for this domain reports `answer_parse_rate` (science)
    reports_answer_rate: bool = False

    def __init__(self, confidence_instruction: str, instruction_role: str = "user") -> None:
        check_choice("data.task.instruction_role", instruction_role, ("user", "system"))
        self.confidence_instruction = confidence_instruction
        self.instruction_role = instruction_role

    def student_messages(self, item: dict) -> list[dict]:
        """The student's chat: the item's messages with the confidence instruction."""
        out = [dict(m) for m in item["messages"]]
        text = self.confidence_instruction
        if not text:
            return out
        if self.instruction_role == "system":
            if out and out[0]["role"] == "system":
                out[0]["content"] = f"{out[0]['content']}\n{text}"
            else:
                out.insert(0, {"role": "system", "content": text})
            return out
        last_user = last_user_index(out)
        out[last_user]["content"] = f"{out[last_user]['content']}\n{text}"
        return out

    def eval_messages(self, item: dict, protocol: str = "default") -> list[dict]:
        """The chat an evaluation scores: the student's, or the item's verbatim (``reference``).

        The reference's evaluation scripts apply the chat template to the evaluation rows as
        they are, with no confidence instruction (``eval.protocol=reference``).
        """
        if protocol == "reference":
            return [dict(m) for m in item["messages"]]
        return self.student_messages(item)

    def reference_verdict(self, completion: str, item: dict) -> tuple[bool, object]:
        """``(correct, parsed answer)`` under the reference's evaluation scorer.

        A domain the reference scores (science, tool use) overrides this with its rules
        (`lightning_caopd.reference`); elsewhere the task's own verifier decides.
        """
        return self.verify(completion, item), self.parse_answer(completion)

    @abstractmethod
    def parse_answer(self, completion: str) -> str | None:
        """The answer a completion states, or None."""

    @abstractmethod
    def verify(self, completion: str, item: dict) -> bool:
        """Whether `completion` answers `item` correctly."""

    def score(self, completion: str, item: dict) -> float:
        """The completion's score in [0, 1]: 1.0 or 0.0 (a task with partial credit grades)."""
        return 1.0 if self.verify(completion, item) else 0.0


def task_scores(task: Task, completions: list[str], items: list[dict]) -> tuple[list[float], int]:
    """Every completion's `Task.score`, and how many of them the verifier failed to score.

    A verifier that raises scores its completion 0.0 and is logged once per task (instance)
    and kind of exception, with the item id and the completion; with
    ``task.on_verifier_error == "raise"`` a `VerifierError` naming both stops the run instead.
    """
    scores, errors = [], 0
    for text, item in zip(completions, items, strict=True):
        try:
            value = float(task.score(text, item))
        except Exception as err:
            where = (
                f"The verifier of {type(task).__name__} failed on item {item.get('id')!r} "
                f"({type(err).__name__}: {err}); completion: {text[:200]!r}."
            )
            if task.on_verifier_error == "raise":
                raise VerifierError(
                    f"{where} Fix the verifier, or set data.task.on_verifier_error=count to "
                    "score such completions 0 and go on."
                ) from err
            reported = task.__dict__.setdefault("_reported_errors", set())
            if type(err).__name__ not in reported:
                reported.add(type(err).__name__)
                log.warning("%s It is scored 0 (train/verifier_errors counts such).", where)
            scores.append(0.0)
            errors += 1
            continue
        scores.append(float(value))
    return scores, errors


def check_on_verifier_error(value: str) -> None:
    """Refuse an unknown ``data.task.on_verifier_error``."""
    check_choice(
        "data.task.on_verifier_error",
        value,
        ON_VERIFIER_ERROR,
        "(count: score 0 and go on; raise: stop the run)",
    )
