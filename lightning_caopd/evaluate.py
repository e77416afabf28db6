r"""Score a model on a data split: accuracy, calibration, a reliability diagram.

Usage (a Hydra app over ``conf/evaluate.yaml``, which takes every group of ``train.yaml``)::

    python -m lightning_caopd.evaluate model=smollm2_135m data=science \
        data.path=../shared/data/science_dev.jsonl data.num_eval=50
    python -m lightning_caopd.evaluate experiment=caopd_science data.path=... \
        checkpoint=outputs/.../checkpoints/last.ckpt

The model is the one ``model`` builds (a Hub name or local folder with ``model=hf``);
``checkpoint`` replaces its weights with a training run's student. Generation follows
``method.eval``. The run folder receives ``metrics.json`` (the keys of a training run's
evaluation), ``reliability.png`` and ``completions.jsonl`` (one scored completion a line).
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from lightning_caopd.module import StudentSystem
from lightning_caopd.runner import (
    METRICS_FILE,
    build_datamodule,
    ensure_model_built,
    write_json_atomic,
)

SPLITS = ("eval", "train", "all")
_MODEL_KEYS = ("pretrained_model_name_or_path", "gguf", "path")  # how a model config names it


class Evaluator(StudentSystem):
    """A student scored with the training loop's own evaluation (no teacher, no optimizer).

    Args:
        student: the model to score.
        tokenizer: its tokenizer.
        task: the domain (prompts, verifier, categories).
        eval: generation options (``max_new_tokens``, ``do_sample``, ``temperature``,
            ``max_prompt_length``).
    """

    def __init__(self, student, tokenizer, task, eval: dict | None = None) -> None:  # noqa: A002
        super().__init__()
        self.student = student
        self.tokenizer = tokenizer
        self.task = task
        self.setup_eval(task, eval or {})


def load_student_weights(student: torch.nn.Module, checkpoint: str | Path) -> None:
    """Load the student's weights from a training run's Lightning checkpoint.

    Args:
        student: a model of the checkpoint's architecture (built from the same model config).
        checkpoint: a ``.ckpt`` file written by ``ModelCheckpoint``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the checkpoint holds no student weights.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint={checkpoint} does not exist.")
    # weights_only=False: a Lightning checkpoint also pickles its hyper-parameters; it is the
    # user's own training output.
    state = torch.load(path, map_location="cpu", weights_only=False).get("state_dict", {})
    prefix = "student."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(
            f"{path} holds no student weights (no 'student.*' keys): pass a checkpoint of "
            "`python train.py` (outputs/.../checkpoints/last.ckpt)."
        )
    student.load_state_dict(weights)


def evaluate(cfg: DictConfig) -> dict:
    """Score the configured model on one split and write the run folder's files.

    Args:
        cfg: the composed ``conf/evaluate.yaml``.

    Returns:
        What was written to ``metrics.json``.
    """
    if cfg.split not in SPLITS:
        raise ValueError(f"split={cfg.split!r}: choose one of {SPLITS}.")
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    datamodule = build_datamodule(cfg)
    if cfg.split == "all":
        if not hasattr(datamodule, "load_items"):
            raise ValueError("split=all needs a file-backed data config (data=science, tooluse).")
        items = datamodule.load_items(datamodule.eval_path, datamodule.eval_split)
    else:
        datamodule.setup("validate")  # a bad path fails here, before the model loads
        items = datamodule.eval_items if cfg.split == "eval" else datamodule.train_items

    ensure_model_built(cfg)  # the toy base, on first use
    tokenizer = instantiate(cfg.model.tokenizer)
    student = instantiate(cfg.model.student)
    if cfg.get("checkpoint"):
        load_student_weights(student, cfg.checkpoint)
    eval_opts = OmegaConf.to_container(cfg.method.get("eval") or {}, resolve=True)
    module = Evaluator(student, tokenizer, instantiate(cfg.data.task), eval_opts)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    module.eval_output_dir = out_dir if trainer.is_global_zero else None
    loader = DataLoader(items, batch_size=datamodule.eval_batch_size, collate_fn=list)
    trainer.validate(module, dataloaders=loader, verbose=False)

    result = dict(module.last_eval)
    result["run"] = {
        "model": next((cfg.model[k] for k in _MODEL_KEYS if cfg.model.get(k)), None),
        "checkpoint": cfg.get("checkpoint"),
        "data": cfg.data.path if cfg.split == "train" else cfg.data.get("eval_path"),
        "split": cfg.split,
        "seed": cfg.seed,
    }
    if trainer.is_global_zero:
        write_json_atomic(result, out_dir / METRICS_FILE)
        with (out_dir / "completions.jsonl").open("w") as f:
            for record in module.eval_records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        summary = ", ".join(f"{k} {result.get(k)}" for k in ("n", "accuracy", "ece", "format_rate"))
        print(f"Wrote {out_dir / METRICS_FILE} ({summary})")
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    evaluate(cfg)


if __name__ == "__main__":
    main()
