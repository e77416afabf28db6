"""Confidence parsing, spans and stripping (`lightning_caopd.confidence`), on good and bad text."""

import doctest
import time

import pytest

from lightning_caopd import confidence
from lightning_caopd.confidence import confidence_span, parse_confidence, strip_confidence
from lightning_caopd.tasks import science
from lightning_caopd.tasks.toy import ToyTask


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # plain probabilities
        ("Confidence: 0.8", 0.8),
        ("Confidence: .8", 0.8),
        ("Confidence: 0", 0.0),
        ("Confidence: 1", 1.0),
        ("Confidence: 1.0", 1.0),
        ("Confidence: 1.00", 1.0),
        ("Confidence: 0.00", 0.0),
        ("confidence:0.25", 0.25),
        ("CONFIDENCE :   0.4", 0.4),
        ("Confidence: 0.8.", 0.8),
        ("Confidence: 0.8 (fairly sure)", 0.8),
        ("**Confidence:** 0.65", 0.65),
        ("**Confidence**: 0.65", 0.65),
        # percent
        ("Confidence: 80%", 0.8),
        ("Confidence: 80 %", 0.8),
        ("Confidence: 5%", 0.05),
        ("Confidence: 0.5%", 0.005),
        ("Confidence: 100%", 1.0),
        ("Confidence: 150%", 1.0),
        # whole numbers: 0-10 scale
        ("Confidence: 7", 0.7),
        ("Confidence: 8", 0.8),
        ("Confidence: 10", 1.0),
        ("Confidence: 8/10", 0.8),
        # whole numbers: 10-100 scale
        ("Confidence: 75", 0.75),
        ("Confidence: 80", 0.8),
        ("Confidence: 100", 1.0),
        ("Confidence: 85/100", 0.85),
        # a decimal point, comma or exponent: a probability as written, refused above 1
        ("Confidence: 1.5", None),
        ("Confidence: 10.5", None),
        ("Confidence: 1.0000001", None),
        ("Confidence: 2.0", None),
        ("Confidence: 85.5", None),
        ("Confidence: 0,8", 0.8),
        ("Confidence: ,8", 0.8),
        ("Confidence: 1,5", None),
        ("Confidence: 75,5%", 0.755),
        ("Confidence: 1e-5", 1e-5),
        ("Confidence: 5E-1", 0.5),
        ("Confidence: 2.5e-1", 0.25),
        ("Confidence: 1e2", None),
        ("Confidence: 1e", 1.0),  # no exponent digits: the whole number 1, then text
        ("Confidence: 1e999", None),
        ("Confidence: 0.8, fairly sure", 0.8),
        # clamping
        ("Confidence: 250", 1.0),
        ("Confidence: -0.3", 0.0),
        ("Confidence: -50%", 0.0),
        # tag form
        ("<confidence>0.3</confidence>", 0.3),
        ("<Confidence> 65% </Confidence>", 0.65),
        ("<confidence>\n9\n</confidence>", 0.9),
        ("<confidence>0,8</confidence>", 0.8),
        ("<confidence>3e-1 %</confidence>", 0.003),
        ("<confidence>1.5</confidence>", None),
        ("<confidence>x <confidence>0.3</confidence>", 0.3),  # the innermost opening pairs
        ("<confidence>0.3</confidence></confidence>", 0.3),
        ("<confidence>0.3</confidence><confidence>0.6", 0.3),  # the unclosed one is no tag
        ("<confidence>high</confidence>", None),
        ("<confidence>0.3 maybe</confidence>", None),
        # garbage and absence
        ("Confidence: high", None),
        ("Confidence:", None),
        ("Confidence: %", None),
        ("", None),
        ("The answer is 42.", None),
        ("overconfidence: 0.9", None),
        ("<confidence>0.9", None),
    ],
)
def test_parse_table(text, expected):
    got = parse_confidence(text)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=1e-12)


def test_last_label_wins():
    assert parse_confidence("Confidence: 0.2\nwait...\nConfidence: 0.9") == 0.9
    assert parse_confidence("Confidence: 90%\nConfidence: 0.1") == pytest.approx(0.1)


def test_last_garbage_label_wins_over_earlier_number():
    assert parse_confidence("Confidence: 0.9\nOn reflection, Confidence: unsure") is None


def test_last_by_position_across_forms():
    assert parse_confidence("<confidence>0.2</confidence>\nConfidence: 0.7") == pytest.approx(0.7)
    assert parse_confidence("Confidence: 0.7\n<confidence>0.2</confidence>") == pytest.approx(0.2)
    assert parse_confidence("Confidence: 0.7 <confidence>x</confidence>") is None


