"""Parse the verbalised confidence a model states after its answer.

CaOPD (arXiv 2604.16830) asks the student to end each response with a line such as
``Confidence: 0.8``; the metrics score that number against the verifier's verdict. Models
write the number in several ways, so one parser owns the rules:

1. **Markers.** Two forms are recognised, case-insensitively:

   * a label ``Confidence: X`` -- the word ``confidence`` (as a whole word, so
     ``overconfidence:`` does not count), optional spaces or markdown ``*`` before and after
     the colon (``**Confidence:** 0.8`` works), then ``X``;
   * a tag ``<confidence>X</confidence>`` with optional spaces inside.

2. **Which one wins.** The marker that *starts* last in the text wins, whichever its form.
   Its value is the answer even when it is garbage: ``Confidence: 0.9 ... Confidence: high``
   gives ``None``, because the model's final statement is not a number. An earlier number is
   never used as a fallback.

3. **The number.** ``X`` is a decimal number with an optional sign: ``0.8``, ``.8``, ``80``,
   ``-3``; an optional ``%`` may follow, with spaces allowed before it. Text after the number
   on the label's line is ignored (``Confidence: 0.8 (fairly sure)`` gives 0.8); inside a tag
   nothing but the number and an optional ``%`` may stand.

4. **Scale.** ``X%`` means ``X / 100``. A bare ``X`` in ``(1, 10]`` means ``X / 10`` (so
   ``8/10`` reads as 0.8); a bare ``X`` in ``(10, 100]`` means ``X / 100``; anything else is
   taken as it stands. The result is then clamped to ``[0, 1]``: ``250`` gives 1.0, ``-3``
   gives 0.0.

5. **Nothing usable.** No marker, or a winning marker whose value is not a number, gives
   ``None``. Unicode replacement characters (``\\ufffd``, left by decoding bytes that were not
   UTF-8) are ordinary characters: they do not break the parse around them, but a number made
   of them is no number.
"""

import re

_NUMBER = r"[+-]?(?:\d+(?:\.\d+)?|\.\d+)"
_LABEL = re.compile(r"\bconfidence\s*\**\s*:\s*\**[ \t]*", re.IGNORECASE)
_LABEL_VALUE = re.compile(rf"({_NUMBER})[ \t]*(%)?")
_TAG = re.compile(r"<confidence>(.*?)</confidence>", re.IGNORECASE | re.DOTALL)
_TAG_VALUE = re.compile(rf"\s*({_NUMBER})\s*(%)?\s*")


def _winner(text: str) -> tuple[int, tuple[int, int] | None, bool] | None:
    """Find the winning marker.

    Returns:
        ``(marker_start, number_span, is_percent)`` with ``number_span`` ``None`` when the
        winning marker's value is not a number, or ``None`` when there is no marker at all.
    """
    label = next(reversed(list(_LABEL.finditer(text))), None)  # the last of each form
    tag = next(reversed(list(_TAG.finditer(text))), None)
    if label is None and tag is None:
        return None
    if tag is None or (label is not None and label.start() > tag.start()):
        value = _LABEL_VALUE.match(text, label.end())
        return label.start(), (value.span(1) if value else None), bool(value and value[2])
    value = _TAG_VALUE.fullmatch(text, tag.start(1), tag.end(1))
    return tag.start(), (value.span(1) if value else None), bool(value and value[2])


def _scale(number: float, is_percent: bool) -> float:
    """Map a stated number to a probability following rule 4 of the module docstring."""
    if is_percent or 10.0 < number <= 100.0:
        number /= 100.0
    elif 1.0 < number <= 10.0:
        number /= 10.0
    return min(max(number, 0.0), 1.0)


def parse_confidence(text: str) -> float | None:
    """Read the stated confidence of a response as a probability.

    The rules (markers, last one wins, percent and 0-10 / 0-100 scales, clamping) are listed
    in the module docstring.

    Args:
        text: A model response.

    Returns:
        The confidence in ``[0, 1]``, or ``None`` when no usable confidence is stated.

    Example:
        >>> parse_confidence("The answer is 4.\\nConfidence: 80%")
        0.8
        >>> parse_confidence("Confidence: 0.3 <confidence>7</confidence>")
        0.7
        >>> parse_confidence("Confidence: high") is None
        True
    """
    found = _winner(text)
    if found is None or found[1] is None:
        return None
    start, end = found[1]
    return _scale(float(text[start:end]), found[2])


def confidence_span(text: str) -> tuple[int, int] | None:
    """Locate the number of the winning confidence.

    Args:
        text: A model response.

    Returns:
        ``(start, end)`` such that ``text[start:end]`` is the number literal (sign included,
        ``%`` excluded) that :func:`parse_confidence` reads, or ``None`` when it returns
        ``None``.

    Example:
        >>> text = "x = 2\\nConfidence: 90%"
        >>> start, end = confidence_span(text)
        >>> text[start:end]
        '90'
    """
    found = _winner(text)
    return None if found is None else found[1]


def strip_confidence(text: str) -> str:
    """Cut the confidence statement off a response.

    The cut falls at the start of the line holding the winning marker when nothing but
    spaces or markup (no letter or digit) precedes the marker on that line, and at the marker
    itself otherwise, so that an answer written on the same line survives. A winning marker
    whose value is not a number is still cut (it is still a confidence statement).

    Args:
        text: A model response.

    Returns:
        The text before the winning confidence statement, or ``text`` unchanged when there is
        no marker.

    Example:
        >>> strip_confidence("The answer is 4.\\nConfidence: 0.8")
        'The answer is 4.\\n'
        >>> strip_confidence("The answer is 4. Confidence: 0.8")
        'The answer is 4. '
    """
    found = _winner(text)
    if found is None:
        return text
    marker = found[0]
    line_start = text.rfind("\n", 0, marker) + 1
    if any(ch.isalnum() for ch in text[line_start:marker]):
        return text[:marker]
    return text[:line_start]


# --- token spans: which completion tokens state the answer and which the confidence ----------


def char_offsets(ids: list[int], tokenizer) -> list[int]:
    """offsets[i] = length of the decoded text of ids[:i], for i in 0..len(ids)."""
    return [len(tokenizer.decode(ids[:i], skip_special_tokens=True)) for i in range(len(ids) + 1)]


def span_tokens(offsets: list[int], start: int, end: int) -> list[int]:
    """Indices of tokens whose character span overlaps [start, end)."""
    return [i for i in range(len(offsets) - 1) if offsets[i] < end and offsets[i + 1] > start]


def answer_confidence_tokens(ids: list[int], text: str, tokenizer) -> tuple[list[int], list[int]]:
    """Indices of a completion's answer tokens and of its confidence value's tokens.

    The answer is the text before the confidence statement (`strip_confidence`), the confidence
    the number `parse_confidence` reads (`confidence_span`). Evaluation and training measure
    token entropies on these spans.

    Args:
        ids: the completion's token ids.
        text: their decoded text (special tokens skipped).
        tokenizer: decodes prefixes of `ids` to map characters to tokens.
    """
    offsets = char_offsets(ids, tokenizer)
    answer = span_tokens(offsets, 0, len(strip_confidence(text).rstrip()))
    span = confidence_span(text)
    return answer, span_tokens(offsets, *span) if span else []
