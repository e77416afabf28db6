"""Confidence parsing, spans and stripping (`lightning_caopd.confidence`), on good and bad text."""

import doctest

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
        # 0-10 scale
        ("Confidence: 7", 0.7),
        ("Confidence: 10", 1.0),
        ("Confidence: 1.5", 0.15),
        ("Confidence: 8/10", 0.8),
        # 10-100 scale
        ("Confidence: 80", 0.8),
        ("Confidence: 10.5", 0.105),
        ("Confidence: 100", 1.0),
        ("Confidence: 85/100", 0.85),
        # clamping
        ("Confidence: 250", 1.0),
        ("Confidence: -0.3", 0.0),
        ("Confidence: -50%", 0.0),
        # tag form
        ("<confidence>0.3</confidence>", 0.3),
        ("<Confidence> 65% </Confidence>", 0.65),
        ("<confidence>\n9\n</confidence>", 0.9),
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
        number = float(text[start:end])
        assert parse_confidence(text) == pytest.approx(confidence._scale(number, "%" in text))


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
