r"""Score a model on a data split: accuracy, calibration, a reliability diagram.

Usage (a Hydra app over ``conf/evaluate.yaml``, which takes every group of ``train.yaml``)::

    python -m lightning_caopd.evaluate model=smollm2_135m data=science \
        data.path=../shared/data/science_dev.jsonl data.num_eval=50
    python -m lightning_caopd.evaluate experiment=science method=caopd data.path=... \
        checkpoint=outputs/.../checkpoints/last.ckpt

The model is the one ``model`` builds (a Hub name or local folder with ``model=hf``);
``checkpoint`` replaces its weights with a training run's student; when the checkpoint lies in
a training run's directory, that run's own overrides (``.hydra/overrides.yaml``: model, data,
method, ...) are composed first, so ``checkpoint=<run dir>/checkpoints/last.ckpt`` alone scores
it on its own data (command-line overrides still win); the user's config folders of that run
and of the command line (``--config-dir``, ``hydra.searchpath``) are searched again, so its
``experiment=`` of the user's own is found. Generation follows ``eval``. The run
folder receives ``metrics.json`` (the keys of a training run's evaluation), ``reliability.png``,
``completions.jsonl`` (one scored completion a line, with its prompt) and ``evaluate.log``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from lightning_caopd.callbacks import MetricsWriter
from lightning_caopd.checkpointing import student_state_dict
from lightning_caopd.config import current_search_path, user_search_path, with_search_path
from lightning_caopd.errors import ConfigError, exit_with, user_message
from lightning_caopd.module import StudentSystem
from lightning_caopd.runner import (
    build_student,
    chat_template_kwargs,
    check_config,
    lock_output_dir,
    pin_cpu_isa,
    prepare_base,
    quiet_console,
    summary,
)
from lightning_caopd.settings import EvalSettings, from_config

log = logging.getLogger(__name__)

SPLITS = ("eval", "train", "all")
_MODEL_KEYS = ("pretrained_model_name_or_path", "gguf", "path")  # how a model config names it
# a training run's overrides that say how it trained or where it wrote, not what it trained
_TRAINING_ONLY = (
    "hydra",
    "ckpt_path",
    "checkpoint",
    "trainer",
    "callbacks",
    "logger",
    "paths.output_dir",
    "eval_before_training",
    "optimized_metric",
    "split",
)


class EvalProgress(L.Callback):
    """Logs how many items are scored so far, one line per batch (generation is slow)."""

    def __init__(self, total: int) -> None:
        super().__init__()
        self.total = total
        self.done = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args):  # noqa: D102
        self.done += len(batch)
        if trainer.is_global_zero:
            log.info("Scored %d/%d items", min(self.done, self.total), self.total)


def _key(override: str) -> str:
    """The key an override sets: ``model`` for ``model=hf``, ``a.b`` for ``+a.b=1``."""
    return override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def training_run_overrides(checkpoint: str | Path) -> tuple[list[str], Path | None]:
    """The overrides of the training run a checkpoint belongs to, and that run's directory.

    Args:
        checkpoint: ``<run dir>/checkpoints/last.ckpt`` (or a file directly in the run dir).

    Returns:
        The run's ``.hydra/overrides.yaml`` without those about training only (trainer,
        callbacks, logger, ``ckpt_path``, the output directory), and the run directory; ``[]``
        and None for a checkpoint outside a run directory.
    """
    ckpt = Path(checkpoint).expanduser().resolve()
    for folder in (ckpt.parent, ckpt.parent.parent):
        file = folder / ".hydra" / "overrides.yaml"
        if file.is_file():
            kept = [
                str(o)
                for o in OmegaConf.to_container(OmegaConf.load(file))
                if not any(
                    _key(str(o)) == k or _key(str(o)).startswith(k + ".") for k in _TRAINING_ONLY
                )
            ]
            return kept, folder
    return [], None


def merge_overrides(run: list[str], cli: list[str]) -> list[str]:
    """The training run's overrides, then the command line's; a key on both: the command line's.

    Examples:
        >>> merge_overrides(["model=hf", "data=science"], ["model=tiny", "split=all"])
        ['data=science', 'model=tiny', 'split=all']
    """
    given = {_key(o) for o in cli}
    return [o for o in run if _key(o) not in given] + list(cli)


def student_overrides(student: str | Path) -> tuple[list[str], Path | None]:
    """The overrides of ``student=<folder>``: ``model=hf`` on that folder, the rest as given.

    When the folder is a training run's ``student/``, that run's overrides other than its model
    (data, experiment, ...) come first, as for ``checkpoint=``; the command line's win.

    Returns:
        The overrides and the training run's directory (None: the folder is no run's).
    """
    cli = [o for o in HydraConfig.get().overrides.task if _key(o) != "student"]
    run, folder = training_run_overrides(Path(student) / "config.json")
    if folder is not None:
        log.info("Composing the training run's config (%s): %s", folder, " ".join(run))
    run = [o for o in run if _key(o) != "model" and not _key(o).startswith("model.")]
    model = ["model=hf", f"model.pretrained_model_name_or_path={Path(student).resolve()}"]
    return merge_overrides(run + model, cli), folder


def training_run_search_path(folder: Path | None) -> list[str]:
    """The user's config folders a training run composed from (its ``.hydra/hydra.yaml``).

    Args:
        folder: the run directory (`training_run_overrides`' second value), or None.

    Returns:
        Its ``--config-dir`` and ``hydra.searchpath`` folders (``file://...``); ``[]`` for
        None or a run without the file.
    """
    file = None if folder is None else Path(folder) / ".hydra" / "hydra.yaml"
    if file is None or not file.is_file():
        return []
    return user_search_path(OmegaConf.load(file).get("hydra"))


def recompose(overrides: list[str], folder: Path | None) -> DictConfig:
    """``conf/evaluate.yaml`` with `overrides`, searched where the training run and we were.

    Hydra's second composition does not carry ``hydra.searchpath`` over, and a training run's
    ``.hydra/overrides.yaml`` holds none of its ``hydra.*`` overrides; both come back here as
    one ``hydra.searchpath``, the command line's folders first (a config in both: this one's).

    Args:
        overrides: the merged overrides (`merge_overrides`).
        folder: the training run's directory, or None.
    """
    searched = [*current_search_path(), *training_run_search_path(folder)]
    return hydra.compose(config_name="evaluate", overrides=with_search_path(overrides, searched))


def load_student_weights(student: torch.nn.Module, checkpoint: str | Path) -> None:
    """Load a trained student's weights: a run directory, its ``student/`` or a ``.ckpt``.

    Checkpoints are read with ``weights_only=True``: one carrying code is refused, not run
    (`lightning_caopd.checkpointing.student_state_dict`).

    Raises:
        ResumeError: nothing loadable there, a damaged or foreign file, or no student weights.
    """
    student.load_state_dict(student_state_dict(checkpoint, key="checkpoint"))


def evaluate(cfg: DictConfig) -> dict:
    """Score the configured model on one split and write the run folder's files.

    Args:
        cfg: the composed ``conf/evaluate.yaml``.

    Returns:
        What was written to ``metrics.json``.
    """
    if cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split!r} is out of range: it must be one of {SPLITS}.")
    pin_cpu_isa(cfg.get("cpu_isa"))  # before the first tensor operation
    quiet_console()
    datamodule = check_config(cfg, read_rows=cfg.split != "all")  # before any model loads
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with lock_output_dir(out_dir):
        return _score(cfg, out_dir, datamodule)


def _score(cfg: DictConfig, out_dir: Path, datamodule) -> dict:
    """Load the model and score the split (`evaluate` after its checks)."""
    L.seed_everything(cfg.seed, workers=True)
    if cfg.split == "all":
        if not hasattr(datamodule, "load_items"):
            raise ConfigError("split=all needs a file-backed data config (data=science, tooluse).")
        items = datamodule.load_items(datamodule.eval_path, datamodule.eval_split)
    else:
        datamodule.setup("validate")  # a bad path fails here, before the model loads
        items = datamodule.eval_items if cfg.split == "eval" else datamodule.train_items

    prepare_base(cfg)  # the toy base, on first use
    tokenizer, student, task = build_student(cfg)
    if cfg.get("checkpoint"):
        load_student_weights(student, cfg.checkpoint)
    settings = from_config(EvalSettings, cfg.get("eval"), "eval")
    module = StudentSystem(
        student, tokenizer, task, eval=settings, chat_template_kwargs=chat_template_kwargs(cfg)
    )
    run_info = {
        "model": next((cfg.model[k] for k in _MODEL_KEYS if cfg.model.get(k)), None),
        "checkpoint": cfg.get("checkpoint"),
        "data": cfg.data.path if cfg.split == "train" else cfg.data.get("eval_path"),
        "split": cfg.split,
        "seed": cfg.seed,
    }
    writer = MetricsWriter(out_dir, run=run_info, record_initial=False, completions=True)
    callbacks = [writer, EvalProgress(len(items))]
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=callbacks)
    loader = DataLoader(items, batch_size=datamodule.eval_batch_size, collate_fn=list)
    log.info("Scoring %d items in batches of %d", len(items), datamodule.eval_batch_size)
    trainer.validate(module, dataloaders=loader, verbose=False)
    result = writer.result
    if trainer.is_global_zero:
        log.info("Wrote %s (%s)", out_dir / "metrics.json", summary(result))
    return result


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; a checkpoint of a training run brings that run's overrides."""
    try:
        if cfg.get("student"):
            cfg = recompose(*student_overrides(cfg.student))
        elif cfg.get("checkpoint"):
            run, folder = training_run_overrides(cfg.checkpoint)
            if folder is not None:
                overrides = merge_overrides(run, list(HydraConfig.get().overrides.task))
                log.info("Composing the training run's config (%s): %s", folder, " ".join(run))
                cfg = recompose(overrides, folder)
        evaluate(cfg)
    except Exception as err:  # a problem the user can fix: its paragraph, not a traceback
        message = user_message(err)
        if message is None:
            raise
        exit_with(message)


if __name__ == "__main__":
    main()
