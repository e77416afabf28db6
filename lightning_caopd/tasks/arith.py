"""Addition with a visible difficulty: the real-model task (SmolLM2-135M-Instruct on a CPU).

Three families, named by the operands' digit count, which the prompt shows:
``add2`` (``What is 47 + 85?``), ``add3`` (``What is 587 + 466?``) and ``add4``. Asked to
answer directly (no chain of thought), SmolLM2-135M-Instruct got ``add2`` right 0.38 of the
time and ``add3`` 0.13 (48 items each, the reply prefilled with ``Answer: a + b =``); after the
format warm-up (experiment=smollm2_base) it gets ``add2`` right 0.77 and ``add3`` 0.48 of the
time, so a base model is right on some items and wrong on others, and more often on the easier
ones. (``add1``, one-digit operands, it gets right 0.98 of the time after the warm-up.)

A completion restates the sum and states a confidence::

    Answer: 47 + 85 = 132
    Confidence: 0.40

The stated answer is the last integer after the ``=`` of the ``Answer:`` line (a bare
``Answer: 132`` counts too; an unfinished ``Answer: 47 + 85`` states none).
"""

from __future__ import annotations

import itertools
import random
import re
import zlib
from collections.abc import Iterator

from lightning_caopd.tasks.base import Task

FAMILIES = ("add2", "add3", "add4")
_ANSWER = re.compile(r"Answer:[ \t]*([^\n]*)")
_INTEGER = re.compile(r"-?\d+")
INSTRUCTION = "Reply with two lines: Answer: <number> and Confidence: <0-1>."


def make_item(rng: random.Random, family: str, index: int, split: str) -> dict:
    """One item of `family` (``add<d>``: two d-digit operands, 0-9 for d = 1), drawn from `rng`."""
    if not re.fullmatch(r"add[1-9]", family):
        raise ValueError(f"Unknown arithmetic family {family!r}; choose add1 ... add9.")
    digits = int(family[3:])
    low = 0 if digits == 1 else 10 ** (digits - 1)
    a, b = rng.randrange(low, 10**digits), rng.randrange(low, 10**digits)
    return {
        "id": f"{split}-{index}",
        "messages": [{"role": "user", "content": f"What is {a} + {b}?"}],
        "answer": str(a + b),
        "demo": f"Answer: {a} + {b} = {a + b}",
        "category": family,
    }


def iter_items(seed: int, split: str, families=FAMILIES) -> Iterator[dict]:
    """Items cycling through `families` without end, reproducible from (`seed`, `split`)."""
    rng = random.Random(zlib.crc32(f"arith|{seed}|{split}".encode()))
    for i in itertools.count():
        yield make_item(rng, families[i % len(families)], i, split)


def make_items(n: int, seed: int, split: str, families=FAMILIES) -> list[dict]:
    """The first `n` items of `iter_items`."""
    return list(itertools.islice(iter_items(seed, split, families), n))


def parse_answer(completion: str) -> str | None:
    """The sum the first ``Answer:`` line states (``47 + 85 = 132`` -> ``132``), or None.

    The last integer after the line's last ``=``; on a line without ``=``, its last integer
    unless it is an unfinished sum (``47 + 85``).
    """
    line = _ANSWER.search(completion)
    if line is None:
        return None
    text = line.group(1)
    if "=" in text:
        text = text.rsplit("=", 1)[1]
    elif "+" in text:
        return None
    numbers = _INTEGER.findall(text)
    return numbers[-1] if numbers else None


class ArithTask(Task):
    """Addition as a `Task`: exact match of the stated sum.

    Args:
        confidence_instruction: the instruction to answer and state a confidence.
        instruction_role: where it goes (see `Task`).
    """

    categories = FAMILIES

    def __init__(
        self,
        confidence_instruction: str = INSTRUCTION,
        instruction_role: str = "system",
    ) -> None:
        super().__init__(confidence_instruction, instruction_role)

    def parse_answer(self, completion: str) -> str | None:
        """See `parse_answer`."""
        return parse_answer(completion)

    def verify(self, completion: str, item: dict) -> bool:
        """Whether the stated sum is the item's."""
        return parse_answer(completion) == item["answer"]
