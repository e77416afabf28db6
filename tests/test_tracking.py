"""Loggers and what they receive: W&B offline run contents, rollout CSV, token-span entropies."""

import csv
import json
import math
import struct

import pytest
import torch

from lightning_caopd.models import build_char_tokenizer
from lightning_caopd.runner import run
from lightning_caopd.callbacks import RolloutTable, rollout_entropies
from lightning_caopd.loggers import ROLLOUT_COLUMNS
from tests.conftest import TINY, compose_cfg


def test_entropies_split_answer_and_confidence_tokens():
    tok = build_char_tokenizer()
    text = "Answer: b\nConfidence: 0.62"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    conf_start = text.index("0.62")
    v = len(tok)
    logits = torch.zeros(2, len(ids), v)  # uniform: entropy log V everywhere
    # peaked rows on the confidence value's 4 characters of rollout 0: entropy ~ 0 there
    logits[0, conf_start : conf_start + 4, 0] = 1e4
    out = rollout_entropies(logits, [ids, ids[: text.index("\n")]], tok)
    assert out["train/answer_entropy"] == pytest.approx(math.log(v), rel=1e-5)
    # 4 peaked tokens of rollout 0; rollout 1 was cut before its confidence: it adds none
    assert out["train/confidence_entropy"] == pytest.approx(0.0, abs=1e-4)
    only_answers = rollout_entropies(logits[1:], [ids[: text.index("\n")]], tok)
    assert "train/confidence_entropy" not in only_answers


def test_tracker_rejects_bad_options():
    with pytest.raises(ValueError, match="rows"):
        RolloutTable(rows=0)


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
def test_wandb_offline_run_holds_config_history_image_and_table(toy_base, tmp_path, monkeypatch):
    wandb_root = tmp_path / "wandb_dir"
    wandb_root.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_root))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_cfg(
        [
            "experiment=caopd",
            f"model.path={toy_base}",
            *[o for o in TINY if not o.startswith("callbacks=")],
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
    assert any("val/ece" in r for r in history)
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
    assert sum(bins["count"]) == result["n"] == 24
    assert sum(result["initial"]["reliability"]["count"]) == 24


@pytest.mark.parametrize("choice", ["logger=many", "logger=[csv,wandb,tensorboard]"])
def test_several_loggers_compose_and_instantiate(choice, tmp_path, monkeypatch):
    from hydra.utils import instantiate

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    cfg = compose_cfg([choice], tmp_path)
    names = list(cfg.logger)
    assert {"csv", "wandb"} <= set(names)
    loggers = [instantiate(c) for c in cfg.logger.values()]
    wandb_logger = loggers[names.index("wandb")]
    # nothing starts before the first log call; the offline folder goes to the run dir
    assert wandb_logger._wandb_init["dir"] == str(tmp_path)
    assert wandb_logger._wandb_init["group"] == "train" and wandb_logger._wandb_init["tags"] == [
        "opd"
    ]


@pytest.mark.parametrize(
    "choice", ["hydra/launcher=joblib_local", "hydra/launcher=slurm", "hydra/sweeper=optuna_lr_k"]
)
def test_sweep_configs_compose(choice, tmp_path):
    cfg = compose_cfg([choice], tmp_path)
    group = choice.split("=")[0].split("/")[1]
    node = cfg.hydra[group]
    assert node._target_.startswith("hydra_plugins.")
    if group == "sweeper":
        assert set(node.params) == {"method.optimizer.lr", "method.rollout.num_rollouts"}
        assert node.sampler.seed == cfg.seed
