"""The warm-ups: supervised training of a base student (the toy base, the arithmetic base).

The toy base learns three things: the answer format with a confidence line on every answer; the
``next`` family and half of the ``prev`` family; and to use privileged context, that is, to
copy a reference solution's answer and its stated confidence, with or without the CaOPD note.
Its own confidences are noisy family-level guesses, so that their token entropy is high before
distillation (the paper's entropy-collapse claim is measured against it). The arithmetic base
(SmolLM2-135M-Instruct, ``experiment=smollm2_base``) learns the same from the same recipe,
`supervised_examples`: the answer and confidence format, and the teacher role. Any other task
gets the same from its own training items (``experiment=format_base``, `FormatWarmupModule`),
its verifier deciding which demonstrations are right answers to learn.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_caopd.calibration import CaOPD
from lightning_caopd.checks import check_int, check_number
from lightning_caopd.errors import ConfigError
from lightning_caopd.models import build_char_tokenizer, save_model
from lightning_caopd.module import StudentSystem
from lightning_caopd.rollout import encode_chats
from lightning_caopd.tasks import arith
from lightning_caopd.tasks.base import Task, task_scores
from lightning_caopd.tasks.toy import ToyTask, iter_items, prev_in_warmup
from lightning_caopd.templates import TeacherTemplate, with_confidence

log = logging.getLogger(__name__)

# The base's stated confidence on its own answers: noisy, family-level, overconfident on `code`.
BASE_CONFIDENCES = {
    "next": [0.7, 0.8, 0.9, 1.0],
    "prev": [0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
    "code": [0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
}
# The arithmetic base's: around the accuracy the warmed-up SmolLM2-135M reaches on each family
# (0.83 / 0.61 / 0.49 when it was taught 0.5-0.9 / 0.3-0.7 / 0.1-0.5 and stated 0.50 / 0.18 /
# none: its greedy confidences sit at the low end of what it was taught)
ARITH_CONFIDENCES = {
    "add2": [0.75, 0.8, 0.85, 0.9],
    "add3": [0.55, 0.6, 0.65, 0.7],
    "add4": [0.4, 0.45, 0.5, 0.55],
}


def supervised_examples(
    items: Iterable[dict],
    n: int,
    seed: int,
    task: Task,
    template: TeacherTemplate,
    caopd: CaOPD,
    confidences: Mapping[str, list[float]],
    keep: Callable[[dict], bool] = lambda item: True,
    teacher_share: float = 0.5,
    confidence_steps: int = 100,
) -> list[tuple[list[dict], str]]:
    """(chat, target completion) pairs for a base's warm-up, drawn from `items`.

    A `teacher_share` of them carry a reference solution with a stated confidence (1.00 in a
    third of them, else uniform on the grid 0, 1/`confidence_steps`, ..., 1: 0.01 by default,
    1/K to teach exactly the values P_acc takes), and half of those the CaOPD note too; the
    target copies the reference's answer and confidence. The rest are plain student prompts
    (of the items `keep` accepts) whose target is the item's demonstration with a noisy
    family-level confidence drawn from `confidences[category]`.
    """
    rng = random.Random(seed)
    examples: list[tuple[list[dict], str]] = []
    for item in items:
        if len(examples) == n:
            break
        student = task.student_messages(item)
        if rng.random() < teacher_share:
            sure = rng.random() < 1 / 3
            c = 1.0 if sure else rng.randrange(confidence_steps + 1) / confidence_steps
            line = f"Confidence: {c:.2f}"
            note = caopd.note.format(p_acc=c) if rng.random() < 0.5 else ""
            chat = template.messages(student, with_confidence(item["demo"], line), note)
            examples.append((chat, f"{item['demo']}\n{line}"))
            continue
        if not keep(item):
            continue
        c = rng.choice(confidences[item["category"]])
        examples.append((student, f"{item['demo']}\nConfidence: {c:.2f}"))
    return examples


def warmup_examples(
    n: int,
    seed: int,
    task: ToyTask,
    template: TeacherTemplate,
    caopd: CaOPD,
    world_seed: int = 0,
    teacher_share: float = 0.5,
    confidence_steps: int = 100,
) -> list[tuple[list[dict], str]]:
    """The toy warm-up's `supervised_examples`.

    Student targets for ``prev`` only on the warm-up half of the letters; confidences from
    `BASE_CONFIDENCES`.
    """

    def keep(item: dict) -> bool:
        letter = item["messages"][0]["content"][-1]
        return item["category"] != "prev" or prev_in_warmup(world_seed, letter)

    items = iter_items(seed, "warmup", world_seed)
    return supervised_examples(
        items,
        n,
        seed,
        task,
        template,
        caopd,
        BASE_CONFIDENCES,
        keep,
        teacher_share,
        confidence_steps,
    )


class SFTDataset(Dataset):
    """Tokenized (prompt, target) pairs; the loss counts target tokens only."""

    def __init__(
        self,
        examples: list[tuple[list[dict], str]],
        tokenizer: PreTrainedTokenizerBase,
        chat_template_kwargs: dict | None = None,
    ):
        chats = [chat for chat, _ in examples]
        prompts, _ = encode_chats(tokenizer, chats, chat_template_kwargs=chat_template_kwargs)
        targets = tokenizer([t for _, t in examples], add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        self.rows = [(p, t + [eos]) for p, t in zip(prompts, targets, strict=True)]
        self.pad_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        return self.rows[i]

    def collate(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """Right-padded prompt+target ids with labels -100 outside the targets."""
        width = max(len(p) + len(t) for p, t in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (p, t) in enumerate(rows):
            ids[i, : len(p) + len(t)] = torch.tensor(p + t)
            labels[i, len(p) : len(p) + len(t)] = torch.tensor(t)
            mask[i, : len(p) + len(t)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build_dataset(
    n: int,
    seed: int,
    world_seed: int,
    confidence_instruction: str,
    instruction_role: str = "system",
    confidence_steps: int = 100,
) -> SFTDataset:
    """The warm-up's tokenized examples, for the character tokenizer and default templates."""
    task = ToyTask(confidence_instruction, instruction_role)
    examples = warmup_examples(
        n, seed, task, TeacherTemplate(), CaOPD(), world_seed, confidence_steps=confidence_steps
    )
    return SFTDataset(examples, build_char_tokenizer())


