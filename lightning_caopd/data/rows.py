"""DataModules for the paper's two domains, read from local files or the Hub.

Rows come through `lightning_caopd.data.loading.load_rows` (a JSON Lines file, a ``save_to_disk``
directory or a Hub dataset name) and become items through the domain's ``row_to_item``.

Train / evaluation split: ``path`` gives the training rows and ``eval_path`` (by default the
same source) the evaluation rows. When both name the same rows (same file or directory and
the same split), ``num_eval`` rows are held out of training: a fixed random choice drawn from
``split_seed``, independent of the run's seed, so every run of an experiment scores the same
items. Otherwise ``num_eval`` caps the evaluation rows (null keeps them all). ``limit`` keeps
only the first rows of each source, before the split.

Duplicates: rows whose prompt (``messages``) another row repeats are counted in the log and never
held out, so no evaluation item is also a training item; with a separate evaluation source the
evaluation rows that also appear among the training rows are counted.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from lightning_caopd.checks import check_int
from lightning_caopd.data.base import ItemDataModule
from lightning_caopd.data.loading import chat_messages, load_rows, row_error
from lightning_caopd.errors import DataError
from lightning_caopd.tasks import science, tooluse

log = logging.getLogger(__name__)
# what every item carries (`lightning_caopd.tasks.base.Task`); the templates read ``demo``
ITEM_FIELDS = ("id", "messages", "answer", "demo", "category")


def _same_rows(a: str, split_a: str | None, b: str, split_b: str | None) -> bool:
    """Whether two (source, split) pairs name the same rows (paths compared resolved)."""
    if split_a != split_b:
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return str(a) == str(b)


def held_out_indices(n: int, num_eval: int, seed: int, exclude: Iterable[int] = ()) -> list[int]:
    """Which of `n` rows to hold out for evaluation: `num_eval` of them, seeded, sorted.

    The rows are drawn in one seeded order of all `n`, skipping `exclude`, so rows outside
    `exclude` are chosen as they would be without it.

    Args:
        n: number of rows.
        num_eval: rows to hold out.
        seed: the split's seed.
        exclude: rows never held out (duplicates).

    Returns:
        Sorted row indices.

    Examples:
        >>> held_out_indices(10, 3, seed=0) == held_out_indices(10, 3, seed=0)
        True
        >>> 4 in held_out_indices(10, 9, seed=0, exclude=[4])
        False
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    skip = set(exclude)
    return sorted([i for i in order if i not in skip][:num_eval])


def prompt_key(item: dict) -> str:
    """What makes two items the same question: their prompt messages."""
    return json.dumps(item["messages"], sort_keys=True, ensure_ascii=False)


def duplicate_indices(items: list[dict]) -> list[int]:
    """The indices of the items whose prompt another item repeats (every copy).

    Examples:
        >>> a, b = {"messages": [{"content": "a"}]}, {"messages": [{"content": "b"}]}
        >>> duplicate_indices([a, b, a])
        [0, 2]
    """
    counts = Counter(prompt_key(it) for it in items)
    return [i for i, it in enumerate(items) if counts[prompt_key(it)] > 1]


