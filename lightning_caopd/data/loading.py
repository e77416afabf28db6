"""Read raw rows from a local JSON(L) file, a ``save_to_disk`` directory or the Hub.

Every failure a user can fix (a typo in a path, a broken line, no network) raises `DataError`
with one paragraph that names the file, the line or row, and says what to do. Tasks turn rows
into items (``lightning_caopd.tasks.*.row_to_item``); this module only reads them.

``datasets`` is optional: it is imported only when a ``save_to_disk`` directory or a Hub name
is given.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from lightning_caopd.errors import DataError

_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt", ".gz", ".zip")
# ``name`` or ``owner/name`` as the Hub spells dataset repositories.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_TRUTHY = {"1", "true", "yes", "on"}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_NETWORK_WORDS = (
    "offline",
    "couldn't reach",
    "could not reach",
    "connection",
    "connect",
    "timed out",
    "timeout",
    "name resolution",
    "name or service not known",
    "network is unreachable",
    "max retries exceeded",
)
_LOCAL_HINT = (
    "Pass a local JSONL file (one JSON object per line) or a directory written by "
    "`datasets.Dataset.save_to_disk` instead."
)


def _excerpt(text: str, limit: int = 60) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read one JSON object per line, skipping blank lines.

    Args:
        path: a JSON Lines file.

    Returns:
        The rows, in file order.

    Raises:
        DataError: the file is missing or unreadable, a line is not valid JSON or not an
            object, or the file holds no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path} does not exist or is not a file. Check the path (relative paths are "
            f"resolved from {Path.cwd()})."
        )
    rows: list[dict] = []
    try:
        with path.open(encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{path}, line {lineno}: not valid JSON ({err.msg} at column "
                        f"{err.colno}): {_excerpt(line)!r}. Each line must hold one complete "
                        "JSON object; fix or delete that line (a record split over several "
                        "lines or a truncated last line are common causes)."
                    ) from None
                if not isinstance(row, dict):
                    raise DataError(
                        f"{path}, line {lineno}: expected a JSON object ({{...}}) but found "
                        f"{type(row).__name__}: {_excerpt(line)!r}. Each line must hold one "
                        "row as an object with named fields."
                    )
                rows.append(row)
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}). Save it as UTF-8 "
            "JSON Lines."
        ) from None
    if not rows:
        raise DataError(
            f"{path} is empty: it holds no rows. Point the data config at a file with at "
            "least one JSON object per line."
        )
    return rows


def _read_json(path: Path, split: str | None) -> list[dict]:
    """A ``.json`` file: a list of rows, a dict of splits, or JSON Lines with a .json name."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError:
        # `datasets.Dataset.to_json` writes JSON Lines under a .json name.
        return read_jsonl(path)
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text ({err.reason}). Save it as UTF-8 JSON."
        ) from None
    if isinstance(data, dict):
        data = _pick_split(data, split, str(path))
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(
            f"{path}: expected a JSON list of objects (rows) or an object mapping split names "
            "to such lists. Convert it to JSON Lines, one object per line."
        )
    if not data:
        raise DataError(
            f"{path} is empty: it holds no rows. Point the data config at a file with rows."
        )
    return data


def _pick_split(splits, split: str | None, source: str):
    """One split of a mapping of splits (a dict or a ``datasets.DatasetDict``)."""
    names = list(splits.keys())
    if split is None:
        if len(names) == 1:
            return splits[names[0]]
        raise DataError(
            f"{source} holds several splits ({', '.join(names)}); say which one to use "
            "(e.g. `split=train`)."
        )
    if split not in splits:
        raise DataError(
            f"{source} has no split {split!r}; it holds: {', '.join(names) or 'none'}. "
            "Pick one of these."
        )
    return splits[split]


def _import_datasets(source: str):
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"Reading {source} needs the `datasets` package, which is not installed. Install "
            f"it (`pip install datasets`), or convert the data to JSON Lines. {_LOCAL_HINT}"
        ) from None
    return datasets


