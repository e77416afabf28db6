"""The embedded default: a synthetic question family set generated from a seed.

Three families, the family name visible in every prompt:

* ``next``: ``next k`` -> ``l``, the next letter (z wraps to a). The base student solves it.
* ``add``: ``add 3+5`` -> ``8``. The warm-up teaches the student only half of the 100 digit
  pairs (a seeded subset), so the base partly solves the family and OPD can teach the rest.
* ``code``: ``code 4821`` -> a seeded random three-letter code. No model can know it without
  the privileged context.

Completions read ``Answer: X`` then ``Confidence: 0.62``.
"""

from __future__ import annotations

import random
import re
import zlib

from lightning_caopd.tasks.base import Task

FAMILIES = ("next", "add", "code")
_ANSWER = re.compile(r"Answer:[ \t]*([^\n]*)")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _hash(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def secret_code(world_seed: int, number: int) -> str:
    """The code family's answer: three letters fixed by the world seed, unrelated to `number`."""
    rng = random.Random(_hash("code", world_seed, number))
    return "".join(rng.choice(_LETTERS) for _ in range(3))


def add_pair_in_warmup(world_seed: int, a: int, b: int) -> bool:
    """Whether the warm-up teaches the sum of (a, b): a seeded half of the 100 pairs."""
    return _hash("add", world_seed, a, b) % 2 == 0


def make_item(rng: random.Random, family: str, index: int, split: str, world_seed: int) -> dict:
    """One item of `family`, drawn from `rng`."""
    if family == "next":
        i = rng.randrange(26)
        question, answer = f"next {_LETTERS[i]}", _LETTERS[(i + 1) % 26]
    elif family == "add":
        a, b = rng.randrange(10), rng.randrange(10)
        question, answer = f"add {a}+{b}", str(a + b)
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


def make_items(n: int, seed: int, split: str, world_seed: int = 0, families=FAMILIES) -> list[dict]:
    """`n` items cycling through `families`, reproducible from (`seed`, `split`)."""
    rng = random.Random(_hash("items", seed, split))
    return [make_item(rng, families[i % len(families)], i, split, world_seed) for i in range(n)]


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

    def __init__(self, confidence_instruction: str = "Say Answer and Confidence.") -> None:
        super().__init__(confidence_instruction)

    def parse_answer(self, completion: str) -> str | None:
        """See `parse_answer`."""
        return parse_answer(completion)

    def verify(self, completion: str, item: dict) -> bool:
        """See `verify`."""
        return verify(completion, item["answer"])
