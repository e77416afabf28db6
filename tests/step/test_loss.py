"""The loss paths (`lightning_caopd.step.loss`): chosen from method.loss, checked at start-up."""

import pytest
import torch

from lightning_caopd.errors import ConfigError
from lightning_caopd.models import build_char_tokenizer, build_tiny_llama
from lightning_caopd.settings import LossSettings
from lightning_caopd.step.loss import (
    FusedPath,
    LogitsPath,
    LossBatch,
    TopKPath,
    loss_path,
)
from lightning_caopd.step.teacher import make_teacher

TOK = build_char_tokenizer()


@pytest.mark.parametrize(
    ("settings", "kind"),
    [
        ({}, LogitsPath),
        ({"chunk_size": 4}, LogitsPath),
        ({"topk": 5}, TopKPath),
        ({"fused": True}, FusedPath),
        ({"fused": True, "topk": 5}, FusedPath),
    ],
    ids=str,
)
def test_method_loss_chooses_the_path(settings, kind):
    path = loss_path(LossSettings(**settings), TOK.pad_token_id)
    assert type(path) is kind
    assert (path.sharding_refusal is not None) == (kind is FusedPath)


def test_paths_refuse_at_start_up_what_the_models_cannot_serve():
    student = build_tiny_llama(hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    teacher = make_teacher(student)
    vocab = len(TOK)
    loss_path(LossSettings(topk=vocab), TOK.pad_token_id).check(student, teacher)
    with pytest.raises(ConfigError, match=f"topk={vocab + 1} exceeds the vocabulary"):
        loss_path(LossSettings(topk=vocab + 1), TOK.pad_token_id).check(student, teacher)
    teacher.model.lm_head = torch.nn.Sequential(teacher.model.lm_head)  # a head of another kind
    with pytest.raises(ConfigError, match="teacher's output head to be a plain torch.nn.Linear"):
        loss_path(LossSettings(fused=True), TOK.pad_token_id).check(student, teacher)


@pytest.mark.parametrize("share", [True, False])
def test_a_loss_batch_without_importance_gives_no_weights(share):
    student = build_tiny_llama(hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    teacher = make_teacher(student)
    path = loss_path(LossSettings(share_prompt_prefix=share), TOK.pad_token_id)
    prompts = [TOK("ab")["input_ids"], TOK("c")["input_ids"]]
    completions = [TOK(t)["input_ids"] for t in ("x", "yz", "w", "vvv")]
    out = path(student, teacher, LossBatch(prompts, prompts, completions))
    # a teacher equal to the student: zero divergence, on the completions' positions only
    assert out.correction == {} and out.mask.sum() == 7 and out.logits.shape[:2] == (4, 3)
    torch.testing.assert_close(out.loss, torch.tensor(0.0), atol=1e-6, rtol=0)
