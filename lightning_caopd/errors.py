"""The project's errors, each a problem the user can fix.

Each is raised with one paragraph naming the file, row, key or value and what to do;
``train.py`` and ``evaluate`` print the paragraph instead of a traceback (`user_message`).
"""

from __future__ import annotations

import errno
import logging
import sys


class DataError(ValueError):
    """A data source cannot be read or a row is malformed; the message names the file and row."""


class ConfigError(ValueError):
    """A config value is out of range; the message names the key, the value and what is allowed."""


class ResumeError(FileNotFoundError):
    """The checkpoint to resume from does not exist; the message says what to pass."""


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class RunDirError(RuntimeError):
    """The output directory is in use by another live run."""


class VerifierError(RuntimeError):
    """A task's verifier raised on a completion (``data.task.on_verifier_error=raise``)."""


USER_ERRORS = (DataError, ConfigError, ResumeError, NonFiniteError, RunDirError, VerifierError)

# what the user can do something about when a write fails
_STORAGE = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file grew past the size this process may write",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "this user may not write there",
    errno.EPERM: "this user may not write there",
}


def out_of_range(key: str, value: object, allowed: str) -> ConfigError:
    """The error for a config value outside its range, as one sentence.

    Args:
        key: the dotted config key, ``method.rollout.top_p``.
        value: the value it was given.
        allowed: what it may be, ``a number in (0, 1]``.

    Returns:
        A `ConfigError` to raise.

    Examples:
        >>> str(out_of_range("data.batch_size", 0, "an integer >= 1"))
        'data.batch_size=0 is out of range: it must be an integer >= 1.'
    """
    return ConfigError(f"{key}={value!r} is out of range: it must be {allowed}.")


def _chain(err: BaseException | None):
    """`err` and the exceptions it was raised from (Hydra, Lightning and torch wrap errors)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def find_cause(err: BaseException, types: type | tuple[type, ...]) -> BaseException | None:
    """The first exception of `types` among `err` and those it was raised from, or None."""
    return next((e for e in _chain(err) if isinstance(e, types)), None)


def storage_error(err: BaseException) -> str | None:
    """One paragraph for a failed write (full disk, read-only directory), or None for others.

    Args:
        err: what a run raised; the OSError may be wrapped in others.

    Returns:
        The paragraph, or None when no OSError of a full or unwritable disk is behind `err`.
    """
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in _STORAGE:
            where = e.filename or "into the run directory"
            return (
                f"Could not write {where}: {_STORAGE[e.errno]} ({e.strerror}). Files are "
                "written beside their destination and renamed over it, so metrics.json and the "
                "checkpoints already in the run directory are whole. Free some space or make the "
                "directory writable (or choose another with hydra.run.dir=...), then repeat the "
                "command; a training run continues from its last checkpoint with ckpt_path=last."
            )
    return None


def user_message(err: BaseException) -> str | None:
    """The paragraph to print for `err` instead of a traceback, or None for a bug.

    Args:
        err: what a run raised.

    Returns:
        ``Error: ...`` for a user error (also when wrapped) or a failed write; None otherwise.
    """
    for e in _chain(err):
        if isinstance(e, USER_ERRORS):
            return f"Error: {e}"
    text = storage_error(err)
    return None if text is None else f"Error: {text}"


def exit_with(message: str) -> None:
    """Print `message` to stderr and exit with status 1; the run's log files get it too.

    Args:
        message: the paragraph (`user_message`).
    """
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):  # the terminal gets it from sys.exit
            record = {"name": "error", "levelname": "ERROR", "levelno": logging.ERROR}
            handler.emit(logging.makeLogRecord({**record, "msg": message}))
    sys.exit(message)
