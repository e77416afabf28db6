"""Train a student by OPD or CaOPD: `python train.py experiment=caopd` (see conf/)."""

import hydra
from omegaconf import DictConfig

from lightning_caopd.runner import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    run(cfg)


if __name__ == "__main__":
    main()
