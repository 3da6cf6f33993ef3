"""What a training run tells: TensorBoard, console lines, ``train_metrics.json``.

Only rank 0 writes; :class:`Reporter` is a no-op elsewhere. Per-step losses stay on
the device in :class:`StepLog` until a flush, so logging costs one host sync and one
all-reduce per ``train.log_every`` steps rather than one per step.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from scalept import distributed as dist_env
from scalept.atomic import atomic_path
from scalept.data.semantickitti import CLASS_NAMES
from scalept.errors import TrainingDiverged
from scalept.metrics import iou_per_class, mean_iou

log = logging.getLogger("scalept.train")  # the stage's logger, whichever module of it speaks


class Reporter:
    """Rank 0's TensorBoard writer and console output (tqdm on a terminal, one-line summaries otherwise)."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, log_every: int):
        self.enabled, self.log_every = enabled, max(1, int(log_every))
        self.total_steps, self.start_step, self.started = total_steps, start_step, time.monotonic()
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"))
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def eta(self, step: int) -> str:
        """Time left at the mean pace of this run's steps so far, e.g. '12m05s'."""
        done = step - self.start_step
        if done <= 0:
            return "?"
        seconds = (time.monotonic() - self.started) / done * max(0, self.total_steps - step)
        hours, rest = divmod(int(seconds), 3600)
        return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"

    def steps(self, first_step: int, losses: Sequence[float], lr: float, voxels_per_s: float,
              gpu_mem_gb: float | None, epoch: int) -> None:
        if not self.enabled:
            return
        for i, loss in enumerate(losses):
            self.writer.add_scalar("train/loss", loss, first_step + i)
        last = first_step + len(losses) - 1
        self.writer.add_scalar("train/lr", lr, last)
        self.writer.add_scalar("train/voxels_per_s", voxels_per_s, last)
        if gpu_mem_gb is not None:
            self.writer.add_scalar("train/gpu_mem_gb", gpu_mem_gb, last)
        mem = f" mem {gpu_mem_gb:.1f} GB" if gpu_mem_gb is not None else ""
        if self.bar is not None:
            self.bar.update(len(losses))
            self.bar.set_postfix_str(f"epoch {epoch} loss {losses[-1]:.4f} lr {lr:.2e} {voxels_per_s:,.0f} vox/s{mem}")
        else:
            step = last  # steps done so far
            log.info("step %d/%d (%.0f%%) epoch %d loss %.4f lr %.3e %.0f voxels/s%s, ETA %s", step, self.total_steps,
                     100 * step / max(1, self.total_steps), epoch, losses[-1], lr, voxels_per_s, mem, self.eta(step))

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
    """Nested config as ``{"group.key.sub": value}``: TensorBoard hparams take flat scalars only."""
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


class StepLog:
    """Step losses and voxel counts of the loop, read back and rank-averaged only when flushed.

    Throughput counts training time only: the loop calls :meth:`restart_clock` after
    validation and checkpointing.
    """

    def __init__(self, reporter: Reporter, device: torch.device, world_size: int):
        self.reporter, self.device, self.world_size = reporter, device, world_size
        self.pending: list[torch.Tensor] = []  # per-step losses not yet read back (no host sync per step)
        self.step_losses: list[tuple[int, float]] = []
        self.last_loss = float("nan")
        self.window_voxels, self.window_start = 0, time.perf_counter()
        self.total_voxels, self.train_seconds = 0, 0.0
        self.window_steps = 0
        # (optimizer steps, voxels on this rank, seconds, end time) of every flushed window; the
        # end of a window is a host sync, so its seconds are GPU-complete (benchmarks.train_stage)
        self.windows: list[tuple[int, int, float, float]] = []

    def add_voxels(self, voxels: int) -> None:
        self.window_voxels += voxels
        self.total_voxels += voxels

    def add_step(self, loss: torch.Tensor) -> None:
        self.pending.append(loss)
        self.window_steps += 1

    def pending_finite(self) -> bool:
        """Whether this rank's losses not yet flushed are all finite (one host sync)."""
        return not self.pending or bool(torch.isfinite(torch.stack(self.pending)).all())

    def restart_clock(self) -> None:
        self.window_start = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (e.g. a checkpoint written inside the window) out of the window's time."""
        self.window_start += seconds

    def flush(self, step: int, lr: float, epoch: int) -> None:
        """Read back the pending step losses (one sync), average over ranks, log them."""
        pending = self.pending
        if not pending:
            return
        values = torch.stack(pending).float()
        values = torch.cat([values, torch.tensor([float(self.window_voxels)], device=values.device)])
        values = (dist_env.all_reduce_sum(values) / torch.tensor([self.world_size] * len(pending) + [1.0],
                                                                   device=values.device)).tolist()
        now = time.perf_counter()
        elapsed = now - self.window_start
        self.train_seconds += elapsed
        self.windows.append((self.window_steps, self.window_voxels, elapsed, now))
        first = step - len(pending) + 1
        losses = values[:-1]
        diverged = next((s for s, loss in zip(range(first, step + 1), losses) if not math.isfinite(loss)), None)
        if diverged is not None:  # every rank sees the same rank-averaged values, so every rank raises
            raise TrainingDiverged(
                f"train: the loss is {losses[diverged - first]} at step {diverged} (lr {lr:.3g}): training diverged; "
                "rerun with train.resume=false and a lower optim.lr or optim.block_lr_scale, or a larger "
                "train.step_voxels (no checkpoint was written after the divergence)")
        self.step_losses.extend(zip(range(first, step + 1), losses))
        self.last_loss = losses[-1]
        self.reporter.steps(first, losses, lr, values[-1] / max(elapsed, 1e-9), peak_gpu_mem_gb(self.device), epoch)
        pending.clear()
        self.window_voxels, self.window_steps, self.window_start = 0, 0, time.perf_counter()


def peak_gpu_mem_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def param_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes: equal on every rank of a correct data-parallel run."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_train_metrics(run_dir: Path, metrics: Mapping) -> None:
    with atomic_path(run_dir / "train_metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")


def read_train_metrics(run_dir: Path) -> dict:
    """What a finished run wrote (empty if the file is gone): a skipped run returns it."""
    metrics_file = run_dir / "train_metrics.json"
    return json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
