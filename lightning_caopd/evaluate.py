r"""Score a model on a data split: accuracy, calibration, a reliability diagram.

Usage (a Hydra app over ``conf/evaluate.yaml``, which takes every group of ``train.yaml``)::

    python -m lightning_caopd.evaluate model=smollm2_135m data=science \
        data.path=../shared/data/science_dev.jsonl data.num_eval=50
    python -m lightning_caopd.evaluate experiment=caopd_science data.path=... \
        checkpoint=outputs/.../checkpoints/last.ckpt

The model is the one ``model`` builds (a Hub name or local folder with ``model=hf``);
``checkpoint`` replaces its weights with a training run's student. Generation follows
``eval``. The run folder receives ``metrics.json`` (the keys of a training run's
evaluation), ``reliability.png`` and ``completions.jsonl`` (one scored completion a line).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from lightning_caopd.callbacks import MetricsWriter
from lightning_caopd.checkpointing import load_checkpoint_file
from lightning_caopd.errors import USER_ERRORS
from lightning_caopd.module import StudentSystem
from lightning_caopd.runner import build_datamodule, build_student, pin_cpu_isa, prepare_base

SPLITS = ("eval", "train", "all")
_MODEL_KEYS = ("pretrained_model_name_or_path", "gguf", "path")  # how a model config names it


def load_student_weights(student: torch.nn.Module, checkpoint: str | Path) -> None:
    """Load the student's weights from a training run's Lightning checkpoint.

    The file is read with ``weights_only=True``: a checkpoint carrying code is refused, not run.

    Args:
        student: a model of the checkpoint's architecture (built from the same model config).
        checkpoint: a ``.ckpt`` file written by ``ModelCheckpoint``.

    Raises:
        ResumeError: the file does not exist, is damaged, or holds more than plain values.
        ValueError: the checkpoint holds no student weights.
    """
    path = Path(checkpoint)
    state = load_checkpoint_file(path).get("state_dict", {})
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
    pin_cpu_isa(cfg.get("cpu_isa"))  # before the first tensor operation
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

    prepare_base(cfg)  # the toy base, on first use
    tokenizer, student, task = build_student(cfg)
    if cfg.get("checkpoint"):
        load_student_weights(student, cfg.checkpoint)
    eval_opts = OmegaConf.to_container(cfg.get("eval") or {}, resolve=True)
    module = StudentSystem(student, tokenizer, task, eval=eval_opts)
    run_info = {
        "model": next((cfg.model[k] for k in _MODEL_KEYS if cfg.model.get(k)), None),
        "checkpoint": cfg.get("checkpoint"),
        "data": cfg.data.path if cfg.split == "train" else cfg.data.get("eval_path"),
        "split": cfg.split,
        "seed": cfg.seed,
    }
    writer = MetricsWriter(out_dir, run=run_info, record_initial=False, completions=True)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[writer])
    loader = DataLoader(items, batch_size=datamodule.eval_batch_size, collate_fn=list)
    trainer.validate(module, dataloaders=loader, verbose=False)
    result = writer.result
    if trainer.is_global_zero:
        summary = ", ".join(f"{k} {result.get(k)}" for k in ("n", "accuracy", "ece", "format_rate"))
        print(f"Wrote {out_dir / 'metrics.json'} ({summary})")
    return result


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    try:
        evaluate(cfg)
    except USER_ERRORS as err:  # a problem the user can fix: its paragraph, not a traceback
        sys.exit(f"Error: {err}")


if __name__ == "__main__":
    main()
