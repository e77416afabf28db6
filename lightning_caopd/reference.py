"""The paper's released evaluation, re-implemented: ``eval.protocol=reference``.

SalesforceAIResearch/CaOPD scores its generations with ``eval/run_eval_chemistry.py`` and
``eval/run_eval_tooluse.py``. Their rules, written here from their behaviour (not copied):

* **Science answers** (`science_answer`): the *first* ``<answer>X</answer>`` (X one letter A-D,
  any case, spaces allowed), then an unclosed ``<answer>X`` ending a line, then a letter alone on
  a line (the last one), then ``Answer: X`` / ``answer is X`` (the last one).
* **Tool-use calls** (`first_call`): the first ``Action:`` anywhere (any case; the rest of its
  line is the name) and the first ``{...}`` after the first ``Action Input:`` anywhere (braces
  counted, strings not tracked). A missing or unbalanced input is ``{}``; the input is compared
  as ``json.dumps(json.loads(x), sort_keys=True)``, or as its stripped text when it is not JSON.
  Only the first golden call counts.
* **Confidence** (`lightning_caopd.confidence.reference_reading`): the ``Confidence:`` label's
  number clamped to [0, 1], else a ``<confidence>`` tag's number rescaled (``80`` is 0.8), else
  an unclosed tag's; an output without one counts as confidence **0.0** (``format_ok`` 0).
* **Metrics** (`metrics`): accuracy, Brier, ECE (ten ``linspace``/``digitize`` bins), SPR, OCG
  and mean confidence over *all* N items in float64, the reference's key names, its
  ``bin_stats``, and a ``valid_confidence_only`` block over the items that state a confidence
  when at least two do.

Where the reference raises instead of scoring (a label such as ``Confidence: 0.85.``, a
tool input nested deeper than Python's JSON parser goes, an integer of more than 4300 digits),
this module scores: the label's leading number is read, the input is compared as text.

Its *training* verifier is another rule (`science_training_answer`): the last
``<answer>...</answer>``, whose whole content must be the letter; for tool use it is the
evaluation scorer above (`lightning_caopd.tasks` ``verifier="reference"``).
"""

from __future__ import annotations

import json
import re

import numpy as np

PROTOCOLS = ("default", "reference")
N_BINS = 10

# Possessive quantifiers: each run is followed by a character it cannot match (linear time).
_TAG = re.compile(r"<answer>\s*+([A-Da-d])\s*+</answer>", re.IGNORECASE)
_UNCLOSED = re.compile(r"<answer>\s*+([A-Da-d])[^\S\n]*+$", re.IGNORECASE | re.MULTILINE)
_PHRASE = re.compile(r"[Aa]nswer(?:\s++is)?[:\s]++([A-Da-d])\b")
_BARE = re.compile(r"[A-Da-d]")
_OPEN = re.compile(r"<answer>", re.IGNORECASE)
_ACTION = re.compile(r"action:", re.IGNORECASE)
_WS = re.compile(r"\s*+")


def science_answer(text: str) -> str | None:
    """The option letter the reference's calibration scorer reads, uppercase, or None.

    Example:
        >>> science_answer("<answer>A</answer> no, <answer>C</answer>")  # the first tag
        'A'
        >>> science_answer("I pick\\nb\\nThe answer is D")  # a bare letter before the phrase
        'B'
    """
    for pattern in (_TAG, _UNCLOSED):
        found = pattern.search(text)
        if found:
            return found.group(1).upper()
    for line in reversed(text.strip().splitlines()):
        if _BARE.fullmatch(line.strip()):
            return line.strip().upper()
    letter = None
    for found in _PHRASE.finditer(text):
        letter = found.group(1).upper()
    return letter


def science_verdict(text: str, answer: str | None) -> tuple[bool, str | None]:
    """``(correct, parsed letter)`` as the reference's science scorer gives them.

    An item without an answer is correct when no letter is read (the reference's rule).
    """
    parsed = science_answer(text)
    expected = (answer or "").strip().upper()
    if not expected:
        return parsed is None, parsed
    return parsed == expected, parsed


