"""One schema, checked once: every group a user sets is checked at start-up, before any model.

`lightning_caopd.runner.check_config` builds everything that is not a model (the method's
settings and parts, the optimizer, ``eval``, the callbacks, the task and the data) and a bad
value stops the run with a `ConfigError` naming the key, the value and what is allowed;
``train.py`` prints it as one ``Error:`` paragraph.
"""

import re
from dataclasses import asdict

import pytest
from omegaconf import OmegaConf

from lightning_caopd import checks, runner
from lightning_caopd.divergence.token import KINDS
from lightning_caopd.errors import ConfigError, user_message
from lightning_caopd.settings import DIVERGENCES, EvalSettings, LossSettings, from_config
from tests.fixtures.runs import SCIENCE, train_process

# (group, override(s), the error's start): one bad value or more of every group a user sets
BAD = [
    ("rollout", "method.rollout.num_rollouts=abc", "method.rollout.num_rollouts='abc' is out of"),
    ("rollout", "method.rollout.num_rollouts=0", "method.rollout.num_rollouts=0 is out of range"),
    ("rollout", "method.rollout.temperature=0", "method.rollout.temperature=0 is out of range"),
    ("rollout", "method.rollout.max_new_tokens=0", "method.rollout.max_new_tokens=0 is out of"),
    ("rollout", "method.rollout.min_new_tokens=-1", "method.rollout.min_new_tokens=-1 is out of"),
    (
        "rollout",
        "method.rollout.min_new_tokens=33",
        "method.rollout.min_new_tokens=33 is out of range: it must be an integer <= "
        "method.rollout.max_new_tokens=32",
    ),
    ("rollout", "method.rollout.top_p=2", "method.rollout.top_p=2 is out of range"),
    ("rollout", "method.rollout.prompt_overflow=drop", "method.rollout.prompt_overflow='drop'"),
    ("rollout", "method.rollout.row_seeds=2", "method.rollout.row_seeds=2 is out of range"),
    (
        "rollout",
        "method.rollout.row_seeds=true method.engine.use_generate=true",
        "method.rollout.row_seeds=true with method.engine.use_generate=true",
    ),
    ("loss", "method.loss.divergence=kl", "method.loss.divergence='kl' is out of range"),
    ("loss", "method.loss.jsd_beta=2", "method.loss.jsd_beta=2 is out of range"),
    ("loss", "method.loss.skip_first_tokens=-1", "method.loss.skip_first_tokens=-1 is out of"),
    ("loss", "method.loss.share_prompt_prefix=2", "method.loss.share_prompt_prefix=2 is out of"),
    ("loss", "method.loss.temperature=0", "method.loss.temperature=0 is out of range"),
    ("loss", "method.loss.topk_support=both", "method.loss.topk_support='both' is out of"),
    ("targets", "method=caopd method.rollout.num_rollouts=1", "CaOPD needs K >= 2"),
    ("targets", "method=caopd method.targets.cut=middle", "method.targets.cut='middle' is out"),
    (
        "targets",
        "method=caopd_sdpo method.targets.add_note=false",
        "method.targets.note_only_rows=",
    ),
    ("targets", "method=caopd method.targets.note='{q}'", "method.targets.note='{q}' is out"),
    ("template", "method.template.source=bogus", "method.template.source='bogus' is out"),
    ("template", "method.template.user_format='{prompt}'", "method.template.user_format='{prom"),
    ("template", "method.template.note_format=x", "method.template.note_format='x' is out"),
    ("engine", "method.engine=tpu", "method.engine='tpu' is out of range"),
    ("engine", "method.engine.use_generate=maybe", "method.engine.use_generate='maybe' is out"),
    ("engine", "method/engine=vllm method.engine.gpu_memory_utilization=2", "method.engine.gpu_"),
    ("engine", "method/engine=vllm method.engine.seed=-1", "method.engine.seed=-1 is out of"),
    ("optimizer", "method.optimizer.lr=-1", "method.optimizer: Invalid learning rate: -1"),
    ("optimizer", "+method.optimizer.momentum=0.9", "method.optimizer: AdamW.__init__() got an"),
    ("eval", "eval.max_new_tokens=0", "eval.max_new_tokens=0 is out of range"),
    ("eval", "eval.max_prompt_length=0", "eval.max_prompt_length=0 is out of range"),
    ("eval", "eval.do_sample=sometimes", "eval.do_sample='sometimes' is out of range"),
    ("eval", "eval.temperature=-1", "eval.temperature=-1 is out of range"),
    ("eval", "eval.scoring=mine", "eval.scoring='mine' is out of range"),
    ("eval", "eval.protocol=mine", "eval.protocol='mine' is out of range"),
    ("eval", "eval.confidence_readout=mode", "eval.confidence_readout='mode' is out of range"),
    ("eval", "eval.confidence_readout=expected eval.scoring=reference", "eval.confidence_read"),
    ("eval", "eval.engine=tpu", "eval.engine='tpu' is out of range"),
    ("eval", "eval.teacher_conditioned=yes", "eval.teacher_conditioned='yes' is out of range"),
    ("eval", "+eval.bogus=1", "eval has no setting bogus: its settings are max_new_tokens"),
    ("callbacks", "callbacks.teacher_ema.rate=2", "callbacks.teacher_ema.rate=2 is out of range"),
    (
        "callbacks",
        "model.lora={r:4,alpha:8,target_modules:[q_proj]} callbacks.teacher_ema.rate=0.1",
        "callbacks.teacher_ema.rate > 0 moves the teacher toward the student, but with model.lora",
    ),
    ("callbacks", "callbacks.nonfinite_guard.max_consecutive=0", "callbacks.nonfinite_guard.m"),
    ("callbacks", "callbacks.metrics.completions=all", "callbacks.metrics.completions='all' is"),
    ("callbacks", "callbacks=default callbacks.teacher_success.every_n_steps=0", "callbacks.te"),
    ("callbacks", "callbacks=default callbacks.rollout_table.rows=0", "callbacks.rollout_table."),
    ("data", "data.batch_size=0", "data.batch_size=0 is out of range"),
    ("data", "data.eval_batch_size=0", "data.eval_batch_size=0 is out of range"),
    ("data", "data.num_train=0", "data.num_train=0 is out of range"),
    ("data", "data.num_eval=-1", "data.num_eval=-1 is out of range"),
    ("data", "data.world_seed=-1", "data.world_seed=-1 is out of range"),
    ("data", "data.task.instruction_role=tool", "data.task.instruction_role='tool' is out of"),
]


