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
    cfg = make_cfg(["experiment=toy", "method=caopd", *tiny_overrides, *small_build], tmp_path)
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
    cfg2 = make_cfg(["experiment=toy", "method=caopd", *tiny_overrides, *small_build], again)
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


def _science_rows_with_demos(path, wrong: int):
    """The science fixture rows with a demonstration each; the first `wrong` name a wrong letter."""
    from tests.fixtures.runs import SCIENCE

    rows = [json.loads(line) for line in open(SCIENCE)]
    for i, row in enumerate(rows):
        letter = "ABCD"[("ABCD".index(row["answer"]) + (i < wrong)) % 4]
        row["output_text"] = f"<reasoning>It is {letter}.</reasoning>\n<answer>{letter}</answer>"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


FORMAT_BASE = [
    "experiment=format_base",
    "model=tiny_scratch",
    "data=science",
    "data.num_eval=2",
    "data.batch_size=2",
    "trainer.max_steps=2",
    "trainer.log_every_n_steps=1",
    "eval.max_new_tokens=8",
    "logger=csv",
    "callbacks=minimal",
]


def test_format_base_warms_up_on_the_tasks_verified_items(make_cfg, tmp_path, caplog):
    import logging
    import re

    from lightning_caopd.models import load_pretrained

    rows = _science_rows_with_demos(tmp_path / "rows.jsonl", wrong=3)
    cfg = make_cfg([*FORMAT_BASE, f"data.path={rows}"], tmp_path / "run")
    caplog.set_level(logging.INFO, logger="lightning_caopd.warmup")
    run(cfg)
    # 4 training rows, 1 to 3 of them with a wrong demonstration (2 of the 6 are held out)
    said = re.search(r"accepts (\d) of the 4 training items' demonstrations; the (\d)", caplog.text)
    assert said and 1 <= int(said[1]) <= 3 and int(said[1]) + int(said[2]) == 4
    rows_csv = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    rejected = [float(r["train/rejected_demos"]) for r in rows_csv if r.get("train/rejected_demos")]
    assert len(rejected) == 2 and sum(rejected) >= 1
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["initial"]["format_rate"] is not None and metrics["format_rate"] is not None
    assert metrics["run"]["experiment"] == "format_base" and metrics["run"]["steps"] == 2
    # saved where method.save_dir says (the model and the data of the run), loadable by model=hf
    base = tmp_path / "run" / "cache" / "format_base" / "tiny_scratch-science"
    assert cfg.method.save_dir == str(base) and (base / "config.json").is_file()
    assert load_pretrained(str(base)).num_parameters() == metrics["n_parameters"]


def test_format_base_with_no_verified_demonstration_is_a_clear_error(make_cfg, tmp_path):
    import pytest

    from lightning_caopd.errors import ConfigError

    rows = _science_rows_with_demos(tmp_path / "rows.jsonl", wrong=6)
    cfg = make_cfg([*FORMAT_BASE, f"data.path={rows}"], tmp_path / "run")
    with pytest.raises(ConfigError, match="rejects the demonstration of every one of the 4"):
        run(cfg)
    assert not (tmp_path / "run" / "cache" / "format_base").exists()  # no base saved
