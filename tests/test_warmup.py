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


def test_scaling_sweep_builds_one_base_per_size(conf_dir, tiny_overrides, make_cfg, tmp_path):
    from hydra import initialize_config_dir
    from transformers import AutoConfig

    small_build = [
        "+model.base.overrides.trainer.max_steps=2",
        "+model.base.overrides.data.dataset.n=64",
        "+model.base.overrides.data.num_eval=8",
    ]
    cfg = make_cfg(["experiment=scaling_toy", "size=16", *tiny_overrides, *small_build], tmp_path)
    sweep = cfg.hydra.sweeper.params
    assert len(str(sweep.size).split(",")) >= 4 and str(sweep.method) == "opd,caopd"
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        run(cfg)
    base = tmp_path / "cache" / "scaling_base" / "world0_h16"
    width = AutoConfig.from_pretrained(base)
    assert (width.hidden_size, width.intermediate_size) == (16, 32)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    warmup = json.loads((base.parent / "world0_h16.run" / "metrics.json").read_text())
    assert metrics["n_parameters"] == warmup["n_parameters"] < 10_000  # the 16-wide student
    assert warmup["run"]["experiment"] == "scaling_base"


def test_teacher_examples_state_confidences_on_the_chosen_grid():
    from lightning_caopd.calibration import CaOPD
    from lightning_caopd.confidence import parse_confidence
    from lightning_caopd.tasks.toy import ToyTask
    from lightning_caopd.templates import TeacherTemplate
    from lightning_caopd.warmup import warmup_examples

    def stated(steps):
        examples = warmup_examples(
            600, 0, ToyTask(), TeacherTemplate(), CaOPD(), confidence_steps=steps
        )
        teacher = [t for chat, t in examples if "Reference solution" in chat[-1]["content"]]
        return {round(parse_confidence(t), 2) for t in teacher}

    assert stated(8) == {round(k / 8, 2) for k in range(9)}  # every value P_acc takes at K = 8
    assert len(stated(100)) > 40  # the default 0.01 grid


def test_mul_resolver_scales_a_width_in_a_config():
    from omegaconf import OmegaConf

    import lightning_caopd.resolvers  # noqa: F401  (registers caopd.*)

    cfg = OmegaConf.create({"size": 24, "mlp": "${caopd.mul:${size},2}"})
    assert cfg.mlp == 48
