"""What every task (domain) provides to the training loop."""

from __future__ import annotations

from abc import ABC, abstractmethod

VERIFIERS = ("project", "reference")  # data.task.verifier of the domains the reference scores


def check_verifier(verifier: str) -> None:
    """Refuse an unknown verifier with a sentence naming the choices."""
    if verifier not in VERIFIERS:
        raise ValueError(
            f"verifier must be one of {VERIFIERS}; got {verifier!r} (set `data.task.verifier`)."
        )


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
    # the reference's evaluation script for this domain reports `answer_parse_rate` (science)
    reports_answer_rate: bool = False

    def __init__(self, confidence_instruction: str, instruction_role: str = "user") -> None:
        if instruction_role not in ("user", "system"):
            raise ValueError(
                f"instruction_role must be 'user' or 'system'; got {instruction_role!r} "
                "(set `data.task.instruction_role`)."
            )
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
