"""Every config under conf/ composes, and every `_target_` in it binds its arguments.

Nothing is instantiated (no weights are loaded): each `_target_` is located and its keyword
arguments are bound to its signature, so a renamed or misspelt argument fails here rather than
at the start of a long run. The sweep configs, the paper's experiments and its model configs
carry the values the paper's runs need.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from tests.fixtures.configs import CONF_DIR

GROUPS = [
    "model",
    "data",
    "method",
    "trainer",
    "logger",
    "callbacks",
    "paths",
    "experiment",
    "debug",
]
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# Hydra plugins behind the `sweep` extra
PLUGINS = {
    "launcher/joblib_local": "hydra_plugins.hydra_joblib_launcher",
    "launcher/slurm": "hydra_plugins.hydra_submitit_launcher",
    "sweeper/optuna_lr_k": "hydra_plugins.hydra_optuna_sweeper",
}


# the groups nested in `method` that its files choose (`method/targets=caopd/science`); their
# folders hold options of those groups, not methods
METHOD_GROUPS = ["engine", "recipe", "template", "targets"]
# the domain presets and the methods each is run with (the method chosen by `method=`)
DOMAINS = {
    "toy": ["opd", "caopd", "sdpo", "caopd_sdpo"],
    "science": ["opd", "caopd"],
    "tooluse": ["opd", "caopd", "sdpo", "caopd_sdpo"],
    "smollm2": ["opd", "caopd"],
}
DISTILLATION = ["opd", "caopd", "sdpo", "caopd_sdpo"]


def _options(group: str) -> list[str]:
    root = Path(CONF_DIR) / group
    # `_name.yaml` files are shared blocks that other options include, not options themselves
    files = root.glob("*.yaml") if group == "method" else root.rglob("*.yaml")
    return sorted(
        str(p.relative_to(root).with_suffix("")) for p in files if not p.name.startswith("_")
    )


def _targets(node, path: str = "") -> list[tuple[str, DictConfig]]:
    """(key path, node) for every node with a `_target_`, depth first."""
    found = []
    if isinstance(node, DictConfig):
        if "_target_" in node:
            found.append((path or "<root>", node))
        for key in node:
            if key != "hydra":
                found += _targets(node._get_node(key), f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, child in enumerate(node):
            found += _targets(child, f"{path}[{i}]")
    return found


def _check_binds(cfg: DictConfig) -> int:
    """Bind every `_target_`'s config keys to its signature; returns how many were checked."""
    targets = _targets(cfg)
    for path, node in targets:
        target = get_object(node._target_)
        kwargs = {k: None for k in node if k not in HYDRA_KEYS}
        sig = inspect.signature(target)
        try:
            sig.bind_partial(**kwargs)
        except TypeError as err:
            raise AssertionError(
                f"{path}: {node._target_} does not take {sorted(kwargs)}: {err}"
            ) from err
    return len(targets)


@pytest.mark.parametrize(
    "override",
    [f"{g}={o}" for g in GROUPS for o in _options(g)]
    + [f"method/{g}={o}" for g in METHOD_GROUPS for o in _options(f"method/{g}")],
    ids=lambda s: s,
)
def test_config_composes_and_binds(override, make_cfg, tmp_path):
    cfg = make_cfg([override], tmp_path)
    OmegaConf.to_container(cfg, resolve=False)  # every node is valid YAML/OmegaConf
    assert _check_binds(cfg) >= 4  # model, data, method and trainer at the least


@pytest.mark.parametrize("option", sorted(PLUGINS))
def test_hydra_plugin_configs_compose(option, make_cfg, tmp_path):
    importlib.import_module(PLUGINS[option])  # the `sweep` extra, which `make test` installs
    group, name = option.split("/")
    cfg = make_cfg([f"hydra/{group}={name}"], tmp_path)
    assert cfg.hydra[group]._target_


def test_bind_check_catches_a_wrong_argument(make_cfg, tmp_path):
    cfg = make_cfg(["method=opd", "+method.num_rolouts=4"], tmp_path)  # misspelt
    with pytest.raises(AssertionError, match="num_rolouts"):
        _check_binds(cfg)


