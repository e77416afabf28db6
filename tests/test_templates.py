"""Teacher contexts and chats (`lightning_caopd.templates`): demo, correct solution, SDPO."""

import pytest

from lightning_caopd.errors import ConfigError
from lightning_caopd.templates import TeacherTemplate, strip_thinking


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
    with pytest.raises(ConfigError, match="method.template.source='oracle' is out of range"):
        TeacherTemplate(source="oracle")
    with pytest.raises(ConfigError, match=r"method.template.user_format=.*lacks \['context'\]"):
        TeacherTemplate(user_format="{prompt}{note}")
    with pytest.raises(ConfigError, match=r"user_format=.*only \{prompt\}, \{context\}, \{note\}"):
        TeacherTemplate(user_format="{prompt}{context}{note}{answer}")


SDPO_FORMAT = (
    "{prompt}\nCorrect solution:\n\n{context}{note}\n\nCorrectly solve the original question."
)


def sdpo() -> TeacherTemplate:
    return TeacherTemplate(source="sdpo_sibling", user_format=SDPO_FORMAT)


def test_sdpo_rollout_is_never_its_own_context():
    texts = [f"Answer: {c}\nConfidence: 0.{i}" for i, c in enumerate("abcd")]
    contexts, fell_back = sdpo().contexts({"demo": "Answer: z"}, texts, [True, False, True, False])
    # the successes 0 and 2 see each other; the failures see the first success
    assert contexts == [
        "Answer: c\nConfidence: 1.00",
        "Answer: a\nConfidence: 1.00",
        "Answer: a\nConfidence: 1.00",
        "Answer: a\nConfidence: 1.00",
    ]
    assert not fell_back
    # every pattern of verdicts in a group of 4: rollout i's context is never its own text, and
    # it has one exactly when another rollout succeeded
    template = sdpo()
    for bits in range(16):
        correct = [bool(bits >> i & 1) for i in range(4)]
        contexts, _ = template.contexts({"demo": "d"}, texts, correct)
        for i, ctx in enumerate(contexts):
            assert ctx != template.contexts({"demo": "d"}, [texts[i]] * 2, [True, True])[0][0]
            assert (ctx is None) == (sum(correct) - correct[i] == 0)


def test_sdpo_one_success_is_its_siblings_context_and_is_masked_itself():
    texts = ["Answer: a", "Answer: b", "Answer: c"]
    contexts, _ = sdpo().contexts({"demo": "Answer: z"}, texts, [False, True, False])
    assert contexts == [
        "Answer: b\nConfidence: 1.00",
        None,
        "Answer: b\nConfidence: 1.00",
    ]


def test_sdpo_group_without_success_has_no_context_and_no_demo_fallback():
    contexts, fell_back = sdpo().contexts({"demo": "Answer: z"}, ["x", "y"], [False, False])
    assert contexts == [None, None] and not fell_back
    with pytest.raises(ValueError, match="one context per rollout"):
        sdpo().context({"demo": "Answer: z"}, ["x"], [True])


def test_sdpo_prompt_is_the_question_then_the_sibling_then_the_instruction():
    student = [{"role": "user", "content": "Q?"}]
    msgs = sdpo().messages(student, "Answer: b\nConfidence: 1.00", note="NOTE")
    assert msgs[0]["content"] == (
        "Q?\nCorrect solution:\n\nAnswer: b\nConfidence: 1.00\nNOTE"
        "\n\nCorrectly solve the original question."
    )


def test_note_only_prompt_is_the_feedback_reprompt_or_the_user_format_without_context():
    student = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}]
    feedback = TeacherTemplate(
        source="sdpo_sibling",
        user_format=SDPO_FORMAT,
        note_only_format="{prompt}{note}\n\nCorrectly solve the original question.",
    )
    msgs = feedback.note_only_messages(student, "NOTE")
    assert msgs[0] == student[0]
    assert msgs[1]["content"] == "Q?\nNOTE\n\nCorrectly solve the original question."
    toy = TeacherTemplate(source="sdpo_sibling")  # no note_only_format: the context left empty
    assert toy.note_only_messages(student, "NOTE")[1]["content"] == (
        "Reference solution:\n\nNOTE\n\nQ?"
    )
    with pytest.raises(ConfigError, match=r"note_only_format='\{prompt\} only'.*lacks \['note'\]"):
        TeacherTemplate(note_only_format="{prompt} only")


def test_thinking_is_stripped_from_the_sibling():
    assert strip_thinking("<think>a\nb</think>\nAnswer: x") == "Answer: x"
    assert strip_thinking("x <think>1</think> y <think>2</think>z") == "x y z"
    assert strip_thinking("reasoning opened in the prompt</think>Answer: x") == "Answer: x"
    assert strip_thinking("Answer: x") == "Answer: x"
    texts = ["<think>long\nthought</think>\nAnswer: b\nConfidence: 0.3", "Answer: c"]
    contexts, _ = sdpo().contexts({"demo": "d"}, texts, [True, False])
    assert contexts == [None, "Answer: b\nConfidence: 1.00"]
