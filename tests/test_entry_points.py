"""Entry points after a plain install: `lightning_caopd.train`, the console scripts, `compose`."""

import doctest
import importlib
import importlib.util
import json
import tomllib

import lightning_caopd.config
from lightning_caopd import compose
from lightning_caopd.config import PACKAGE_CONF, current_search_path
from lightning_caopd.runner import run
from tests.fixtures.configs import user_conf
from tests.fixtures.runs import ROOT, SCIENCE

# two steps of one prompt and two short rollouts, scored on the tiny model
SHORT = [
    "trainer.max_steps=2",
    "method.rollout.num_rollouts=2",
    "method.rollout.max_new_tokens=6",
    "eval.max_new_tokens=6",
    "logger=csv",
    "callbacks=minimal",
]


def test_console_scripts_and_train_py_are_the_package_apps():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {
        "caopd-train": "lightning_caopd.train:main",
        "caopd-evaluate": "lightning_caopd.evaluate:main",
    }
    for target in scripts.values():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr))
    # the repository's train.py is a wrapper over the same app
    spec = importlib.util.spec_from_file_location("root_train", ROOT / "train.py")
    wrapper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wrapper)
    assert wrapper.main is importlib.import_module("lightning_caopd.train").main


def test_config_helpers_doctests():
    assert doctest.testmod(lightning_caopd.config).failed == 0


def test_compose_from_python_finds_the_users_configs_and_runs(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # paths.root_dir: the working directory, as on the command line
    user = user_conf(tmp_path / "my_conf")
    common = ["experiment=mine", f"model.pretrained_model_name_or_path={tiny_dir}"]
    common += [f"data.path={SCIENCE}", *SHORT]
    # config_dir=, as --config-dir: no HydraConfig or paths.* by hand
    cfg = compose(common, tmp_path / "run", config_dir=user)
    assert current_search_path() == [f"file://{user}"]
    assert cfg.paths.output_dir == str(tmp_path / "run")
    assert cfg.paths.root_dir == str(tmp_path)
    result = run(cfg)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["run"]["experiment"] == "users_own" and written["n"] == result["n"] == 2
    # hydra.searchpath=[file://...] works the same; the package's own configs stay found
    cfg = compose([*common, f"hydra.searchpath=[file://{user}]"], tmp_path / "again")
    assert cfg.task_name == "users_own" and cfg.method.name == "opd"
    assert current_search_path() == [f"file://{user}"]
    assert PACKAGE_CONF not in current_search_path()
