"""Atomic writes: every file and folder a run produces is written beside its destination.

It is then renamed over it, so a kill or a full disk mid-write leaves the previous version whole (or
nothing), never a truncated file. Checkpoints, ``metrics.json``, the toy base and the converted
GGUF model all go through here.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside `path`, flush it to disk, rename it over.

    A failure or a kill mid-write leaves `path` as it was (the temporary file is removed on
    failure; after a kill, a stale ``.<name>.tmp-<pid>`` may remain next to it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_dir(
    path: str | os.PathLike, write: Callable[[Path], None], replace: bool = True
) -> Path:
    """Call ``write(folder)`` on a temporary folder beside `path`, then rename it to `path`.

    Args:
        path: the folder to create.
        write: fills the folder (e.g. ``save_pretrained`` calls).
        replace: an existing `path` is replaced; with False it is kept (the first writer wins,
            as when several processes convert the same model) and the new folder is dropped.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replace and path.exists():
        shutil.rmtree(path)
    try:
        tmp.rename(path)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if replace:
            raise
    return path
