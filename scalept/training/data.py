"""What the model sees in training: the label-fraction subset, the loaders, the validation pass.

The training loader draws its order from :class:`ResumableSampler` (seed, epoch) and
its augmentations from (seed, epoch, tile), so neither depends on how often a job was
restarted; the epoch/step arithmetic of the schedule follows from its length.
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
from scalept.data.dataset import TileDataset, collate, split_tile_files
from scalept.data.semantickitti import NUM_CLASSES
from scalept.data.tiles import TileFile
from scalept.errors import ConfigError
from scalept.metrics import confusion_matrix
from scalept.training.resume import PREEMPT_SIGNALS, ResumableSampler


def frame_subset(num_frames: int, fraction: float) -> np.ndarray:
    """Frames whose labels a ``label_fraction`` run uses: 0, k, 2k, ... with k = round(1 / fraction)."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"train.label_fraction={fraction} must be in (0, 1]")
    k = max(1, round(1.0 / fraction))
    return np.arange(0, num_frames, k)


def label_fraction_tiles(files: Sequence[TileFile], fraction: float) -> list[tuple[int, int]]:
    """(file, tile) pairs of the tiles of :func:`frame_subset`'s frames of every file."""
    pairs = []
    for f, tile_file in enumerate(files):
        keep = np.isin(tile_file.tile_frame, frame_subset(tile_file.num_frames, fraction))
        pairs += [(f, int(t)) for t in np.flatnonzero(keep)]
    return pairs


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGUSR2 to the main process, which checkpoints before exiting."""
    for sig in PREEMPT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def make_loader(dataset, batch_size: int, sampler, num_workers: int, pin: bool) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=num_workers,
        pin_memory=pin, worker_init_fn=_ignore_stop_signals if num_workers else None,
        # its own generator, so creating an iterator never draws from the global torch RNG that the
        # model's drop-path and order shuffling use (a resumed run must see the same draws)
        generator=torch.Generator().manual_seed(0),
    )


def to_device(batch: Mapping, device: torch.device, keys: Sequence[str]) -> dict:
    return {k: batch[k].to(device, non_blocking=True) for k in keys}


@dataclass
class TrainData:
    """The training tiles of this rank and the schedule their number gives."""

    dataset: TileDataset
    sampler: ResumableSampler
    loader: DataLoader
    batch_size: int
    accum: int  # micro-batches per optimizer step
    batches_per_epoch: int
    epochs: int
    total_steps: int


def build_train_data(cfg: DictConfig, rank: int, world_size: int, device: torch.device, seed: int) -> TrainData:
    """Dataset, sampler and loader of ``dataset.splits.train`` (or its label fraction), and the schedule.

    ``train.max_steps``, when set, fixes the number of optimizer steps and the epochs follow;
    otherwise ``train.epochs`` does and the steps follow.
    """
    tcfg = cfg.train
    paths = split_tile_files(cfg.tiles_dir, cfg.sampling.name, [str(s) for s in cfg.dataset.splits.train])
    files = [TileFile(p) for p in paths]
    fraction = float(tcfg.label_fraction)
    tiles = label_fraction_tiles(files, fraction) if fraction < 1.0 else None
    dataset = TileDataset(paths, tcfg.grid_size, OmegaConf.to_container(tcfg.augmentation, resolve=True),
                          tiles=tiles, seed=seed)
    if len(dataset) == 0:
        raise ConfigError(f"no training tiles in {[str(p) for p in paths]} (train.label_fraction={fraction})")
    batch_size, accum = int(tcfg.batch_size), int(tcfg.grad_accum)
    if batch_size < 1 or accum < 1:
        raise ConfigError("train.batch_size and train.grad_accum must be >= 1")
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    loader = make_loader(dataset, batch_size, sampler, int(tcfg.num_workers), device.type == "cuda")
    batches_per_epoch = math.ceil(sampler.num_samples / batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    if tcfg.max_steps is not None:
        total_steps = int(tcfg.max_steps)
        epochs = math.ceil(total_steps / steps_per_epoch)
    else:
        epochs = int(tcfg.epochs)
        total_steps = epochs * steps_per_epoch
    if total_steps < 1:
        raise ConfigError("train.epochs / train.max_steps give no optimizer step")
    return TrainData(dataset, sampler, loader, batch_size, accum, batches_per_epoch, epochs, total_steps)


@torch.no_grad()
def validate(model: torch.nn.Module, cfg: DictConfig, device: torch.device, autocast) -> np.ndarray:
    """Confusion matrix over every point of every validation tile, summed over ranks.

    Each rank predicts tiles rank, rank + world, ...; per-voxel predictions go back
    to the tile's points through ``batch['inverse']``. Points in several tiles count
    once per tile (a tile-level score; the fusion stage scores frames).
    """
    paths = split_tile_files(cfg.tiles_dir, cfg.sampling.name, [str(s) for s in cfg.dataset.splits.val])
    dataset = TileDataset(paths, cfg.train.grid_size)
    rank, world = dist_env.get_rank(), dist_env.get_world_size()
    loader = make_loader(dataset, int(cfg.train.batch_size), list(range(rank, len(dataset), world)),
                         int(cfg.train.num_workers), device.type == "cuda")
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
