"""A user's own task: a verifier function and a confidence instruction, no subclass needed.

``data=jsonl`` pairs it with rows of the user's own (`lightning_caopd.data.rows.JsonlDataModule`)::

    data:
      path: capitals.jsonl
      task:
        verify: my_task.verify        # def verify(completion: str, item: dict) -> bool | float

The verifier gets the completion and the item (``id``, ``messages``, ``answer``, ``demo``,
``category`` and any extra fields the data config keeps) and returns True/False or a score in
[0, 1] (partial credit): P_acc is then a prompt's mean score, and a completion counts as correct
at ``pass_score`` or above. A `Task` subclass of one's own works too (``data.task._target_``).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from lightning_caopd.checks import check_number
from lightning_caopd.errors import ConfigError
from lightning_caopd.tasks.base import Task, check_on_verifier_error

INSTRUCTION = (
    "Give your answer on a line 'Answer: ...', then one line:\n"
    "Confidence: your confidence level (0.0-1.0) that your answer is correct."
)
_ANSWER = re.compile(r"^[ \t*_]*+answer[ \t*_]*+:[ \t]*+(.*)$", re.IGNORECASE | re.MULTILINE)


def import_function(path: str, key: str) -> Callable:
    """The function a dotted path names (``package.module.name``), with errors that say why.

    Args:
        path: ``module.name``; the module is imported as Python finds it (the working directory
            and ``PYTHONPATH``).
        key: the config key that gave it, for the messages.

    Raises:
        ConfigError: the module cannot be imported (which one and why), has no such name (which
            names it has), or the name is not callable.
    """
    module_name, _, name = str(path).rpartition(".")
    if not module_name or not name:
        raise ConfigError(
            f"{key}={path!r} is not a dotted path: give `module.function` (e.g. my_task.verify)."
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the user's module failed to import: say which and why
        raise ConfigError(
            f"{key}={path!r}: importing module {module_name!r} failed ({type(err).__name__}: "
            f"{err}). Is its folder the working directory or on PYTHONPATH?"
        ) from None
    fn = getattr(module, name, None)
    if fn is None:
        public = sorted(n for n in vars(module) if not n.startswith("_"))[:12]
        raise ConfigError(
            f"{key}={path!r}: module {module_name!r} ({module.__file__}) has no {name!r}; "
            f"it has {public}."
        )
    if not callable(fn):
        raise ConfigError(f"{key}={path!r} is a {type(fn).__name__}, not a function.")
    return fn


def answer_line(completion: str) -> str | None:
    """The text after the last ``Answer:`` label (any case, markdown allowed), or None.

    Example:
        >>> answer_line("I think so.\\nAnswer: Paris\\nConfidence: 0.8")
        'Paris'
    """
    labels = list(_ANSWER.finditer(completion))
    return labels[-1].group(1).strip() if labels else None


class FunctionTask(Task):
    """A task made of a verifier function (and optionally an answer parser).

    Args:
        verify: ``verify(completion, item) -> bool | float``: a function, or its dotted path.
        confidence_instruction: appended to the prompt (null: none).
        categories: item categories reported separately in metrics.json (``by_category``).
        parse_answer: ``parse_answer(completion) -> str | None`` for completions.jsonl's
            ``answer`` (a function or dotted path); None: the last ``Answer:`` line.
        pass_score: the score from which a completion counts as correct (graded verifiers).
        instruction_role: ``user`` (appended to the last user turn) or ``system``.
        on_verifier_error: ``count`` (a verifier that raises scores 0, logged) or ``raise``.

    Raises:
        ConfigError: a path that does not import, a pass score outside (0, 1], an unknown
            ``on_verifier_error``.
    """

    def __init__(
        self,
        verify: Callable | str,
        confidence_instruction: str | None = INSTRUCTION,
        categories: tuple[str, ...] | list[str] = (),
        parse_answer: Callable | str | None = None,
        pass_score: float = 1.0,
        instruction_role: str = "user",
        on_verifier_error: str = "count",
    ) -> None:
        super().__init__(confidence_instruction or "", instruction_role)
        self.verifier = verify if callable(verify) else import_function(verify, "data.task.verify")
        self.parser = (
            parse_answer
            if parse_answer is None or callable(parse_answer)
            else import_function(parse_answer, "data.task.parse_answer")
        )
        check_number("data.task.pass_score", pass_score, 0, 1, open_low=True)
        check_on_verifier_error(on_verifier_error)
        self.categories = tuple(categories)
        self.pass_score = float(pass_score)
        self.on_verifier_error = on_verifier_error

    def parse_answer(self, completion: str) -> str | None:
        """The user's parser, or the last ``Answer:`` line."""
        return answer_line(completion) if self.parser is None else self.parser(completion)

    def score(self, completion: str, item: dict) -> float:
        """The verifier's value (True is 1.0); anything but a bool or a number in [0, 1] raises."""
        value = self.verifier(completion, item)
        if isinstance(value, bool):
            return float(value)
        if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise ValueError(f"the verifier returned {value!r}, not a bool or a score in [0, 1]")
        return float(value)

    def verify(self, completion: str, item: dict) -> bool:
        """Whether the score reaches ``pass_score``."""
        return self.score(completion, item) >= self.pass_score
