"""OmegaConf resolvers the shipped configs use (registered when the package is imported)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


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


def register() -> None:
    """Register the resolvers once (``caopd.held_out_or_all``, ``caopd.mul``)."""
    for name, fn in (("caopd.held_out_or_all", held_out_or_all), ("caopd.mul", mul)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
