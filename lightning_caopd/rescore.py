"""Re-score saved completions without generating anything.

    python -m lightning_caopd.rescore outputs/run/completions.jsonl
    python -m lightning_caopd.rescore outputs/run/completions.jsonl eval.protocol=reference
    python -m lightning_caopd.rescore eval_responses.json out=paper_metrics.json
    python -m lightning_caopd.rescore run/completions.jsonl config=run/csv/version_0/hparams.yaml

Reads the ``completions.jsonl`` a training run or ``evaluate`` writes (each record holds the
item's answer, its category and the raw completion) and scores every completion again with the
run's task and ``eval`` settings (its ``.hydra/config.yaml``), as changed by ``key=value``
overrides (``eval.protocol``, ``eval.scoring``, ``data.task.verifier``, ...). It also reads the
paper's released generations: a JSON list (or JSON lines) of ``{"response", "answer"}``
(science) or ``{"response", "golden_answer"}`` (tool use), as its evaluation scripts write them;
without a run config these are scored as ``data=science`` or ``data=tooluse`` with
``eval.protocol=reference``.

It writes ``metrics.json`` beside the input (``metrics.rescored.json`` when a ``metrics.json``
is already there) or to ``out=PATH``: every key computed from the texts, the same values the run
computed when nothing is overridden, and a ``rescore`` block (source, protocol, the keys that
need the model and are left out: the token entropies and the teacher's block).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_caopd import reference
from lightning_caopd.callbacks import METRICS_FILE
from lightning_caopd.errors import ConfigError, DataError, exit_with, user_message
from lightning_caopd.files import atomic_write_text
from lightning_caopd.scoring import (
    EvalBatch,
    EvalScores,
    parse_confidences,
    reference_record,
    verdicts,
)
from lightning_caopd.settings import EvalSettings, from_config
from lightning_caopd.tasks.base import Task

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).parent / "conf"
NEEDS_MODEL = ("answer_entropy", "confidence_entropy", "teacher_conditioned", "n_parameters")


def read_completions(path: Path) -> tuple[list[dict], str | None]:
    """The records of `path` and, for the paper's format, its domain (``science``/``tooluse``).

    Raises:
        DataError: the file is missing, not JSON, or its rows are neither format.
    """
    if not path.is_file():
        raise DataError(f"{path}: no such file. Give a completions.jsonl or an eval JSON file.")
    text = path.read_text(encoding="utf-8")
    lines = [text] if text.lstrip().startswith("[") else text.splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            if line.strip():
                rows.extend(json.loads(line) if line is text else [json.loads(line)])
        except json.JSONDecodeError as err:
            where = err.lineno if line is text else number
            raise DataError(
                f"{path}: line {where} is not JSON ({err.msg}). Give the completions.jsonl a "
                "run wrote, or the JSON list the reference's evaluation scripts write."
            ) from None
    if rows and all(isinstance(r, dict) and "completion" in r and "gold" in r for r in rows):
        return rows, None
    if rows and all(isinstance(r, dict) and "response" in r for r in rows):
        return _from_reference(rows, path)
    raise DataError(
        f"{path}: the rows are neither this project's records (`completion`, `gold`, "
        "`category`: written by runs since eval.protocol exists; re-run `evaluate` for older "
        "ones) nor the reference's (`response` with `answer` or `golden_answer`)."
    )


def _from_reference(rows: list[dict], path: Path) -> tuple[list[dict], str]:
    """The reference's eval rows as records, and their domain."""
    golds = [r.get("golden_answer", r.get("answer")) for r in rows]
    first = next((g for g in golds if g), None)
    if isinstance(first, list) and first and isinstance(first[0], dict) and "Answer" in first[0]:
        domain, golds = "science", [(g[0].get("Answer") if g else None) for g in golds]
    elif isinstance(first, list):
        domain = "tooluse"
    elif isinstance(first, str):
        domain = "science"
    else:
        raise DataError(
            f"{path}: no row has an `answer` (science) or `golden_answer` (tool use) to score "
            "against."
        )
    records = [
        {"id": f"{path.stem}-{i}", "category": domain, "gold": g or "", "completion": r["response"]}
        for i, (r, g) in enumerate(zip(rows, golds, strict=True))
    ]
    return records, domain


