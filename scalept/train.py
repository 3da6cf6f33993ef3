"""The training stage (``stage=train``): PTv3 on the tiles of ``dataset.splits.train``, data-parallel.

``run(cfg)`` trains on one process or on every rank of a torchrun / Slurm job
(:mod:`scalept.distributed`), validates every ``train.val_every`` epochs on
``dataset.splits.val`` and keeps ``<run_dir>/checkpoints/{last,best}.pt``,
``<run_dir>/tb/`` and ``<run_dir>/train_metrics.json``. Only rank 0 writes.

Schedule. A micro-batch is as many tiles as fit ``train.batch_voxels`` voxels on one
rank (:mod:`scalept.training.batching`); an optimizer step is one micro-batch per rank,
or, with ``train.step_voxels``, as many accumulated micro-batches as keep the global
step at that many voxels whatever the world size. ``train.epochs`` passes, or exactly
``train.max_steps`` optimizer steps when that is set (the OneCycle schedule spans the
whole run either way). The learning rate is scaled from ``optim.reference_voxels`` to
the plan's mean voxels per step.

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
pipeline never goes on with a half-trained model; so does a rank that stopped
only because another rank was signalled. ``train.stop_at_step``
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

Layout. This module sets the run up and holds the epoch / optimizer-step loop; its
pieces (data, optimizer, resumable state, reporting) live in :mod:`scalept.training`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from scalept import distributed as dist_env
from scalept.checkpoint import checkpoint_path
from scalept.data.semantickitti import NUM_CLASSES
from scalept.errors import ConfigError, TrainingInterrupted
from scalept.losses import segmentation_loss  # looked up here at every step: tests wrap it
from scalept.metrics import mean_iou
from scalept.model import build_model
from scalept.training.data import build_train_data, frame_subset, label_fraction_tiles, to_device, validate
from scalept.training.optim import build_optimizer, param_groups, scaled_lr
from scalept.training.reporting import (Reporter, StepLog, confusion_figure, param_digest, peak_gpu_mem_gb,
                                        peak_rss_gb, read_train_metrics, write_train_metrics)
from scalept.training.resume import (PREEMPT_SIGNALS, Checkpointer, StopFlag, load_resume_state, restore, rng_state,
                                     seed_everything, set_rng_state, unwrap)

# The stage's public names, including the helpers that lived here before the split into
# scalept.training: tests and callers keep importing them from scalept.train.
__all__ = [
    "ALLOC_CONF", "PREEMPT_SIGNALS", "Reporter", "StopFlag", "build_train_data", "TrainingInterrupted",
    "confusion_figure", "frame_subset", "label_fraction_tiles", "param_groups", "rng_state", "run", "scaled_lr",
    "seed_everything", "segmentation_loss", "set_rng_state", "validate",
]

log = logging.getLogger(__name__)

ALLOC_CONF = "expandable_segments:True"
ANOTHER_RANK = "another rank's signal"  # why a rank that caught no signal itself stops


def run(cfg: DictConfig, step_hook: Callable[[int], None] | None = None) -> dict:
    """Train (or resume, or skip a finished run); returns the metrics also written to train_metrics.json.

    The returned dict adds ``step_losses``: [(step, loss), ...] of the steps this call ran
    (the rank-averaged loss of each optimizer step), ``param_digest`` (a hash of the
    parameters, equal on every rank) and ``windows``, the (steps, voxels, seconds, end time)
    of every logging window. Every rank returns it; only rank 0 writes files.
    ``step_hook(step)``, if given, runs after every optimizer step (profilers, benchmarks).
    """
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)  # before CUDA starts; the user's value wins
    env = dist_env.init()
    try:
        return _train(cfg, env, step_hook)
    finally:
        dist_env.teardown()


def _model_config(cfg: DictConfig) -> dict:
    """``cfg.model`` with ``train.checkpoint_levels`` applied: recomputation is a memory setting of the run."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    levels = cfg.train.get("checkpoint_levels")
    if levels is not None:
        if not isinstance(levels, int) or isinstance(levels, bool) or not 0 <= levels <= len(model_cfg["enc_depths"]):
            raise ConfigError(f"train.checkpoint_levels={levels!r} must be null or 0..{len(model_cfg['enc_depths'])}")
        model_cfg["checkpoint_levels"] = levels
    return model_cfg


