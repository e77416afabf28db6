"""The toy base (`lightning_caopd.warmup`): built by the warm-up on first use, then cached."""

import csv
import json

from lightning_caopd.runner import run


def test_missing_base_is_built_on_first_use_and_cached(
    conf_dir, tiny_overrides, make_cfg, tmp_path
):
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    small_build = [
        "+model.base.overrides.trainer.max_steps=2",
        "+model.base.overrides.data.dataset.n=64",
        "+model.base.overrides.data.num_eval=6",
        "trainer.log_every_n_steps=1",
    ]
    cfg = make_cfg(["experiment=caopd", *tiny_overrides, *small_build], tmp_path)
    base = tmp_path / "cache" / "toy_base" / "world0"
    assert not base.exists()
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        run(cfg)
    assert (base / "config.json").exists() and (base / "tokenizer.json").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["run"]["steps"] == 2
    # the warm-up skips the evaluation of its random initial model (eval_before_training=false)
    warmup = json.loads((base.parent / "world0.run" / "metrics.json").read_text())
    assert warmup["initial"] is None and warmup["run"]["steps"] == 2
    assert not (base.parent / "world0.run" / "reliability_initial.png").exists()
    # the same run again, now on the cached base: the same numbers as the run that built it
    again = tmp_path / "again"
    cfg2 = make_cfg(["experiment=caopd", *tiny_overrides, *small_build], again)
    with open_dict(cfg2):
        cfg2.paths.cache_dir = str(tmp_path / "cache")
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        run(cfg2)
    first, second = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path, again))
    for m in (first, second):
        m.pop("run")
    assert first == second
    # the per-step losses too: they depend on the sampled rollouts, so on the generator state
    rows = [list(csv.DictReader((d / "csv" / "metrics.csv").open())) for d in (tmp_path, again)]
    losses = [[r["train/loss"] for r in rs if r["train/loss"]] for rs in rows]
    assert len(losses[0]) == 2 and losses[0] == losses[1]
