"""The teacher-prompt builder (`lightning_caopd.step.prompts`): template + targets -> inputs."""

import torch

from lightning_caopd.calibration import CaOPD, ConfidenceTargets
from lightning_caopd.models import build_char_tokenizer
from lightning_caopd.step.prompts import TeacherPrompts
from lightning_caopd.tasks.toy import ToyTask, make_items
from lightning_caopd.templates import TeacherTemplate

TOK = build_char_tokenizer()


def _inputs(template: TeacherTemplate, targets, correct: list[bool]):
    batch = make_items(2, 0, "train", 0)
    texts = [
        f"Answer: {batch[i // 3]['answer']}" if ok else "Answer: #" for i, ok in enumerate(correct)
    ]
    builder = TeacherPrompts(template, targets, ToyTask(), TOK, max_prompt_length=None)
    p_acc = torch.tensor(correct, dtype=torch.float).view(2, 3).mean(1)
    return builder(batch, texts, torch.tensor(correct), p_acc)


def test_one_prompt_per_group_serves_its_k_rollouts():
    inputs = _inputs(TeacherTemplate(), ConfidenceTargets(), [True, False, False] * 2)
    assert len(inputs.prompts) == 2 and inputs.rows.tolist() == [True] * 6
    assert inputs.in_loss.all() and inputs.fallbacks == 0 and inputs.n_cut == 0


def test_one_prompt_per_rollout_and_rows_without_a_sibling():
    sdpo = TeacherTemplate(source="sdpo_sibling")
    inputs = _inputs(sdpo, CaOPD(), [True, False, False, False, False, False])
    assert len(inputs.prompts) == 6
    assert inputs.rows.tolist() == [False, True, True, False, False, False]
    assert not inputs.note_rows.any() and inputs.in_loss.sum() == 2
    assert "Empirical confidence: 0.33" in TOK.decode(inputs.prompts[1])
