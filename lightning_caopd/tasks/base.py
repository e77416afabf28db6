"""What every task (domain) provides to the training loop."""

from __future__ import annotations

from abc import ABC, abstractmethod


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

    @abstractmethod
    def parse_answer(self, completion: str) -> str | None:
        """The answer a completion states, or None."""

    @abstractmethod
    def verify(self, completion: str, item: dict) -> bool:
        """Whether `completion` answers `item` correctly."""
