"""The shared DataModule base: items in, batches of items (lists of dicts) out."""

from __future__ import annotations

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler

from lightning_caopd.checkpointing import ResumableDataLoader
from lightning_caopd.checks import check_bool, check_int


def _as_list(rows: list) -> list:
    return rows


class RankSlices(Sampler[int]):
    """Rank `rank`'s slice of each batch of `world` x `batch_size` indices drawn by `order`.

    One process drawing `order` in batches of ``world * batch_size`` trains on what the
    `world` ranks train on together. A last batch of fewer than ``world * batch_size`` indices
    is left out, so that every rank runs the same number of steps.
    """

    def __init__(self, order: Sampler[int], batch_size: int, world: int, rank: int) -> None:
        self.order, self.batch_size, self.world, self.rank = order, batch_size, world, rank

    def __iter__(self):
        indices, span = list(self.order), self.batch_size * self.world
        for start in range(0, len(indices) - span + 1, span):
            yield from indices[start + self.rank * self.batch_size :][: self.batch_size]

    def __len__(self) -> int:
        return len(self.order) // (self.batch_size * self.world) * self.batch_size


class ItemDataModule(L.LightningDataModule):
    """Serves training and evaluation items; batches are lists of item dicts.

    Args:
        batch_size: prompts per training step (each gets K rollouts).
        eval_batch_size: items per evaluation batch.
        shuffle: shuffle the training items (seeded by Lightning's seed).

    Raises:
        ConfigError: a batch size below 1.
    """

    def __init__(
        self, batch_size: int = 8, eval_batch_size: int = 128, shuffle: bool = True
    ) -> None:
        super().__init__()
        check_int("data.batch_size", batch_size, 1)
        check_int("data.eval_batch_size", eval_batch_size, 1)
        check_bool("data.shuffle", shuffle)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.shuffle = shuffle
        self.train_items: list = []
        self.eval_items: list[dict] = []

    def transfer_batch_to_device(self, batch: list, device, dataloader_idx: int) -> list:
        """Nothing to move: a batch is a list of items (text), encoded on the device by the step.

        (Lightning would walk every item's messages looking for tensors, every step.) The hook
        lives here, not in the LightningModule, where Lightning warns that a DataModule is also
        given.
        """
        return batch

    def _check(self) -> None:
        for name, rows in (("training", self.train_items), ("evaluation", self.eval_items)):
            if not rows:
                raise ValueError(
                    f"The {name} split is empty: check the data config (`data.*`) points at rows."
                )

    def train_dataloader(self) -> DataLoader:
        """The training items in a seeded order that replays on resume.

        On N processes rank r takes the r-th slice of each batch of N x ``batch_size`` items of
        that same order: the N ranks together train on the batches one process with N times
        the batch size trains on (the trainer configs set ``use_distributed_sampler: false``,
        so Lightning's own sampler does not replace this one).
        """
        self._check()
        # a generator of its own, seeded by the run's seed: the order replays on resume
        # (`ResumableDataLoader`), and drawing it leaves torch's global generator alone
        generator = torch.Generator().manual_seed(torch.initial_seed())
        order = (RandomSampler if self.shuffle else SequentialSampler)(self.train_items)
        if self.shuffle:
            order.generator = generator
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        if world > 1:
            order = RankSlices(order, self.batch_size, world, trainer.global_rank)
        return ResumableDataLoader(
            dataset=self.train_items,
            batch_size=self.batch_size,
            sampler=order,
            collate_fn=_as_list,
            generator=generator,
            trained_batches=self._trained_batches,
        )

    def _trained_batches(self) -> int:
        """Batches trained on in the current epoch (the data position a checkpoint records)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def val_dataloader(self) -> DataLoader:
        """The evaluation items in order; under DDP each rank gets its own, none repeated."""
        self._check()
        sampler = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # each rank scores its own items, none twice (Lightning's default sampler pads the
            # last ranks with repeats, which would count items twice in the synced metrics)
            sampler = UnrepeatedDistributedSampler(self.eval_items, shuffle=False)
        return DataLoader(
            self.eval_items, batch_size=self.eval_batch_size, sampler=sampler, collate_fn=_as_list
        )
