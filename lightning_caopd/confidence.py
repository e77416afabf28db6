"""Parse the verbalised confidence a model states after its answer.

CaOPD (arXiv 2604.16830) asks the student to end each response with a line such as
``Confidence: 0.8``; the metrics score that number against the verifier's verdict. Models
write the number in several ways, so one parser owns the rules:

1. **Markers.** Two forms are recognised, case-insensitively:

   * a label ``Confidence: X`` -- the word ``confidence`` (as a whole word, so
     ``overconfidence:`` does not count), optional spaces or markdown ``*`` before and after
     the colon (``**Confidence:** 0.8`` works), then ``X``;
   * a tag ``<confidence>X</confidence>`` with optional spaces inside. An opening tag
     pairs with the first closing tag after it, the innermost opening when several stand
     before it (``<confidence>x <confidence>0.3</confidence>`` states 0.3).

2. **Which one wins.** The marker that *starts* last in the text wins, whichever its form.
   Its value is the answer even when it is garbage: ``Confidence: 0.9 ... Confidence: high``
   gives ``None``, because the model's final statement is not a number. An earlier number is
   never used as a fallback.

3. **The number.** ``X`` is a decimal number with an optional sign: ``0.8``, ``.8``, ``80``,
   ``-3``; a decimal comma counts as a decimal point (``0,8`` is 0.8) and an exponent is
   read as one (``1e-5`` is 0.00001, ``5E-1`` is 0.5); an optional ``%`` may follow, with
   spaces allowed before it. Text after the number on the label's line is ignored
   (``Confidence: 0.8 (fairly sure)`` gives 0.8, ``8/10`` gives 0.8); inside a tag nothing
   but the number and an optional ``%`` may stand.

4. **Scale.** How ``X`` is written decides how it is read:

   * ``X%`` means ``X / 100``, whatever ``X`` looks like (``0.5%`` is 0.005).
   * A whole number (digits only, no point, comma or exponent) may be on a 0-10 or 0-100
     scale, as people write them: ``0`` and ``1`` are taken as they stand, ``2`` to ``10``
     mean ``X / 10`` (``8`` is 0.8), ``11`` to ``100`` mean ``X / 100`` (``75`` is 0.75).
   * A number with a decimal point, a decimal comma or an exponent is a probability as
     written (``0.62`` is 0.62, ``1.00`` is 1.0). Above 1 it is refused (``None``):
     ``1.5``, ``10.5`` and ``1.0000001`` could mean 15 %, 10.5 %, "about 1" or a slip, and
     a guessed scale would put a wrong number into the metrics.

   The result is then clamped to ``[0, 1]``: ``250`` and ``150%`` give 1.0, ``-3`` and
   ``-0.3`` give 0.0.

5. **Nothing usable.** No marker, or a winning marker whose value is not a number (or is a
   refused one), gives ``None``. Unicode replacement characters (``\\ufffd``, left by
   decoding bytes that were not UTF-8) are ordinary characters: they do not break the parse
   around them, but a number made of them is no number.

Every function here runs in time linear in the length of the text, whatever the model
wrote: the patterns use possessive quantifiers (no backtracking into a run of spaces or
digits), and the last marker is found by one pass back from the end of the text, so a
rollout of a million spaces or of a thousand unclosed tags costs milliseconds, not minutes.
"""

import re

# Possessive quantifiers (`*+`, `++`, `?+`) never give back what they took: each piece below is
# followed by something its characters cannot match, so they find the same matches as the
# plain forms, in one pass.
_NUMBER = r"[+-]?+(?:\d++(?:[.,]\d++)?+|[.,]\d++)(?:[eE][+-]?+\d++)?+"
# `.*` anchored at the start runs to the end once and backs off to the last match of the rest.
_LAST_LABEL = re.compile(r".*(\bconfidence\s*+\**+\s*+:\s*+\**+[ \t]*+)", re.IGNORECASE | re.DOTALL)
_LABEL_VALUE = re.compile(rf"({_NUMBER})[ \t]*+(%)?")
_LAST_OPEN = re.compile(r".*(<confidence>)", re.IGNORECASE | re.DOTALL)
_LAST_CLOSE = re.compile(r".*(</confidence>)", re.IGNORECASE | re.DOTALL)
_CLOSE_TAG = re.compile(r"</confidence>", re.IGNORECASE)
_TAG_VALUE = re.compile(rf"\s*+({_NUMBER})\s*+(?:(%)\s*+)?")