def _is_dataset_dir(path: Path) -> bool:
    return any(
        (path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def _load_from_disk(path: Path, split: str | None) -> list[dict]:
    datasets = _import_datasets(str(path))
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises many types for a damaged directory
        raise DataError(
            f"{path} looks like a `save_to_disk` directory but could not be loaded "
            f"({type(err).__name__}: {err}). Re-save it with `save_to_disk`, or export it to "
            "JSON Lines."
        ) from err
    if hasattr(loaded, "keys"):  # a DatasetDict
        loaded = _pick_split(loaded, split, str(path))
    rows = loaded.to_list()
    if not rows:
        raise DataError(f"{path} holds no rows (split {split!r}). Point the data config at rows.")
    return rows


def hub_offline() -> bool:
    """Whether the Hugging Face offline switches (``HF_HUB_OFFLINE`` ...) are set."""
    return any(os.environ.get(v, "").strip().lower() in _TRUTHY for v in _OFFLINE_VARS)


def _is_network_error(err: BaseException) -> bool:
    """Whether `err`, or an exception it was raised from, says the Hub could not be reached."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ConnectionError | TimeoutError):
            return True
        text = f"{type(err).__name__} {err}".lower()
        if any(word in text for word in _NETWORK_WORDS):
            return True
        err = err.__cause__ or err.__context__
    return False


def _offline_error(source: str, why: str) -> DataError:
    return DataError(
        f"{source!r} is not a local file or directory, so it was read as a Hugging Face Hub "
        f"dataset name, but {why}. {_LOCAL_HINT}"
    )


def _load_hub(source: str, split: str | None) -> list[dict]:
    if hub_offline():
        names = [v for v in _OFFLINE_VARS if os.environ.get(v, "").strip().lower() in _TRUTHY]
        raise _offline_error(source, f"this machine is offline ({' and '.join(names)} set)")
    datasets = _import_datasets(source)
    try:
        loaded = datasets.load_dataset(source, split=split)
    except Exception as err:  # network, missing repo, bad split: each deserves a sentence
        if _is_network_error(err):
            raise _offline_error(
                source, f"the Hub could not be reached, so the machine looks offline ({err})"
            ) from err
        raise DataError(
            f"Could not load the Hub dataset {source!r} (split {split!r}): "
            f"{type(err).__name__}: {err}. Check the name and split. {_LOCAL_HINT}"
        ) from err
    if hasattr(loaded, "keys"):
        loaded = _pick_split(loaded, split, source)
    return loaded.to_list()


def _looks_like_path(source: str) -> bool:
    return (
        source.lower().endswith(_FILE_SUFFIXES)
        or source.startswith(("/", ".", "~"))
        or "\\" in source
        or not _HUB_NAME.fullmatch(source)
    )


def load_rows(source: str, split: str | None = None) -> list[dict]:
    """Raw rows from a local file, a ``save_to_disk`` directory or a Hub dataset name.

    Args:
        source: a ``.jsonl`` file, a ``.json`` file (a list of rows, or an object mapping
            split names to lists), a directory written by ``datasets`` ``save_to_disk``, or
            a Hub dataset name such as ``owner/name``.
        split: the split to use where the source holds several (a ``DatasetDict``, a JSON
            object of splits, a Hub dataset); ignored for JSON Lines files.

    Returns:
        The rows as plain dicts.

    Raises:
        DataError: the path does not exist, the data is malformed or empty, the split is
            unknown, ``datasets`` is missing where needed, or the Hub cannot be reached.
    """
    source = str(source)
    path = Path(source).expanduser()
    if path.is_dir():
        if _is_dataset_dir(path):
            return _load_from_disk(path, split)
        raise DataError(
            f"{path} is a directory but not one written by `save_to_disk` (no "
            "dataset_info.json, state.json or dataset_dict.json inside). Pass the JSONL file "
            "itself, or the directory `save_to_disk` wrote."
        )
    if path.is_file():
        if path.suffix.lower() == ".json":
            return _read_json(path, split)
        return read_jsonl(path)
    if _looks_like_path(source):
        raise DataError(
            f"{source} does not exist (looked for {path.resolve()}). Check the spelling, or "
            "give an absolute path if the working directory is not the one you expect."
        )
    return _load_hub(source, split)


def row_error(source: str, index: int, field: str, problem: str, fix: str) -> DataError:
    """A `DataError` about one field of one row, naming the file, the row and the field.

    Args:
        source: the file (or dataset name) the row came from.
        index: the row's 0-based position; the message gives the 1-based row number, which
            is the line number in a JSON Lines file without blank lines.
        field: the field at fault, e.g. ``answer``.
        problem: what is wrong, e.g. ``is missing``.
        fix: what the user should do.

    Returns:
        The error, for the caller to raise.
    """
    return DataError(f"{source}, row {index + 1}: field {field!r} {problem}. {fix}")


def chat_messages(value, source: str, index: int, field: str) -> list[dict]:
    """A chat list (or a bare string as one user turn) as plain ``{role, content}`` dicts."""
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )
    if not ok:
        raise row_error(
            source,
            index,
            field,
            "is neither a non-empty string nor a chat list",
            'Give the text, or a non-empty list of {"role": ..., "content": ...} messages.',
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]
