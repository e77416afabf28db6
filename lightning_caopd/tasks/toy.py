"""The embedded default: a synthetic question family set generated from a seed.

Three families, the family name visible in every prompt:

* ``next``: ``next k`` -> ``l``, the next letter (z wraps to a). The base student solves it.
* ``prev``: ``prev k`` -> ``j``, the previous letter. The warm-up teaches the student only a
  seeded half of the 26 letters, so the base partly solves the family and OPD can teach the rest.
* ``code``: ``code 4821`` -> a seeded random letter. No model can know it without the
  privileged context.

Every answer is one character, so a reference solution sits at a fixed distance from the
completion that copies it: a tiny model learns to use privileged context in minutes.

Completions read ``Answer: X`` then ``Confidence: 0.62``.
"""

from __future__ import annotations

import itertools
import random
import re
import zlib
from collections.abc import Iterator

from lightning_caopd.tasks.base import Task

FAMILIES = ("next", "prev", "code")
_ANSWER = re.compile(r"Answer:[ \t]*([^\n]*)")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _hash(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def secret_code(world_seed: int, number: int) -> str:
    """The code family's answer: a letter fixed by the world seed, unrelated to `number`."""
    return random.Random(_hash("code", world_seed, number)).choice(_LETTERS)


def prev_in_warmup(world_seed: int, letter: str) -> bool:
    """Whether the warm-up teaches ``prev letter``: a seeded half of the alphabet."""
    order = sorted(_LETTERS, key=lambda c: _hash("prev", world_seed, c))
    return letter in order[:13]


def make_item(rng: random.Random, family: str, index: int, split: str, world_seed: int) -> dict:
    """One item of `family`, drawn from `rng`."""
    if family == "next":
        i = rng.randrange(26)
        question, answer = f"next {_LETTERS[i]}", _LETTERS[(i + 1) % 26]
    elif family == "prev":
        i = rng.randrange(26)
        question, answer = f"prev {_LETTERS[i]}", _LETTERS[(i - 1) % 26]
    elif family == "code":
        # Train and eval draw from disjoint numbers, so eval codes are never seen in training.
        number = 2 * rng.randrange(5000) + (split != "train")
        question, answer = f"code {number:04d}", secret_code(world_seed, number)
    else:
        raise ValueError(f"Unknown toy family {family!r}; choose from {FAMILIES}.")
    return {
        "id": f"{split}-{index}",
        "messages": [{"role": "user", "content": question}],
        "answer": answer,
        "demo": f"Answer: {answer}",
        "category": family,
    }


def iter_items(seed: int, split: str, world_seed: int = 0, families=FAMILIES) -> Iterator[dict]:
    """Items cycling through `families` without end, reproducible from (`seed`, `split`)."""
    rng = random.Random(_hash("items", seed, split))
    for i in itertools.count():
        yield make_item(rng, families[i % len(families)], i, split, world_seed)


def make_items(n: int, seed: int, split: str, world_seed: int = 0, families=FAMILIES) -> list[dict]:
    """The first `n` items of `iter_items`."""
    return list(itertools.islice(iter_items(seed, split, world_seed, families), n))


def parse_answer(completion: str) -> str | None:
    """The text after the first ``Answer:``, stripped, or None."""
    m = _ANSWER.search(completion)
    return m.group(1).strip() if m else None


def verify(completion: str, answer: str) -> bool:
    """Exact match of the stated answer with the ground truth."""
    return parse_answer(completion) == answer


class ToyTask(Task):
    """The toy world as a `Task`."""

    categories = FAMILIES

    def __init__(
        self,
        confidence_instruction: str = "Say Answer and Confidence.",
        instruction_role: str = "system",
    ) -> None:
        super().__init__(confidence_instruction, instruction_role)

    def parse_answer(self, completion: str) -> str | None:
        """See `parse_answer`."""
        return parse_answer(completion)

    def verify(self, completion: str, item: dict) -> bool:
        """See `verify`."""
        return verify(completion, item["answer"])
