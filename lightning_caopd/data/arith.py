"""The arithmetic task's DataModules: seeded items, and the real-model base's warm-up."""

from __future__ import annotations

from lightning_caopd.checks import check_int
from lightning_caopd.data.base import ItemDataModule
from lightning_caopd.data.toy import ToyWarmupDataModule
from lightning_caopd.tasks.arith import make_items


class ArithDataModule(ItemDataModule):
    """Seeded addition items for training and held-out evaluation (another seed stream).

    Args:
        num_train: training items.
        num_eval: held-out evaluation items (the families in turn).
        seed: item seed.
        **kwargs: see `ItemDataModule`.
    """

    def __init__(self, num_train: int = 2000, num_eval: int = 300, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        check_int("data.num_train", num_train, 1)
        check_int("data.num_eval", num_eval, 1)
        self.train_items = make_items(num_train, seed, "train")
        self.eval_items = make_items(num_eval, seed, "eval")


class ArithWarmupDataModule(ToyWarmupDataModule):
    """The warm-up of the arithmetic base: supervised examples, held-out addition items.

    Args:
        dataset: a `lightning_caopd.warmup.SFTDataset`.
        num_eval: held-out evaluation items.
        seed: evaluation item seed.
        **kwargs: see `ItemDataModule`.
    """

    def __init__(self, dataset, num_eval: int = 300, seed: int = 0, **kwargs):
        super().__init__(dataset, num_eval=num_eval, seed=seed, **kwargs)

    def make_eval_items(self, n: int, seed: int, world_seed: int) -> list[dict]:
        """Held-out addition items (no world seed: sums are the same in every world)."""
        return make_items(n, seed, "eval")