def _train(cfg: DictConfig, env: dist_env.DistEnv, step_hook: Callable[[int], None] | None = None) -> dict:
    t_start = time.perf_counter()
    tcfg = cfg.train
    device = dist_env.device()
    main = env.is_main
    run_dir = Path(cfg.run_dir)
    last_path, best_path = checkpoint_path(run_dir, "last"), checkpoint_path(run_dir, "best")

    state = load_resume_state(cfg, last_path)
    if state is not None and state.get("finished"):
        log.info("train: %s says training finished (step %d); nothing to do", last_path, state["step"])
        return {**read_train_metrics(run_dir), "step_losses": [], "preempted": False, "skipped": True}

    # setup, in the order that fixes the RNG draws: seed, data, model init, optimizer, resume
    seed = int(cfg.seed)
    seed_everything(seed)
    data = build_train_data(cfg, env.rank, env.world_size, device, seed)
    accum, epochs = data.accum, data.epochs
    model = build_model(_model_config(cfg), NUM_CLASSES).to(device)
    step_voxels = round(data.step_voxels)  # mean voxels of an optimizer step, every rank together
    lr, optimizer, scheduler = build_optimizer(model, cfg.optim, step_voxels, data.total_steps, device)
    start = restore(state, model, optimizer, scheduler, env.world_size, main, last_path, data.total_steps)
    step, epoch, skip_batches, best_miou, total_steps = (start.step, start.epoch, start.batch_in_epoch,
                                                         start.best_miou, start.total_steps)

    if env.world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    use_amp = bool(tcfg.get("amp", True)) and device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()

    stop = StopFlag().install()
    stop_at = tcfg.get("stop_at_step")
    reporter = Reporter(run_dir, main, total_steps, step, int(tcfg.log_every))
    lovasz_weight = float(tcfg.get("lovasz_weight", 1.0))
    val_every = int(tcfg.val_every)
    has_val = len(cfg.dataset.splits.get("val", [])) > 0
    checkpointer = Checkpointer(cfg, model, optimizer, scheduler, main, env.world_size, step_voxels)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps_log = StepLog(reporter, device, env.world_size)
    last_val_epoch, preempted, step_lr = -1, False, float(scheduler.get_last_lr()[0])
    model.train()

    try:
        while epoch < epochs and step < total_steps:
            data.batches.set_epoch(epoch)
            data.batches.skip = skip_batches
            batches_per_epoch = data.micro_steps(epoch)
            micro = skip_batches
            skip_batches = 0
            for batch in data.loader:
                # micro-batches of one optimizer step; the epoch's last step may have fewer
                group = micro // accum
                group_end = min((group + 1) * accum, batches_per_epoch)
                final_micro = micro + 1 == group_end
                b = to_device(batch, device, ("feat", "grid", "offsets", "label"))
                sync = contextlib.nullcontext() if final_micro or env.world_size == 1 else model.no_sync()
                with sync:
                    with autocast():
                        logits = model(b["feat"], b["grid"], b["offsets"])
                    loss, _ = segmentation_loss(logits, b["label"], lovasz_weight)
                    (loss / (group_end - group * accum)).backward()
                group_loss = loss.detach() if micro == group * accum else group_loss + loss.detach()
                steps_log.add_voxels(len(batch["feat"]))
                micro += 1
                if not final_micro:
                    continue
                optimizer.step()
                step_lr = optimizer.param_groups[0]["lr"]  # the rate this step used (logged)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                steps_log.add_step(group_loss / (group_end - group * accum))
                if step_hook is not None:
                    step_hook(step)
                if stop_at is not None and step >= int(stop_at):
                    stop.request(f"train.stop_at_step={stop_at}")
                stopping = dist_env.any_rank(stop.requested)
                if stopping or step % reporter.log_every == 0 or step >= total_steps:
                    steps_log.flush(step, step_lr, epoch)
                if stopping:
                    stop.reason = stop.reason or ANOTHER_RANK
                    checkpointer.save(last_path, epoch, micro, step, best_miou)
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
            steps_log.flush(step, step_lr, epoch - 1)  # one read-back per epoch besides the log_every ones
            if has_val and val_every > 0 and (epoch % val_every == 0 or epoch >= epochs or step >= total_steps):
                confusion = validate(unwrap(model), cfg, device, autocast)  # not through DDP: shards may differ in size
                miou = mean_iou(confusion)
                last_val_epoch = epoch
                reporter.validation(step, epoch, confusion)
                if miou > best_miou:
                    best_miou = miou
                    checkpointer.save(best_path, epoch, 0, step, best_miou)
            checkpointer.save(last_path, epoch, 0, step, best_miou, finished=epoch >= epochs or step >= total_steps)
            steps_log.restart_clock()  # throughput counts training, not validation or saving
        steps_log.flush(step, step_lr, epoch)
        if not preempted and main and last_val_epoch < 0 and not best_path.is_file():
            # no validation ran: best is the final model
            checkpointer.save(best_path, epoch, 0, step, best_miou, finished=True)
    except BaseException:
        stop.restore()
        reporter.close()
        raise
    if stop.signum is None:
        stop.restore()

    metrics = {
        "steps": step, "epochs": epoch, "total_steps": total_steps, "final_loss": steps_log.last_loss,
        "best_val_miou": best_miou if best_miou > float("-inf") else None,
        "points_per_s": (steps_log.total_voxels * env.world_size / steps_log.train_seconds
                         if steps_log.train_seconds else None),
        "voxels_seen_per_rank": steps_log.total_voxels, "peak_gpu_mem_gb": peak_gpu_mem_gb(device),
        "peak_rss_gb": peak_rss_gb(), "seconds": time.perf_counter() - t_start, "world_size": env.world_size,
        "step_voxels": step_voxels, "micro_batches_per_step": accum, "batch_voxels": data.budget, "lr": lr, "preempted": preempted, "device": str(device),
    }
    if main:
        if not preempted:
            reporter.hparams(cfg, {"best_val_miou": metrics["best_val_miou"] or 0.0, "final_loss": steps_log.last_loss})
        write_train_metrics(run_dir, metrics)
    reporter.close()
    if stop.signum is not None or stop.reason == ANOTHER_RANK:  # never go on with a half-trained model
        dist_env.barrier()
        dist_env.teardown()
        if stop.signum is not None:  # a real signal: let its previous owner act (default: terminate)
            stop.reraise()
        raise TrainingInterrupted(f"training stopped by {stop.reason} at step {step}; {last_path} written; "
                                  "rerun the same command to resume")
    return {**metrics, "step_losses": steps_log.step_losses, "param_digest": param_digest(unwrap(model)),
            "windows": steps_log.windows}