class RowsDataModule(ItemDataModule):
    """Items from a file, a ``save_to_disk`` directory or a Hub dataset.

    Rows are read in `setup`, so a bad path fails when the trainer starts rather than when
    the config is composed.

    Args:
        path: training rows (see `lightning_caopd.data.loading.load_rows`).
        row_to_item: turns ``(row, index, source)`` into an item (a function or its dotted
            path, e.g. ``my_task.row_to_item``); an exception it raises is reported with the
            file and row, and every item must carry `ITEM_FIELDS`.
        eval_path: evaluation rows; None or the same source as `path` holds rows out of it.
        num_eval: held-out rows (same source) or a cap on evaluation rows (another source;
            None keeps all).
        limit: keep only the first `limit` rows of each source (None: all).
        split: the split of `path` where it holds several.
        eval_split: the split of `eval_path`; None uses `split`.
        split_seed: seed of the held-out choice.
        **kwargs: see `ItemDataModule` (``batch_size``, ``eval_batch_size``, ``shuffle``).
    """

    def __init__(
        self,
        path: str,
        row_to_item: Callable[[dict, int, str], dict],
        eval_path: str | None = None,
        num_eval: int | None = 50,
        limit: int | None = None,
        split: str | None = None,
        eval_split: str | None = None,
        split_seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_int("data.num_eval", num_eval, 1, allow_none=True)
        check_int("data.limit", limit, 1, allow_none=True)
        check_int("data.split_seed", split_seed, 0)
        self.path = str(path)
        self.eval_path = str(eval_path) if eval_path is not None else self.path
        if isinstance(row_to_item, str):
            from lightning_caopd.tasks.custom import import_function

            row_to_item = import_function(row_to_item, "data.row_to_item")
        self.row_to_item = row_to_item
        self.num_eval = num_eval
        self.limit = limit
        self.split = split
        self.eval_split = eval_split if eval_split is not None else split
        self.split_seed = split_seed

    def load_items(self, source: str, split: str | None) -> list[dict]:
        """Every item of one source (its first `limit` rows), unsplit.

        Args:
            source: see `lightning_caopd.data.loading.load_rows`.
            split: the split, where the source holds several.

        Returns:
            The items, in source order.
        """
        rows = load_rows(source, split)[: self.limit]
        items = [self._item(row, i, source) for i, row in enumerate(rows)]
        derived = sum(bool(it.pop(science.ANSWER_FROM_DEMO, False)) for it in items)
        if derived:
            log.info(
                "%s: %d of %d rows have no `answer`; it was taken from the last <answer> tag of "
                "their demonstration (`output_text`).",
                source,
                derived,
                len(items),
            )
        return items

    def _item(self, row: dict, index: int, source: str) -> dict:
        """`row_to_item` of one row, its exceptions and missing fields reported with the row."""
        name = getattr(self.row_to_item, "__name__", None) or getattr(
            getattr(self.row_to_item, "func", None), "__name__", "row_to_item"
        )
        try:
            item = self.row_to_item(row, index, source)
        except DataError:
            raise
        except Exception as err:  # the user's code: say which row it failed on
            raise DataError(
                f"{source}, row {index + 1}: {name} raised {type(err).__name__}: {err}. Fix the "
                "row, or the function that turns rows into items."
            ) from err
        missing = [k for k in ITEM_FIELDS if not isinstance(item, dict) or k not in item]
        if missing:
            raise DataError(
                f"{source}, row {index + 1}: the item {name} made has no {missing}. Every item "
                f"needs {list(ITEM_FIELDS)} (`demo`: the teacher's privileged context)."
            )
        return item

    def setup(self, stage: str | None = None) -> None:
        """Read and split the rows (once; later calls keep them)."""
        if self.train_items or self.eval_items:
            return
        train = self.load_items(self.path, self.split)
        if not _same_rows(self.path, self.split, self.eval_path, self.eval_split):
            self.train_items = train
            self.eval_items = self.load_items(self.eval_path, self.eval_split)[: self.num_eval]
            seen = {prompt_key(it) for it in train}
            shared = sum(prompt_key(it) in seen for it in self.eval_items)
            if shared:
                log.warning(
                    "%d of the %d evaluation rows of %s also appear (same prompt) among the "
                    "training rows of %s: their scores measure memory, not generalisation.",
                    shared,
                    len(self.eval_items),
                    self.eval_path,
                    self.path,
                )
            return
        if self.num_eval is None or self.num_eval >= len(train):
            raise DataError(
                f"Training and evaluation both read {self.path} ({len(train)} rows), so "
                f"`data.num_eval` rows are held out for evaluation, but it is "
                f"{self.num_eval}. Set it below {len(train)}, or give separate evaluation "
                "rows with `data.eval_path`."
            )
        dups = duplicate_indices(train)
        if dups:
            log.warning(
                "%s: %d of its %d rows repeat another row's prompt (%d distinct prompts); they "
                "stay in training and none of them is held out for evaluation.",
                self.path,
                len(dups),
                len(train),
                len({prompt_key(train[i]) for i in dups}),
            )
        if self.num_eval > len(train) - len(dups):
            raise DataError(
                f"{self.path}: only {len(train) - len(dups)} of its {len(train)} rows have a "
                f"prompt no other row repeats, fewer than data.num_eval={self.num_eval}; a "
                "repeated row cannot be held out (its copy would be trained on). Lower "
                "data.num_eval, remove the duplicates, or give evaluation rows with data.eval_path."
            )
        held = set(held_out_indices(len(train), self.num_eval, self.split_seed, exclude=dups))
        self.eval_items = [it for i, it in enumerate(train) if i in held]
        self.train_items = [it for i, it in enumerate(train) if i not in held]


class ScienceDataModule(RowsDataModule):
    """Science multiple choice rows (see `lightning_caopd.tasks.science.row_to_item`).

    Args:
        path: training rows.
        **kwargs: see `RowsDataModule`.
    """

    def __init__(self, path: str, **kwargs) -> None:
        super().__init__(path, science.row_to_item, **kwargs)


class ToolUseDataModule(RowsDataModule):
    """Tool-use rows (see `lightning_caopd.tasks.tooluse.row_to_item`).

    Args:
        path: training rows.
        **kwargs: see `RowsDataModule`.
    """

    def __init__(self, path: str, **kwargs) -> None:
        super().__init__(path, tooluse.row_to_item, **kwargs)


FIELDS = {
    "prompt": "prompt",
    "messages": None,
    "system": None,
    "answer": "answer",
    "context": None,
    "category": None,
    "id": None,
}


def row_from_fields(row: dict, index: int, source: str, fields: dict) -> dict:
    """An item from a row of one's own, by field names (``data.fields``).

    Args:
        row: the raw row (a JSON object).
        index: its 0-based position in `source`.
        source: the file it came from.
        fields: which row field holds what: ``prompt`` (a string: one user turn, or a chat list)
            or ``messages`` (a chat list), ``system`` (a system message), ``answer``,
            ``context`` (the teacher's privileged context; None: the answer as text),
            ``category`` and ``id``; None where the rows have no such field.

    Returns:
        ``{"id", "messages", "answer", "demo", "category", "row"}``; ``row`` is the raw row,
        for a verifier that needs its other fields.

    Raises:
        DataError: a named field missing or of the wrong type, naming the file, row and field.
    """
    if not isinstance(row, dict):
        raise DataError(f"{source}, row {index + 1}: {type(row).__name__} is not a JSON object.")

    def get(key: str, required: bool = True):
        name = fields.get(key)
        if name is None:
            return None
        if name not in row or row[name] is None:
            if not required:
                return None
            raise row_error(
                source,
                index,
                name,
                "is missing",
                f"data.fields.{key}={name!r} names it; fix the row, or the field's name.",
            )
        return row[name]

    key = "messages" if fields.get("messages") else "prompt"
    messages = chat_messages(get(key), source, index, str(fields[key]))
    system = get("system", required=False)
    if isinstance(system, str) and system:
        messages = [{"role": "system", "content": system}, *messages]
    answer = get("answer")
    context = get("context")
    if context is None:
        context = answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)
    category = get("category", required=False)
    given_id = get("id", required=False)
    return {
        "id": str(given_id) if given_id is not None else f"{Path(source).stem}-{index}",
        "messages": messages,
        "answer": answer,
        "demo": str(context),
        "category": str(category) if category is not None else "default",
        "row": row,
    }


class JsonlDataModule(RowsDataModule):
    """Rows of one's own (``data=jsonl``): a JSON Lines file, fields named by ``fields``.

    Args:
        path: training rows (see `lightning_caopd.data.loading.load_rows`).
        fields: row field names by role (`FIELDS` gives the defaults: ``prompt`` and
            ``answer``); see `row_from_fields`.
        **kwargs: see `RowsDataModule`.

    Raises:
        ConfigError: a role that `FIELDS` does not know.
    """

    def __init__(self, path: str, fields: dict | None = None, **kwargs) -> None:
        unknown = sorted(set(fields or {}) - set(FIELDS))
        if unknown:
            from lightning_caopd.errors import ConfigError

            raise ConfigError(
                f"data.fields has {unknown}, which it does not know; its keys are {list(FIELDS)}."
            )
        self.fields = {**FIELDS, **(fields or {})}
        convert = functools.partial(row_from_fields, fields=self.fields)
        functools.update_wrapper(convert, row_from_fields)
        super().__init__(path, convert, **kwargs)
