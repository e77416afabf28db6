"""The evaluation entry point (`lightning_caopd.evaluate`): metrics, diagram, checkpoint weights."""

import json

import pytest
import torch

from lightning_caopd.evaluate import evaluate, load_student_weights
from tests.fixtures.runs import SCIENCE


@pytest.mark.parametrize("split, n", [("all", 6), ("eval", 2)])
def test_evaluation_entry_point_writes_metrics_and_diagram(split, n, tiny_dir, make_cfg, tmp_path):
    cfg = make_cfg(
        [
            "model=hf",
            f"model.pretrained_model_name_or_path={tiny_dir}",
            "data=science",
            f"data.path={SCIENCE}",
            "data.num_eval=2",
            f"split={split}",
            "eval.max_new_tokens=8",
        ],
        tmp_path,
        config_name="evaluate",
    )
    result = evaluate(cfg)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["n"] == n == result["n"] and written["run"]["split"] == split
    assert {"accuracy", "ece", "brier", "spr", "by_category"} <= written.keys()
    assert (tmp_path / "reliability.png").stat().st_size > 10_000
    records = (tmp_path / "completions.jsonl").read_text().splitlines()
    assert len(records) == n and "completion" in json.loads(records[0])


def test_checkpoint_weights_replace_the_student(tiny_dir, tmp_path):
    from lightning_caopd.models import load_pretrained

    student, trained = load_pretrained(str(tiny_dir)), load_pretrained(str(tiny_dir))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    state = {f"student.{k}": v for k, v in trained.state_dict().items()}
    state["teacher.x"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "last.ckpt")
    load_student_weights(student, tmp_path / "last.ckpt")
    assert all(
        torch.equal(a, b) for a, b in zip(student.parameters(), trained.parameters(), strict=True)
    )
    torch.save({"state_dict": {"teacher.x": torch.zeros(1)}}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="no student weights"):
        load_student_weights(student, tmp_path / "bad.ckpt")
