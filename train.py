"""Train a student by OPD or CaOPD: `python train.py experiment=toy method=caopd` (see conf/).

The app is `lightning_caopd.train` (also ``python -m lightning_caopd.train`` and the console
script ``caopd-train``); this file keeps the repository's short command.
"""

from lightning_caopd.train import main

if __name__ == "__main__":
    main()