@pytest.mark.parametrize("group, overrides, message", BAD, ids=[b[1] for b in BAD])
def test_every_bad_value_stops_the_run_before_any_model_loads(
    group, overrides, message, no_models, tiny_overrides, make_cfg, tmp_path
):
    cfg = make_cfg([*tiny_overrides, *overrides.split()], tmp_path)
    with pytest.raises(ConfigError) as info:
        runner.run(cfg)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text and user_message(info.value) == f"Error: {text}"


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.scheduler.warmup_ratio=1", "method.scheduler.warmup_ratio=1 is out of range"),
        ("data.task.answer_format=strict", "data.task.answer_format='strict' is out of range"),
        ("data.task.verifier=mine", "data.task.verifier='mine' is out of range"),
        ("data.split_seed=-1", "data.split_seed=-1 is out of range"),
        ("method.engine.importance_sampling_cap=1", "method.engine.importance_sampling_cap=1"),
    ],
)
def test_a_domain_preset_s_bad_values_stop_the_run_before_any_model_loads(
    override, message, no_models, make_cfg, tmp_path
):
    cfg = make_cfg(["experiment=science", "method=opd", f"data.path={SCIENCE}", override], tmp_path)
    with pytest.raises(ConfigError, match=re.escape(message)):
        runner.run(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.teacher_share=1.5", "method.teacher_share=1.5 is out of range"),
        ("method.confidences=[0.5,2]", "method.confidences=2 is out of range"),
        ("method.confidence_steps=0", "method.confidence_steps=0 is out of range"),
        (
            "+method.caopd.cut=middle",
            "method.targets.cut='middle' is out of range: it must be one"
            " of ('last', 'first'). (in method.caopd)",
        ),
    ],
)
def test_the_format_warm_up_s_bad_values_stop_it_before_any_model_loads(
    override, message, no_models, make_cfg, tmp_path
):
    overrides = ["experiment=format_base", "data=science", f"data.path={SCIENCE}", override]
    with pytest.raises(ConfigError, match=re.escape(message)):
        runner.run(make_cfg(overrides, tmp_path))


