"""P_acc and CaOPD's three replacements (`lightning_caopd.calibration`)."""

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from lightning_caopd.calibration import CaOPD, ConfidenceTargets, empirical_accuracy
from lightning_caopd.confidence import parse_confidence
from lightning_caopd.errors import ConfigError
from lightning_caopd.models import build_char_tokenizer
from lightning_caopd.templates import with_confidence

TOK = build_char_tokenizer()


def ids(text: str, eos: bool = True) -> list[int]:
    out = TOK(text, add_special_tokens=False)["input_ids"]
    return out + [TOK.eos_token_id] if eos else out


def test_p_acc_is_share_correct_per_prompt():
    correct = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    assert empirical_accuracy(correct, 4).tolist() == [0.75, 0.0]


def test_student_replacement_keeps_sampled_tokens_and_appends_p_acc():
    sampled = ids("Answer: 12\nConfidence: 0.95")
    new = CaOPD().student_completion(sampled, 0.375, TOK)
    assert (
        new[: len(ids("Answer: 12\n", eos=False))] == sampled[: len(ids("Answer: 12\n", eos=False))]
    )
    assert TOK.decode(new, skip_special_tokens=True) == "Answer: 12\nConfidence: 0.38"
    assert new[-1] == TOK.eos_token_id


def test_student_replacement_without_confidence_line_appends_one():
    new = CaOPD().student_completion(ids("Answer: 7"), 0.5, TOK)
    assert TOK.decode(new, skip_special_tokens=True) == "Answer: 7\nConfidence: 0.50"


def test_student_replacement_of_truncated_rollout_without_eos():
    new = CaOPD().student_completion(ids("Answer: 7\nConfid", eos=False), 1.0, TOK)
    assert TOK.decode(new, skip_special_tokens=True) == "Answer: 7\nConfid\nConfidence: 1.00"


def test_student_replacement_switch_off_leaves_ids():
    sampled = ids("Answer: 1\nConfidence: 0.9")
    assert CaOPD(replace_student=False).student_completion(sampled, 0.0, TOK) == sampled