def build_arith_dataset(
    n: int,
    seed: int,
    tokenizer: PreTrainedTokenizerBase,
    confidence_instruction: str,
    instruction_role: str = "system",
    confidence_steps: int = 100,
) -> SFTDataset:
    """The arithmetic base's warm-up examples, tokenized for `tokenizer` (with its chat template).

    `supervised_examples` of addition items, confidences from `ARITH_CONFIDENCES`.
    """
    task = arith.ArithTask(confidence_instruction, instruction_role)
    items = arith.iter_items(seed, "warmup")
    examples = supervised_examples(
        items,
        n,
        seed,
        task,
        TeacherTemplate(),
        CaOPD(),
        ARITH_CONFIDENCES,
        confidence_steps=confidence_steps,
    )
    return SFTDataset(examples, tokenizer)


class WarmupModule(StudentSystem):
    """Supervised warm-up of a base student; saves it with `save_pretrained` at the end.

    Args:
        student: the model to train.
        tokenizer: its tokenizer.
        task: the task (for evaluation).
        optimizer: partial optimizer over the student's parameters.
        save_dir: where the trained base is written.
        scheduler: optional partial LR scheduler.
        eval: evaluation options.
        name: the method's name in logs and metrics.json.
        chat_template_kwargs: keyword arguments of every chat-template call.
    """

    def __init__(
        self,
        student: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        task: ToyTask,
        optimizer: Callable,
        save_dir: str,
        scheduler: Callable | None = None,
        eval: dict | None = None,  # noqa: A002
        name: str = "sft",
        chat_template_kwargs: dict | None = None,
    ) -> None:
        super().__init__(student, tokenizer, task, optimizer, scheduler, eval, chat_template_kwargs)
        self.save_hyperparameters(
            {"name": name, "save_dir": str(save_dir), "eval": asdict(self.eval_cfg)}
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Cross-entropy on the target tokens (labels are -100 elsewhere)."""
        loss = self.student(**batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_fit_end(self) -> None:
        """Save the trained base (rank 0)."""
        if self.trainer.is_global_zero:
            path = save_model(self.student, self.tokenizer, Path(self.hparams.save_dir))
            print(f"Saved the base student to {path}")


def verified_items(task: Task, items: Iterable[dict]) -> tuple[list[dict], int]:
    """The items whose demonstration (``demo``) the task's verifier accepts; how many it rejects.

    A demonstration counts as a right answer as a completion does: its `Task.score` at
    ``task.pass_score`` or above (a verifier that raises on it rejects it, and is logged).
    """
    items = list(items)
    demos = [str(item.get("demo") or "") for item in items]
    scores, _ = task_scores(task, demos, items)
    kept = [item for item, score in zip(items, scores, strict=True) if score >= task.pass_score]
    return kept, len(items) - len(kept)


def _demo_key(item: dict) -> tuple:
    """What identifies an item's demonstration for `FormatWarmupModule.verified`."""
    return item.get("id"), item.get("demo")


class FormatWarmupModule(WarmupModule):
    """The format warm-up of any task (``experiment=format_base``), on its own training items.

    Each training batch is a list of the task's items (the DataModule ``data=`` composes).
    Those whose demonstration the task's verifier accepts (`verified_items`) become
    `supervised_examples`: the student's prompt -> the demonstration and a ``Confidence:``
    line drawn from `confidences`, or, for a `teacher_share` of them, the teacher's
    privileged prompt -> a copy of the reference's answer and confidence. A rejected
    demonstration is never a target: ``train/rejected_demos`` counts them per step, a log line
    over the whole training split at the start; when the verifier accepts none, a `ConfigError`.

    Args:
        student: the model to train.
        tokenizer: its tokenizer.
        task: the task: its prompts and its verifier.
        optimizer: partial optimizer over the student's parameters.
        save_dir: where the trained base is written.
        scheduler: optional partial LR scheduler.
        eval: evaluation options.
        name: the method's name in logs and metrics.json.
        chat_template_kwargs: keyword arguments of every chat-template call.
        template: the teacher's privileged prompt (that of the distillation runs to come).
        caopd: the CaOPD note of half the teacher examples.
        confidences: what a student target states, one drawn per example.
        teacher_share: the share of teacher examples.
        confidence_steps: the teacher examples' stated confidences lie on the grid
            0, 1/steps, ..., 1 (K: the values P_acc takes with K rollouts), or are 1.00.
        seed: the examples' draws (with the step and batch index).
    """

    def __init__(
        self,
        student: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        task: Task,
        optimizer: Callable,
        save_dir: str,
        scheduler: Callable | None = None,
        eval: dict | None = None,  # noqa: A002
        name: str = "format_sft",
        chat_template_kwargs: dict | None = None,
        template: TeacherTemplate | None = None,
        caopd: CaOPD | None = None,
        confidences: Iterable[float] = (0.5, 0.6, 0.7, 0.8, 0.9),
        teacher_share: float = 0.5,
        confidence_steps: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__(
            student,
            tokenizer,
            task,
            optimizer,
            save_dir,
            scheduler,
            eval,
            name,
            chat_template_kwargs,
        )
        self.check_method(
            {
                "confidences": confidences,
                "teacher_share": teacher_share,
                "confidence_steps": confidence_steps,
            }
        )
        self.template = template or TeacherTemplate()
        self.caopd = caopd or CaOPD()
        self.confidences = [float(c) for c in confidences]
        self.teacher_share = teacher_share
        self.confidence_steps = confidence_steps
        self.seed = seed
        self._accepts: dict[tuple[str, str], bool] = {}  # (id, demo) -> the verifier's verdict

    @staticmethod
    def check_method(method: Mapping) -> None:
        """The warm-up's own values among `method` (the ``method`` node), before any model loads.

        Raises:
            ConfigError: naming the key, the value and what is allowed.
        """
        if "confidences" in method:
            confidences = list(method["confidences"])
            if not confidences:
                raise ConfigError(
                    "method.confidences=[] is out of range: it must be a non-empty list of "
                    "numbers in [0, 1] (the confidences the warm-up's student targets state)."
                )
            for c in confidences:
                check_number("method.confidences", c, 0, 1)
        if "teacher_share" in method:
            check_number("method.teacher_share", method["teacher_share"], 0, 1)
        if "confidence_steps" in method:
            check_int("method.confidence_steps", method["confidence_steps"], 1)

    def verified(self, items: list[dict]) -> tuple[list[dict], int]:
        """`verified_items`, each demonstration verified once per run (every epoch repeats them)."""
        new = [it for it in items if _demo_key(it) not in self._accepts]
        accepted = {_demo_key(it) for it in verified_items(self.task, new)[0]}
        for it in new:
            self._accepts[_demo_key(it)] = _demo_key(it) in accepted
        kept = [it for it in items if self._accepts[_demo_key(it)]]
        return kept, len(items) - len(kept)

    def on_fit_start(self) -> None:
        """Count the training split's demonstrations the verifier rejects; none accepted: stop."""
        super().on_fit_start()
        items = getattr(self.trainer.datamodule, "train_items", None)
        if not items:
            return
        kept, rejected = self.verified(items)
        log.info(
            "Format warm-up: the task's verifier accepts %d of the %d training items' "
            "demonstrations; the %d it rejects are not used as targets.",
            len(kept),
            len(items),
            rejected,
        )
        if not kept:
            first = items[0]
            raise ConfigError(
                f"The format warm-up has nothing to learn: the task's verifier "
                f"({type(self.task).__name__}, data.task) rejects the demonstration of every "
                f"one of the {len(items)} training items, e.g. item {first.get('id')!r}: "
                f"{str(first.get('demo'))[:200]!r}. Only a demonstration the verifier accepts "
                "is a target; check the rows' demonstrations (`demo`) against data.task (its "
                "verifier and answer format)."
            )

    def training_step(self, batch: list[dict], batch_idx: int) -> torch.Tensor | None:
        """Cross-entropy on the targets of the batch's verified items (None: no item passes)."""
        kept, rejected = self.verified(batch)
        self.log("train/rejected_demos", float(rejected), reduce_fx="sum", batch_size=len(batch))
        if not kept:  # Lightning skips the optimizer step
            return None
        examples = supervised_examples(
            kept,
            len(kept),
            self.seed * 1_000_003 + self.global_step * 1_009 + batch_idx,
            self.task,
            self.template,
            self.caopd,
            {item["category"]: self.confidences for item in kept},
            teacher_share=self.teacher_share,
            confidence_steps=self.confidence_steps,
        )
        data = SFTDataset(examples, self.tokenizer, self.chat_template_kwargs)
        inputs = {k: v.to(self.device) for k, v in data.collate(data.rows).items()}
        return super().training_step(inputs, batch_idx)


def load_or_build_base(
    path: str, experiment: str = "toy_base", overrides: dict | None = None
) -> str:
    """The load-or-build step of a warmed-up base (``model.base`` of a model config).

    ``conf/model/tiny.yaml`` (the toy base) and ``conf/model/smollm2_arith.yaml`` use it.
    When `path` holds no saved model, runs the warm-up experiment once (``python train.py
    experiment=toy_base`` with `overrides`: about 4 minutes on a laptop CPU; ``smollm2_base``
    about 8), which saves the base there; later runs only load it. Prints what it does either
    way.

    Args:
        path: where the base lives (``model.path``).
        experiment: the experiment that builds it.
        overrides: Hydra overrides for that experiment, ``{"data.world_seed": 0}``.

    Returns:
        `path`.
    """
    from hydra.core.hydra_config import HydraConfig

    from lightning_caopd.config import compose, current_search_path, with_search_path
    from lightning_caopd.runner import run

    target = Path(path)
    if (target / "config.json").is_file():
        print(f"Base: loading {target}")
        return path
    args = [f"experiment={experiment}", f"method.save_dir={target}"]
    args += [f"{k}={v}" for k, v in _flatten(dict(overrides or {}))]
    # the user's config folders of the run that asked (--config-dir, hydra.searchpath): a base
    # of their own data config is composed from the same files
    args = with_search_path(args, current_search_path())
    command = f"python -m lightning_caopd.train {' '.join(args)} hydra.run.dir={target}.run"
    print(f"Base: {target} does not exist yet; building it once with `{command}`.")
    outer = HydraConfig.instance().cfg  # the asking run's; `compose` sets the base run's
    try:
        run(compose(args, f"{target}.run"))
    finally:
        HydraConfig.instance().cfg = outer
    print(f"Base: cached at {target}")
    return path


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    """{"a": {"b": 1}, "c.d": 2} -> [("a.b", 1), ("c.d", 2)] (Hydra override keys)."""
    out = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out += _flatten(dict(v), f"{key}.") if isinstance(v, Mapping) else [(key, v)]
    return out
