"""One run from a composed Hydra config: prepare the base, build, evaluate, fit, evaluate.

`check_config` checks every method and data value before anything slow happens, and
`build` is the one builder of the system (student, teacher, LoRA, task, module) and its data;
``train.py``, ``python -m lightning_caopd.evaluate`` and the benchmarks all use it. Writing
``metrics.json``, the diagrams and the checkpoints is done by the callbacks the config names
(``conf/callbacks/``); the runner only orders the Lightning calls.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_caopd.callbacks import EMA_ON_ADAPTER_BASE, MetricsWriter
from lightning_caopd.checkpointing import keep_previous_logs
from lightning_caopd.errors import (
    ConfigError,
    DataError,
    ResumeError,
    RunDirError,
    find_cause,
    out_of_range,
)
from lightning_caopd.loggers import finish_loggers
from lightning_caopd.rollout import SEEDED_GENERATE
from lightning_caopd.settings import EvalSettings, from_config

log = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
SUMMARY_KEYS = ("n", "accuracy", "ece", "brier", "format_rate")


def check_config(cfg: DictConfig, read_rows: bool = True):
    """Build and check everything that is not a model, at start-up, before any weights load.

    Builds the method's parts (``method.rollout``, ``loss``, ``template``, ``targets``,
    ``engine``: every ``method`` entry with a ``_target_``) and checks them against each other
    (CaOPD's K >= 2), the optimizer (over a stand-in parameter) and the scheduler over it, the
    ``eval`` settings (`lightning_caopd.settings.EvalSettings`), every callback, the rules
    across groups (`_check_pairs`: row seeds with ``generate``, a teacher EMA on a LoRA base),
    the task (importing a user's verifier) and the DataModule (batch sizes, counts); a file-backed
    DataModule's rows are read (every row made an item: a bad row is reported with its file,
    row and field).

    Args:
        cfg: the composed config.
        read_rows: read the rows now (``evaluate split=all`` reads its own).

    Returns:
        The DataModule, for `build`.

    Raises:
        ConfigError: one sentence naming the key, the value and what is allowed.
        DataError: a data file or row that cannot be read, named by file and row.
    """
    resolve_engine(cfg)
    method = cfg.get("method") or {}
    parts = {
        name: _built(node, f"method.{name}")
        for name, node in method.items()
        if isinstance(node, DictConfig) and "_target_" in node and not node.get("_partial_")
    }
    if "targets" in parts and "rollout" in parts:
        parts["targets"].check(parts["rollout"].num_rollouts)
    _check_optimizer(method)
    method_class = get_class(method["_target_"]) if "_target_" in method else None
    if hasattr(method_class, "check_method"):  # the method's own values (the format warm-up's)
        method_class.check_method(method)
    from_config(EvalSettings, cfg.get("eval"), "eval")
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is not None:
            _built(node, f"callbacks.{name}")
    _check_pairs(cfg, parts)  # after each group's own values passed
    if cfg.get("data", {}).get("task") is not None:
        _built(cfg.data.task, "data.task")  # imports a user's verifier: a bad path fails here
    datamodule = _built(_data_node(cfg), "data")
    if read_rows and hasattr(datamodule, "load_items"):
        datamodule.setup("fit")  # every row read and made an item, before any model loads
    return datamodule


def _check_pairs(cfg: DictConfig, parts: dict) -> None:
    """The rules between keys of different groups, which no one component sees whole."""
    rollout, engine = parts.get("rollout"), parts.get("engine")
    if rollout is not None and rollout.row_seeds and getattr(engine, "use_generate", False):
        raise ConfigError(SEEDED_GENERATE)
    ema = (cfg.get("callbacks") or {}).get("teacher_ema")
    model = cfg.get("model") or {}
    self_taught = model.get("lora") is not None and model.get("teacher") is None
    if self_taught and ema is not None and (ema.get("rate") or 0) > 0:
        raise ConfigError(EMA_ON_ADAPTER_BASE)


def _built(node, key: str | None, **kwargs):
    """`node` instantiated; a mistake in its values as the project's error.

    The components raise `ConfigError` (or `DataError`) themselves, naming the full key: that
    error is raised as it is, not wrapped in Hydra's (`key` added where a component sits under
    another name than its own: the format warm-up's ``method.caopd``). With a `key`, any other
    ValueError or TypeError from building `node` (an unknown argument, a library's own check)
    becomes a ConfigError that names `key`; without one (a module built over loaded models,
    where such an error is a bug) it is left as Hydra raised it.
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = find_cause(err, ConfigError | DataError)
        if isinstance(cause, ConfigError) and key is not None and key not in str(cause):
            raise type(cause)(f"{cause} (in {key})") from None
        if cause is not None:
            raise cause from None
        cause = find_cause(err, ValueError | TypeError) if key is not None else None
        if cause is not None:
            raise ConfigError(f"{key}: {cause}") from None
        raise


def _check_optimizer(method) -> None:
    """``method.optimizer`` (and ``method.scheduler``) built over one stand-in parameter.

    torch checks the learning rate and the other values when an optimizer is made, which a run
    does only after its models load.
    """
    if method.get("optimizer") is None:
        return
    optimizer = _built(method.optimizer, "method.optimizer")
    try:
        optimizer = optimizer(params=[torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise ConfigError(f"method.optimizer: {err}") from None
    scheduler = method.get("scheduler")
    if scheduler is None:
        return
    factory = _built(scheduler, "method.scheduler")
    # a schedule whose length the trainer gives (total_steps: null) gets a stand-in length
    length = {"total_steps": 100} if scheduler.get("total_steps", 0) is None else {}
    try:
        factory(optimizer=optimizer, **length)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"method.scheduler: {err}") from None


def resolve_engine(cfg: DictConfig) -> None:
    """``method.engine=vllm`` (a name) as ``method/engine=vllm`` (the group's file).

    Hydra reads ``method.engine=vllm`` as a value, not a group choice; the name is looked up in
    ``conf/method/engine/`` so both spellings run the same engine (further knobs need the group
    form: ``method/engine=vllm method.engine.cpu_kv_cache_gib=2``).

    Raises:
        ConfigError: no engine of that name.
    """
    name = OmegaConf.select(cfg, "method.engine")
    if not isinstance(name, str):
        return
    folder = Path(__file__).parent / "conf" / "method" / "engine"
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    if name not in names:
        raise out_of_range("method.engine", name, f"one of {names} (conf/method/engine/)")
    with open_dict(cfg):
        cfg.method.engine = OmegaConf.load(folder / f"{name}.yaml")


def quiet_console() -> None:
    """Send Lightning's messages and Python warnings through logging, without the noise.

    Under Hydra (``train.py``, ``evaluate``) the root logger writes to the terminal and to the
    run's ``train.log`` / ``evaluate.log``; Lightning's own loggers write only to the terminal,
    so they are made to pass their messages up instead, and so are warnings. Lightning's
    litlogger/litmodels advertisements and torch's ``LeafSpec`` deprecation (raised inside
    Lightning, nothing a user can change) are dropped. Outside Hydra (no root handler) only the
    filters apply.
    """
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*deprecated")
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _TipFilter) for f in tips.filters):
        tips.addFilter(_TipFilter())
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for handler in list(lg.handlers):
            if type(handler) is logging.StreamHandler:
                lg.removeHandler(handler)
        lg.propagate = True
    logging.captureWarnings(True)


class _TipFilter(logging.Filter):
    """Drops Lightning's "Tip: try installing litlogger / litmodels" messages."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102
        return "Tip:" not in str(record.msg)


@contextlib.contextmanager
def lock_output_dir(out_dir: Path) -> Iterator[None]:
    """Hold the run directory for this run: a second live run into it is refused.

    Two runs writing into one directory mix their CSV rows and checkpoints. The lock is an
    ``flock`` on ``<out_dir>/.run.lock``, which the system releases when the process ends, so
    a killed run leaves no stale lock (its resume, ``ckpt_path=last``, takes the directory
    again). Only the first process of a multi-process run takes it.

    Args:
        out_dir: the run directory.

    Raises:
        RunDirError: another live process holds the directory.
    """
    if rank_zero_only.rank != 0:
        yield
        return
    path = out_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                log.warning("Could not lock %s (%s); carrying on without a lock.", out_dir, err)
            else:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                raise RunDirError(
                    f"The output directory {out_dir} is in use by another run that is still "
                    f"going ({holder}). Two runs in one directory would mix their CSV rows and "
                    "checkpoints: wait for it to end, or give this run its own directory with "
                    "hydra.run.dir=<another directory> (a resumed run, ckpt_path=last, uses the "
                    "directory of the run it continues once that run has stopped)."
                ) from None
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {stamp}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def summary(result: dict) -> str:
    """The headline metrics, rounded: ``n 24, accuracy 0.4167, ece 0.1234, ...``."""
    parts = []
    for key in SUMMARY_KEYS:
        value = result.get(key)
        if isinstance(value, float):
            value = round(value, 4)
        if value is not None:
            parts.append(f"{key} {value}")
    return ", ".join(parts)


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

    With ``model.init_from`` (a run directory, its ``student/`` folder or a ``.ckpt``) the
    student starts from that run's trained weights (a self-distillation teacher is then a copy
    of them); the optimizer and the step count start afresh, unlike ``ckpt_path``. The student
    carries its LoRA adapter when ``model.lora`` is set (on top of the loaded weights).
    """
    tokenizer = instantiate(cfg.model.tokenizer)
    student = instantiate(cfg.model.student)
    if cfg.model.get("init_from"):  # a trained student's weights; fresh optimizer and steps
        from lightning_caopd.checkpointing import student_state_dict

        weights = student_state_dict(cfg.model.init_from)
        student.load_state_dict(weights)
        log.info("Started the student from %s", cfg.model.init_from)
    if cfg.model.get("lora") is not None:  # only the adapter trains; the teacher is the base
        from lightning_caopd.models import apply_lora

        student = apply_lora(student, **OmegaConf.to_container(cfg.model.lora, resolve=True))
    return tokenizer, student, instantiate(cfg.data.task)


def _data_node(cfg: DictConfig) -> dict:
    """``cfg.data`` without its ``task`` entry (which goes to the module)."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg.pop("task", None)
    return data_cfg


def build_datamodule(cfg: DictConfig):
    """The DataModule of ``cfg.data`` (its ``task`` entry goes to the module, not here)."""
    return instantiate(_data_node(cfg))


def build(cfg: DictConfig, datamodule=None):
    """The LightningModule ``cfg.method`` names (over student, teacher, task) and the data.

    Args:
        cfg: the composed config.
        datamodule: the DataModule `check_config` built (None: built here).
    """
    tokenizer, student, task = build_student(cfg)
    extra = {}
    if cfg.model.get("teacher") is not None:
        from lightning_caopd.models import check_same_tokenizer

        check_same_tokenizer(tokenizer, instantiate(cfg.model.teacher_tokenizer))
        extra["teacher"] = instantiate(cfg.model.teacher)
    if cfg.model.get("chat_template_kwargs"):
        extra["chat_template_kwargs"] = chat_template_kwargs(cfg)
    settings = from_config(EvalSettings, cfg.get("eval"), "eval")
    module = _built(
        cfg.method, None, student=student, tokenizer=tokenizer, task=task, eval=settings, **extra
    )
    return module, datamodule if datamodule is not None else build_datamodule(cfg)


def chat_template_kwargs(cfg: DictConfig) -> dict:
    """``model.chat_template_kwargs`` as a plain dict (``{}`` when unset)."""
    value = cfg.model.get("chat_template_kwargs")
    return OmegaConf.to_container(value, resolve=True) if value else {}


def build_trainer(cfg: DictConfig, **kwargs) -> L.Trainer:
    """The Trainer of ``cfg.trainer`` with the configured callbacks and loggers.

    A run of fewer optimizer steps (``trainer.max_steps``) than ``trainer.log_every_n_steps``
    logs every ``max_steps`` steps instead, so that its last step's scalars reach the loggers.
    """
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    steps, every = cfg.trainer.get("max_steps", -1), cfg.trainer.get("log_every_n_steps")
    if isinstance(steps, int) and steps > 0 and isinstance(every, int) and every > steps:
        kwargs.setdefault("log_every_n_steps", steps)
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
        if not path.exists():  # a file, or a folder of shards (trainer=fsdp)
            raise ResumeError(
                f"ckpt_path=last: there is no checkpoint to resume from at {path}. `last` is the "
                "run directory's checkpoints/last.ckpt, so a resumed run must use the directory "
                "of the run it continues: pass hydra.run.dir=<that directory> (otherwise Hydra "
                "makes a new, dated one) with the same overrides, and keep callbacks=default "
                "(callbacks=minimal saves no checkpoints). To start afresh, leave ckpt_path unset."
            )
        return path
    path = Path(value)
    if not path.exists():
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
    raise ConfigError(
        "The run has no MetricsWriter callback, so it would write no metrics.json: keep "
        "callbacks.metrics (in conf/callbacks/minimal.yaml, which default.yaml includes)."
    )


def run(cfg: DictConfig) -> dict:
    """Run the experiment `cfg` describes and return what it wrote to metrics.json.

    Raises:
        ConfigError: a method or data value out of range (before any model loads).
        RunDirError: another live run writes into the output directory.
        ResumeError: `ckpt_path` names no checkpoint.
    """
    pin_cpu_isa(cfg.get("cpu_isa"))  # before the first tensor operation
    quiet_console()
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)
    datamodule = check_config(cfg)  # every range, before anything slow
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with lock_output_dir(out_dir):
        ckpt_path = resolve_ckpt_path(cfg, out_dir)  # a wrong path fails at once
        prepare_base(cfg)
        # seeded after the base: a base built on first use (a run of its own, which draws from
        # the generators) must not change this run's numbers
        L.seed_everything(cfg.seed, workers=True)
        return _fit(cfg, out_dir, ckpt_path, datamodule)


def _fit(cfg: DictConfig, out_dir: Path, ckpt_path: Path | None, datamodule) -> dict:
    """Build, evaluate, fit and evaluate (`run` after its checks); metrics.json's content."""
    module, datamodule = build(cfg, datamodule)
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
        log.info("Wrote %s (%s)", out_dir / "metrics.json", summary(writer.result))
    finish_loggers(trainer.loggers)  # the next run of a multirun gets its own W&B run
    return writer.result