@pytest.mark.parametrize(
    "choice", ["hydra/launcher=joblib_local", "hydra/launcher=slurm", "hydra/sweeper=optuna_lr_k"]
)
def test_sweep_configs_compose(choice, make_cfg, tmp_path):
    cfg = make_cfg([choice], tmp_path)
    group = choice.split("=")[0].split("/")[1]
    node = cfg.hydra[group]
    assert node._target_.startswith("hydra_plugins.")
    if group == "sweeper":
        assert set(node.params) == {"method.optimizer.lr", "method.rollout.num_rollouts"}
        assert node.sampler.seed == cfg.seed


@pytest.mark.parametrize(
    "experiment, method", [(d, m) for d in ("science", "tooluse") for m in ("opd", "caopd")]
)
def test_experiments_carry_the_paper_hyper_parameters(experiment, method, make_cfg, tmp_path):
    cfg = make_cfg([f"experiment={experiment}", f"method={method}", "data.path=x"], tmp_path)
    m = cfg.method
    assert (m.rollout.num_rollouts, m.optimizer.lr, m.loss.divergence) == (8, 2e-5, "forward_kl")
    assert cfg.callbacks.teacher_ema.rate == 0.01
    r = m.rollout
    assert (m.loss.skip_first_tokens, r.max_prompt_length, r.max_new_tokens) == (3, 1024, 1024)
    # 4 prompts x K=8 = 32 completions per optimizer step (the reference's 32 completions)
    assert cfg.data.batch_size * cfg.trainer.accumulate_grad_batches == 4
    assert m.targets._target_.endswith("CaOPD") == (method == "caopd")
    assert cfg.data.task._target_.endswith(
        "ScienceTask" if experiment == "science" else "ToolUseTask"
    )


@pytest.mark.parametrize(
    "experiment",
    [
        *(f"{d} method={m}" for d in ("science", "tooluse") for m in DOMAINS[d]),
        *(f"paper/{name}" for name in _options("experiment/paper")),
    ],
)
def test_domain_presets_follow_the_reference_code_and_the_embedded_default_does_not(
    experiment, make_cfg, tmp_path
):
    # the reference divides both models' logits by the sampling temperature and cuts the
    # student's completion at its first `Confidence:`; the toy experiments keep 1.0 and `last`
    overrides = ["data.path=x", "method.rollout.temperature=0.7"]
    if experiment == "paper/continual_stage2":
        overrides.append("model.init_from=run")
    if experiment == "paper/ood_science_eval":
        overrides.append("data.eval_path=eval.jsonl")
    cfg = make_cfg([*f"experiment={experiment}".split(), *overrides], tmp_path)
    assert cfg.method.loss.temperature == 0.7
    is_caopd = cfg.method.targets._target_.endswith("CaOPD")
    assert is_caopd == ("caopd" in experiment or experiment.startswith("paper/"))
    assert cfg.method.targets.get("cut") == ("first" if is_caopd else None)
    for toy in [f"toy method={m}" for m in DOMAINS["toy"]] + ["smollm2 method=caopd"]:
        overrides = [*f"experiment={toy}".split(), "method.rollout.temperature=0.7"]
        cfg = make_cfg(overrides, tmp_path)
        assert cfg.method.loss.temperature == 1.0
        assert cfg.method.targets.get("cut", "last") == "last"


@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_k_ablation_keeps_32_completions_per_optimizer_step(k, make_cfg, tmp_path):
    overrides = ["experiment=paper/k_ablation", "data.path=x", f"method.rollout.num_rollouts={k}"]
    cfg = make_cfg(overrides, tmp_path)
    assert cfg.trainer.accumulate_grad_batches * k * cfg.data.batch_size == 32
    assert cfg.trainer.accumulate_grad_batches == 32 // k  # K=8: the presets' 4 prompts
    two = make_cfg([*overrides, "data.batch_size=2"], tmp_path)  # 2 prompts per micro-batch
    assert two.trainer.accumulate_grad_batches * k * 2 == 32


def test_k_ablation_refuses_a_k_that_does_not_divide_32(make_cfg, tmp_path):
    from lightning_caopd.errors import user_message

    cfg = make_cfg(
        ["experiment=paper/k_ablation", "data.path=x", "method.rollout.num_rollouts=3"], tmp_path
    )
    with pytest.raises(InterpolationResolutionError, match="3 does not divide 32") as raised:
        OmegaConf.select(cfg, "trainer.accumulate_grad_batches")
    assert user_message(raised.value).startswith("Error: ${caopd.div:32,3}: 3 does not divide")


