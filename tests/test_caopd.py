"""CaOPD's three replacements, the teacher templates and P_acc."""

import pytest
import torch

from lightning_caopd.calibration import CaOPD, empirical_accuracy
from lightning_caopd.models import build_char_tokenizer
from lightning_caopd.templates import TeacherTemplate, with_confidence

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
    assert new[: len(ids("Answer: 12\n", eos=False))] == sampled[: len(ids("Answer: 12\n", eos=False))]
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


def test_demo_template_puts_context_in_last_user_turn_and_keeps_system():
    t = TeacherTemplate(source="demo")
    item = {"demo": "<answer>B</answer>"}
    ctx, fell_back = t.context(item, ["x", "y"], [False, False])
    assert ctx == "<answer>B</answer>\nConfidence: 1.00" and not fell_back
    student = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q?"}]
    msgs = t.messages(student, ctx, note="NOTE")
    assert msgs[0] == {"role": "system", "content": "SYS"}
    assert msgs[1]["content"].endswith("Q?") and ctx in msgs[1]["content"] and "NOTE" in msgs[1]["content"]
    assert student[1]["content"] == "Q?"  # the student's chat is not mutated


def test_correct_solution_template_uses_first_correct_rollout_or_falls_back():
    t = TeacherTemplate(source="correct_solution")
    item = {"demo": "Answer: d"}
    ctx, fell_back = t.context(item, ["Answer: a\nConfidence: 0.2", "Answer: b\nConfidence: 0.3"], [False, True])
    assert ctx == "Answer: b\nConfidence: 1.00" and not fell_back
    ctx, fell_back = t.context(item, ["Answer: a"], [False])
    assert ctx == "Answer: d\nConfidence: 1.00" and fell_back


def test_bad_template_config_is_a_clear_error():
    with pytest.raises(ValueError, match="source"):
        TeacherTemplate(source="oracle")
    with pytest.raises(ValueError, match="context"):
        TeacherTemplate(user_format="{prompt}{note}")
