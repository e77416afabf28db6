"""Models (`lightning_caopd.models`), LoRA: only the adapter trains; the teacher is the base."""

from __future__ import annotations

import lightning as L
import torch
from hydra.utils import instantiate

from lightning_caopd.models import load_pretrained
from lightning_caopd.runner import build
from lightning_caopd.step.teacher import AdapterDisabledTeacher

LORA = "model.lora={r:4,alpha:8,target_modules:[q_proj,v_proj]}"


class RecordGrads(L.Callback):
    """Names of the parameters that received a gradient, after every backward."""

    def __init__(self) -> None:
        self.with_grad: set[str] = set()

    def on_after_backward(self, trainer, pl_module) -> None:
        self.with_grad |= {n for n, p in pl_module.named_parameters() if p.grad is not None}


def _logits(model, ids):
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits


def test_lora_two_steps_trains_the_adapter_against_the_base_teacher(
    toy_base, tiny_overrides, make_cfg, tmp_path
):
    cfg = make_cfg(
        [
            "experiment=toy",
            "method=opd",
            f"model.path={toy_base}",
            *tiny_overrides,
            LORA,
            "method.optimizer.lr=1e-2",
            "method.rollout.max_new_tokens=8",
        ],
        tmp_path,
    )
    module, datamodule = build(cfg)
    tokenizer = module.tokenizer
    student = module.student
    base = load_pretrained(str(toy_base), attn_implementation="eager")

    # no second copy: the teacher is the student itself with the adapter off
    assert isinstance(module.teacher, AdapterDisabledTeacher) and module.teacher.model is student
    assert not any(k.startswith("teacher.") for k in module.state_dict())
    n_module = sum(p.numel() for p in module.parameters())
    n_base = sum(p.numel() for p in base.parameters())
    n_adapter = sum(p.numel() for n, p in student.named_parameters() if "lora_" in n)
    assert n_adapter > 0 and n_module == n_base + n_adapter
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    grads = RecordGrads()
    trainer = instantiate(
        cfg.trainer,
        callbacks=[grads],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2
    assert grads.with_grad and all("lora_" in n for n in grads.with_grad)
    assert {n for n in grads.with_grad if "lora_B" in n}  # the adapter's output side learns

    # the base weights did not move; the adapter did, so the student now differs from the base
    base_state = base.state_dict()
    for name, p in student.get_base_model().state_dict().items():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, base_state[key]), name
    ids = torch.tensor([tokenizer("<|user|>next k<|end|><|assistant|>Answer: l")["input_ids"]])
    with torch.no_grad():
        teacher, want, moved = (
            _logits(module.teacher, ids),
            _logits(base, ids),
            _logits(student, ids),
        )
    torch.testing.assert_close(teacher, want, atol=1e-5, rtol=1e-5)
    assert (moved - want).abs().max() > 1e-3
    assert student.training  # the teacher call restores the student's mode
