"""`python -m lightning_caopd.rescore`: saved completions scored again, without a model."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightning_caopd import rescore
from lightning_caopd.errors import ConfigError, DataError
from lightning_caopd.runner import run
from tests.test_runner import SCIENCE, SHORT

NOT_RECOMPUTED = {"run", "initial", "confidence_readout", *rescore.NEEDS_MODEL}


def _train(make_cfg, overrides, out: Path) -> dict:
    """A short run in `out`, its config saved where Hydra saves it; its metrics.json."""
    cfg = make_cfg(overrides, out)
    run(cfg)
    (out / ".hydra").mkdir()
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    return json.loads((out / "metrics.json").read_text())


def _same(written: dict, rescored: dict) -> None:
    assert set(written) - set(rescored) == NOT_RECOMPUTED
    for key, value in rescored.items():
        if key != "rescore":
            assert value == written[key], key  # exactly, not approximately


def test_rescore_reproduces_a_reference_protocol_run_and_gives_the_default(
    toy_base, tiny_overrides, make_cfg, tmp_path
):
    overrides = ["experiment=toy", "method=caopd", f"model.path={toy_base}", *tiny_overrides]
    written = _train(make_cfg, [*overrides, "eval.protocol=reference"], tmp_path)
    records = (tmp_path / "completions.jsonl").read_text().splitlines()
    assert len(records) == written["n"] == written["reference"]["n_samples"]
    assert {"gold", "completion", "category", "reference"} <= json.loads(records[0]).keys()

    out = rescore.main([str(tmp_path / "completions.jsonl")])[0]
    assert out.name == "metrics.rescored.json"  # the run's metrics.json is kept
    again = json.loads(out.read_text())
    _same(written, again)
    assert again["rescore"]["protocol"] == "reference"

    other = tmp_path / "default.json"
    rescore.main([str(tmp_path / "completions.jsonl"), "eval.protocol=default", f"out={other}"])
    default = json.loads(other.read_text())
    assert "reference" not in default and default["accuracy"] == written["accuracy"]


def test_rescore_reproduces_a_science_preset_run(tiny_dir, make_cfg, tmp_path):
    written = _train(
        make_cfg,
        [
            "experiment=science",
            "method=caopd",
            "model=hf",
            f"model.pretrained_model_name_or_path={tiny_dir}",
            f"data.path={SCIENCE}",
            "data.num_eval=2",
            *SHORT,
        ],
        tmp_path,
    )
    assert written["reference"]["n_samples"] == 2 and "answer_parse_rate" in written["reference"]
    again = json.loads(rescore.main([str(tmp_path / "completions.jsonl")])[0].read_text())
    _same(written, again)


def _records(tmp_path: Path, texts: list[str]) -> Path:
    """A completions.jsonl of science records and the config of a default-protocol run."""
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    task = OmegaConf.load(rescore.CONF_DIR / "data" / "science.yaml").task
    cfg = {"data": {"task": task, "eval_batch_size": 2}, "eval": {"scoring": "default"}}
    OmegaConf.save(OmegaConf.create(cfg), run_dir / ".hydra" / "config.yaml")
    rows = [
        {"id": str(i), "category": "science", "gold": "B", "completion": t}
        for i, t in enumerate(texts)
    ]
    path = run_dir / "completions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_config_file_given_by_hand(tmp_path):
    path = _records(tmp_path, ["<answer>B</answer>\nConfidence: 0.5"])
    moved = tmp_path / "elsewhere.jsonl"
    moved.write_text(path.read_text())
    config = path.parent / ".hydra" / "config.yaml"
    result = json.loads(rescore.main([str(moved), f"config={config}"])[0].read_text())
    assert result["accuracy"] == 1.0 and result["mean_confidence"] == 0.5


def test_overrides_change_the_parser_and_the_verifier(tmp_path):
    path = _records(
        tmp_path,
        ["<answer>B</answer>\nConfidence: 8", "<answer>(B)</answer>\nConfidence: 0.4", "none"],
    )
    ours = json.loads(rescore.main([str(path)])[0].read_text())
    assert ours["mean_confidence"] == pytest.approx(0.6)  # 8 read as 0.8
    assert ours["accuracy"] == pytest.approx(2 / 3)
    theirs = json.loads(
        rescore.main(
            [
                str(path),
                "eval.scoring=reference",
                "data.task.verifier=reference",
                f"out={tmp_path / 'ref.json'}",
            ]
        )[0].read_text()
    )
    assert theirs["mean_confidence"] == pytest.approx(0.7)  # 8 clamped to 1.0
    assert theirs["accuracy"] == pytest.approx(1 / 3)  # (B) is no letter for its verifier


def test_reads_the_references_own_generations(tmp_path):
    science = tmp_path / "science" / "eval_responses.json"
    science.parent.mkdir()
    science.write_text(
        json.dumps(
            [
                {"prompt": [], "response": "<answer>A</answer>\nConfidence: 0.9", "answer": "A"},
                {"prompt": [], "response": "<answer>C</answer>", "answer": "B"},
            ]
        )
    )
    block = json.loads(rescore.main([str(science)])[0].read_text())
    assert (science.parent / "metrics.json").is_file()
    ref = block["reference"]
    assert ref["accuracy"] == 0.5 and ref["mean_confidence"] == pytest.approx(0.45)
    assert ref["answer_parse_rate"] == 1.0 and "valid_confidence_only" not in ref
    assert block["n_stated"] == 1 and block["mean_confidence"] == pytest.approx(0.9)  # ours

    tools = tmp_path / "tooluse.jsonl"
    golden = [{"Action": "getFacts", "Action_Input": "{}"}]
    tools.write_text(
        json.dumps({"response": "Action: getFacts\nConfidence: 0.5", "golden_answer": golden})
        + "\n"
    )
    ref = json.loads(rescore.main([str(tools), f"out={tmp_path / 't.json'}"])[0].read_text())
    assert ref["reference"]["accuracy"] == 1.0 and "answer_parse_rate" not in ref["reference"]
    assert ref["accuracy"] == 0.0  # ours: a call without an input object


def test_bad_inputs_are_one_sentence_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        rescore.main([str(tmp_path / "missing.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"completion": "x", "gold": "A", "category": "science"}\nnot json\n')
    with pytest.raises(DataError, match="line 2"):
        rescore.main([str(bad)])
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match="neither"):
        rescore.main([str(bad)])
    bad.write_text('{"completion": "x", "gold": "A", "category": "science"}\n')
    with pytest.raises(ConfigError, match="config.yaml"):
        rescore.main([str(bad)])
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        rescore.main([str(bad), f"config={tmp_path / 'nowhere.yaml'}"])
    with pytest.raises(ConfigError, match="Name the completions"):
        rescore.main([])


def test_a_path_with_an_equals_sign_is_a_file(tmp_path):
    path = _records(
        tmp_path / "experiment=toy,method=caopd", ["<answer>B</answer>\nConfidence: 0.5"]
    )
    out = rescore.main([str(path), "eval.protocol=reference"])[0]
    assert json.loads(out.read_text())["reference"]["accuracy"] == 1.0