def science_training_answer(text: str) -> str | None:
    """What the reference's training verifier reads: the content of the last closed tag.

    The content between ``<answer>`` and the first ``<`` after it, when that ``<`` opens
    ``</answer>``, stripped and uppercased; None without such a tag. It must be the letter
    itself to count: ``<answer>(B)</answer>`` and ``<answer>B.</answer>`` do not state B.

    Example:
        >>> science_training_answer("<answer>A</answer> then <answer> b </answer>")
        'B'
        >>> science_training_answer("<answer>(B)</answer>")
        '(B)'
    """
    last, pos = None, 0
    while (opening := _OPEN.search(text, pos)) is not None:
        lt = text.find("<", opening.end())
        if lt >= 0 and text[lt : lt + 9].lower() == "</answer>":
            last, pos = text[opening.end() : lt], lt + 9
        else:
            pos = opening.start() + 1
    return None if last is None else last.strip().upper()


def _action_name(text: str) -> str | None:
    """The name of the first ``Action:`` the reference's ``Action:\\s*([^\\n]+)`` matches."""
    for label in _ACTION.finditer(text):
        start = _WS.match(text, label.end()).end()
        if start < len(text):  # a character that is no space: the rest of its line
            end = text.find("\n", start)
            return text[start : len(text) if end < 0 else end].strip()
        # the spaces reach the end: the pattern backs off to the run's last non-newline
        if text[label.end() :].replace("\n", ""):
            return ""
    return None


def _object_after(text: str, label: str) -> str:
    """The first balanced ``{...}`` after the first `label` (braces only), ``{}`` if none."""
    at = text.find(label)
    if at < 0:
        return ""
    brace = text.find("{", at)
    if brace < 0:
        return "{}"
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace : i + 1]
    return "{}"


def normalize_input(raw: str | None) -> str:
    """An action input as the reference compares it: sorted-key JSON, or its stripped text.

    Example:
        >>> normalize_input(' {"b": 1, "a": 2} '), normalize_input(""), normalize_input("{x}")
        ('{"a": 2, "b": 1}', '{}', '{x}')
    """
    raw = (raw or "").strip()
    if not raw:
        return "{}"
    try:
        return json.dumps(json.loads(raw), sort_keys=True)
    except (ValueError, TypeError, RecursionError):
        return raw


def first_call(text: str) -> dict | None:
    """``{"Action", "Action_Input"}`` of the first call as the reference reads it, or None."""
    name = _action_name(text)
    if name is None:
        return None
    raw = _object_after(text, "Action Input:") or _object_after(text, "Action_Input:")
    return {"Action": name, "Action_Input": normalize_input(raw or "{}")}


def _golden_call(golden: dict) -> dict:
    action = (golden.get("Action") or golden.get("action") or "").strip()
    value = golden.get("Action_Input") or golden.get("Action Input") or "{}"
    if isinstance(value, dict):
        return {"Action": action, "Action_Input": json.dumps(value, sort_keys=True)}
    return {"Action": action, "Action_Input": normalize_input(str(value))}


def tooluse_verdict(text: str, golden: list[dict]) -> tuple[bool, dict | None]:
    """``(correct, parsed call)`` as the reference's tool-use scorer gives them.

    Example:
        >>> tooluse_verdict("Action: ping", [{"Action": "ping", "Action_Input": ""}])[0]
        True
    """
    parsed = first_call(text)
    if not golden:
        return parsed is None, parsed
    if parsed is None:
        return False, None
    gold = _golden_call(golden[0])
    return parsed == gold, parsed


# --- the metrics, float64 over all N items ----------------------------------------------------


