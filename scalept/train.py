"""The training stage (``stage=train``): PTv3 on the tiles of ``dataset.splits.train``, data-parallel.

``run(cfg)`` trains on one process or on every rank of a torchrun / Slurm job
(:mod:`scalept.distributed`), validates every ``train.val_every`` epochs on
``dataset.splits.val`` and keeps ``<run_dir>/checkpoints/{last,best}.pt``,
``<run_dir>/tb/`` and ``<run_dir>/train_metrics.json``. Only rank 0 writes.

Schedule. An optimizer step is ``train.grad_accum`` micro-batches of
``train.batch_size`` tiles per rank (global batch = batch_size x world size x
grad_accum). ``train.epochs`` passes, or exactly ``train.max_steps`` optimizer
steps when that is set (the OneCycle schedule spans the whole run either way).

Label-efficient subsets. ``train.label_fraction = f < 1`` trains on the tiles
of every k-th frame of each training sequence, k = round(1 / f), starting with
the sequence's first frame (frame indices 0, k, 2k, ...): a fixed subset, the
same on every rank and in every run.

Preemption and resume. SIGTERM and SIGUSR2 (what Slurm sends before a time
limit or a preemption, e.g. ``sbatch --signal=USR2@120``) only set a flag; at
the next optimizer-step boundary every rank agrees to stop, rank 0 writes
``last.pt``, the process group ends, the previous handler of the signal is put
back and the signal is raised again. So a plain job still ends as the signal
would have ended it (default action: terminated by the signal), and a
launcher's own handler (submitit's checkpoint-and-requeue on USR2) runs after
the checkpoint. If that handler returns, ``run`` raises
:class:`TrainingInterrupted` (one line, exit code 1 from the launcher) so a
pipeline never goes on with a half-trained model. ``train.stop_at_step``
simulates the same stop at a given step without a signal and then returns
normally (tests, debugging). ``last.pt`` is also written after every epoch.

A later run with ``train.resume=auto`` (the default; ``true`` insists on a
checkpoint, ``false`` starts over) restores model, optimizer, scheduler, epoch, step, the position in
the epoch (batches already done are skipped) and the torch / numpy / python
RNG states, so its losses continue those of an uninterrupted run; the
schedule (total steps) is the resumed run's. A run whose ``last.pt`` says it
finished is skipped (train longer in a new run_dir or with ``train.resume=false``). Augmentations are a function of
(seed, epoch, tile) and the data order of (seed, epoch), neither depends on
how many times the job was restarted.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import resource
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, DistributedSampler

from scalept import distributed as dist_env
from scalept.checkpoint import checkpoint_path, load_checkpoint, model_signature, save_checkpoint
from scalept.data.dataset import TileDataset, collate, split_tile_files
from scalept.data.semantickitti import CLASS_NAMES, NUM_CLASSES
from scalept.data.tiles import TileFile
from scalept.errors import ConfigError, ScalePTError
from scalept.losses import segmentation_loss
from scalept.metrics import confusion_matrix, iou_per_class, mean_iou
from scalept.model import build_model
from scalept.model.blocks import Block

log = logging.getLogger(__name__)

ALLOC_CONF = "expandable_segments:True"
PREEMPT_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR2", None)) if s)


class TrainingInterrupted(ScalePTError, RuntimeError):
    """Training stopped on a signal after writing last.pt; rerunning the same command resumes it."""


# ----------------------------------------------------------------------------- pure helpers


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


def scaled_lr(lr: float, global_batch: int, reference_batch: int, rule: str) -> float:
    """``lr`` tuned at ``reference_batch`` moved to ``global_batch``: none, linear or sqrt (as Grendel-GS)."""
    ratio = global_batch / reference_batch
    if rule == "none":
        return lr
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    raise ConfigError(f"optim.lr_scaling={rule!r}; choose none, linear or sqrt")


def param_groups(model: torch.nn.Module, lr: float, block_lr_scale: float, weight_decay: float) -> list[dict]:
    """Two AdamW groups: everything inside a transformer :class:`Block` at ``lr x block_lr_scale``, the rest at ``lr``."""
    in_blocks = {id(p) for m in model.modules() if isinstance(m, Block) for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    other = [p for p in params if id(p) not in in_blocks]
    blocks = [p for p in params if id(p) in in_blocks]
    return [
        {"params": other, "lr": lr, "weight_decay": weight_decay, "name": "base"},
        {"params": blocks, "lr": lr * block_lr_scale, "weight_decay": weight_decay, "name": "blocks"},
    ]


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


# ----------------------------------------------------------------------------- data


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can start an epoch after its first ``skip`` samples (mid-epoch resume)."""

    skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGUSR2 to the main process, which checkpoints before exiting."""
    for sig in PREEMPT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _loader(dataset, batch_size: int, sampler, num_workers: int, pin: bool) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=num_workers,
        pin_memory=pin, worker_init_fn=_ignore_stop_signals if num_workers else None,
        # its own generator, so creating an iterator never draws from the global torch RNG that the
        # model's drop-path and order shuffling use (a resumed run must see the same draws)
        generator=torch.Generator().manual_seed(0),
    )


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


# ----------------------------------------------------------------------------- logging


class Reporter:
    """Rank 0's TensorBoard writer and console output (tqdm on a terminal, one-line summaries otherwise)."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, log_every: int):
        self.enabled, self.log_every = enabled, max(1, int(log_every))
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"))
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def steps(self, first_step: int, losses: Sequence[float], lr: float, points_per_s: float,
              gpu_mem_gb: float | None, epoch: int) -> None:
        if not self.enabled:
            return
        for i, loss in enumerate(losses):
            self.writer.add_scalar("train/loss", loss, first_step + i)
        last = first_step + len(losses) - 1
        self.writer.add_scalar("train/lr", lr, last)
        self.writer.add_scalar("train/points_per_s", points_per_s, last)
        if gpu_mem_gb is not None:
            self.writer.add_scalar("train/gpu_mem_gb", gpu_mem_gb, last)
        mem = f" mem {gpu_mem_gb:.1f} GB" if gpu_mem_gb is not None else ""
        if self.bar is not None:
            self.bar.update(len(losses))
            self.bar.set_postfix_str(f"epoch {epoch} loss {losses[-1]:.4f} lr {lr:.2e} {points_per_s:,.0f} vox/s{mem}")
        else:
            log.info("step %d epoch %d loss %.4f lr %.3e %.0f voxels/s%s", last, epoch, losses[-1], lr,
                     points_per_s, mem)

    def validation(self, step: int, epoch: int, confusion: np.ndarray) -> None:
        if not self.enabled:
            return
        iou = iou_per_class(confusion)
        miou = mean_iou(confusion)
        self.writer.add_scalar("val/mIoU", miou, step)
        for name, value in zip(CLASS_NAMES, iou):
            if np.isfinite(value):
                self.writer.add_scalar(f"val/IoU/{name}", float(value), step)
        self.writer.add_figure("val/confusion", confusion_figure(confusion), step)
        if self.bar is not None:
            self.bar.write(f"epoch {epoch} val mIoU {100 * miou:.1f}")
        else:
            log.info("epoch %d step %d val mIoU %.2f%%", epoch, step, 100 * miou)

    def hparams(self, cfg: DictConfig, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        flat = {}
        for group in ("train", "optim", "model", "sampling"):
            for key, value in _flatten(OmegaConf.to_container(cfg[group], resolve=True), group).items():
                flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
        flat["dataset"] = str(cfg.dataset.name)
        flat["world_size"] = dist_env.get_world_size()
        self.writer.add_hparams(flat, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _flatten(tree, prefix: str) -> dict:
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: tree if tree is not None else "null"}


def confusion_figure(confusion: np.ndarray):
    """Row-normalised confusion matrix (rows: ground truth) as a matplotlib figure (Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion, dtype=np.float64)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig, ax = plt.subplots(figsize=(8, 7))
    image = ax.imshow(norm, vmin=0.0, vmax=1.0, cmap="Blues")
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=90, fontsize=7)
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- training


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _to_device(batch: Mapping, device: torch.device, keys: Sequence[str]) -> dict:
    return {k: batch[k].to(device, non_blocking=True) for k in keys}


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
    loader = _loader(dataset, int(cfg.train.batch_size), list(range(rank, len(dataset), world)),
                     int(cfg.train.num_workers), device.type == "cuda")
    was_training = model.training
    model.eval()
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64, device=device)
    for batch in loader:
        b = _to_device(batch, device, ("feat", "grid", "offsets", "inverse", "point_label"))
        with autocast():
            logits = model(b["feat"], b["grid"], b["offsets"])
        confusion += confusion_matrix(logits.argmax(1)[b["inverse"]], b["point_label"], NUM_CLASSES)
    model.train(was_training)
    return dist_env.all_reduce_sum(confusion).cpu().numpy()


def _signature(cfg: DictConfig) -> str:
    return model_signature(cfg.model, NUM_CLASSES, float(cfg.train.grid_size))


def _resume_state(cfg: DictConfig, path: Path) -> dict | None:
    mode = str(cfg.train.get("resume", "auto")).lower()
    if mode not in ("auto", "true", "false"):
        raise ConfigError(f"train.resume={cfg.train.resume!r}; choose auto, true or false")
    if mode == "false":
        return None
    if mode == "auto" and not path.is_file():
        return None
    return load_checkpoint(path, _signature(cfg))


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def run(cfg: DictConfig) -> dict:
    """Train (or resume, or skip a finished run); returns the metrics also written to train_metrics.json.

    The returned dict adds ``step_losses``: [(step, loss), ...] of the steps this call ran
    (the rank-averaged loss of each optimizer step) and ``param_digest`` (a hash of the
    parameters, equal on every rank). Every rank returns it; only rank 0 writes files.
    """
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)  # before CUDA starts; the user's value wins
    env = dist_env.init()
    try:
        return _train(cfg, env)
    finally:
        dist_env.teardown()


def _train(cfg: DictConfig, env: dist_env.DistEnv) -> dict:
    t_start = time.perf_counter()
    tcfg, ocfg = cfg.train, cfg.optim
    device = dist_env.device()
    main = env.is_main
    run_dir = Path(cfg.run_dir)
    last_path, best_path = checkpoint_path(run_dir, "last"), checkpoint_path(run_dir, "best")

    state = _resume_state(cfg, last_path)
    if state is not None and state.get("finished"):
        log.info("train: %s says training finished (step %d); nothing to do", last_path, state["step"])
        metrics_file = run_dir / "train_metrics.json"
        done = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        return {**done, "step_losses": [], "preempted": False, "skipped": True}

    seed = int(cfg.seed)
    seed_everything(seed)

    # data
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
    sampler = ResumableSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed)
    loader = _loader(dataset, batch_size, sampler, int(tcfg.num_workers), device.type == "cuda")
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

    # model, optimizer, schedule
    model = build_model(cfg.model, NUM_CLASSES).to(device)
    global_batch = batch_size * env.world_size * accum
    lr = scaled_lr(float(ocfg.lr), global_batch, int(ocfg.reference_batch), str(ocfg.lr_scaling))
    groups = param_groups(model, lr, float(ocfg.block_lr_scale), float(ocfg.weight_decay))
    optimizer = torch.optim.AdamW(groups, lr=lr, fused=True if device.type == "cuda" else None)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=total_steps, pct_start=float(ocfg.pct_start),
        anneal_strategy="cos", div_factor=float(ocfg.div_factor), final_div_factor=float(ocfg.final_div_factor),
    )

    step, start_epoch, skip_batches, best_miou = 0, 0, 0, float("-inf")
    if state is not None:
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, start_epoch, skip_batches = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        best_miou = float(state.get("best_miou", float("-inf")))
        if int(state.get("world_size", env.world_size)) != env.world_size and skip_batches:
            if main:
                log.warning("train: resumed with %d ranks instead of %d; the rest of epoch %d is skipped",
                            env.world_size, state["world_size"], start_epoch)
            start_epoch, skip_batches = start_epoch + 1, 0
        total_steps = int(scheduler.total_steps)  # the schedule of the run being resumed
        set_rng_state(state["rng"])
        if main:
            log.info("train: resumed %s at epoch %d, step %d (batch %d of the epoch)", last_path, start_epoch, step,
                     skip_batches)
    elif main and last_path.is_file():
        log.warning("train: train.resume=false; %s will be overwritten", last_path)

    if env.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    use_amp = bool(tcfg.get("amp", True)) and device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()

    stop = StopFlag().install()
    stop_at = tcfg.get("stop_at_step")
    reporter = Reporter(run_dir, main, total_steps, step, int(tcfg.log_every))
    lovasz_weight = float(tcfg.get("lovasz_weight", 1.0))
    val_every = int(tcfg.val_every)
    has_val = len(cfg.dataset.splits.get("val", [])) > 0

    def save(which_path: Path, epoch: int, batch_in_epoch: int, finished: bool = False) -> None:
        if not main:
            return
        save_checkpoint(which_path, {
            "model": _unwrap(model).state_dict(), "signature": _signature(cfg),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": step, "best_miou": best_miou,
            "finished": finished, "world_size": env.world_size, "global_batch": global_batch,
            "rng": rng_state(), "config": OmegaConf.to_yaml(cfg, resolve=True),
        })

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_losses: list[tuple[int, float]] = []
    pending: list[torch.Tensor] = []  # per-step losses not yet read back (no host sync per step)
    window_voxels, window_start = 0, time.perf_counter()
    total_voxels, train_seconds = 0, 0.0
    last_val_epoch, last_loss, preempted, step_lr = -1, float("nan"), False, float(scheduler.get_last_lr()[0])
    epoch = start_epoch
    model.train()

    def flush(epoch: int) -> None:
        """Read back the pending step losses (one sync), average over ranks, log them."""
        nonlocal window_voxels, window_start, last_loss, train_seconds
        if not pending:
            return
        values = torch.stack(pending).float()
        values = torch.cat([values, torch.tensor([float(window_voxels)], device=values.device)])
        values = (dist_env.all_reduce_sum(values) / torch.tensor([env.world_size] * len(pending) + [1.0],
                                                                   device=values.device)).tolist()
        elapsed = time.perf_counter() - window_start
        train_seconds += elapsed
        first = step - len(pending) + 1
        losses = values[:-1]
        step_losses.extend(zip(range(first, step + 1), losses))
        last_loss = losses[-1]
        gpu_mem = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        reporter.steps(first, losses, step_lr, values[-1] / max(elapsed, 1e-9), gpu_mem, epoch)
        pending.clear()
        window_voxels, window_start = 0, time.perf_counter()

    try:
        while epoch < epochs and step < total_steps:
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            sampler.skip = skip_batches * batch_size
            micro = skip_batches
            skip_batches = 0
            for batch in loader:
                group = micro // accum
                group_end = min((group + 1) * accum, batches_per_epoch)
                final_micro = micro + 1 == group_end
                b = _to_device(batch, device, ("feat", "grid", "offsets", "label"))
                sync = contextlib.nullcontext() if final_micro or env.world_size == 1 else model.no_sync()
                with sync:
                    with autocast():
                        logits = model(b["feat"], b["grid"], b["offsets"])
                    loss, _ = segmentation_loss(logits, b["label"], lovasz_weight)
                    (loss / (group_end - group * accum)).backward()
                group_loss = loss.detach() if micro == group * accum else group_loss + loss.detach()
                voxels = len(batch["feat"])
                window_voxels += voxels
                total_voxels += voxels
                micro += 1
                if not final_micro:
                    continue
                optimizer.step()
                step_lr = optimizer.param_groups[0]["lr"]  # the rate this step used (logged)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                pending.append(group_loss / (group_end - group * accum))
                if stop_at is not None and step >= int(stop_at):
                    stop.request(f"train.stop_at_step={stop_at}")
                stopping = dist_env.any_rank(stop.requested)
                if stopping or step % reporter.log_every == 0 or step >= total_steps:
                    flush(epoch)
                if stopping:
                    stop.reason = stop.reason or "another rank's signal"
                    save(last_path, epoch, micro)
                    preempted = True
                    if main:
                        log.warning("train: stopping at step %d (%s); %s written, rerun to resume", step,
                                    stop.reason, last_path)
                    break
                if step >= total_steps:
                    break
            if preempted:
                break
            epoch += 1
            flush(epoch - 1)  # one read-back per epoch besides the log_every ones
            if has_val and val_every > 0 and (epoch % val_every == 0 or epoch >= epochs or step >= total_steps):
                confusion = validate(_unwrap(model), cfg, device, autocast)  # not through DDP: shards may differ in size
                miou = mean_iou(confusion)
                last_val_epoch = epoch
                reporter.validation(step, epoch, confusion)
                if miou > best_miou:
                    best_miou = miou
                    save(best_path, epoch, 0)
            save(last_path, epoch, 0, finished=epoch >= epochs or step >= total_steps)
            window_start = time.perf_counter()  # throughput counts training, not validation or saving
        flush(epoch)
        if not preempted and main and last_val_epoch < 0 and not best_path.is_file():
            save(best_path, epoch, 0, finished=True)  # no validation ran: best is the final model
    except BaseException:
        stop.restore()
        reporter.close()
        raise
    if stop.signum is None:
        stop.restore()

    seconds = time.perf_counter() - t_start
    metrics = {
        "steps": step, "epochs": epoch, "total_steps": total_steps, "final_loss": last_loss,
        "best_val_miou": best_miou if best_miou > float("-inf") else None,
        "points_per_s": total_voxels * env.world_size / train_seconds if train_seconds else None,
        "voxels_seen_per_rank": total_voxels, "peak_gpu_mem_gb":
            torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "peak_rss_gb": _peak_rss_gb(), "seconds": seconds, "world_size": env.world_size,
        "global_batch": global_batch, "lr": lr, "preempted": preempted, "device": str(device),
    }
    if main:
        if not preempted:
            reporter.hparams(cfg, {"best_val_miou": metrics["best_val_miou"] or 0.0, "final_loss": last_loss})
        from scalept.atomic import atomic_path

        with atomic_path(run_dir / "train_metrics.json") as tmp:
            tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    reporter.close()
    if stop.signum is not None:  # a real signal: let its previous owner act (default: terminate)
        dist_env.barrier()
        dist_env.teardown()
        stop.reraise()
        raise TrainingInterrupted(f"training stopped by {stop.reason} at step {step}; {last_path} written; "
                                  "rerun the same command to resume")
    return {**metrics, "step_losses": step_losses, "param_digest": _param_digest(_unwrap(model))}


def _param_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes: equal on every rank of a correct data-parallel run."""
    import hashlib

    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
