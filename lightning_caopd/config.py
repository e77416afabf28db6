"""The Hydra config from Python, and the folders it was searched in (a user's own configs).

`compose` composes ``conf/train.yaml`` (or ``evaluate.yaml``) as the command line would, so
that `lightning_caopd.runner.run` works without Hydra's app around it::

    from lightning_caopd import compose
    from lightning_caopd.runner import run

    cfg = compose(["experiment=toy", "method=caopd", "trainer.max_steps=10"], "outputs/mine")
    run(cfg)

A user's own configs (``my_conf/experiment/mine.yaml``, ``my_conf/data/mine.yaml``) come from
``config_dir="my_conf"``, as ``--config-dir my_conf`` on the command line; an override
``hydra.searchpath=[file:///abs/my_conf]`` works too. `user_search_path` names those folders
of a composed config (or of a run's saved ``.hydra/hydra.yaml``), so that a second composition
(``evaluate checkpoint=``, a base built on first use) finds the same files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_caopd.errors import ConfigError

CONFIG_MODULE = "lightning_caopd.conf"
PACKAGE_CONF = f"pkg://{CONFIG_MODULE}"
# the search-path providers that hold a user's folders: --config-dir, hydra.searchpath
_USER_PROVIDERS = (
    "command-line",
    "hydra.searchpath in command-line",
    "hydra.searchpath in main",
)
_SEARCHPATH = "hydra.searchpath"


def compose(
    overrides: Sequence[str] = (),
    output_dir: str | Path = "outputs/compose",
    config_dir: str | Path | None = None,
    config_name: str = "train",
) -> DictConfig:
    """Compose the package's config with `overrides`, its run directory `output_dir`.

    Inside a Hydra app (or an ``initialize_config_*`` block) its config folders are used, else
    the package's. The result holds the ``hydra`` node and is set as the current
    `HydraConfig`, so the ``${hydra:...}`` values resolve (``paths.root_dir`` is the working
    directory) and `lightning_caopd.runner.run` (or ``evaluate.evaluate``) can take it as it is.

    Args:
        overrides: Hydra overrides, as on the command line (``experiment=toy``,
            ``method=caopd``, ``seed=1``).
        output_dir: the run directory (``paths.output_dir``: metrics.json, checkpoints, ...).
        config_dir: a folder of the user's own configs (``experiment/``, ``data/``, ...),
            searched after the package's, as ``--config-dir`` is (a file of the same name as
            one of the package's is not found there); None: the package's only.
        config_name: ``train`` or ``evaluate``.

    Returns:
        The composed config.

    Raises:
        ConfigError: `config_dir` is not a folder.
    """
    overrides = list(overrides)
    if config_dir is not None:
        folder = Path(config_dir).expanduser().resolve()
        if not folder.is_dir():
            raise ConfigError(f"config_dir={config_dir}: no such folder ({folder}).")
        # where --config-dir puts it: after the package's folder (whose train.yaml is primary)
        overrides = with_search_path(overrides, [f"file://{folder}"])
    if GlobalHydra.instance().is_initialized():  # inside an app: its config folders
        cfg = hydra_compose(config_name, overrides=overrides, return_hydra_config=True)
    else:  # leaves Hydra's global state uninitialized, as it found it
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            cfg = hydra_compose(config_name, overrides=overrides, return_hydra_config=True)
    out = str(Path(output_dir).expanduser().resolve())
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = out
        cfg.hydra.runtime.cwd = os.getcwd()
        # as written, not `${hydra:...}`: a later composition's HydraConfig must not move it
        cfg.paths.output_dir = out
    HydraConfig.instance().set_config(cfg)
    return cfg


def searchpath_entries(overrides: Iterable[str]) -> list[str]:
    """The entries of a ``hydra.searchpath=[...]`` override among `overrides` (``[]``: none)."""
    found = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") == _SEARCHPATH]
    if not found:
        return []
    value = OverridesParser.create().parse_overrides(found[-1:])[0].value()
    return [str(v) for v in value or []]


def with_search_path(overrides: Sequence[str], entries: Sequence[str]) -> list[str]:
    """`overrides` with `entries` after those of their own ``hydra.searchpath``, if any.

    Examples:
        >>> with_search_path(["seed=1"], ["file:///a"])
        ['seed=1', "hydra.searchpath=['file:///a']"]
        >>> with_search_path(["hydra.searchpath=[file:///b]"], ["file:///a", "file:///b"])
        ["hydra.searchpath=['file:///b','file:///a']"]
    """
    given = searchpath_entries(overrides)
    merged = list(dict.fromkeys([*given, *entries]))
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != _SEARCHPATH]
    if not merged:
        return rest
    return [*rest, searchpath_override(merged)]


def searchpath_override(entries: Sequence[str]) -> str:
    """``hydra.searchpath=[...]`` with each entry quoted (a folder may hold spaces or commas)."""
    quoted = ",".join("'" + e.replace("\\", "\\\\").replace("'", "\\'") + "'" for e in entries)
    return f"{_SEARCHPATH}=[{quoted}]"


def user_search_path(hydra_cfg: DictConfig | None) -> list[str]:
    """The user's config folders a composition searched (``file://...``), besides the package's.

    Args:
        hydra_cfg: the ``hydra`` node of a composed config: `HydraConfig.get()`, or the one a
            run saved in ``.hydra/hydra.yaml``.

    Returns:
        ``--config-dir``, ``hydra.searchpath`` and `compose`'s ``config_dir`` folders, in the
        order they were searched; Hydra's own and plugins' are left out.
    """
    sources = OmegaConf.select(hydra_cfg, "runtime.config_sources", default=None) or []
    entries = []
    for source in sources:
        if source.get("provider") not in _USER_PROVIDERS:
            continue
        path = str(source.get("path"))
        entry = path if "://" in path else f"{source.get('schema')}://{path}"
        if entry != PACKAGE_CONF and entry not in entries:
            entries.append(entry)
    return entries


def current_search_path() -> list[str]:
    """`user_search_path` of the current `HydraConfig` (``[]`` when none is set)."""
    if not HydraConfig.initialized():
        return []
    return user_search_path(HydraConfig.get())
