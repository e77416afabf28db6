"""Exact resume: atomic checkpoint files, RNG states and a data loader that knows its position.

Lightning's checkpoints already hold the module's state dict (student and teacher), the
optimizer, the scheduler and the loops' progress. What they lack for an exact resume is added
here:

* `rng_states` / `set_rng_states`: Python ``random``, NumPy, torch CPU and CUDA generators (the
  rollouts are sampled from torch's global generator), saved by the module's
  ``on_save_checkpoint`` as tensors and plain Python values.
* `ResumableDataLoader`: Lightning saves and restores a loader's ``state_dict`` (it is
  "stateful"); ours records the shuffle generator at the start of the epoch and the batches
  trained on since, and skips those batches when iterated again after a restore.
* `AtomicCheckpointIO`, a ``CheckpointIO`` plugin (``trainer.plugins``): every checkpoint file
  is written next to its destination and renamed over it (`lightning_caopd.files`), so a kill
  during a save leaves the previous file intact. (Lightning's own save goes through an fsspec
  transaction whose temporary file lives in the system temp directory; when that is another
  filesystem, the final move is a copy that truncates the destination first.) It loads with
  ``weights_only=True``: a checkpoint is never unpickled, so one carrying a code payload is
  refused, not run; the project's own checkpoints hold only tensors and plain values.
* `ModelCheckpoint`: Lightning's, plus ``last.ckpt`` after the final step when the step count
  is no multiple of ``every_n_train_steps``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

from lightning_caopd.errors import ResumeError
from lightning_caopd.files import atomic_write

RNG_KEY = "rng_states"


def rng_states() -> dict[str, Any]:
    """The states of every random generator a training step draws from.

    Tensors and plain values only, so that a checkpoint loads with ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumableDataLoader(DataLoader):
    """A `DataLoader` whose position Lightning saves in checkpoints and restores on resume.

    Lightning treats a training loader with ``state_dict``/``load_state_dict`` as resumable: it
    stores the state under the fit loop in every checkpoint and hands it back before the loader
    is iterated again. The state is the shuffle generator as it was when the current epoch's
    iterator was created, and the number of batches trained on in this epoch; iterating after
    `load_state_dict` replays that epoch's order and skips those batches.

    Args:
        *args: `DataLoader` arguments. Pass ``generator`` (a seeded ``torch.Generator``) with
            ``shuffle=True``; otherwise the order is drawn from torch's global generator and
            cannot be replayed.
        trained_batches: returns the batches trained on so far in the current epoch (the
            trainer's count; the loader itself runs ahead of training by its prefetch).
        **kwargs: `DataLoader` keyword arguments.
    """

    def __init__(self, *args, trained_batches: Callable[[], int] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.trained_batches = trained_batches
        self._epoch_start: torch.Tensor | None = None  # generator state when the epoch began
        self._restored: dict | None = None

    def __iter__(self):
        skip = 0
        if self._restored is not None:
            if self.generator is not None:
                self.generator.set_state(self._restored["generator"])
            skip = self._restored["batches"]
            self._restored = None
        if self.generator is not None:
            self._epoch_start = self.generator.get_state()
        iterator = super().__iter__()
        for _ in range(skip):  # items are already in memory: skipping costs a collate each
            next(iterator)
        return iterator

    def state_dict(self) -> dict[str, Any]:
        """The epoch's start (generator state) and the batches trained on since."""
        done = self.trained_batches() if self.trained_batches is not None else 0
        if self.generator is None:
            return {"generator": None, "batches": done}
        if done >= len(self):  # the epoch is over: the next one starts from the current state
            return {"generator": self.generator.get_state(), "batches": 0}
        start = self._epoch_start if self._epoch_start is not None else self.generator.get_state()
        return {"generator": start, "batches": done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replay the saved epoch's order from the saved batch on the next iteration."""
        if state_dict.get("generator") is None and self.generator is not None:
            raise ValueError(
                "This checkpoint's training data loader had no seeded shuffle generator, so its "
                "order cannot be replayed; resume with the code version that wrote it."
            )
        self._restored = dict(state_dict)


def keep_previous_logs(out_dir: str | os.PathLike) -> list[Path]:
    """Rename every ``metrics.csv`` under `out_dir` to ``metrics.before-resume-<n>.csv``.

    Lightning's CSV logger deletes an existing ``metrics.csv`` when a run starts; a resumed run
    calls this first so that the interrupted run's logs are kept.
    """
    kept = []
    for path in sorted(Path(out_dir).rglob("metrics.csv")):
        n = 1
        while (target := path.with_name(f"metrics.before-resume-{n}.csv")).exists():
            n += 1
        os.replace(path, target)
        kept.append(target)
    return kept


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` that writes by write-then-rename and never unpickles on load."""

    def save_checkpoint(  # noqa: D102 - see the class
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} does not take storage_options; got {storage_options!r}."
            )
        if "://" in str(path) and not str(path).startswith("file://"):
            super().save_checkpoint(checkpoint, path)  # object stores: fsspec's transaction
            return
        atomic_write(str(path).removeprefix("file://"), lambda f: torch.save(checkpoint, f))

    def load_checkpoint(  # noqa: D102 - see the class
        self, path: _PATH, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint_file(path, map_location=map_location or "cpu")


def load_checkpoint_file(path: _PATH, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain values; no code runs).

    Raises:
        ResumeError: the file is missing, not a checkpoint, damaged, or holds objects other
            than tensors and plain values (a foreign or tampered checkpoint), with what to do.
    """
    path = Path(str(path).removeprefix("file://"))
    if not path.is_file():
        raise ResumeError(f"{path}: no such checkpoint file.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ResumeError(
            f"{path} holds objects other than tensors and plain values, so it was not loaded "
            "(loading it would run code from the file). Checkpoints this project writes hold "
            "none; use one written by `python train.py`, or convert a foreign one to a plain "
            f"state dict yourself if you trust it. Detail: {str(err).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ResumeError(
            f"{path} is not a readable checkpoint (damaged or truncated, or not a torch file): "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}. Resume from an "
            "earlier checkpoint, or start afresh without ckpt_path."
        ) from None


STUDENT_DIR = "student"  # <run dir>/student/: the final student, a Hugging Face folder


def student_state_dict(source: _PATH, key: str = "model.init_from") -> dict[str, torch.Tensor]:
    """A trained student's weights, for ``model.init_from`` and ``evaluate checkpoint=``.

    Args:
        source: a run directory (its ``student/`` folder, else ``checkpoints/last.ckpt``), a
            Hugging Face folder (``save_pretrained``: ``<run dir>/student``), or a ``.ckpt``
            file of ``python train.py`` (read with ``weights_only=True``: no code runs) or
            folder (``trainer=fsdp``'s sharded checkpoints, `load_sharded_checkpoint`).
        key: the config key that named `source`, for the error messages.

    Returns:
        The student's state dict (the keys of the model ``model.student`` builds).

    Raises:
        ResumeError: nothing loadable there, or a checkpoint without student weights.
    """
    path = Path(str(source)).expanduser()
    if path.is_dir() and (path / STUDENT_DIR / "config.json").is_file():
        path = path / STUDENT_DIR
    elif path.is_dir() and (path / "checkpoints" / "last.ckpt").exists():
        path = path / "checkpoints" / "last.ckpt"
    if path.is_dir() and (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM  # safetensors: no pickle

        return AutoModelForCausalLM.from_pretrained(path, dtype="auto").state_dict()
    if is_sharded_checkpoint(path):
        state = load_sharded_checkpoint(path).get("state_dict", {})
    elif path.is_file():
        state = load_checkpoint_file(path).get("state_dict", {})
    else:
        raise ResumeError(
            f"{key}={source}: nothing to load from there. Pass a training run's "
            f"directory (it holds {STUDENT_DIR}/ or checkpoints/last.ckpt), its {STUDENT_DIR}/ "
            "folder, or a .ckpt file or folder (trainer=fsdp's sharded checkpoints)."
        )
    prefix = "student."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise ResumeError(
            f"{key}={source}: {path} holds no student weights (no 'student.*' keys); "
            "pass a checkpoint of `python train.py` (<run dir>/checkpoints/last.ckpt)."
        )
    return weights


def is_sharded_checkpoint(path: _PATH) -> bool:
    """Whether `path` is a sharded checkpoint of ``trainer=fsdp`` (torch.distributed.checkpoint)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def load_sharded_checkpoint(path: _PATH) -> dict[str, Any]:
    """A sharded checkpoint folder (``trainer=fsdp``) as one process's whole checkpoint dict.

    The shards are joined in CPU memory by torch's own converter (``dcp_to_torch_save``, no
    process group), through a file in a temporary folder beside the checkpoint, read back with
    ``weights_only=True``; ``state_dict`` holds the whole weights (``student.*``, ``teacher.*``).
    """
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        dcp_to_torch_save(path, Path(tmp) / "whole.ckpt")
        return load_checkpoint_file(Path(tmp) / "whole.ckpt")


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's `ModelCheckpoint`, saving ``last.ckpt`` after the final step too.

    With ``save_last`` the state after the final step is always saved, also when the step count
    is no multiple of ``every_n_train_steps``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._saved_step = -1

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> Any:  # noqa: D102
        self._saved_step = trainer.global_step
        return super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: D102 - see the class
        super().on_train_end(trainer, pl_module)
        if self.save_last and self.dirpath and self._saved_step != trainer.global_step:
            name = self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION
            trainer.save_checkpoint(os.path.join(self.dirpath, name), self.save_weights_only)


@contextlib.contextmanager
def untouched_rng() -> Iterator[None]:
    """Every random generator (`rng_states`: Python, NumPy, torch, CUDA) as it was, after.

    For a diagnostic that samples (the teacher's rollouts) inside a run: the run's later draws
    are those of a run without it.
    """
    states = rng_states()
    try:
        yield
    finally:
        set_rng_states(states)
