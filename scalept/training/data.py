"""What the model sees in training: the label-fraction subset, the loaders, the validation pass.

The training loader draws its batches from :class:`~scalept.data.batching.VoxelBudgetBatches`
(a plan of (seed, epoch)) and its augmentations from (seed, epoch, tile), so neither depends
on how often a job was restarted; the schedule (steps per epoch) follows from the plans.
"""
from __future__ import annotations

import math
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from scalept import distributed as dist_env
from scalept.data.batching import VoxelBudgetBatches, pack, tile_voxel_counts
from scalept.data.dataset import TileDataset, collate, split_tile_files
from scalept.data.semantickitti import NUM_CLASSES
from scalept.data.tiles import TileFile, open_checked
from scalept.errors import ConfigError, ScalePTError
from scalept.metrics import confusion_matrix
from scalept.training.resume import PREEMPT_SIGNALS


def frame_subset(num_frames: int, fraction: float) -> np.ndarray:
    """Frames whose labels a ``label_fraction`` run uses: 0, k, 2k, ... with k = round(1 / fraction)."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"train.label_fraction={fraction} must be in (0, 1]")
    k = max(1, round(1.0 / fraction))
    return np.arange(0, num_frames, k)


def label_fraction_tiles(files: Sequence[TileFile], fraction: float) -> list[tuple[int, int]]:
    """(file, tile) pairs of the tiles of :func:`frame_subset`'s frames, counted over all files in order.

    Counting across files keeps the share right for many short sequences (1 % of 40 sequences of
    10 frames is 4 frames, not one frame of each).
    """
    pairs, first = [], 0
    kept = frame_subset(sum(f.num_frames for f in files), fraction)
    for f, tile_file in enumerate(files):
        keep = np.isin(tile_file.tile_frame + first, kept)
        pairs += [(f, int(t)) for t in np.flatnonzero(keep)]
        first += tile_file.num_frames
    return pairs


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGUSR2 to the main process, which checkpoints before exiting."""
    for sig in PREEMPT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def make_loader(dataset, batch_sampler, num_workers: int, pin: bool) -> DataLoader:
    """Batches from ``batch_sampler`` (lists of dataset keys), collated and, on GPU, pinned by the workers.

    Workers persist across epochs (the epoch travels with each key, see
    :class:`~scalept.data.batching.VoxelBudgetBatches`) and keep several batches ready,
    so a step never waits for worker start-up or for one slow tile.
    """
    extra = dict(persistent_workers=True, prefetch_factor=4, worker_init_fn=_ignore_stop_signals) if num_workers else {}
    return DataLoader(
        dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=num_workers, pin_memory=pin,
        # its own generator, so creating an iterator never draws from the global torch RNG that the
        # model's drop-path and order shuffling use (a resumed run must see the same draws)
        generator=torch.Generator().manual_seed(0), **extra,
    )


def to_device(batch: Mapping, device: torch.device, keys: Sequence[str]) -> dict:
    return {k: batch[k].to(device, non_blocking=True) for k in keys}


def micro_batch_budget(tcfg: DictConfig, world_size: int) -> tuple[int, int]:
    """(voxels per rank per micro-batch, micro-batches per optimizer step) from ``train.batch_voxels/step_voxels``.

    Without ``step_voxels`` an optimizer step is one micro-batch of ``batch_voxels`` per rank.
    With it, the global step is kept at ``step_voxels`` whatever the world size: each rank
    accumulates as many micro-batches of at most ``batch_voxels`` as that takes.
    """
    batch_voxels = tcfg.batch_voxels
    if not isinstance(batch_voxels, int) or isinstance(batch_voxels, bool) or batch_voxels < 1:
        raise ConfigError(f"train.batch_voxels={batch_voxels!r} must be a positive number of voxels, e.g. 300000")
    step_voxels = tcfg.get("step_voxels")
    if step_voxels is None:
        return batch_voxels, 1
    if not isinstance(step_voxels, int) or isinstance(step_voxels, bool) or step_voxels < 1:
        raise ConfigError(f"train.step_voxels={step_voxels!r} must be a positive number of voxels or null")
    per_rank = step_voxels / world_size
    accum = max(1, math.ceil(per_rank / batch_voxels))
    return math.ceil(per_rank / accum), accum


@dataclass
class TrainData:
    """The training tiles of this rank, their voxel-budget plan and the schedule it gives."""

    dataset: TileDataset
    batches: VoxelBudgetBatches
    loader: DataLoader
    budget: int  # voxels per rank per micro-batch
    accum: int  # micro-batches per optimizer step
    epochs: int
    total_steps: int
    step_voxels: float  # mean voxels of an optimizer step over every rank (epoch 0's plan)

    def micro_steps(self, epoch: int) -> int:
        return self.batches.micro_steps(epoch)