def test_answer_numbers_are_not_confidences():
    assert parse_confidence("Answer: 42\n") is None
    assert parse_confidence("Answer: 42\nConfidence: 0.6") == pytest.approx(0.6)


def test_replacement_characters():
    raw = b"\xff\xfeAnswer: 7\xc3\nConfidence: 0.7 \xff\xfe".decode("utf-8", errors="replace")
    assert "\ufffd" in raw
    assert parse_confidence(raw) == pytest.approx(0.7)
    assert parse_confidence("Confidence: \ufffd0.4") is None
    assert parse_confidence("Confidence: \ufffd\ufffd") is None
    assert parse_confidence("\ufffdConfidence: 30%\ufffd") == pytest.approx(0.3)


def test_multiline_label_value():
    # The value may sit on the next line; the model still stated it after the label.
    assert parse_confidence("Confidence:\n0.35") == pytest.approx(0.35)


def test_span_points_at_number():
    text = "Reasoning...\nAnswer: 3\nConfidence: 75%\n"
    start, end = confidence_span(text)
    assert text[start:end] == "75"
    text = "a <confidence> .5 </confidence> b"
    start, end = confidence_span(text)
    assert text[start:end] == ".5"
    text = "Confidence: 0.1\nConfidence: -0.25"
    start, end = confidence_span(text)
    assert text[start:end] == "-0.25"
    assert start == text.rindex("-0.25")


def test_span_none_when_unparseable():
    assert confidence_span("no confidence here") is None
    assert confidence_span("Confidence: high") is None
    assert confidence_span("") is None


def test_span_agrees_with_parse_on_all_table_cases():
    for text in ["Confidence: 0.8", "x <confidence>7</confidence>", "Confidence: 12 %"]:
        start, end = confidence_span(text)
        assert parse_confidence(text) == confidence._read(text[start:end], "%" in text)
    for text in ["Confidence: 0,8", "Confidence: 1e-5", "<confidence>.5</confidence>"]:
        start, end = confidence_span(text)
        assert float(text[start:end].replace(",", ".")) == parse_confidence(text)


def test_refused_number_has_no_span_but_is_still_cut():
    text = "<answer>B</answer>\nConfidence: 1.5"
    assert parse_confidence(text) is None and confidence_span(text) is None
    assert strip_confidence(text) == "<answer>B</answer>\n"


# What the well-formed lines of the toy demo and the teacher's demonstrations give; CaOPD
# splices its target at the span, so these must not move.
WELL_FORMED = [
    ("Confidence: 0.62", 0.62, (12, 16), ""),
    ("Confidence: 1.00", 1.0, (12, 16), ""),
    ("Confidence: 0.00", 0.0, (12, 16), ""),
    ("<answer>B</answer>\nConfidence: 0.62\n", 0.62, (31, 35), "<answer>B</answer>\n"),
    ("Answer: q\nConfidence: 1.00", 1.0, (22, 26), "Answer: q\n"),
    ("x = 3. Confidence: 0.25", 0.25, (19, 23), "x = 3. "),
    ("Answer: q\n<confidence>0.40</confidence>", 0.4, (22, 26), "Answer: q\n"),
]


@pytest.mark.parametrize(("text", "value", "span", "stripped"), WELL_FORMED)
def test_well_formed_lines_parse_exactly(text, value, span, stripped):
    assert parse_confidence(text) == value  # exact: the literal as float() reads it
    assert confidence_span(text) == span
    assert strip_confidence(text) == stripped


def test_strip_cuts_at_line_start():
    assert strip_confidence("Answer: 4\nConfidence: 0.8") == "Answer: 4\n"
    assert strip_confidence("Answer: 4\n**Confidence:** 0.8\n") == "Answer: 4\n"
    assert strip_confidence("Answer: 4\n  - Confidence: 0.8 sure") == "Answer: 4\n"
    assert strip_confidence("Confidence: 0.8") == ""


def test_strip_keeps_answer_on_same_line():
    assert strip_confidence("The answer is 4. Confidence: 0.8") == "The answer is 4. "


def test_strip_uses_winning_marker():
    text = "Step 1: Confidence: 0.2 in this step\nAnswer: 5\nConfidence: 0.9\n"
    assert strip_confidence(text) == "Step 1: Confidence: 0.2 in this step\nAnswer: 5\n"
    assert strip_confidence("Answer: 5\n<confidence>0.9</confidence>") == "Answer: 5\n"


def test_strip_unchanged_without_marker_and_cuts_garbage():
    assert strip_confidence("Answer: 5") == "Answer: 5"
    assert strip_confidence("") == ""
    assert strip_confidence("Answer: 5\nConfidence: very high") == "Answer: 5\n"


def test_doctests():
    result = doctest.testmod(confidence)
    assert result.attempted > 0
    assert result.failed == 0