def run_config(path: Path, domain: str | None, overrides: list[str]) -> DictConfig:
    """The config the records were scored with, with `overrides` (``key=value``) applied.

    ``config=FILE`` if given (a run's ``.hydra/config.yaml``, or a logger's ``hparams.yaml``:
    runs under ``trainer=ddp`` keep no ``.hydra``); else a run's ``.hydra/config.yaml`` beside
    the file or one folder up; for the paper's files, ``conf/data/<domain>.yaml`` with
    ``eval.protocol=reference``.
    """
    given = [Path(o.split("=", 1)[1]) for o in overrides if o.startswith("config=")]
    found = given or [
        f / ".hydra" / "config.yaml"
        for f in (path.parent, path.parent.parent)
        if (f / ".hydra" / "config.yaml").is_file()
    ]
    if found and found[0].is_file():
        cfg = OmegaConf.load(found[0])
    elif domain is not None and not given:
        data = OmegaConf.load(CONF_DIR / "data" / f"{domain}.yaml")
        cfg = OmegaConf.create({"data": {"task": data.task}, "eval": {"protocol": "reference"}})
    else:
        where = given[0] if given else ".hydra/config.yaml beside it or one folder up"
        raise ConfigError(
            f"{path}: no run config ({where}), so the task that scored it is unknown. Keep the "
            "file in its run folder, or give config=<run dir>/.hydra/config.yaml (or a "
            "logger's hparams.yaml)."
        )
    own = ("out=", "config=")
    cfg.merge_with(OmegaConf.from_dotlist([o for o in overrides if not o.startswith(own)]))
    from_config(EvalSettings, cfg.get("eval"), "eval")  # every value checked now
    return cfg


def rescore(records: list[dict], task: Task, cfg: DictConfig) -> dict:
    """The metrics of `records` under `task` and the ``eval`` settings of `cfg`.

    The records are replayed in the run's evaluation batches (``data.eval_batch_size``), so
    the metrics' sums are taken in the run's order and come out identical.
    """
    settings = from_config(EvalSettings, cfg.get("eval"), "eval")  # a key left out: its default
    scoring, protocol = settings.scoring, settings.protocol
    stored = settings.confidence_readout == "expected"
    size = OmegaConf.select(cfg, "data.eval_batch_size", default=None) or len(records)
    scores = EvalScores(list(task.categories), scoring)
    for start in range(0, len(records), size):
        batch = records[start : start + size]
        texts = [r["completion"] for r in batch]
        if stored:  # the expected readout needs the model: keep the run's confidences
            conf = torch.tensor(
                [float("nan") if r["confidence"] is None else r["confidence"] for r in batch]
            )
        else:
            conf = parse_confidences(texts, scoring)
        items = [{**r, "answer": r["gold"]} for r in batch]
        scores.update(EvalBatch(conf, *verdicts(task, texts, items)))
        if protocol == "reference":
            for r, text, item in zip(batch, texts, items, strict=True):
                r["reference"] = reference_record(task, text, item)
    result = scores.compute()
    for key in NEEDS_MODEL:
        result.pop(key, None)
    result["reliability"] = scores.calibration.reliability_bins()
    if protocol == "reference":
        result["reference"] = reference.block(records, task.reports_answer_rate)
    return result


def output_path(source: Path, overrides: list[str], n_inputs: int) -> Path:
    """``out=PATH``, else ``metrics.json`` beside `source` unless one is there already."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("out=")]
    if given:
        if n_inputs > 1:
            raise ConfigError("out=PATH names one file: give one input with it, or leave it out.")
        return Path(given[-1])
    beside = source.parent / METRICS_FILE
    return beside if not beside.exists() else source.parent / "metrics.rescored.json"


def main(argv: list[str] | None = None) -> list[Path]:
    """Re-score each file of `argv` (files, then ``key=value`` overrides); the files written."""
    args = sys.argv[1:] if argv is None else argv
    # a path may hold "=" (a multirun's experiment=toy,method=caopd/): an existing file is a file
    is_file = [Path(a).exists() or "=" not in a for a in args]
    files = [Path(a) for a, f in zip(args, is_file, strict=True) if f]
    overrides = [a for a, f in zip(args, is_file, strict=True) if not f]
    if not files:
        raise ConfigError(
            "Name the completions to re-score: python -m lightning_caopd.rescore "
            "<run dir>/completions.jsonl [eval.protocol=reference] [out=PATH]."
        )
    written = []
    for path in files:
        start = time.perf_counter()
        records, domain = read_completions(path)
        cfg = run_config(path, domain, overrides)
        task = instantiate(cfg.data.task)
        result = rescore(records, task, cfg)
        result["rescore"] = {
            "source": str(path),
            "protocol": OmegaConf.select(cfg, "eval.protocol", default="default"),
            "scoring": OmegaConf.select(cfg, "eval.scoring", default="default"),
            "overrides": overrides,
            "not_recomputed": list(NEEDS_MODEL),
        }
        out = output_path(path, overrides, len(files))
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(result, indent=2, sort_keys=True))
        log.info(
            "Re-scored %d completions of %s in %.2f s: %s",
            len(records),
            path,
            time.perf_counter() - start,
            out,
        )
        written.append(out)
    return written


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main()
    except Exception as err:  # a problem the user can fix: its paragraph, not a traceback
        message = user_message(err)
        if message is None:
            raise
        exit_with(message)
