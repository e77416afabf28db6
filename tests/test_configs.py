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


def _options(group: str) -> list[str]:
    root = Path(CONF_DIR) / group
    # `_name.yaml` files are shared blocks that other options include, not options themselves
    return sorted(
        str(p.relative_to(root).with_suffix(""))
        for p in root.rglob("*.yaml")
        if not p.name.startswith("_")
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
    "override", [f"{g}={o}" for g in GROUPS for o in _options(g)], ids=lambda s: s
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
    "experiment", ["opd_science", "caopd_science", "opd_tooluse", "caopd_tooluse"]
)
def test_experiments_carry_the_paper_hyper_parameters(experiment, make_cfg, tmp_path):
    cfg = make_cfg([f"experiment={experiment}", "data.path=x"], tmp_path)
    m = cfg.method
    assert (m.rollout.num_rollouts, m.optimizer.lr, m.loss.divergence) == (8, 2e-5, "forward_kl")
    assert cfg.callbacks.teacher_ema.rate == 0.01
    r = m.rollout
    assert (m.loss.skip_first_tokens, r.max_prompt_length, r.max_new_tokens) == (3, 1024, 1024)
    # 4 prompts x K=8 = 32 completions per optimizer step (the reference's 32 completions)
    assert cfg.data.batch_size * cfg.trainer.accumulate_grad_batches == 4
    assert m.targets._target_.endswith("CaOPD") == experiment.startswith("caopd")
    assert cfg.data.task._target_.endswith(
        "ScienceTask" if "science" in experiment else "ToolUseTask"
    )


@pytest.mark.parametrize(
    "experiment",
    [
        "opd_science",
        "caopd_science",
        "opd_tooluse",
        "caopd_tooluse",
        "sdpo_tooluse",
        "caopd_sdpo_tooluse",
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
    cfg = make_cfg([f"experiment={experiment}", *overrides], tmp_path)
    assert cfg.method.loss.temperature == 0.7
    is_caopd = cfg.method.targets._target_.endswith("CaOPD")
    assert is_caopd == ("caopd" in experiment or experiment.startswith("paper/"))
    assert cfg.method.targets.get("cut") == ("first" if is_caopd else None)
    for toy in ("opd", "caopd", "sdpo", "caopd_sdpo", "smollm2_caopd"):
        cfg = make_cfg([f"experiment={toy}", "method.rollout.temperature=0.7"], tmp_path)
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
    cfg = make_cfg(["experiment=caopd_tooluse", f"model={name}", "data.path=x"], tmp_path)
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
    cfg = make_cfg(["experiment=caopd", "seed=1", "data.num_eval=5"], tmp_path)
    assert cfg.method.rollout.max_prompt_length == 2048 and cfg.eval.max_prompt_length == 2048
    assert cfg.hydra.sweep.subdir == "data.num_eval=5,experiment=caopd,seed=1"
    named = make_cfg(["experiment=caopd", "data=science", "data.path=/x/rows.jsonl"], tmp_path)
    assert named.hydra.sweep.subdir == "data=science,experiment=caopd"  # paths left out


README = Path(CONF_DIR).resolve().parents[1] / "README.md"
_SETTING = re.compile(r"(?:(science|tool use): )?`([\w.]+)=([^`]*)`")


def _readme_settings() -> list[tuple[str | None, str, str]]:
    """(domain or None, key, value) of every `key=value` in the differences table's 3rd column."""
    text = README.read_text()
    table = text.split("### Differences from the reference code", 1)[1].split("\n\n")[2]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    found = []
    for row in rows[1:]:  # after the header
        column = row.split(" | ")[2]
        found += _SETTING.findall(column)
    return [(domain or None, key, value) for domain, key, value in found]


def _expected(value: str, got):
    """The README's value in the type of the config's: text as written (escapes decoded)."""
    if value == "null":
        return None
    if isinstance(got, str):
        return value.encode().decode("unicode_escape")
    return OmegaConf.create(f"v: {value}").v  # YAML: 2e-5, 1.0, 8, false


@pytest.mark.parametrize(
    "experiment, domain", [("caopd_science", "science"), ("caopd_tooluse", "tool use")]
)
def test_paper_presets_resolve_to_every_setting_of_the_readme_table(
    experiment, domain, make_cfg, tmp_path
):
    cfg = make_cfg([f"experiment={experiment}", "data.path=train.jsonl"], tmp_path)
    settings = _readme_settings()
    assert len(settings) >= 20
    for where, key, value in settings:
        if value == "..." or (where is not None and where != domain):
            continue
        got = OmegaConf.select(cfg, key, throw_on_missing=True)
        assert got == _expected(value, got), (
            f"{experiment}: {key} is {got!r}, the README says {value}"
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


@pytest.mark.parametrize("experiment", ["caopd_science", "caopd_tooluse"])
def test_caopd_teacher_prompt_is_the_references_text(experiment, make_cfg, tmp_path):
    from hydra.utils import instantiate

    cfg = make_cfg([f"experiment={experiment}", "data.path=train.jsonl"], tmp_path)
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

    cfg = make_cfg(["experiment=caopd_science", "data.path=train.jsonl"], tmp_path)
    factory = instantiate(cfg.method.scheduler)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
    sched = factory(optimizer=opt, total_steps=20)
    assert sched.lr_lambdas[0](0) == 0.0 and sched.lr_lambdas[0](2) == 1.0  # 2 warm-up steps


def test_real_model_pair_differs_only_in_targets_and_shares_its_base(make_cfg, tmp_path):
    opd, caopd = (make_cfg([f"experiment=smollm2_{m}"], tmp_path) for m in ("opd", "caopd"))
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


@pytest.mark.parametrize(
    "experiment, method", [("sdpo_tooluse", "sdpo"), ("caopd_sdpo_tooluse", "caopd_sdpo")]
)
def test_tooluse_sdpo_presets_run_sdpo_as_its_method_preset_defines_it(
    experiment, method, make_cfg, tmp_path
):
    # opd_tooluse (via opd_science) sets SDFT's template and loss; the SDPO presets put SDPO's back
    cfg = make_cfg([f"experiment={experiment}", "data.path=x"], tmp_path)
    preset = make_cfg([f"method={method}"], tmp_path / "preset").method
    m = cfg.method
    assert m.template == preset.template and m.targets.keys() == preset.targets.keys()
    assert (m.loss.divergence, m.loss.jsd_beta, m.loss.topk) == ("jsd", 0.5, 100)
    assert m.loss.divergence == preset.loss.divergence and m.loss.topk == preset.loss.topk
    assert cfg.callbacks.teacher_ema.rate == 0.05
    assert cfg.data.task._target_.endswith("ToolUseTask") and m.optimizer.lr == 2e-5
    assert m.targets._target_.endswith("CaOPD") == experiment.startswith("caopd")
    if experiment.startswith("caopd"):
        assert m.targets.note_only_rows and m.targets.note.startswith("Note: The empirical")