def _last_tag(text: str) -> tuple[int, int, int] | None:
    """The last closed ``<confidence>...</confidence>``, innermost opening first.

    The last opening tag before the last closing tag pairs with the first closing tag after
    it: no opening tag stands between them, and none after them has a closing tag.

    Returns:
        ``(tag_start, content_start, content_end)``, or ``None`` when no tag is closed.
    """
    last_close = _LAST_CLOSE.match(text)
    if last_close is None:
        return None
    opening = _LAST_OPEN.match(text, 0, last_close.start(1))
    if opening is None:
        return None
    closing = _CLOSE_TAG.search(text, opening.end())
    return opening.start(1), opening.end(), closing.start()


def _winner(text: str) -> tuple[int, tuple[int, int] | None, bool] | None:
    """Find the winning marker.

    Returns:
        ``(marker_start, number_span, is_percent)`` with ``number_span`` ``None`` when the
        winning marker's value is not a number, or ``None`` when there is no marker at all.
    """
    label = _LAST_LABEL.match(text)
    tag = _last_tag(text)
    if label is None and tag is None:
        return None
    if tag is None or (label is not None and label.start(1) > tag[0]):
        value = _LABEL_VALUE.match(text, label.end(1))
        return label.start(1), (value.span(1) if value else None), bool(value and value[2])
    value = _TAG_VALUE.fullmatch(text, tag[1], tag[2])
    return tag[0], (value.span(1) if value else None), bool(value and value[2])


def _read(literal: str, is_percent: bool) -> float | None:
    """Map a stated number to a probability following rule 4 of the module docstring.

    Args:
        literal: the number as written (sign, digits, point or comma, exponent).
        is_percent: whether a ``%`` follows it.

    Returns:
        The probability in ``[0, 1]``, or ``None`` for a refused value.
    """
    # `\d` matches Unicode decimal digits, every one of which float() reads.
    number = float(literal.replace(",", "."))
    if is_percent:
        number /= 100.0
    elif any(ch in literal for ch in ".,eE"):
        if number > 1.0:
            return None
    elif 1.0 < number <= 10.0:
        number /= 10.0
    elif 10.0 < number <= 100.0:
        number /= 100.0
    return min(max(number, 0.0), 1.0)


def _stated(text: str) -> tuple[int, tuple[int, int] | None, float | None] | None:
    """The winning marker's start, its number's span and its value (see `_winner`).

    A refused number (rule 4) keeps no span, so the span and the value are ``None`` together.
    """
    found = _winner(text)
    if found is None:
        return None
    marker, span, is_percent = found
    value = None if span is None else _read(text[span[0] : span[1]], is_percent)
    return marker, (span if value is not None else None), value


def parse_confidence(text: str) -> float | None:
    """Read the stated confidence of a response as a probability.

    The rules (markers, last one wins, how numbers are written, scales, clamping) are listed
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
        >>> parse_confidence("Confidence: 1.5") is None
        True
    """
    found = _stated(text)
    return None if found is None else found[2]


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
    found = _stated(text)
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


# --- the released CaOPD scorer's reading (eval.scoring=reference) -------------------------------

_REF_LABEL = re.compile(r"confidence:\s*([\d.]+)", re.IGNORECASE)
_REF_TAG = re.compile(r"<confidence>(.*?)</confidence>", re.DOTALL)
_REF_OPEN_TAG = re.compile(r"<confidence>\s*(\d+(?:\.\d+)?)\s*%?")
_REF_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_LEADING_NUMBER = re.compile(r"\d*\.?\d+|\d+")


def _reference_scale(value: float, raw: str) -> float:
    """The reference's scale rule for tag values (not for the ``Confidence:`` label)."""
    if "%" in raw or 10.0 < value <= 100.0:
        return value / 100.0
    if 1.0 < value <= 10.0:
        return value / 10.0
    if 0.0 <= value <= 1.0:
        return value
    return value / 100.0 if value > 100.0 else value / 10.0


def _clamp(value: float) -> float | None:
    return None if value != value else min(max(value, 0.0), 1.0)  # NaN: nothing stated