def build_train_data(cfg: DictConfig, rank: int, world_size: int, device: torch.device, seed: int) -> TrainData:
    """Dataset, voxel-budget batches and loader of ``dataset.splits.train`` (or its label fraction), and the schedule.

    ``train.max_steps``, when set, fixes the number of optimizer steps and the epochs follow;
    otherwise ``train.epochs`` does and the steps follow (epochs differ a little in steps:
    each epoch's permutation packs differently).
    """
    tcfg = cfg.train
    paths = split_tile_files(cfg.tiles_dir, cfg.sampling.name, [str(s) for s in cfg.dataset.splits.train])
    files = open_checked(paths, cfg)
    unlabelled = [f.attrs.get("sequence", f.path.stem) for f in files if not f.attrs.get("has_labels", False)]
    if unlabelled:
        raise ScalePTError(f"dataset.splits.train has sequences without labels ({', '.join(unlabelled)}: no labels/ "
                           "folder when they were tiled); training needs labelled scans: move them to "
                           "dataset.splits.test")
    fraction = float(tcfg.label_fraction)
    tiles = label_fraction_tiles(files, fraction) if fraction < 1.0 else None
    dataset = TileDataset(paths, tcfg.grid_size, OmegaConf.to_container(tcfg.augmentation, resolve=True),
                          tiles=tiles, seed=seed)
    if len(dataset) == 0:
        raise ConfigError(f"no training tiles in {[str(p) for p in paths]} (train.label_fraction={fraction})")
    budget, accum = micro_batch_budget(tcfg, world_size)
    counts = tile_voxel_counts(paths, float(tcfg.grid_size), int(tcfg.num_workers))
    voxels = np.array([counts[f][t] for f, t in dataset.index], dtype=np.int64)
    batches = VoxelBudgetBatches(voxels, budget, rank, world_size, seed)
    loader = make_loader(dataset, batches, int(tcfg.num_workers), device.type == "cuda")

    def steps_in(epoch: int) -> int:
        return math.ceil(batches.micro_steps(epoch) / accum)

    if tcfg.max_steps is not None:
        total_steps, epochs = int(tcfg.max_steps), 0
        planned = 0
        while planned < total_steps:
            planned += steps_in(epochs)
            epochs += 1
    else:
        epochs = int(tcfg.epochs)
        total_steps = sum(steps_in(e) for e in range(epochs))
    if total_steps < 1:
        raise ConfigError("train.epochs / train.max_steps give no optimizer step")
    step_voxels = float(np.mean(batches.step_voxels(0, accum)))
    return TrainData(dataset, batches, loader, budget, accum, epochs, total_steps, step_voxels)


@torch.no_grad()
def validate(model: torch.nn.Module, cfg: DictConfig, device: torch.device, autocast) -> np.ndarray:
    """Confusion matrix over every point of every validation tile, summed over ranks.

    Each rank predicts tiles rank, rank + world, ...; per-voxel predictions go back
    to the tile's points through ``batch['inverse']``. Points in several tiles count
    once per tile (a tile-level score; the fusion stage scores frames).
    """
    paths = split_tile_files(cfg.tiles_dir, cfg.sampling.name, [str(s) for s in cfg.dataset.splits.val])
    open_checked(paths, cfg)
    dataset = TileDataset(paths, cfg.train.grid_size)
    rank, world = dist_env.get_rank(), dist_env.get_world_size()
    counts = np.concatenate(tile_voxel_counts(paths, float(cfg.train.grid_size), int(cfg.train.num_workers)))
    budget, _ = micro_batch_budget(cfg.train, world)
    mine = range(rank, len(dataset), world)
    loader = make_loader(dataset, [tiles[0] for tiles in pack(counts, mine, budget, 1)], int(cfg.train.num_workers),
                         device.type == "cuda")
    was_training = model.training
    model.eval()
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64, device=device)
    for batch in loader:
        b = to_device(batch, device, ("feat", "grid", "offsets", "inverse", "point_label"))
        with autocast():
            logits = model(b["feat"], b["grid"], b["offsets"])
        confusion += confusion_matrix(logits.argmax(1)[b["inverse"]], b["point_label"], NUM_CLASSES)
    model.train(was_training)
    return dist_env.all_reduce_sum(confusion).cpu().numpy()
