"""What every task (domain) provides to the training loop."""

from __future__ import annotations

from abc import ABC, abstractmethod


class Task(ABC):
    """A domain: its items' prompts, their verifier and their answer parser.

    Items are dicts with at least ``id``, ``messages`` (the chat without the confidence
    instruction), ``answer``, ``demo`` (a demonstration) and ``category``.

    Args:
        confidence_instruction: appended to the last user turn of the student's prompt.
    """

    categories: tuple[str, ...] = ()

    def __init__(self, confidence_instruction: str) -> None:
        self.confidence_instruction = confidence_instruction

    def student_messages(self, item: dict) -> list[dict]:
        """The student's chat: the item's messages with the confidence instruction."""
        out = [dict(m) for m in item["messages"]]
        if self.confidence_instruction:
            last_user = max(i for i, m in enumerate(out) if m["role"] == "user")
            out[last_user]["content"] = f"{out[last_user]['content']}\n{self.confidence_instruction}"
        return out

    @abstractmethod
    def parse_answer(self, completion: str) -> str | None:
        """The answer a completion states, or None."""

    @abstractmethod
    def verify(self, completion: str, item: dict) -> bool:
        """Whether `completion` answers `item` correctly."""
