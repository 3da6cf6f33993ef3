"""Voxel-budget batches: every tile once per epoch, budgets kept, ranks in step, counts exact and cached."""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch

from scalept.data.dataset import TileDataset, split_tile_files, voxelize
from scalept.errors import ConfigError
from scalept.data import batching
from scalept.data.batching import VoxelBudgetBatches, epoch_order, pack, tile_voxel_counts
from scalept.training.data import build_train_data, micro_batch_budget
from tiny_training import TRAIN_SEQUENCES, compose_tiny, make_tiny_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.getbasetemp() / "tiny-data")  # shared with test_train


def _tile_sizes(seed: int = 0) -> np.ndarray:
    """Voxel counts shaped like a block/Hilbert mix: many mid-size tiles, some tiny, a few over the budget."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.integers(20_000, 45_000, 60), rng.integers(500, 3_000, 30), [250_000, 180_000]])


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_pack_takes_every_tile_once_within_the_budget(ranks):
    voxels = _tile_sizes()
    order = epoch_order(len(voxels), seed=3, epoch=1)
    budget = 150_000
    steps = pack(voxels, order, budget, ranks)
    assert all(len(step) == ranks and all(step) for step in steps)  # every rank has work in every micro-step
    for step in steps:
        for tiles in step:
            assert len(tiles) == 1 or voxels[tiles].sum() <= budget  # oversized tiles go alone
    used = Counter(i for step in steps for tiles in step for i in tiles)
    assert set(used) == set(range(len(voxels)))
    padding = sum(used.values()) - len(voxels)
    assert padding < ranks and all(used[i] == 1 for i in order[padding:])  # only the last step is padded
    # the budget is used: a micro-step closes only when the next tile fits on no rank
    loads = [min(voxels[tiles].sum() for tiles in step) for step in steps[:-1]]
    assert np.mean(loads) > 0.6 * budget
    assert pack(voxels, order, budget, ranks) == steps  # a function of its inputs alone


def test_plan_is_per_epoch_and_resumes_by_skipping():
    voxels = _tile_sizes(1)
    rank0 = VoxelBudgetBatches(voxels, 100_000, rank=0, world_size=2, seed=5)
    rank1 = VoxelBudgetBatches(voxels, 100_000, rank=1, world_size=2, seed=5)
    assert rank0.plan(0) != rank0.plan(1)  # each epoch draws its own permutation
    for epoch in (0, 1):
        rank0.set_epoch(epoch)
        rank1.set_epoch(epoch)
        batches0, batches1 = list(rank0), list(rank1)
        assert len(batches0) == len(batches1) == rank0.micro_steps(epoch)  # ranks stay in step
        assert {e for b in batches0 for _, e in b} == {epoch}  # the epoch travels with every key
        rank0.skip = 3
        assert list(rank0) == batches0[3:] and len(rank0) == len(batches0) - 3
        rank0.skip = 0


def test_voxel_counts_equal_the_datasets_voxelization_and_are_cached(data_dir, monkeypatch):
    cfg = compose_tiny(data_dir, data_dir / "unused")
    paths = split_tile_files(cfg.tiles_dir, cfg.sampling.name, TRAIN_SEQUENCES)
    for grid in (0.2, 0.05):
        counts = tile_voxel_counts(paths, grid, workers=2)
        dataset = TileDataset(paths, grid)
        for item, (f, t) in enumerate(dataset.index):
            assert counts[f][t] == len(dataset[item]["feat"])
            points, _, _ = dataset.files[f].tile(t)
            assert counts[f][t] == len(voxelize(points[:, :3], grid)[0])

    def no_counting(*args):
        raise AssertionError("counted again despite a valid cache")

    monkeypatch.setattr(batching, "_count_frames", no_counting)
    again = tile_voxel_counts(paths, 0.05)  # from the caches beside the tile files
    assert all(np.array_equal(a, b) for a, b in zip(again, counts, strict=True))
    stat = os.stat(paths[0])
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # a rewritten tile file
    with pytest.raises(AssertionError, match="counted again"):
        tile_voxel_counts(paths, 0.05)


def test_persistent_workers_draw_each_epochs_augmentations(data_dir):
    cfg = compose_tiny(data_dir, data_dir / "unused", "train.num_workers=2", "train.label_fraction=0.25")
    data = build_train_data(cfg, 0, 1, torch.device("cpu"), seed=0)
    assert data.loader.persistent_workers
    for epoch in (0, 1):
        data.batches.set_epoch(epoch)
        batch = next(iter(data.loader))  # the same two worker processes in both epochs
        keys = data.batches.plan(epoch)[0][0]
        expected = np.concatenate([data.dataset[(item, epoch)]["feat"] for item in keys])
        np.testing.assert_array_equal(batch["feat"].numpy(), expected)
    item = data.batches.plan(1)[0][0][0]
    assert not np.array_equal(data.dataset[(item, 0)]["feat"], data.dataset[(item, 1)]["feat"])  # epochs differ


def test_step_voxels_keep_the_global_step_whatever_the_world_size(compose_cfg):
    outdoor = compose_cfg("train=outdoor").train
    assert micro_batch_budget(outdoor, 1) == (500_000, 2)
    assert micro_batch_budget(outdoor, 4) == (250_000, 1)
    assert micro_batch_budget(outdoor, 3) == (333_334, 1)
    small = compose_cfg("train=small_gpu").train
    assert micro_batch_budget(small, 1) == (200_000, 5) and micro_batch_budget(small, 2) == (166_667, 3)
    embedded = compose_cfg("train=embedded").train  # 40k voxels a step, one process or two local ranks
    assert micro_batch_budget(embedded, 1) == (40_000, 1) and micro_batch_budget(embedded, 2) == (20_000, 1)
    assert micro_batch_budget(compose_cfg("train=embedded", "train.step_voxels=null").train, 8) == (40_000, 1)


@pytest.mark.parametrize("override, key", [
    ("train.batch_voxels=0", "train.batch_voxels"), ("train.batch_voxels=abc", "train.batch_voxels"),
    ("train.step_voxels=-5", "train.step_voxels"), ("train.step_voxels=1.5", "train.step_voxels"),
])
def test_bad_budgets_name_their_key(compose_cfg, override, key):
    with pytest.raises(ConfigError, match=key):
        micro_batch_budget(compose_cfg("train=outdoor", override).train, 1)


@pytest.mark.slow
def test_small_gpu_preset_composes_and_trains_on_cpu(data_dir, tmp_path, compose_cfg):
    from scalept import train

    cfg = compose_cfg("train=small_gpu", "model=ptv3_tiny", "stage=train", f"data_dir={data_dir}",
                      f"run_dir={tmp_path}", "dataset.synthetic.frames_per_sequence=4",
                      "dataset.synthetic.azimuth_steps=200", "dataset.splits.train=[00]", "dataset.splits.val=[]",
                      "sampling=hilbert", "sampling.max_points=2500", "sampling.overlap=500", "train.max_steps=1",
                      "train.num_workers=0")
    assert cfg.train.checkpoint_levels == 5 and train._model_config(cfg)["checkpoint_levels"] == 5
    torch.set_num_threads(2)
    result = train.run(cfg)
    # every tile of the sequence fits one 200k-voxel micro-batch; a step would take 5 of them
    assert result["steps"] == 1 and result["batch_voxels"] == 200_000 and result["micro_batches_per_step"] == 5
    assert np.isfinite(result["final_loss"]) and result["voxels_seen_per_rank"] > 20_000
