"""The frozen teacher: one interface for a separate model, a frozen copy and a LoRA base.

Whatever the teacher is, the rest of the package runs it through `Teacher`: the loss path calls
it like a causal LM (``teacher(**inputs)``) or runs its body (`Teacher.body`), the diagnostics
run it as a causal LM for a block (`Teacher.running`), FSDP shards the weights it owns
(`Teacher.own_models`) and the EMA moves them (`Teacher.owns_weights`). Only this module knows
which kind of teacher it is.
"""

from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from transformers import PreTrainedModel

from lightning_caopd.models import is_lora


class Teacher(ABC):
    """The frozen teacher of a distillation step (see the module docstring).

    Calling it runs the causal LM's forward (eval mode, no gradient flows into it).

    Attributes:
        model: the causal LM whose weights it runs (its own, or the peft student's); read its
            head and config from it, run it through `running`.
        owns_weights: whether it has weights of its own (the system holds them, FSDP shards
            them, an EMA can move them).
    """

    model: torch.nn.Module
    owns_weights: bool

    @abstractmethod
    def running(self) -> contextlib.AbstractContextManager[PreTrainedModel]:
        """The teacher as a causal LM that sampling and evaluation code can run for a block."""

    @abstractmethod
    def body(self, **inputs):
        """The decoder body (no LM head) on `inputs`; its output has ``last_hidden_state``."""

    def own_models(self) -> list[torch.nn.Module]:
        """The models whose weights are the teacher's alone (sharded under ``trainer=fsdp``)."""
        return [self.model] if self.owns_weights else []

    def modules_in_eval(self) -> int:
        """How many of the teacher's own modules sit in eval mode (Lightning counts them)."""
        return 0


class FrozenTeacher(torch.nn.Module, Teacher):
    """A teacher with weights of its own: a separately configured model or a copy of the student.

    Put in eval mode with ``requires_grad`` off; its weights are the system's ``teacher.model.*``
    (checkpoints written before this type, with ``teacher.*``, still load).

    Args:
        model: the causal LM.
    """

    owns_weights = True

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.requires_grad_(False)
        self.eval()
        self.register_load_state_dict_pre_hook(_weights_under_model)

    def forward(self, **inputs):
        """The causal LM's forward."""
        return self.model(**inputs)

    def body(self, **inputs):  # noqa: D102 - see Teacher.body
        return self.model.get_decoder()(**inputs)

    @contextlib.contextmanager
    def running(self) -> Iterator[PreTrainedModel]:  # noqa: D102 - see Teacher.running
        yield self.model

    def modules_in_eval(self) -> int:  # noqa: D102 - see Teacher.modules_in_eval
        return sum(1 for m in self.modules() if not m.training)


def _weights_under_model(module: FrozenTeacher, state_dict: dict, prefix: str, *args) -> None:
    """Load-time hook: an older checkpoint's ``<prefix><name>`` read as ``<prefix>model.<name>``."""
    expected = {f"{prefix}model.{name}" for name in module.model.state_dict()}
    for key in [k for k in state_dict if k.startswith(prefix) and k not in expected]:
        if f"{prefix}model.{key[len(prefix) :]}" in expected:
            state_dict[f"{prefix}model.{key[len(prefix) :]}"] = state_dict.pop(key)


class AdapterDisabledTeacher(Teacher):
    """The base weights of a LoRA student as the frozen teacher: no second copy of the model.

    Runs the student inside peft's ``disable_adapter()`` and in eval mode, so the teacher is
    exactly the model the adapter was added to (the student's initial weights). Not an
    ``nn.Module`` on purpose: registering it would list the student's weights twice.

    Args:
        model: the peft-wrapped student.
    """

    owns_weights = False

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(self, **inputs):
        """The student's forward with the adapter disabled, in eval mode (`running`)."""
        with self.running() as model:
            return model(**inputs)

    def body(self, **inputs):  # noqa: D102 - see Teacher.body
        with self.running() as model:
            return model.get_decoder()(**inputs)

    @contextlib.contextmanager
    def running(self) -> Iterator[PreTrainedModel]:
        """The peft student with its adapter disabled, in eval mode (no dropout), for the block."""
        model, was_training = self.model, self.model.training
        model.eval()
        try:
            with model.disable_adapter():
                yield model
        finally:
            model.train(was_training)


def make_teacher(student: PreTrainedModel, teacher: PreTrainedModel | None = None) -> Teacher:
    """The frozen teacher: `teacher`, or the student's initial weights (self-distillation).

    Self-distilling, the teacher is a deep copy of the student, or, when the student carries a
    LoRA adapter, the student itself with the adapter disabled (`AdapterDisabledTeacher`, no
    copy).
    """
    if teacher is None and is_lora(student):
        return AdapterDisabledTeacher(student)
    return FrozenTeacher(copy.deepcopy(student) if teacher is None else teacher)