BAD_TEXTS = [
    "",
    "   ",
    "Answer:",
    "Answer: q",
    "Confidence:",
    "Answer: q\nConfidence: lots",
    "Answer: q\nConfid",
    "\ufffd\ufffdAnswer: \ufffd\nConfidence: \ufffd",
]


@pytest.mark.parametrize("text", BAD_TEXTS)
def test_bad_completions_are_wrong_and_unparseable(text):
    toy_item = {"answer": "l", "family": "next"}
    assert ToyTask().verify(text, toy_item) is False
    assert parse_confidence(text) is None
    assert science.ScienceTask().verify(text, {"answer": "B", "options": ["a", "b"]}) is False


# --- adversarial text: every call returns quickly, in time linear in the text --------------

MB = 1_000_000
ADVERSARIAL = {
    "label, spaces, no colon": ("confidence" + " " * MB, None),
    "label, spaces and stars, no colon": ("Confidence" + " *" * (MB // 2), None),
    "label, spaces around the colon": ("Confidence" + " " * MB + ":" + " " * MB + "0.5", 0.5),
    "unclosed tags": ("<confidence>" * (MB // 12), None),
    "unclosed tag, spaces": ("<confidence>" + " " * MB, None),
    "closing tags only": ("</confidence>" * (MB // 13), None),
    "tag, spaces after the number": ("<confidence>0.5" + " " * MB + "x</confidence>", None),
    "tag, spaces around the percent": (
        "<confidence>50" + " " * MB + "%" + " " * MB + "</confidence>",
        0.5,
    ),
    "repeated labels": ("Confidence: " * (MB // 12), None),
    "repeated tag pairs": ("<confidence>0.5</confidence>" * (MB // 28), 0.5),
    "huge whole number": ("Confidence: " + "9" * MB, 1.0),
    "long decimal": ("Confidence: 0." + "0" * MB + "1", pytest.approx(0.0)),
    "huge exponent": ("Confidence: 1e" + "9" * MB, None),
    "digits, no point digits": ("Confidence: " + "1" * MB + "." + "x", 1.0),
    "newlines": ("\n" * MB, None),
}


def _cpu_seconds(fn, *args) -> float:
    """CPU time of one call (process time: other work on a shared machine does not count)."""
    start = time.process_time()
    fn(*args)
    return time.process_time() - start


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_text_is_parsed_quickly(name):
    # The quadratic parser took 21 s on 8000 unclosed tags; these are a megabyte each and take
    # milliseconds. 2 s of CPU time is far from both.
    text, expected = ADVERSARIAL[name]
    for fn in (parse_confidence, confidence_span, strip_confidence):
        assert _cpu_seconds(fn, text) < 2.0, fn.__name__
    assert parse_confidence(text) == expected
    assert text.startswith(strip_confidence(text))


def test_parse_time_grows_linearly():
    # Four times the text, about four times the time; a quadratic parser takes sixteen. The
    # least of three runs keeps a busy machine's noise out of the ratio.
    def total(n: int) -> float:
        texts = ["confidence" + " " * n, "<confidence>" * (n // 12), "Confidence: " * (n // 12)]
        return sum(min(_cpu_seconds(strip_confidence, t) for _ in range(3)) for t in texts)

    assert total(1_000_000) < 10 * total(250_000)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Confidence: 0.62", 0.62),
        ("Confidence: 8", 1.0),  # clamped, not rescaled
        ("Confidence: 75", 1.0),
        ("confidence:\n0.4", 0.4),  # any case; spaces include newlines
        ("overconfidence: 0.2", 0.2),  # no word boundary
        ("**Confidence:** 0.9", None),  # markdown around the colon: no label
        ("Confidence: 0.85.", 0.85),  # the reference raises; the leading number is read
        ("Confidence: ...", None),
        ("Confidence: 0.2 then <confidence>0.9</confidence>", 0.2),  # a label beats any tag
        ("<confidence>80</confidence>", 0.8),  # tags are rescaled
        ("<confidence>7</confidence>", 0.7),
        ("<confidence>0.5%</confidence>", 0.005),
        ("<confidence>250</confidence>", 1.0),  # 2.5 in the reference: clamped here
        ("<confidence>about 0.4</confidence>", 0.4),
        ("<confidence> </confidence><confidence>0.3", None),  # an empty closed tag wins
        ("<Confidence>0.4</Confidence>", None),  # tags are case-sensitive
        ("<confidence> 6", 0.6),  # unclosed
        ("nothing stated", None),
    ],
)
def test_reference_parser_follows_the_released_scorer(text, expected):
    from lightning_caopd.confidence import parse_confidence_reference

    got = parse_confidence_reference(text)
    assert got == (None if expected is None else pytest.approx(expected))
