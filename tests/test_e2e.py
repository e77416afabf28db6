"""Two-step Hydra-composed runs of each method on the tiny model."""

import csv
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
    overrides = ["experiment=caopd", f"model.path={toy_base}", *TINY, "method.rollout.num_rollouts=1"]
    cfg = compose_cfg(overrides, tmp_path)
    with pytest.raises(Exception, match="K >= 2"):
        run(cfg)


def test_missing_base_is_built_on_first_use_and_cached(tmp_path):
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    from tests.conftest import CONF_DIR

    small_build = [
        "+model.base.overrides.trainer.max_steps=2",
        "+model.base.overrides.data.dataset.n=64",
        "+model.base.overrides.data.num_eval=6",
        "trainer.log_every_n_steps=1",
    ]
    cfg = compose_cfg(["experiment=caopd", *TINY, *small_build], tmp_path)
    base = tmp_path / "cache" / "toy_base" / "world0"
    assert not base.exists()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        run(cfg)
    assert (base / "config.json").exists() and (base / "tokenizer.json").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["run"]["steps"] == 2
    # the warm-up skips the evaluation of its random initial model (eval_before_training=false)
    warmup = json.loads((base.parent / "world0.run" / "metrics.json").read_text())
    assert warmup["initial"] is None and warmup["run"]["steps"] == 2
    assert not (base.parent / "world0.run" / "reliability_initial.png").exists()
    # the same run again, now on the cached base: the same numbers as the run that built it
    again = tmp_path / "again"
    cfg2 = compose_cfg(["experiment=caopd", *TINY, *small_build], again)
    with open_dict(cfg2):
        cfg2.paths.cache_dir = str(tmp_path / "cache")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        run(cfg2)
    first, second = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path, again))
    for m in (first, second):
        m.pop("run")
    assert first == second
    # the per-step losses too: they depend on the sampled rollouts, so on the generator state
    rows = [list(csv.DictReader((d / "csv" / "metrics.csv").open())) for d in (tmp_path, again)]
    losses = [[r["train/loss"] for r in rs if r["train/loss"]] for rs in rows]
    assert len(losses[0]) == 2 and losses[0] == losses[1]