def test_teacher_context_replacement_and_note():
    c = CaOPD()
    ctx = with_confidence("Answer: abc", "Confidence: 1.00")
    assert ctx == "Answer: abc\nConfidence: 1.00"
    assert c.teacher_context(ctx, 0.25) == "Answer: abc\nConfidence: 0.25"
    assert "0.25" in c.teacher_note(0.25)
    assert CaOPD(replace_context=False).teacher_context(ctx, 0.25) == ctx
    assert CaOPD(add_note=False).teacher_note(0.25) == ""


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (every byte one token, as in GPT-2's alphabet) with an EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.add_special_tokens({"eos_token": "<|end|>", "pad_token": "<|end|>"})
    return tok


def test_non_utf8_bytes_decode_to_replacement_characters_and_the_splice_still_works():
    tok = _byte_tokenizer()
    eos = tok.eos_token_id
    good = tok("Answer: l\nConfidence: 0.9", add_special_tokens=False)["input_ids"]
    lead, cont = tok("\u00ff", add_special_tokens=False)["input_ids"]  # the bytes C3 BF
    broken = good[:8] + [cont, lead] + good[8:]  # a lone continuation byte, a lead byte before "\n"
    text = tok.decode(broken, skip_special_tokens=True)
    assert "\ufffd" in text and parse_confidence(text) == pytest.approx(0.9)
    caopd = CaOPD()
    answer_line = broken[:11]  # "Answer: l" with the two bad bytes, and its newline
    for ids, kept in (
        ([], []),
        ([eos], []),
        (broken + [eos], answer_line),
        ([lead] * 5, [lead] * 5),
        (good[:12], good[:10]),
    ):
        out = caopd.student_completion(ids, 0.25, tok)
        assert out[: len(kept)] == kept and out[-1] == eos  # sampled tokens kept up to the line
        text = tok.decode(out, skip_special_tokens=True)
        assert text.endswith("Confidence: 0.25") and parse_confidence(text) == 0.25


# --- method.targets.cut: where replacement (a) cuts (last: ours; first: the released code) ---

SECOND_STEP = (
    "Action: a\nAction Input: {}\nConfidence: 0.9\nThought: more\nAction: b\nConfidence: 0.3"
)


def _kept(new: list[int], sampled: list[int], text: str) -> bool:
    """Whether `new` starts with the sampled tokens of `text` (a prefix of `sampled`'s)."""
    n = len(ids(text, eos=False))
    return new[:n] == sampled[:n]


def test_cut_last_keeps_a_step_written_after_a_first_confidence_line_and_cut_first_drops_it():
    sampled = ids(SECOND_STEP)
    last = CaOPD().student_completion(sampled, 0.5, TOK, max_new_tokens=1000)
    assert TOK.decode(last, skip_special_tokens=True) == SECOND_STEP[:-3] + "0.50"
    assert _kept(last, sampled, SECOND_STEP[: -len("Confidence: 0.3")])
    first = CaOPD(cut="first").student_completion(sampled, 0.5, TOK, max_new_tokens=1000)
    assert TOK.decode(first, skip_special_tokens=True) == (
        "Action: a\nAction Input: {}\nConfidence: 0.50"
    )
    assert _kept(first, sampled, "Action: a\nAction Input: {}") and first[-1] == TOK.eos_token_id


def test_cut_first_matches_overconfidence_and_cut_last_does_not():
    text = "Answer: B; no overconfidence: here\nConfidence: 0.8"
    sampled = ids(text)
    last = TOK.decode(CaOPD().student_completion(sampled, 0.25, TOK), skip_special_tokens=True)
    assert last == "Answer: B; no overconfidence: here\nConfidence: 0.25"
    first = CaOPD(cut="first").student_completion(sampled, 0.25, TOK)
    assert TOK.decode(first, skip_special_tokens=True) == "Answer: B; no over\nConfidence: 0.25"
    assert _kept(first, sampled, "Answer: B; no over")


def test_cut_first_strips_trailing_whitespace_and_always_starts_a_new_line():
    cut = CaOPD(cut="first")
    for sampled, want in (
        ("Answer: 7  \n\n", "Answer: 7\nConfidence: 0.50"),  # no label: trailing space goes
        ("Answer: 7 Confidence: 0.9", "Answer: 7\nConfidence: 0.50"),
        ("Confidence: 0.9", "\nConfidence: 0.50"),  # as the reference: "" + "\nConfidence: ..."
    ):
        out = cut.student_completion(ids(sampled), 0.5, TOK)
        assert TOK.decode(out, skip_special_tokens=True) == want and out[-1] == TOK.eos_token_id


def test_cut_first_caps_the_completion_at_the_rollout_length():
    text = "x" * 50 + "\nConfidence: 0.9"
    sampled = ids(text)
    line = "\nConfidence: 0.50"
    first = CaOPD(cut="first")
    out = first.apply([sampled, ids("A: 1")], torch.tensor([0.5]), TOK, max_new_tokens=24)
    # kept tokens dropped from the end until kept + line + EOS fit in 24
    assert len(out[0]) == 24 and out[0][-1] == TOK.eos_token_id
    assert TOK.decode(out[0], skip_special_tokens=True) == "x" * (23 - len(line)) + line
    assert out[0][: 23 - len(line)] == sampled[: 23 - len(line)]
    assert TOK.decode(out[1], skip_special_tokens=True) == "A: 1" + line  # fits: not cut
    # without a cap, or with cut=last (today's rule, never capped), the whole text is kept
    uncapped = first.student_completion(sampled, 0.5, TOK)
    assert TOK.decode(uncapped, skip_special_tokens=True) == "x" * 50 + line
    last = CaOPD().student_completion(sampled, 0.5, TOK, max_new_tokens=24)
    assert len(last) == 50 + len(line) + 1
    # a cap shorter than the line itself: the line is cut too, EOS still last
    short = first.student_completion(sampled, 0.5, TOK, max_new_tokens=6)
    assert short == ids(line, eos=False)[:5] + [TOK.eos_token_id]


def test_targets_out_of_range_are_config_errors():
    with pytest.raises(ConfigError, match="method.targets.cut='middle' is out of range"):
        CaOPD(cut="middle")
    with pytest.raises(ConfigError, match="note_only_rows=true needs method.targets.add_note=true"):
        CaOPD(note_only_rows=True, add_note=False)
    with pytest.raises(ConfigError, match="method.targets.add_note='yes' is out of range"):
        CaOPD(add_note="yes")
    with pytest.raises(
        ConfigError, match=r"confidence_format='Confidence: 1.00'.*lacks \['p_acc'\]"
    ):
        CaOPD(confidence_format="Confidence: 1.00")
    # (the start-up pass checks K against the targets: tests/test_schema.py)
    with pytest.raises(ConfigError, match=r"K >= 2 .*method.rollout.num_rollouts=1\."):
        CaOPD().check(1)
    ConfidenceTargets().check(1)  # OPD needs no P_acc
