"""One run from a composed Hydra config: prepare the base, build, evaluate, fit, evaluate.

`build` is the one builder of the system (student, teacher, LoRA, task, module) and its data;
``train.py``, ``python -m lightning_caopd.evaluate`` and the benchmarks all use it. Writing
``metrics.json``, the diagrams and the checkpoints is done by the callbacks the config names
(``conf/callbacks/``); the runner only orders the Lightning calls.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_caopd.callbacks import MetricsWriter
from lightning_caopd.checkpointing import keep_previous_logs
from lightning_caopd.errors import ResumeError
from lightning_caopd.loggers import finish_loggers

log = logging.getLogger(__name__)


def resolved_config(cfg: DictConfig) -> dict:
    """The run's config as plain, resolved Python (Hydra's own node left out)."""
    return {
        k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        for k, v in cfg.items()
        if k != "hydra"
    }


def pin_cpu_isa(isa: str | None) -> None:
    """Make torch's CPU kernels use the instruction set `isa`, so numbers do not depend on the CPU.

    Vectorised kernels (softmax, attention) round differently with AVX-512 than with AVX2, and
    over a training run the difference grows: the embedded default's warm-up gives another base
    student on an AVX-512 CPU. Pinning AVX2 gives every x86 CPU with AVX2 the same numbers. It
    must happen before the process's first tensor operation (torch reads the setting once); a
    process that already ran one (a test session) keeps its kernels and is told so.

    Args:
        isa: ``avx2`` (or ``default``, ``avx512``); None leaves torch's choice.
    """
    if not isa:
        return
    os.environ["ATEN_CPU_CAPABILITY"] = isa.lower()
    os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", isa.upper())
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", isa.upper())
    got = torch.backends.cpu.get_cpu_capability()
    if got.lower() != isa.lower() and isa.lower() != "default":
        log.warning(
            "cpu_isa=%s could not be applied: this process already uses %s kernels, so its "
            "numbers may differ from a fresh run's. Start the run in a new process, or set "
            "ATEN_CPU_CAPABILITY=%s in the environment.",
            isa,
            got,
            isa.lower(),
        )


def prepare_base(cfg: DictConfig) -> None:
    """The load-or-build step of a model config with a ``base`` entry (the toy base).

    The entry names the target that makes sure the weights exist, building them on first use;
    it prints what it does.
    """
    if cfg.model.get("base") is not None:
        instantiate(cfg.model.base)


def build_student(cfg: DictConfig):
    """The tokenizer, the student and the task, from ``cfg.model`` and ``cfg.data.task``.

    The student carries its LoRA adapter when ``model.lora`` is set.
    """
    tokenizer = instantiate(cfg.model.tokenizer)
    student = instantiate(cfg.model.student)
    if cfg.model.get("lora") is not None:  # only the adapter trains; the teacher is the base
        from lightning_caopd.models import apply_lora

        student = apply_lora(student, **OmegaConf.to_container(cfg.model.lora, resolve=True))
    return tokenizer, student, instantiate(cfg.data.task)


def build_datamodule(cfg: DictConfig):
    """The DataModule of ``cfg.data`` (its ``task`` entry goes to the module, not here)."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg.pop("task", None)
    return instantiate(data_cfg)


def build(cfg: DictConfig):
    """The LightningModule ``cfg.method`` names (over student, teacher, task) and the data."""
    tokenizer, student, task = build_student(cfg)
    extra = {}
    if cfg.model.get("teacher") is not None:
        from lightning_caopd.models import check_same_tokenizer

        check_same_tokenizer(tokenizer, instantiate(cfg.model.teacher_tokenizer))
        extra["teacher"] = instantiate(cfg.model.teacher)
    eval_opts = OmegaConf.to_container(cfg.get("eval") or {}, resolve=True)
    module = instantiate(
        cfg.method, student=student, tokenizer=tokenizer, task=task, eval=eval_opts, **extra
    )
    return module, build_datamodule(cfg)


def build_trainer(cfg: DictConfig, **kwargs) -> L.Trainer:
    """The Trainer of ``cfg.trainer`` with the configured callbacks and loggers."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **kwargs)


def resolve_ckpt_path(cfg: DictConfig, out_dir: Path) -> Path | None:
    """The checkpoint `ckpt_path` names (``last``: the run directory's ``last.ckpt``), or None.

    Raises:
        ResumeError: the checkpoint does not exist, with what to pass instead.
    """
    value = cfg.get("ckpt_path")
    if value is None:
        return None
    if str(value) == "last":
        checkpoint_cb = (cfg.get("callbacks") or {}).get("checkpoint") or {}
        path = Path(checkpoint_cb.get("dirpath") or out_dir / "checkpoints") / "last.ckpt"
        if not path.is_file():
            raise ResumeError(
                f"ckpt_path=last: there is no checkpoint to resume from at {path}. `last` is the "
                "run directory's checkpoints/last.ckpt, so a resumed run must use the directory "
                "of the run it continues: pass hydra.run.dir=<that directory> (otherwise Hydra "
                "makes a new, dated one) with the same overrides, and keep callbacks=default "
                "(callbacks=minimal saves no checkpoints). To start afresh, leave ckpt_path unset."
            )
        return path
    path = Path(value)
    if not path.is_file():
        raise ResumeError(
            f"ckpt_path={value}: no such checkpoint file (looked for {path.resolve()}). Pass the "
            "path of a .ckpt file, or ckpt_path=last with hydra.run.dir=<the run's directory>."
        )
    return path


def metrics_writer(trainer: L.Trainer) -> MetricsWriter:
    """The run's `MetricsWriter` callback (every run has one: ``conf/callbacks/minimal.yaml``)."""
    for callback in trainer.callbacks:
        if isinstance(callback, MetricsWriter):
            return callback
    raise ValueError(
        "The run has no MetricsWriter callback, so it would write no metrics.json: keep "
        "callbacks.metrics (in conf/callbacks/minimal.yaml, which default.yaml includes)."
    )


def run(cfg: DictConfig) -> dict:
    """Run the experiment `cfg` describes and return what it wrote to metrics.json."""
    pin_cpu_isa(cfg.get("cpu_isa"))  # before the first tensor operation
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)
    prepare_base(cfg)
    # seeded after the base: a base built on first use (a run of its own, which draws from the
    # generators) must not change this run's numbers
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = resolve_ckpt_path(cfg, out_dir)  # before anything slow: a wrong path fails at once

    module, datamodule = build(cfg)
    trainer = build_trainer(cfg)
    writer = metrics_writer(trainer)
    if ckpt_path is not None and trainer.is_global_zero:
        keep_previous_logs(out_dir)  # the CSV logger would delete the interrupted run's metrics.csv
    for lg in trainer.loggers:
        lg.log_hyperparams(resolved_config(cfg))

    # The model before its first training step (the base row of the table). A resumed run has
    # it in the checkpoint (MetricsWriter's state): its model is no longer the initial one.
    if ckpt_path is None and cfg.get("eval_before_training", True):
        trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if writer.last_step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    if trainer.is_global_zero:
        print(f"Wrote {out_dir / 'metrics.json'}")
    finish_loggers(trainer.loggers)  # the next run of a multirun gets its own W&B run
    return writer.result
