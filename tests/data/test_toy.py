"""The toy DataModules: seeded items, batches as lists of items, length-grouped batches."""

import pytest

from lightning_caopd.data.base import ItemDataModule
from lightning_caopd.data.toy import LengthGroupedBatches, ToyDataModule


def test_toy_items_are_seeded_and_batches_are_lists_of_items():
    dm = ToyDataModule(num_train=10, num_eval=5, batch_size=4, eval_batch_size=3, shuffle=False)
    again = ToyDataModule(num_train=10, num_eval=5)
    ids = lambda items: [it["id"] for it in items]  # noqa: E731
    assert ids(dm.train_items) == ids(again.train_items) and len(dm.eval_items) == 5
    assert not set(ids(dm.train_items)) & set(ids(dm.eval_items))
    train = list(dm.train_dataloader())
    assert [len(b) for b in train] == [4, 4, 2] and train[0] == dm.train_items[:4]
    assert [ids(b) for b in dm.val_dataloader()] == [ids(dm.eval_items[:3]), ids(dm.eval_items[3:])]


def test_an_empty_split_is_a_clear_error():
    with pytest.raises(ValueError, match="training split is empty"):
        ItemDataModule().train_dataloader()


def test_length_grouped_batches_cover_every_index_once_within_one_bucket():
    lengths = [5, 50, 7, 60, 3, 70, 9, 80, 4]
    sampler = LengthGroupedBatches(lengths, batch_size=2, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    median = sorted(lengths)[len(lengths) // 2]
    assert all(len({lengths[i] >= median for i in b}) == 1 for b in batches)
    assert batches == list(LengthGroupedBatches(lengths, batch_size=2, seed=0))
    assert list(sampler) != batches  # the next epoch draws a new order