@pytest.mark.parametrize(
    "name, hub",
    [
        ("qwen3_8b", "Qwen/Qwen3-8B"),
        ("qwen2_5_7b_instruct", "Qwen/Qwen2.5-7B-Instruct"),
        ("olmo3_7b_instruct", "allenai/Olmo-3-7B-Instruct"),
    ],
)
def test_paper_model_configs_compose_without_loading(name, hub, make_cfg, tmp_path):
    overrides = ["experiment=tooluse", "method=caopd", f"model={name}", "data.path=x"]
    cfg = make_cfg(overrides, tmp_path)
    assert (
        cfg.model.student.pretrained_model_name_or_path
        == hub
        == cfg.model.tokenizer.pretrained_model_name_or_path
    )
    assert cfg.model.student.dtype == "bfloat16" and cfg.model.teacher is None


def test_toy_base_model_with_another_domain_resolves(make_cfg, tmp_path):
    # model=tiny names its base by data.world_seed, which only the toy data configs have
    cfg = make_cfg(["model=tiny", "data=science", "data.path=rows.jsonl"], tmp_path)
    resolved = OmegaConf.to_container(cfg.model, resolve=True)
    assert resolved["path"].endswith("toy_base/world0")
    assert resolved["base"]["overrides"] == {"data.world_seed": 0}
    toy = make_cfg(["data.world_seed=3"], tmp_path)
    assert OmegaConf.to_container(toy.model, resolve=True)["path"].endswith("toy_base/world3")


def test_safe_prompt_length_and_multirun_dirs_named_by_overrides(make_cfg, tmp_path):
    cfg = make_cfg(["experiment=toy", "method=caopd", "seed=1", "data.num_eval=5"], tmp_path)
    assert cfg.method.rollout.max_prompt_length == 2048 and cfg.eval.max_prompt_length == 2048
    assert cfg.hydra.sweep.subdir == "data.num_eval=5,experiment=toy,method=caopd,seed=1"
    named = make_cfg(["method=caopd", "data=science", "data.path=/x/rows.jsonl"], tmp_path)
    assert named.hydra.sweep.subdir == "data=science,method=caopd"  # paths left out


REFERENCE_TABLE = Path(CONF_DIR).resolve().parents[1] / "docs" / "reference_code.md"
_SETTING = re.compile(r"(?:(science|tool use): )?`([\w.]+)=([^`]*)`")


def _table_settings() -> list[tuple[str | None, str, str]]:
    """(domain or None, key, value) of every `key=value` in the differences table's 3rd column."""
    text = REFERENCE_TABLE.read_text()
    table = text.split("# Differences from the reference code", 1)[1].split("\n\n")[2]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    found = []
    for row in rows[1:]:  # after the header
        column = row.split(" | ")[2]
        found += _SETTING.findall(column)
    return [(domain or None, key, value) for domain, key, value in found]


def _expected(value: str, got):
    """The table's value in the type of the config's: text as written (escapes decoded)."""
    if value == "null":
        return None
    if isinstance(got, str):
        return value.encode().decode("unicode_escape")
    return OmegaConf.create(f"v: {value}").v  # YAML: 2e-5, 1.0, 8, false


@pytest.mark.parametrize("experiment, domain", [("science", "science"), ("tooluse", "tool use")])
def test_paper_presets_resolve_to_every_setting_of_the_differences_table(
    experiment, domain, make_cfg, tmp_path
):
    cfg = make_cfg([f"experiment={experiment}", "method=caopd", "data.path=train.jsonl"], tmp_path)
    settings = _table_settings()
    assert len(settings) >= 20
    for where, key, value in settings:
        if value == "..." or (where is not None and where != domain):
            continue
        got = OmegaConf.select(cfg, key, throw_on_missing=True)
        assert got == _expected(value, got), (
            f"{experiment}: {key} is {got!r}, docs/reference_code.md says {value}"
        )
    # 4 prompts x K=8 = 32 completions per optimizer step, as the reference's 1 x 32 x 8 / 8
    prompts = cfg.data.batch_size * cfg.trainer.accumulate_grad_batches
    assert prompts * cfg.method.rollout.num_rollouts == 32 and prompts == 4
    # a separate eval set is scored whole; the training file holds rows out
    assert cfg.data.num_eval == (50 if domain == "science" else 10)
    separate = make_cfg(
        [f"experiment={experiment}", "data.path=train.jsonl", "data.eval_path=eval.jsonl"], tmp_path
    )
    assert separate.data.num_eval is None


