"""The shared DataModule base (`lightning_caopd.data.base`): batches split across processes."""

import pytest
from torch.utils.data import SequentialSampler

from lightning_caopd.data.base import RankSlices


@pytest.mark.parametrize("n", [16, 19])
def test_ranks_together_train_on_the_batches_of_one_process(n):
    # 2 ranks x 3 prompts: rank r takes the r-th half of each batch of 6 that one process
    # with batch size 6 takes; a last batch of fewer than 6 is left out on every rank
    order, batch, world = SequentialSampler(range(n)), 3, 2
    ranks = [list(RankSlices(order, batch, world, r)) for r in range(world)]
    one = [list(range(n))[i : i + batch * world] for i in range(0, n, batch * world)]
    full = [b for b in one if len(b) == batch * world]
    for step, together in enumerate(full):
        assert ranks[0][step * batch : (step + 1) * batch] == together[:batch]
        assert ranks[1][step * batch : (step + 1) * batch] == together[batch:]
    assert len(ranks[0]) == len(ranks[1]) == len(RankSlices(order, batch, world, 0))
    assert len(ranks[0]) == len(full) * batch
