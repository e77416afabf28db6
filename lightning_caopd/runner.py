"""One run from a composed Hydra config: build, evaluate, train, evaluate, write metrics.json."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import lightning as L
import torch
from hydra import compose
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_caopd.checkpointing import keep_previous_logs
from lightning_caopd.errors import ResumeError
from lightning_caopd.tracking import finish_loggers

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


def write_json_atomic(obj: dict, path: Path) -> None:
    """Write JSON to a temporary file, then rename it over `path` (a kill never truncates it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def resolved_config(cfg: DictConfig) -> dict:
    """The run's config as plain, resolved Python (Hydra's own node left out)."""
    return {
        k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        for k, v in cfg.items()
        if k != "hydra"
    }


def ensure_model_built(cfg: DictConfig) -> None:
    """Build the model a config points at when it is missing (the toy base on first use).

    A model config with ``build.experiment`` names the experiment that creates
    ``model.path``; it runs once and its result is cached there for later runs.
    """
    build = cfg.model.get("build")
    if not build or Path(cfg.model.path).exists():
        return
    path = Path(cfg.model.path)
    print(f"The base model {path} does not exist yet: building it with experiment={build.experiment}.")
    overrides = [f"experiment={build.experiment}", f"paths.output_dir={path}.run", f"method.save_dir={path}"]
    overrides += [f"{k}={v}" for k, v in _flatten(OmegaConf.to_container(build.get("overrides") or {}, resolve=True))]
    sub = compose(config_name="train", overrides=overrides)
    run(sub)
    print(f"Cached the base model at {path}")


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    """{"a": {"b": 1}, "c.d": 2} -> [("a.b", 1), ("c.d", 2)] (Hydra override keys)."""
    out = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out += _flatten(v, f"{key}.") if isinstance(v, dict) else [(key, v)]
    return out


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
                "(callbacks=none saves no checkpoints). To start afresh, leave ckpt_path unset."
            )
        return path
    path = Path(value)
    if not path.is_file():
        raise ResumeError(
            f"ckpt_path={value}: no such checkpoint file (looked for {path.resolve()}). Pass the "
            "path of a .ckpt file, or ckpt_path=last with hydra.run.dir=<the run's directory>."
        )
    return path


def initial_eval_from(ckpt_path: Path | None) -> dict | None:
    """The evaluation before the first step, as the run that wrote `ckpt_path` measured it."""
    if ckpt_path is None:
        return None
    # mmap: only the small entry is read, not the weights
    checkpoint = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False)
    return checkpoint.get("initial_eval")


def build_module(cfg: DictConfig):
    """Tokenizer, task, student, optional teacher and the LightningModule from the config."""
    tokenizer = instantiate(cfg.model.tokenizer)
    task = instantiate(cfg.data.task)
    student = instantiate(cfg.model.student)
    if cfg.model.get("lora") is not None:  # only the adapter trains; the teacher is the base
        from lightning_caopd.models import apply_lora

        student = apply_lora(student, **OmegaConf.to_container(cfg.model.lora, resolve=True))
    extra = {}
    if cfg.model.get("teacher") is not None:
        from lightning_caopd.models import check_same_tokenizer

        check_same_tokenizer(tokenizer, instantiate(cfg.model.teacher_tokenizer))
        extra["teacher"] = instantiate(cfg.model.teacher)
    module = instantiate(cfg.method, student=student, tokenizer=tokenizer, task=task, **extra)
    return module, tokenizer, task


def build_datamodule(cfg: DictConfig):
    """The DataModule of ``cfg.data`` (its ``task`` entry goes to the module, not here)."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg.pop("task", None)
    return instantiate(data_cfg)


def run(cfg: DictConfig) -> dict:
    """Run the experiment `cfg` describes and return what it wrote to metrics.json."""
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)
    ensure_model_built(cfg)
    # seeded after the build: a base built on first use (a run of its own, which draws from the
    # generators) must not change this run's numbers
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = resolve_ckpt_path(cfg, out_dir)  # before anything slow: a wrong path fails at once

    module, tokenizer, task = build_module(cfg)
    datamodule = build_datamodule(cfg)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if ckpt_path is not None and trainer.is_global_zero:
        keep_previous_logs(out_dir)  # the CSV logger would delete the interrupted run's metrics.csv
    for lg in loggers:
        lg.log_hyperparams(resolved_config(cfg))

    # The model before its first training step, so base / OPD / CaOPD can be tabled. A resumed
    # run takes it from the checkpoint: its model is no longer the one before the first step.
    module.eval_output_dir = out_dir if trainer.is_global_zero else None
    initial = initial_eval_from(ckpt_path)
    if initial is None and cfg.get("eval_before_training", True):
        trainer.validate(module, datamodule=datamodule, verbose=False)
        initial = module.last_eval
        if trainer.is_global_zero:
            os.replace(out_dir / "reliability.png", out_dir / "reliability_initial.png")
    module.initial_eval = initial

    # weights_only=False: a run's own checkpoint holds pickled hyper-parameters (Hydra partials)
    # and RNG states (NumPy arrays, Python tuples), which the weights-only loader refuses
    weights_only = False if ckpt_path else None
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=weights_only)
    if module.last_eval_step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    result = dict(module.last_eval)
    result["initial"] = initial
    result["run"] = {
        "experiment": cfg.get("task_name"),
        "method": cfg.method.get("name", "n/a"),
        "seed": cfg.seed,
        "steps": trainer.global_step,
    }
    if trainer.is_global_zero:
        write_json_atomic(result, out_dir / METRICS_FILE)
        print(f"Wrote {out_dir / METRICS_FILE}")
    finish_loggers(loggers)  # the next run of a multirun gets its own W&B run
    return result
