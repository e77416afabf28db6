"""A model that never states a confidence gets no calibration numbers, and not perfect ones.

`python -m lightning_caopd.evaluate model=tiny_scratch ...`, run in-process: a random-weight
model writes no confidence line, so its metrics.json must say format_rate 0, no ECE or Brier
(None, not 0.0), and the worst brier_all.
"""

import json

from lightning_caopd.evaluate import evaluate

STATED_KEYS = ("accuracy_stated", "mean_confidence", "ece", "brier", "ocg", "spr", "auroc", "aurc")


def test_tiny_scratch_reports_no_format_and_no_perfect_calibration(make_cfg, tmp_path):
    cfg = make_cfg(
        [
            "model=tiny_scratch",
            "data.num_eval=12",
            "data.eval_batch_size=12",
            "eval.max_new_tokens=8",
        ],
        tmp_path,
        config_name="evaluate",
    )
    result = evaluate(cfg)
    written = json.loads((tmp_path / "metrics.json").read_text())
    for metrics in (result, written):
        assert metrics["n"] == 12 and metrics["n_stated"] == 0
        assert metrics["format_rate"] == 0.0
        assert all(metrics[key] is None for key in STATED_KEYS), metrics
        assert metrics["brier_all"] == 1.0  # the worst possible, so a sweep cannot pick it
        assert metrics["accuracy"] is not None
        for values in metrics["by_category"].values():
            assert values["ece"] is None and values["brier"] is None
            assert values["format_rate"] == 0.0 and values["brier_all"] == 1.0
    assert sum(written["reliability"]["count"]) == 0
    records = [
        json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()
    ]
    assert len(records) == 12 and all(r["confidence"] is None for r in records)
