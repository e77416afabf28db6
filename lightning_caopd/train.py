"""Train a student by OPD or CaOPD: the Hydra app over ``conf/train.yaml``.

Usage (three names for the same app; ``conf/`` is the package's ``lightning_caopd/conf``)::

    python -m lightning_caopd.train experiment=toy method=caopd
    caopd-train experiment=toy method=caopd            # the console script of a pip install
    python train.py experiment=toy method=caopd        # in a clone of the repository

A user's own configs (``my_conf/experiment/mine.yaml``, ``my_conf/data/mine.yaml``) join the
package's with ``--config-dir my_conf`` or ``hydra.searchpath=[file:///abs/my_conf]``::

    caopd-train --config-dir my_conf experiment=mine
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lightning_caopd.errors import exit_with, user_message
from lightning_caopd.runner import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the final ``optimized_metric`` (for Optuna sweeps)."""
    try:
        result = run(cfg)
    except Exception as err:  # a problem the user can fix: its paragraph, not a traceback
        message = user_message(err)
        if message is None:
            raise
        exit_with(message)
    key = cfg.get("optimized_metric", "brier_all")
    if key not in result:
        raise KeyError(
            f"optimized_metric={key} is not a key of metrics.json; use one of "
            f"{sorted(k for k, v in result.items() if isinstance(v, int | float))}."
        )
    if result[key] is None:  # undefined (e.g. ece without a stated confidence): the worst value
        direction = OmegaConf.select(HydraConfig.get(), "sweeper.direction", default="minimize")
        maximize = str(direction) == "maximize"
        return float("-inf") if maximize else float("inf")
    return result[key]


if __name__ == "__main__":
    main()
