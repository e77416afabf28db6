"""The teacher type (`lightning_caopd.step.teacher`): one interface for every kind of teacher."""

import torch

from lightning_caopd.models import apply_lora, build_tiny_llama
from lightning_caopd.step.teacher import AdapterDisabledTeacher, FrozenTeacher, make_teacher


def _llama():
    return build_tiny_llama(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )


def _ids():
    return torch.tensor([[7, 8, 9, 10]])


def test_copy_and_separate_teachers_are_frozen_models_of_their_own():
    student = _llama()
    copy = make_teacher(student)
    separate = make_teacher(student, _llama())
    for teacher in (copy, separate):
        assert isinstance(teacher, FrozenTeacher) and teacher.owns_weights
        assert teacher.own_models() == [teacher.model] and teacher.model is not student
        assert not any(p.requires_grad for p in teacher.parameters())
        assert not teacher.training and teacher.modules_in_eval() == len(list(teacher.modules()))
    assert student.training and all(p.requires_grad for p in student.parameters())
    # called like the model, its body is the model's decoder, and it runs as the model itself
    with torch.no_grad():
        out = copy(input_ids=_ids()).logits
        torch.testing.assert_close(out, student(input_ids=_ids()).logits, atol=0, rtol=0)
        hidden = copy.body(input_ids=_ids()).last_hidden_state
        torch.testing.assert_close(hidden, student.model(input_ids=_ids()).last_hidden_state)
    with copy.running() as model:
        assert model is copy.model


def test_lora_teacher_is_the_student_with_its_adapter_off_and_owns_nothing():
    student = apply_lora(_llama(), r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():  # a non-zero adapter, so that student and base differ
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    teacher = make_teacher(student)
    assert isinstance(teacher, AdapterDisabledTeacher) and not teacher.owns_weights
    assert teacher.own_models() == [] and teacher.modules_in_eval() == 0
    with torch.no_grad():
        with student.disable_adapter():
            base = student(input_ids=_ids()).logits
        adapted = student(input_ids=_ids()).logits
        torch.testing.assert_close(teacher(input_ids=_ids()).logits, base, atol=0, rtol=0)
        assert (adapted - base).abs().max() > 1e-4
        with teacher.running() as model:
            assert model is student and not model.training
    assert student.training  # each run restores the student's mode


def test_checkpoints_with_the_teacher_weights_at_the_top_still_load():
    student, holder = _llama(), torch.nn.Module()
    holder.teacher = make_teacher(student)
    old = {f"teacher.{k}": v + 1 for k, v in student.state_dict().items()}  # before the type
    holder.load_state_dict(old)
    for name, value in student.state_dict().items():
        torch.testing.assert_close(holder.teacher.model.state_dict()[name], value + 1)
    assert all(k.startswith("teacher.model.") for k in holder.state_dict())
