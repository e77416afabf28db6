"""DataModules: items in, batches of items (lists of dicts) out."""

from __future__ import annotations

import random

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Sampler

from lightning_caopd.checkpointing import ResumableDataLoader
from lightning_caopd.tasks.toy import make_items


def _as_list(rows: list) -> list:
    return rows


class ItemDataModule(L.LightningDataModule):
    """Serves training and evaluation items; batches are lists of item dicts.

    Args:
        batch_size: prompts per training step (each gets K rollouts).
        eval_batch_size: items per evaluation batch.
        shuffle: shuffle the training items (seeded by Lightning's seed).
    """

    def __init__(self, batch_size: int = 8, eval_batch_size: int = 128, shuffle: bool = True) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.shuffle = shuffle
        self.train_items: list = []
        self.eval_items: list[dict] = []

    def _check(self) -> None:
        for name, rows in (("training", self.train_items), ("evaluation", self.eval_items)):
            if not rows:
                raise ValueError(
                    f"The {name} split is empty: check the data config (`data.*`) points at rows."
                )

    def train_dataloader(self) -> DataLoader:
        self._check()
        # a generator of its own, seeded by the run's seed: the order replays on resume
        # (`ResumableDataLoader`), and drawing it leaves torch's global generator alone
        return ResumableDataLoader(
            dataset=self.train_items,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            collate_fn=_as_list,
            generator=torch.Generator().manual_seed(torch.initial_seed()),
            trained_batches=self._trained_batches,
        )

    def _trained_batches(self) -> int:
        """Batches trained on in the current epoch (the data position a checkpoint records)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def val_dataloader(self) -> DataLoader:
        self._check()
        sampler = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # each rank scores its own items, none twice (Lightning's default sampler pads the
            # last ranks with repeats, which would count items twice in the synced metrics)
            sampler = UnrepeatedDistributedSampler(self.eval_items, shuffle=False)
        return DataLoader(
            self.eval_items, batch_size=self.eval_batch_size, sampler=sampler, collate_fn=_as_list
        )


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

    def __init__(self, num_train: int = 4000, num_eval: int = 600, seed: int = 0, world_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
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
        self.train_items = dataset
        self.seed = seed
        self.eval_items = make_items(num_eval, seed, "eval", world_seed)

    def train_dataloader(self) -> DataLoader:
        self._check()
        rows = self.train_items
        lengths = [len(p) + len(t) for p, t in rows.rows]
        sampler = LengthGroupedBatches(lengths, self.batch_size, seed=self.seed)
        return DataLoader(rows, batch_sampler=sampler, collate_fn=rows.collate)
