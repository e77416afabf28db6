"""Two-step Hydra-composed runs of each method on the tiny model."""

import json

import pytest

from lightning_caopd.runner import run
from tests.conftest import TINY, compose_cfg


@pytest.mark.parametrize("experiment", ["opd", "caopd"])
def test_two_step_run_writes_metrics_json(experiment, toy_base, tmp_path):
    cfg = compose_cfg([f"experiment={experiment}", f"model.path={toy_base}", *TINY], tmp_path)
    result = run(cfg)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["run"]["steps"] == 2 and written["run"]["method"] == experiment
    keys = {"accuracy", "mean_confidence", "ece", "brier", "ocg", "spr", "format_rate", "n",
            "answer_entropy", "confidence_entropy", "by_category"}
    assert keys <= written.keys() and keys <= written["initial"].keys()
    assert written["n"] == 24 and written["initial"]["n"] == 24
    assert set(written["by_category"]) <= {"next", "prev", "code"}
    assert (tmp_path / "reliability.png").stat().st_size > 10_000
    assert (tmp_path / "reliability_initial.png").exists()
    assert result["accuracy"] == written["accuracy"]


def test_caopd_with_one_rollout_is_a_clear_error(toy_base, tmp_path):
    cfg = compose_cfg(["experiment=caopd", f"model.path={toy_base}", *TINY, "method.num_rollouts=1"], tmp_path)
    with pytest.raises(Exception, match="K >= 2"):
        run(cfg)
