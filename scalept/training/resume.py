"""Resumable training state: a stopped run continues with the losses an uninterrupted one would have.

That takes more than the weights: optimizer, scheduler, epoch, step, the position in
the epoch (the voxel-budget plan of an epoch is recomputed and its first batches skipped) and the torch /
numpy / python RNG states, all saved by :class:`Checkpointer` and put back by
:func:`restore`. :class:`StopFlag` turns SIGTERM/SIGUSR2 into a request that the loop
honours at the next optimizer-step boundary, so the checkpoint is always consistent.
"""
from __future__ import annotations

import logging
import random
import signal
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from scalept.checkpoint import load_checkpoint, model_record, model_signature, save_checkpoint
from scalept.data.semantickitti import CLASS_NAMES, NUM_CLASSES
from scalept.errors import ConfigError

log = logging.getLogger("scalept.train")  # the stage's logger, whichever module of it speaks

PREEMPT_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR2", None)) if s)


# ----------------------------------------------------------------------------- randomness


def rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python RNG states as tensors and lists (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- preemption


class StopFlag:
    """SIGTERM/SIGUSR2 set a flag; the training loop stops at the next step boundary."""

    def __init__(self, signals: Sequence[int] = PREEMPT_SIGNALS):
        self.signals = tuple(signals)
        self.signum: int | None = None
        self.reason: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.signum = signum
        self.reason = signal.Signals(signum).name

    def request(self, reason: str) -> None:
        self.reason = reason

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def reraise(self) -> None:
        """Hand the caught signal to the handler that was there before us (default: terminate)."""
        previous = self._previous.get(self.signum, signal.SIG_DFL)
        self.restore()
        if previous is not signal.SIG_IGN:
            signal.raise_signal(self.signum)


# ----------------------------------------------------------------------------- checkpoints


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a ``DistributedDataParallel`` (or the model itself): what checkpoints hold."""
    return model.module if hasattr(model, "module") else model


def checkpoint_signature(cfg: DictConfig) -> str:
    """What a checkpoint must match to be resumed: model config, classes, grid."""
    return model_signature(cfg.model, NUM_CLASSES, float(cfg.train.grid_size))


def load_resume_state(cfg: DictConfig, path: Path) -> dict | None:
    """The checkpoint ``train.resume`` asks to continue from, or None to start over."""
    mode = str(cfg.train.resume).lower()
    if mode not in ("auto", "true", "false"):
        raise ConfigError(f"train.resume={cfg.train.resume!r}; choose auto, true or false")
    if mode == "false":
        return None
    if mode == "auto" and not path.is_file():
        return None
    return load_checkpoint(path, checkpoint_signature(cfg))


@dataclass
class ResumePoint:
    """Where the loop starts: 0 / epoch 0 for a fresh run, the checkpoint's position for a resumed one."""

    step: int
    epoch: int
    batch_in_epoch: int
    best_miou: float
    total_steps: int


def restore(state: Mapping | None, model: torch.nn.Module, optimizer, scheduler, world_size: int, main: bool,
            last_path: Path, total_steps: int) -> ResumePoint:
    """Load ``state`` (from :func:`load_resume_state`) into model, optimizer, scheduler and the RNGs.

    A resumed run keeps the schedule (total steps) it was started with. Resumed on another
    number of ranks, the sampler's shards differ, so the rest of the interrupted epoch is skipped.
    """
    if state is None:
        if main and last_path.is_file():
            log.warning("train: train.resume=false; %s will be overwritten", last_path)
        return ResumePoint(0, 0, 0, float("-inf"), total_steps)
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    step, epoch, skip_batches = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
    best_miou = float(state.get("best_miou", float("-inf")))
    if int(state.get("world_size", world_size)) != world_size and skip_batches:
        if main:
            log.warning("train: resumed with %d ranks instead of %d; the rest of epoch %d is skipped",
                        world_size, state["world_size"], epoch)
        epoch, skip_batches = epoch + 1, 0
    total_steps = int(scheduler.total_steps)  # the schedule of the run being resumed
    set_rng_state(state["rng"])
    if main:
        log.info("train: resumed %s at epoch %d, step %d (batch %d of the epoch)", last_path, epoch, step,
                 skip_batches)
    return ResumePoint(step, epoch, skip_batches, best_miou, total_steps)


class Checkpointer:
    """Rank 0 writes ``last.pt`` / ``best.pt`` with everything :func:`restore` reads; other ranks write nothing."""

    def __init__(self, cfg: DictConfig, model: torch.nn.Module, model_cfg: dict, optimizer, scheduler, main: bool,
                 world_size: int, step_voxels: int):
        self.cfg, self.model, self.model_cfg, self.optimizer, self.scheduler = cfg, model, model_cfg, optimizer, scheduler
        self.main, self.world_size, self.step_voxels = main, world_size, step_voxels

    def save(self, path: Path, epoch: int, batch_in_epoch: int, step: int, best_miou: float,
             finished: bool = False) -> None:
        if not self.main:
            return
        save_checkpoint(path, {
            **model_record(unwrap(self.model), self.model_cfg, CLASS_NAMES, float(self.cfg.train.grid_size)),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": step, "best_miou": best_miou,
            "finished": finished, "world_size": self.world_size, "step_voxels": self.step_voxels,
            "rng": rng_state(), "config": OmegaConf.to_yaml(self.cfg, resolve=True),
        })
