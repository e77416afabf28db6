"""The arithmetic task: items, the answer parser and verifier, the warm-up's examples."""

from __future__ import annotations

import pytest

from lightning_caopd.tasks.arith import FAMILIES, ArithTask, make_items, parse_answer


@pytest.mark.parametrize(
    "completion, stated",
    [
        ("Answer: 47 + 85 = 132\nConfidence: 0.40", "132"),
        ("Answer: 132", "132"),
        ("Answer: 4+5=9.", "9"),
        ("Answer: 47 + 85 = -3", "-3"),
        ("Answer: 47 + 85", None),  # unfinished: the operand 85 is not an answer
        ("Answer: 1 + 2 = ?", None),
        ("The sum is 132", None),
        ("Answer: 7 + 8 = 15\nAnswer: 16", "15"),  # the first Answer line counts
    ],
)
def test_parse_answer(completion, stated):
    assert parse_answer(completion) == stated


def test_unknown_family_is_refused():
    import random

    from lightning_caopd.tasks.arith import make_item

    assert make_item(random.Random(0), "add1", 0, "x")["category"] == "add1"
    with pytest.raises(ValueError, match="add1 ... add9"):
        make_item(random.Random(0), "mul2", 0, "x")


def test_items_cycle_through_the_families_with_their_digit_counts():
    items = make_items(300, seed=0, split="eval")
    assert [it["category"] for it in items[:6]] == list(FAMILIES) * 2
    for it in items:
        a, b = (int(x) for x in it["messages"][0]["content"][8:-1].split(" + "))
        assert int(it["answer"]) == a + b
        digits = int(it["category"][3:])
        for x in (a, b):
            assert len(str(x)) == digits if digits > 1 else 0 <= x <= 9
        assert parse_answer(it["demo"]) == it["answer"]


def test_items_are_reproducible_and_splits_differ():
    assert make_items(20, 0, "train") == make_items(20, 0, "train")
    train = {it["messages"][0]["content"] for it in make_items(300, 0, "train")}
    evals = make_items(300, 0, "eval")
    add4 = [it["messages"][0]["content"] for it in evals if it["category"] == "add4"]
    assert not train & set(add4)  # 81 million four-digit pairs: no overlap by chance
    assert make_items(20, 0, "eval") != make_items(20, 1, "eval")


def test_verify_and_the_instruction_in_the_system_message():
    task = ArithTask()
    item = make_items(2, 0, "eval")[1]
    assert task.verify(item["demo"] + "\nConfidence: 0.50", item)
    assert not task.verify(f"Answer: {int(item['answer']) + 1}", item)
    chat = task.student_messages(item)
    assert chat[0]["role"] == "system" and "Confidence" in chat[0]["content"]
    assert chat[-1] == item["messages"][-1]


def test_warmup_examples_copy_references_and_state_family_confidences():
    from lightning_caopd.confidence import parse_confidence
    from lightning_caopd.models import build_char_tokenizer
    from lightning_caopd.warmup import ARITH_CONFIDENCES, build_arith_dataset

    tok = build_char_tokenizer()
    data = build_arith_dataset(400, 0, tok, ArithTask().confidence_instruction, "system", 8)
    assert len(data) == 400
    teacher = student = 0
    for prompt, target in data.rows:
        assert target[-1] == tok.eos_token_id
        prompt_text, answer = tok.decode(prompt), tok.decode(target[:-1])
        question = prompt_text[prompt_text.rindex("What is") :].split("?")[0] + "?"
        a, b = (int(x) for x in question[8:-1].split(" + "))
        assert parse_answer(answer) == str(a + b)
        stated = parse_confidence(answer)
        if "Reference solution" in prompt_text:  # the teacher copies the reference's confidence
            teacher += 1
            assert f"Confidence: {stated:.2f}" in prompt_text
            assert stated in {round(k / 8, 2) for k in range(9)}  # on the k/8 grid
        else:
            student += 1
            family = f"add{len(str(a))}"
            assert stated in ARITH_CONFIDENCES[family]
    assert 150 < teacher < 250 and student == 400 - teacher