def _bins(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    edges = np.linspace(0, 1, n_bins + 1)
    edges[0], edges[-1] = -np.inf, np.inf
    return np.clip(np.digitize(confidence, edges) - 1, 0, n_bins - 1)


def _ece(correct: np.ndarray, confidence: np.ndarray, n_bins: int) -> float:
    index, ece = _bins(confidence, n_bins), 0.0
    for b in range(n_bins):
        mask = index == b
        if np.sum(mask) > 0:
            gap = np.abs(np.mean(confidence[mask]) - np.mean(correct[mask]))
            ece += np.sum(mask) / len(confidence) * gap
    return float(ece)


def _spr(correct: np.ndarray, confidence: np.ndarray) -> float:
    if np.nanmin(correct) == np.nanmax(correct):
        return 0.0
    pos, neg = confidence[correct >= 0.5], confidence[correct < 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return 0.0
    return float(np.mean(pos[:, None] > neg[None, :]))


def _scores(correct: np.ndarray, confidence: np.ndarray, n_bins: int) -> dict:
    return {
        "accuracy": float(np.mean(correct)),
        "brier_score": float(np.mean((confidence - correct) ** 2)),
        "ece": _ece(correct, confidence, n_bins),
        "spr": _spr(correct, confidence),
        "mean_confidence": float(np.mean(confidence)),
    }


def bin_stats(correct: np.ndarray, confidence: np.ndarray, n_bins: int = N_BINS) -> list[dict]:
    """Per-bin ``count``, ``mean_conf`` and ``accuracy`` (None in an empty bin)."""
    index, out = _bins(confidence, n_bins), []
    for b in range(n_bins):
        mask = index == b
        n = int(np.sum(mask))
        out.append(
            {
                "bin": b,
                "low": b / n_bins,
                "high": (b + 1) / n_bins,
                "count": n,
                "mean_conf": float(np.mean(confidence[mask])) if n else None,
                "accuracy": float(np.mean(correct[mask])) if n else None,
            }
        )
    return out


def metrics(
    correct: list[bool],
    confidence: list[float],
    format_ok: list[bool],
    parsed: list[bool] | None = None,
    n_bins: int = N_BINS,
) -> dict:
    """The reference's metrics block, its key names, from per-item verdicts.

    Args:
        correct: each item's verdict.
        confidence: each item's confidence (0.0 where none is stated).
        format_ok: whether each item states one.
        parsed: whether an answer was read from each item (science: ``answer_parse_rate``);
            None leaves the key out, as the tool-use script does.
        n_bins: the ECE's bins.

    Returns:
        ``accuracy``, ``brier_score``, ``ece``, ``spr``, ``overconfidence_gap``,
        ``mean_confidence``, ``confidence_format_adherence``, ``n_samples``, ``n_bins``,
        ``bin_stats`` and, when two or more items state a confidence,
        ``valid_confidence_only``. Empty input: ``{"n_samples": 0}``.

    Example:
        >>> block = metrics([True, False, True], [0.9, 0.0, 0.6], [True, False, True])
        >>> round(block["mean_confidence"], 4), block["valid_confidence_only"]["n_valid"]
        (0.5, 2)
    """
    if not correct:
        return {"n_samples": 0, "n_bins": n_bins}
    c = np.array([1.0 if x else 0.0 for x in correct], dtype=np.float64)
    p = np.array(confidence, dtype=np.float64)
    ok = np.array(format_ok, dtype=bool)
    out = _scores(c, p, n_bins)
    out["overconfidence_gap"] = float(np.mean(p) - np.mean(c))
    out["confidence_format_adherence"] = float(np.mean(ok))
    if parsed is not None:
        out["answer_parse_rate"] = sum(parsed) / len(parsed)
    out.update(n_samples=len(c), n_bins=n_bins, bin_stats=bin_stats(c, p, n_bins))
    if int(ok.sum()) >= 2:
        out["valid_confidence_only"] = {"n_valid": int(ok.sum()), **_scores(c[ok], p[ok], n_bins)}
    return out


def block(records: list[dict], answer_rate: bool) -> dict:
    """`metrics` of the ``reference`` verdicts that `lightning_caopd.scoring` keeps per record.

    Args:
        records: ``completions.jsonl`` records, each with a ``reference`` dict (``correct``,
            ``confidence``, ``format_ok``, ``parsed``).
        answer_rate: report ``answer_parse_rate`` (the reference's science script does).
    """
    ref = [r["reference"] for r in records]
    return metrics(
        [r["correct"] for r in ref],
        [r["confidence"] for r in ref],
        [r["format_ok"] for r in ref],
        [r["parsed"] is not None for r in ref] if answer_rate else None,
    )