def parse_confidence_reference(text: str) -> float | None:
    """Read a stated confidence the way the released CaOPD scorer does (``eval.scoring=reference``).

    The rules of SalesforceAIResearch/CaOPD ``eval/parse_confidence.py`` (re-implemented, not
    copied), where they differ from :func:`parse_confidence`:

    1. A label ``Confidence:`` (any case, no markdown around the colon, so ``**Confidence:**
       0.8`` is not read; no word boundary, so ``overconfidence: 0.8`` is) followed by spaces and
       a run of digits and points. The last such label anywhere wins over every tag. Its
       number is **clamped, never rescaled**: ``80`` and ``8`` give 1.0, ``0.62`` gives 0.62.
    2. Without a label, the last closed ``<confidence>...</confidence>`` (lower case only) and
       its content, stripped: empty gives nothing; a number (or the first number in it) is
       rescaled as the reference does: ``%`` or 10 < x <= 100 -> x/100, 1 < x <= 10 -> x/10,
       above 100 -> x/100, below 0 -> x/10.
    3. Without either, the last unclosed ``<confidence>X`` (with an optional ``%``), rescaled
       the same way.

    Two places where the reference cannot serve as it stands, decided here: a label whose run
    is not one number (``Confidence: 0.85.``, ``Confidence: ...``) makes the reference raise;
    here the longest number the run starts with is read (0.85), and a run without one states
    nothing. A rescaled tag value outside [0, 1] (``<confidence>250</confidence>`` is 2.5 in
    the reference) is clamped, since the metrics take probabilities. Where the reference
    scores an unparsed output as confidence 0 in its headline numbers, here it states nothing
    (``None``), as in the default mode (the reference's ``valid_confidence_only`` numbers).

    Example:
        >>> parse_confidence_reference("Confidence: 80")  # clamped, not 0.8
        1.0
        >>> parse_confidence_reference("<confidence>80</confidence>")  # tags are rescaled
        0.8
        >>> parse_confidence_reference("**Confidence:** 0.8") is None
        True
    """
    stated, value = reference_reading(text)
    return _clamp(value) if stated else None


def reference_reading(text: str) -> tuple[bool, float]:
    """``(stated, value)`` by the rules of `parse_confidence_reference`, unclamped.

    What the reference's headline metrics take (``eval.protocol=reference``): 0.0 when nothing
    is stated, and a rescaled tag value as it comes (``<confidence>250</confidence>`` is 2.5).

    Example:
        >>> reference_reading("<answer>B</answer>")
        (False, 0.0)
        >>> reference_reading("<confidence>250</confidence>")
        (True, 2.5)
    """
    labels = _REF_LABEL.findall(text)
    if labels:
        number = _LEADING_NUMBER.match(labels[-1])
        if number is None:  # a run of points only: the reference raises; nothing stated here
            return False, 0.0
        return True, min(float(number.group()), 1.0)  # clamped, never rescaled
    tags = _REF_TAG.findall(text)
    if tags:
        content = tags[-1].strip()
        if not content:
            return False, 0.0
        try:
            value = float(content)
        except ValueError:
            found = _REF_NUMBER.search(content)
            if found is None:
                return False, 0.0
            value = float(found.group())
        return True, _reference_scale(value, content)
    unclosed = list(_REF_OPEN_TAG.finditer(text))
    if unclosed:
        last = unclosed[-1]
        return True, _reference_scale(float(last.group(1)), last.group())
    return False, 0.0


PARSERS = {"default": parse_confidence, "reference": parse_confidence_reference}

_REF_FIRST_LABEL = re.compile(r"confidence:", re.IGNORECASE)


def strip_confidence_reference(text: str) -> str:
    """Cut a response at its *first* ``Confidence:``, as the released CaOPD trainer does.

    The rule of SalesforceAIResearch/CaOPD ``distil_trainer.py``'s CaOPD rewrite (re-implemented,
    not copied; ``method.targets.cut=first``): everything from the first ``Confidence:`` (any
    case, the colon right after the word, no word boundary, so ``overconfidence:`` counts) to
    the end goes, and what is left (all of it when there is no label) loses its trailing
    whitespace, the newline before the label included. Unlike `strip_confidence` (the last
    marker wins), whatever follows a first confidence line goes too: a tool-use rollout that
    states a confidence and then writes another step keeps only its first step.

    Example:
        >>> strip_confidence_reference("Action: a\\nConfidence: 0.9\\nAction: b\\nConfidence: 0.3")
        'Action: a'
        >>> strip_confidence_reference("No overconfidence: here")
        'No over'
    """
    found = _REF_FIRST_LABEL.search(text)
    return (text if found is None else text[: found.start()]).rstrip()


# --- token spans: which completion tokens state the answer and which the confidence ----------


def decode_all(tokenizer, id_lists: list[list[int]]) -> list[str]:
    """``tokenizer.decode(ids, skip_special_tokens=True)`` of every list in `id_lists`.

    A fast tokenizer that does no clean-up decodes them all in one call of its backend (what its
    `decode` does to each; the training callbacks decode every rollout of every step); any other
    decodes them one by one.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return backend.decode_batch([list(ids) for ids in id_lists], skip_special_tokens=True)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in id_lists]


def char_offsets(ids: list[int], tokenizer) -> list[int]:
    """offsets[i] = length of the decoded text of ids[:i], for i in 0..len(ids)."""
    return [len(t) for t in decode_all(tokenizer, [ids[:i] for i in range(len(ids) + 1)])]


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
