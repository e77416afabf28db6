"""Loggers (`lightning_caopd.loggers`): a W&B offline run's contents, several loggers at once."""

import csv
import json
import struct

import pytest

from lightning_caopd.loggers import ROLLOUT_COLUMNS
from lightning_caopd.runner import run


def _offline_run_dir(root):
    runs = sorted((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run under {root}, found {runs}"
    return runs[0]


def _records(run_dir):
    """The protobuf records of the run's ``run-*.wandb`` transaction log.

    The file is a LevelDB-style log (wandb 0.31 ships no Python reader): a 7-byte header
    (``:W&B``, magic, version), then 32 KiB blocks of chunks, each with a 7-byte header
    (CRC32, length, kind: 1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and n == 0):  # zero padding at the end of a block
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(chunk)
            chunk = b""
            yield rec


def _items(records, kind: str) -> list[dict]:
    """The key/value items of each record of `kind` ("history" or "config")."""
    out = []
    for rec in records:
        if rec.WhichOneof("record_type") == kind:
            items = rec.history.item if kind == "history" else rec.config.update
            out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return out


@pytest.mark.slow
def test_wandb_offline_run_holds_config_history_image_and_table(
    toy_base, tiny_overrides, make_cfg, tmp_path, monkeypatch
):
    wandb_root = tmp_path / "wandb_dir"
    wandb_root.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_root))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg(
        [
            "experiment=toy",
            "method=caopd",
            f"model.path={toy_base}",
            *[o for o in tiny_overrides if not o.startswith("callbacks=")],
            "callbacks=default",
            "logger=[csv,wandb]",
            "trainer.log_every_n_steps=1",
            "callbacks.rollout_table.every=1",
            "callbacks.rollout_table.rows=3",
        ],
        tmp_path / "run",
    )
    result = run(cfg)
    run_dir = _offline_run_dir(wandb_root)
    files = run_dir / "files"

    records = list(_records(run_dir))
    # the resolved Hydra config is the run's config (offline, it lives in the .wandb log only)
    config = next(c for c in _items(records, "config") if "method" in c)
    assert config["method"]["name"] == "caopd"
    assert config["method"]["rollout"]["num_rollouts"] == 2
    assert config["method"]["targets"]["confidence_format"] == "Confidence: {p_acc:.2f}"
    assert config["logger"]["wandb"]["save_dir"] == str(wandb_root)

    # per-step scalars (with the new entropies) and the evaluations' metrics
    history = _items(records, "history")
    train = [r for r in history if "train/loss" in r]
    assert len(train) == 2
    assert all(r["train/answer_entropy"] > 0 for r in train)
    assert any("val/brier_all" in r for r in history)  # val/ece only when a confidence is stated
    assert any("val/by_category/next/accuracy" in r for r in history)

    # the reliability diagram of both evaluations, and a rollout table per step
    images = sorted((files / "media" / "images" / "val").glob("reliability_*.png"))
    assert len(images) == 2 and all(p.stat().st_size > 10_000 for p in images)
    tables = sorted((files / "media" / "table" / "train").glob("rollouts_*.table.json"))
    assert len(tables) == 2
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ROLLOUT_COLUMNS and len(table["data"]) == 3
    step, prompt, completion, _answer, _conf, correct, p_acc = table["data"][0]
    assert prompt and isinstance(completion, str) and isinstance(correct, bool) and 0 <= p_acc <= 1

    # the CSV logger's copy of the rollouts: header + 2 steps x 3 rows
    rows = list(csv.reader((tmp_path / "run" / "csv" / "rollouts.csv").open()))
    assert rows[0] == ROLLOUT_COLUMNS and len(rows) == 1 + 2 * 3
    assert {r[0] for r in rows[1:]} == {"0", "1"}

    # metrics.json keeps the diagram's bins, so reports can redraw it
    bins = result["reliability"]
    assert sum(bins["count"]) == result["n_stated"] and result["n"] == 24  # stated items only
    assert sum(result["initial"]["reliability"]["count"]) == result["initial"]["n_stated"]


@pytest.mark.parametrize("choice", ["logger=many", "logger=[csv,wandb,tensorboard]"])
def test_several_loggers_compose_and_instantiate(choice, make_cfg, tmp_path, monkeypatch):
    from hydra.utils import instantiate

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    cfg = make_cfg([choice], tmp_path)
    names = list(cfg.logger)
    assert {"csv", "wandb"} <= set(names)
    loggers = [instantiate(c) for c in cfg.logger.values()]
    wandb_logger = loggers[names.index("wandb")]
    # nothing starts before the first log call; the offline folder goes to the run dir
    assert wandb_logger._wandb_init["dir"] == str(tmp_path)
    assert wandb_logger._wandb_init["group"] == "train" and wandb_logger._wandb_init["tags"] == [
        "opd"
    ]
