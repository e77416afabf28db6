"""Train a student by OPD or CaOPD: `python train.py experiment=caopd` (see conf/)."""

import sys

import hydra
from omegaconf import DictConfig

from lightning_caopd.errors import USER_ERRORS
from lightning_caopd.runner import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the final ``optimized_metric`` (for Optuna sweeps)."""
    try:
        result = run(cfg)
    except USER_ERRORS as err:  # a problem the user can fix: its paragraph, not a traceback
        sys.exit(f"Error: {err}")
    key = cfg.get("optimized_metric", "ece")
    if key not in result:
        raise KeyError(
            f"optimized_metric={key} is not a key of metrics.json; use one of "
            f"{sorted(k for k, v in result.items() if isinstance(v, int | float))}."
        )
    return result[key]


if __name__ == "__main__":
    main()
