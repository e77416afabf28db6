"""Teacher contexts and chats (`lightning_caopd.templates`): demo, correct solution, bad configs."""

import pytest

from lightning_caopd.templates import TeacherTemplate


def test_demo_template_puts_context_in_last_user_turn_and_keeps_system():
    t = TeacherTemplate(source="demo")
    item = {"demo": "<answer>B</answer>"}
    ctx, fell_back = t.context(item, ["x", "y"], [False, False])
    assert ctx == "<answer>B</answer>\nConfidence: 1.00" and not fell_back
    student = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q?"}]
    msgs = t.messages(student, ctx, note="NOTE")
    assert msgs[0] == {"role": "system", "content": "SYS"}
    assert (
        msgs[1]["content"].endswith("Q?")
        and ctx in msgs[1]["content"]
        and "NOTE" in msgs[1]["content"]
    )
    assert student[1]["content"] == "Q?"  # the student's chat is not mutated


def test_correct_solution_template_uses_first_correct_rollout_or_falls_back():
    t = TeacherTemplate(source="correct_solution")
    item = {"demo": "Answer: d"}
    ctx, fell_back = t.context(
        item, ["Answer: a\nConfidence: 0.2", "Answer: b\nConfidence: 0.3"], [False, True]
    )
    assert ctx == "Answer: b\nConfidence: 1.00" and not fell_back
    ctx, fell_back = t.context(item, ["Answer: a"], [False])
    assert ctx == "Answer: d\nConfidence: 1.00" and fell_back


def test_bad_template_config_is_a_clear_error():
    with pytest.raises(ValueError, match="source"):
        TeacherTemplate(source="oracle")
    with pytest.raises(ValueError, match="context"):
        TeacherTemplate(user_format="{prompt}{note}")