def test_every_group_has_a_bad_value_tested():
    assert {b[0] for b in BAD} == {
        "rollout",
        "loss",
        "targets",
        "template",
        "engine",
        "optimizer",
        "eval",
        "callbacks",
        "data",
    }


def test_a_good_config_passes_the_check_without_a_model(
    no_models, tiny_overrides, make_cfg, tmp_path
):
    for extra in ([], ["method=caopd", "callbacks=default"], ["method=sdpo"]):
        cfg = make_cfg([*tiny_overrides, *extra], tmp_path)
        datamodule = runner.check_config(cfg)  # builds no model: the fixture would fail
        assert datamodule.batch_size == 2
        with pytest.raises(AssertionError, match="a model or base was loaded"):
            runner.run(cfg)  # the check passed; the run went on to load the base


def test_one_checker_per_kind_of_range():
    checks.check_int("k", None, 1, allow_none=True)
    checks.check_number("k", 0.5, 0, 1, open_low=True)
    checks.check_format("k", "{p_acc:.2f}", ["p_acc"])
    for call, allowed in [
        (lambda: checks.check_int("k", True, 0), "an integer >= 0"),
        (lambda: checks.check_number("k", float("nan"), 0), "a number >= 0"),
        (lambda: checks.check_number("k", float("inf"), 0), "a number >= 0"),
        (lambda: checks.check_number("k", 1, 0, 1, open_high=True), "a number in [0, 1)"),
        (lambda: checks.check_number("k", "1", allow_none=True), "a finite number or null"),
        (lambda: checks.check_choice("k", "c", ("a", "b")), "one of ('a', 'b')"),
        (lambda: checks.check_bool("k", "true"), "true or false"),
        (lambda: checks.check_format("k", "{x}", ["p"]), "a format string using only {p}"),
    ]:
        with pytest.raises(ConfigError, match="is out of range: it must be") as info:
            call()
        assert allowed in str(info.value)


def test_the_divergences_are_listed_once():
    assert DIVERGENCES is KINDS
    for kind in KINDS:
        LossSettings(divergence=kind)


def test_eval_defaults_are_the_config_defaults(make_cfg, tmp_path):
    cfg = make_cfg([], tmp_path)
    assert OmegaConf.to_container(cfg.eval, resolve=True) == asdict(EvalSettings())
    assert from_config(EvalSettings, None, "eval") == EvalSettings()
    assert from_config(EvalSettings, cfg.eval, "eval") == EvalSettings()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("method.rollout.num_rollouts=1", "Error: CaOPD needs K >= 2 rollouts per prompt"),
        ("callbacks.teacher_ema.rate=2", "Error: callbacks.teacher_ema.rate=2 is out of range"),
        ("method.template.source=bogus", "Error: method.template.source='bogus' is out of range"),
        ("method.rollout.top_p=2", "Error: method.rollout.top_p=2 is out of range"),
        ("method.loss.divergence=foo", "Error: method.loss.divergence='foo' is out of range"),
    ],
)
def test_train_py_prints_one_paragraph_before_loading_the_base(override, expected, tmp_path):
    overrides = ["experiment=toy", "method=caopd", override, "trainer.max_steps=1"]
    where = [f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    process = train_process([*overrides, *where], tmp_path)
    output, _ = process.communicate(timeout=120)  # stdout and stderr together
    assert process.returncode == 1
    lines = output.strip().splitlines()
    assert lines[-1].startswith(expected) and [ln for ln in lines if "Error" in ln] == lines[-1:]
    assert "Traceback" not in output and "Error executing job" not in output
    assert not (tmp_path / "cache").exists()  # the toy base was neither built nor loaded
    assert expected[len("Error: ") :] in (tmp_path / "run" / "train.log").read_text()
