"""Index bookkeeping of PTv3: orders, attention patches and pooled levels."""
from __future__ import annotations

import pytest
import torch

from scalept import serialization
from scalept.model.points import first_level, pool_level

ORDERS = list(serialization.ORDERS)


@pytest.fixture
def level(cloud, batch_of):
    _, grid, offsets = batch_of(cloud(700, 1), cloud(50, 2), cloud(300, 3), cloud(1, 4))
    return first_level(grid, offsets, ORDERS)


def test_order_and_inverse_round_trip(level):
    n = level.size
    for k in range(len(ORDERS)):
        assert torch.equal(level.order[k][level.inverse[k]], torch.arange(n))
        assert torch.equal(level.inverse[k][level.order[k]], torch.arange(n))
        assert (torch.diff(level.codes[k][level.order[k]]) > 0).all()


def test_serialized_orders_keep_samples_apart(level):
    """The sample index sits above the curve bits, so each sample is one contiguous run of every order."""
    for k in range(len(ORDERS)):
        assert (torch.diff(level.batch[level.order[k]]) >= 0).all()


@pytest.mark.parametrize("size", [16, 128, 300])
def test_patches_cover_each_sample_without_crossing(level, size):
    for k in range(len(ORDERS)):
        p = level.patches(size, k)
        # Every point's output row holds that very point.
        assert torch.equal(p.gather[p.scatter], torch.arange(level.size))
        full = p.gather[: p.full * size].view(p.full, size)
        for patch in full:
            assert len(torch.unique(patch)) == size
            assert len(torch.unique(level.batch[patch])) == 1
        small = p.gather[p.full * size :].view(p.small, p.small_len)
        for row, mask in zip(small, p.mask.view(p.small, -1) if p.small else []):
            assert len(torch.unique(level.batch[row])) == 1
            assert len(torch.unique(row[mask])) == int(mask.sum()) == int((level.batch == level.batch[row[0]]).sum())
        assert p.small == sum(c < size for c in level.counts_host)


def test_pooling_merges_2x2x2_cells_of_each_sample(level):
    fine = level
    coarse = pool_level(fine)
    keys = torch.cat([fine.batch[:, None], fine.grid.long() >> 1], dim=1)
    assert coarse.size == len(torch.unique(keys, dim=0))
    # Each fine point lands in the coarse cell holding its own (sample, grid >> 1).
    assert torch.equal(coarse.batch[fine.cluster], fine.batch)
    assert torch.equal(coarse.grid[fine.cluster], fine.grid >> 1)
    assert coarse.counts_host == torch.bincount(coarse.batch).tolist()
    # Dropping 3 bits equals encoding the coarse grid afresh.
    again = serialization.encode_orders(coarse.grid, ORDERS, depth=15, batch=coarse.batch)
    assert torch.equal(coarse.codes, again)


def test_pool_lengths_are_runs_of_order_zero(level):
    coarse = pool_level(level)
    runs = level.cluster[level.order[0]]
    assert torch.equal(torch.repeat_interleave(torch.arange(coarse.size), level.pool_lengths), runs)