@pytest.mark.parametrize("experiment", ["science", "tooluse"])
def test_caopd_teacher_prompt_is_the_references_text(experiment, make_cfg, tmp_path):
    from hydra.utils import instantiate

    cfg = make_cfg([f"experiment={experiment}", "method=caopd", "data.path=train.jsonl"], tmp_path)
    template, targets = instantiate(cfg.method.template), instantiate(cfg.method.targets)
    demo = "<reasoning>r</reasoning>\n<answer>B</answer>"
    context, _ = template.context({"demo": demo}, [], [])
    context = targets.teacher_context(context, 0.375)
    chat = [{"role": "user", "content": "Q?"}]
    got = template.messages(chat, context, targets.teacher_note(0.375))[0]["content"]
    # main.py's demo template, distil_trainer.py's note before the instruction; the tool-use
    # demonstration carries `Confidence: 1.00`, replaced by P_acc
    shown = demo if "science" in experiment else demo + "\nConfidence: 0.38"
    assert got == (
        "Q?\n\nThis is an example for a response to the question:\n"
        f"{shown}\n\n"
        "Note: The empirical confidence for this question is 0.38. "
        "Output this exact value in the 'Confidence:' field.\n\n"
        "Now answer with a response of your own, including the thinking process.\n"
    )


def test_paper_schedule_builds_from_the_preset(make_cfg, tmp_path):
    import torch
    from hydra.utils import instantiate

    cfg = make_cfg(["experiment=science", "method=caopd", "data.path=train.jsonl"], tmp_path)
    factory = instantiate(cfg.method.scheduler)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
    sched = factory(optimizer=opt, total_steps=20)
    assert sched.lr_lambdas[0](0) == 0.0 and sched.lr_lambdas[0](2) == 1.0  # 2 warm-up steps


def test_real_model_pair_differs_only_in_targets_and_shares_its_base(make_cfg, tmp_path):
    opd, caopd = (
        make_cfg(["experiment=smollm2", f"method={m}"], tmp_path) for m in ("opd", "caopd")
    )
    base = make_cfg(["experiment=smollm2_base"], tmp_path)
    assert opd.model.path == caopd.model.path == base.method.save_dir  # built once, on first use
    assert opd.model.base.experiment == "smollm2_base" and opd.model.lora is not None
    assert opd.data.num_eval >= 300 and opd.eval.do_sample is False
    methods = [OmegaConf.to_container(c.method, resolve=True) for c in (opd, caopd)]
    for m in methods:
        m.pop("name")
    assert methods[0].pop("targets")["_target_"].endswith("ConfidenceTargets")
    assert methods[1].pop("targets")["_target_"].endswith("CaOPD")
    assert methods[0] == methods[1]
    assert OmegaConf.to_container(opd.trainer) == OmegaConf.to_container(caopd.trainer)


# what makes a method what it is comes from conf/method/ (its file, and the template, targets
# and teacher EMA it picks for the domain's recipe), never from a domain preset
METHOD_KEYS = {"_target_", "name", "template", "targets"}
METHOD_LOSS_KEYS = ("divergence", "jsd_beta", "topk")


def _domain_cfg(make_cfg, tmp_path, experiment, method, *extra):
    data = ["data.path=x"] if experiment in ("science", "tooluse") else []
    return make_cfg([f"experiment={experiment}", f"method={method}", *data, *extra], tmp_path)


@pytest.mark.parametrize("experiment", sorted(DOMAINS))
def test_domain_presets_set_no_method_specific_key(experiment):
    preset = OmegaConf.load(Path(CONF_DIR) / "experiment" / f"{experiment}.yaml")
    method = preset.get("method") or {}
    assert not METHOD_KEYS & set(method)
    assert not set(METHOD_LOSS_KEYS) & set(method.get("loss") or {})
    assert OmegaConf.select(preset, "callbacks.teacher_ema") is None
    overrides = [k for d in preset.get("defaults", []) if isinstance(d, DictConfig) for k in d]
    # the domain names its recipe; it never picks the method, its template or its targets
    assert not {"override /method", "override /method/template", "override /method/targets"} & set(
        overrides
    )


