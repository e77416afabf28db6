"""The value checks every setting uses: one for integers, one for number ranges, one for choices.

Each raises `lightning_caopd.errors.ConfigError` with one sentence naming the full key, the
value and what is allowed (`lightning_caopd.errors.out_of_range`). The settings
(`lightning_caopd.settings`), the components a config builds (targets, template, engines,
callbacks, DataModules) and the start-up pass (`lightning_caopd.runner.check_config`) all check
through these, so a range is written once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from lightning_caopd.errors import out_of_range


def check_int(key: str, value: object, low: int, allow_none: bool = False) -> None:
    """Stop unless `value` is an integer >= `low` (or None where allowed).

    Args:
        key: the dotted config key, for the message (``data.batch_size``).
        value: its value.
        low: the smallest value allowed.
        allow_none: whether null is allowed.

    Raises:
        ConfigError: naming the key, the value and the allowed range.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise out_of_range(key, value, f"an integer >= {low}" + (" or null" if allow_none else ""))


def check_number(
    key: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    open_low: bool = False,
    open_high: bool = False,
    allow_none: bool = False,
) -> None:
    """Stop unless `value` is a finite number within the bounds (or None where allowed).

    Args:
        key: the dotted config key.
        value: its value.
        low: the lower bound (None: none).
        high: the upper bound (None: none).
        open_low: `low` itself is not allowed.
        open_high: `high` itself is not allowed.
        allow_none: whether null is allowed.

    Raises:
        ConfigError: naming the key, the value and the allowed range.

    Examples:
        >>> from lightning_caopd.errors import ConfigError
        >>> try:
        ...     check_number("method.rollout.top_p", 0, 0, 1, open_low=True)
        ... except ConfigError as err:
        ...     print(err)
        method.rollout.top_p=0 is out of range: it must be a number in (0, 1].
    """
    if value is None and allow_none:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value < high if open_high else value <= high
    if ok:
        return
    if low is not None and high is not None:
        allowed = f"a number in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    elif low is not None:
        allowed = f"a number {'>' if open_low else '>='} {low}"
    elif high is not None:
        allowed = f"a number {'<' if open_high else '<='} {high}"
    else:
        allowed = "a finite number"
    raise out_of_range(key, value, allowed + (" or null" if allow_none else ""))


def check_choice(key: str, value: object, choices: Iterable, what: str = "") -> None:
    """Stop unless `value` is one of `choices`.

    Args:
        key: the dotted config key.
        value: its value.
        choices: the values allowed.
        what: what the choices mean, appended to the message (``(hf: ...; vllm: ...)``).

    Raises:
        ConfigError: naming the key, the value and the choices.
    """
    choices = tuple(choices)
    if value not in choices:
        raise out_of_range(key, value, f"one of {choices}" + (f" {what}" if what else ""))


def check_bool(key: str, value: object, allow_none: bool = False) -> None:
    """Stop unless `value` is true or false (or None where allowed).

    Raises:
        ConfigError: naming the key and the value.
    """
    if not isinstance(value, bool) and not (value is None and allow_none):
        raise out_of_range(key, value, "true or false" + (" or null" if allow_none else ""))


def check_format(key: str, value: object, fields: Iterable[str], required: bool = True) -> None:
    """Stop unless `value` is a format string whose fields are among `fields`.

    Args:
        key: the dotted config key (``method.template.user_format``).
        value: the format string.
        fields: the names it may use (``prompt``, ``context``, ``note``).
        required: every one of `fields` must appear.

    Raises:
        ConfigError: not a string, a field it may not use, a field it lacks, or a broken brace.
    """
    fields = tuple(fields)
    names = ", ".join("{" + f + "}" for f in fields)
    if not isinstance(value, str):
        raise out_of_range(key, value, f"a format string with {names}")
    try:
        value.format(**dict.fromkeys(fields, 0.5))
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        raise out_of_range(
            key, value, f"a format string using only {names} ({type(err).__name__}: {err})"
        ) from None
    missing = [f for f in fields if required and "{" + f not in value]
    if missing:
        raise out_of_range(key, value, f"a format string containing {names}; it lacks {missing}")
