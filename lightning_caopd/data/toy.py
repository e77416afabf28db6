"""The toy world's DataModules: seeded items, and the warm-up's length-grouped batches."""

from __future__ import annotations

import random

from torch.utils.data import DataLoader, Sampler

from lightning_caopd.checks import check_int
from lightning_caopd.data.base import ItemDataModule
from lightning_caopd.tasks.toy import make_items


class ToyDataModule(ItemDataModule):
    """The embedded toy world: seeded training and held-out evaluation items.

    Args:
        num_train: training items (one epoch; steps are capped by ``trainer.max_steps``).
        num_eval: held-out evaluation items (a different seed stream and, for ``code``,
            disjoint numbers).
        seed: item seed.
        world_seed: the seed of the world's facts (codes, warm-up pairs); the base was built
            for one world.
        **kwargs: see `ItemDataModule`.
    """

    def __init__(
        self,
        num_train: int = 4000,
        num_eval: int = 600,
        seed: int = 0,
        world_seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_int("data.num_train", num_train, 1)
        check_int("data.num_eval", num_eval, 1)
        check_int("data.world_seed", world_seed, 0)
        self.train_items = make_items(num_train, seed, "train", world_seed)
        self.eval_items = make_items(num_eval, seed, "eval", world_seed)


class LengthGroupedBatches(Sampler[list[int]]):
    """Batches drawn from two length buckets (below / from the median), in a seeded order.

    The toy warm-up mixes short student prompts and long teacher prompts; two buckets cut the
    padding by about a third while every batch still mixes the task families (sorting by exact
    length would give single-family batches).
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0) -> None:
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def __iter__(self):
        rng = random.Random(self.seed + self.epoch)
        self.epoch += 1
        median = sorted(self.lengths)[len(self.lengths) // 2]
        batches = []
        for long_ in (False, True):
            idx = [i for i, n in enumerate(self.lengths) if (n >= median) == long_]
            rng.shuffle(idx)
            batches += [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        rng.shuffle(batches)
        return iter(batches)

    def __len__(self) -> int:
        median = sorted(self.lengths)[len(self.lengths) // 2]
        n_long = sum(n >= median for n in self.lengths)
        b = self.batch_size
        return -(-n_long // b) + -(-(len(self.lengths) - n_long) // b)


class ToyWarmupDataModule(ItemDataModule):
    """The toy warm-up: tokenized supervised examples for training, toy items for evaluation.

    Args:
        dataset: a `lightning_caopd.warmup.SFTDataset`.
        num_eval: held-out evaluation items.
        seed: evaluation item seed.
        world_seed: see `ToyDataModule`.
        **kwargs: see `ItemDataModule`.
    """

    def __init__(self, dataset, num_eval: int = 600, seed: int = 0, world_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        check_int("data.num_eval", num_eval, 1)
        check_int("data.world_seed", world_seed, 0)
        self.train_items = dataset
        self.seed = seed
        self.eval_items = self.make_eval_items(num_eval, seed, world_seed)

    def make_eval_items(self, n: int, seed: int, world_seed: int) -> list[dict]:
        """The held-out items the warmed-up base is scored on (toy items)."""
        return make_items(n, seed, "eval", world_seed)

    def train_dataloader(self) -> DataLoader:
        """The supervised examples in length-grouped batches (`LengthGroupedBatches`)."""
        self._check()
        rows = self.train_items
        lengths = [len(p) + len(t) for p, t in rows.rows]
        sampler = LengthGroupedBatches(lengths, self.batch_size, seed=self.seed)
        return DataLoader(rows, batch_sampler=sampler, collate_fn=rows.collate)
