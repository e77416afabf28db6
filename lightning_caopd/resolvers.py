"""OmegaConf resolvers the shipped configs use (registered when the package is imported)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from lightning_caopd.errors import ConfigError


def held_out_or_all(path, eval_path, held_out: int) -> int | None:
    """``data.num_eval`` of the paper presets: `held_out` rows of one file, or a whole eval set.

    When `eval_path` names the training rows (the same string, or the same file once
    resolved), `held_out` of them are held out for evaluation; when it names a separate set
    (the paper's eval sets), every row of it is scored (``None``).

    Examples:
        >>> held_out_or_all("train.jsonl", "train.jsonl", 50)
        50
        >>> held_out_or_all("train.jsonl", "eval.jsonl", 50) is None
        True
    """
    if eval_path is None or str(eval_path) == str(path):
        return held_out
    a, b = Path(str(path)).expanduser(), Path(str(eval_path)).expanduser()
    if a.exists() and b.exists() and a.resolve() == b.resolve():
        return held_out
    return None


def mul(a, b) -> int | float:
    """``${caopd.mul:${size},2}``: a product in a config (a model width from the sweep's size).

    Examples:
        >>> mul(64, 2)
        128
    """
    return a * b


def div(a, b) -> int:
    """``${caopd.div:32,${method.rollout.num_rollouts}}``: an exact quotient of whole numbers.

    The K ablation keeps 32 completions per optimizer step: prompts per step = 32 / K.

    Raises:
        ConfigError: unless both are whole numbers and `b` (>= 1) divides `a`; the message
            lists the divisors of `a`.

    Examples:
        >>> div(32, 8)
        4
    """
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (a, b)):
        raise ConfigError(f"${{caopd.div:{a},{b}}} divides whole numbers; got {a!r} and {b!r}.")
    if b < 1 or a % b:
        divisors = [d for d in range(1, abs(a) + 1) if a % d == 0]
        raise ConfigError(
            f"${{caopd.div:{a},{b}}}: {b} does not divide {a}; the divisor must be one of "
            f"{divisors}. In experiment=paper/k_ablation it is K x data.batch_size (32 "
            "completions per optimizer step): choose method.rollout.num_rollouts so that it is."
        )
    return a // b


def register() -> None:
    """Register the resolvers once (``caopd.held_out_or_all``, ``caopd.mul``, ``caopd.div``)."""
    for name, fn in (
        ("caopd.held_out_or_all", held_out_or_all),
        ("caopd.mul", mul),
        ("caopd.div", div),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