@pytest.mark.parametrize("experiment, method", [(d, m) for d, ms in DOMAINS.items() for m in ms])
def test_each_domain_runs_each_method_as_its_method_files_define_it(
    experiment, method, make_cfg, tmp_path
):
    from hydra.utils import instantiate

    cfg = _domain_cfg(make_cfg, tmp_path, experiment, method)
    assert _check_binds(cfg) >= 6
    recipe = cfg.hydra.runtime.choices["method/recipe"]
    assert recipe == (experiment if experiment in ("science", "tooluse") else "default")
    # the method alone, with the domain's recipe and no preset
    alone = make_cfg([f"method={method}", f"method/recipe={recipe}"], tmp_path / "alone")
    assert cfg.method.template == alone.method.template
    assert cfg.method.targets == alone.method.targets
    for key in METHOD_LOSS_KEYS:
        assert cfg.method.loss[key] == alone.method.loss[key]
    assert cfg.callbacks.teacher_ema.rate == alone.callbacks.teacher_ema.rate
    template, targets = instantiate(cfg.method.template), instantiate(cfg.method.targets)
    assert (template.source == "sdpo_sibling") == ("sdpo" in method)
    assert type(targets).__name__ == ("CaOPD" if "caopd" in method else "ConfidenceTargets")
    # one name: metrics.json's run.method is method.name, and task_name is built from it
    run = OmegaConf.to_container(cfg.callbacks.metrics.run, resolve=True)
    assert run["method"] == cfg.method.name == method and method in run["experiment"]


@pytest.mark.parametrize("method", ["sdpo", "caopd_sdpo"])
def test_sdpo_on_tooluse_is_sdpo_and_on_the_toy_reads_the_toy_form(method, make_cfg, tmp_path):
    cfg = _domain_cfg(make_cfg, tmp_path, "tooluse", method)
    m = cfg.method
    assert (m.loss.divergence, m.loss.jsd_beta, m.loss.topk) == ("jsd", 0.5, 100)
    assert m.template.source == "sdpo_sibling" and m.template.user_format.startswith("{prompt}")
    assert cfg.callbacks.teacher_ema.rate == 0.05  # SDPO's teacher: an EMA of the student
    assert cfg.data.task._target_.endswith("ToolUseTask") and m.optimizer.lr == 2e-5
    assert m.loss.skip_first_tokens == 3 and m.loss.chunk_size == 512  # the domain's
    if method == "caopd_sdpo":
        assert m.targets.note_only_rows and m.targets.note.startswith("Note: The empirical")
        assert m.targets.cut == "first" and m.targets.replace_context
    toy = _domain_cfg(make_cfg, tmp_path / "toy", "toy", method).method
    assert toy.template.source == "sdpo_sibling" and toy.template.note_only_format is None
    assert toy.template.user_format.startswith("Reference solution:")
    assert (toy.loss.divergence, toy.loss.topk) == ("jsd", 100)


def test_caopd_sdpo_composes_caopds_targets_instead_of_copying_them(make_cfg, tmp_path):
    raw = OmegaConf.load(Path(CONF_DIR) / "method" / "caopd_sdpo.yaml")
    assert set(raw.targets) == {"note_only_rows"}  # the rest is conf/method/targets/caopd/
    for recipe in ("default", "science", "tooluse"):
        overrides = [f"method/recipe={recipe}"]
        caopd = make_cfg(["method=caopd", *overrides], tmp_path).method.targets
        both = make_cfg(["method=caopd_sdpo", *overrides], tmp_path).method.targets
        assert OmegaConf.to_container(both) == {
            **OmegaConf.to_container(caopd),
            "note_only_rows": True,
        }
    science = make_cfg(["method=caopd", "method/recipe=science"], tmp_path).method.targets
    assert science.replace_context is False and science.cut == "first"


def test_the_cpu_determinism_settings_live_in_the_toy_preset_only(make_cfg, tmp_path):
    files = Path(CONF_DIR).rglob("*.yaml")
    setting = sorted(str(p.relative_to(CONF_DIR)) for p in files if "cpu_isa" in OmegaConf.load(p))
    assert setting == ["experiment/toy.yaml", "train.yaml"]  # train.yaml: the default, null
    for experiment in ("toy_base", "scaling_base", "scaling_toy"):
        cfg = make_cfg([f"experiment={experiment}"], tmp_path)
        assert (cfg.threads, cfg.cpu_isa) == (1, "avx2")


def test_the_trainer_default_is_the_embedded_defaults_step_count(make_cfg, tmp_path):
    # experiment=toy sets no step count: the trainer's default is what the README's table runs
    toy = make_cfg(["experiment=toy"], tmp_path)
    assert toy.trainer.max_steps == 500 and "trainer" not in OmegaConf.load(
        Path(CONF_DIR) / "experiment" / "toy.yaml"
    )
