"""The training stage (``stage=train``): PTv3 on the tiles of ``dataset.splits.train``, data-parallel.

``run(cfg)`` trains on one process or on every rank of a torchrun / Slurm job
(:mod:`scalept.distributed`), validates every ``train.val_every`` epochs on
``dataset.splits.val`` and keeps ``<run_dir>/checkpoints/{last,best}.pt``,
``<run_dir>/tb/`` and ``<run_dir>/train_metrics.json``. Only rank 0 writes.

Schedule. A micro-batch is as many tiles as fit ``train.batch_voxels`` voxels on one
rank (:mod:`scalept.data.batching`); an optimizer step is one micro-batch per rank,
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
normally (tests, debugging). ``last.pt`` is also written after every epoch and every
``train.checkpoint_every_min`` minutes (a ``kill -9`` or a lost node loses at most that).

A later run with ``train.resume=auto`` (the default; ``true`` insists on a
checkpoint, ``false`` starts over) restores model, optimizer, scheduler, epoch, step, the position in
the epoch (batches already done are skipped) and the torch / numpy / python
RNG states, so its losses continue those of an uninterrupted run; the
schedule (total steps) is the resumed run's. A run whose ``last.pt`` says it
finished is skipped (train longer in a new run_dir or with ``train.resume=false``). Augmentations are a function of
(seed, epoch, tile) and the data order of (seed, epoch), neither depends on
how many times the job was restarted.

Layout. This module sets the run up and holds the epoch / optimizer-step loop (:class:`Trainer`); its
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
from scalept.atomic import remove_stale_temporaries
from scalept.checkpoint import checkpoint_path, saved_progress
from scalept.data.semantickitti import NUM_CLASSES
from scalept.errors import ConfigError, TrainingInterrupted
from scalept.losses import segmentation_loss  # looked up here at every step: tests wrap it
from scalept.metrics import mean_iou
from scalept.plan import Plan
from scalept.model import build_model, norm_statistics
from scalept.training.bn_recalibration import recalibrate_batch_norms
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

# The sub-configs this stage reads (scalept.steps hands it these and nothing else).
READS = ("run_dir", "seed", "model", "train", "optim", "dataset", "sampling", "tiles_dir", "preprocess")
ALLOC_CONF = "expandable_segments:True"
ANOTHER_RANK = "another rank's signal"  # why a rank that caught no signal itself stops


def run(cfg: DictConfig, step_hook: Callable[[int], None] | None = None,
        model_hook: Callable[[torch.nn.Module], None] | None = None) -> dict:
    """Train (or resume, or skip a finished run); returns the metrics also written to train_metrics.json.

    The returned dict adds ``step_losses``: [(step, loss), ...] of the steps this call ran
    (the rank-averaged loss of each optimizer step), ``param_digest`` (a hash of the
    parameters, equal on every rank) and ``windows``, the (steps, voxels, seconds, end time)
    of every logging window. Every rank returns it; only rank 0 writes files.
    ``step_hook(step)``, if given, runs after every optimizer step (profilers, benchmarks);
    ``model_hook(model)`` runs once with the model as trained, DDP-wrapped when the world has
    more than one rank, before the first step (e.g. to register a DDP communication hook).
    """
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)  # before CUDA starts; the user's value wins
    with dist_env.session() as env:  # the launcher's group when it runs a job's steps, else one of its own
        return _train(cfg, env, step_hook, model_hook)


def plan(cfg: DictConfig) -> Plan:
    """Done when ``last.pt`` says training finished (and ``train.resume`` keeps it), as :func:`run` decides."""
    run_dir = Path(cfg.run_dir)
    progress = saved_progress(checkpoint_path(run_dir, "last"))
    outputs = [str(run_dir / "checkpoints"), str(run_dir / "train_metrics.json")]
    if progress is not None and progress["finished"] and str(cfg.train.resume).lower() != "false":
        return Plan("train", 1, [], outputs)
    start = "from scratch" if progress is None or str(cfg.train.resume).lower() == "false" else \
        f"resuming after step {progress['step']}"
    return Plan("train", 1, [f"train {cfg.model.name} on sampling={cfg.sampling.name} tiles, {start}"], outputs)


CPU_PARAMETERS = 10_000_000  # above this a CPU step takes seconds (ptv3: 46 M, ~9 s per step on 2 cores)


def _warn_large_model_on_cpu(model, device: torch.device, is_main: bool, total_steps: int) -> None:
    parameters = sum(p.numel() for p in model.parameters())
    if device.type == "cpu" and parameters > CPU_PARAMETERS and is_main:
        log.warning("train: a %.1f M-parameter model on the CPU: expect seconds per step (ptv3: ~9 s on 2 cores, "
                    "so %d steps take about %.0f min) and several GB of memory; model=ptv3_tiny is the CPU model. "
                    "The first progress line gives this run's ETA", parameters / 1e6, total_steps, total_steps * 9 / 60)


def _model_config(cfg: DictConfig) -> dict:
    """``cfg.model`` with ``train.checkpoint_levels`` applied: recomputation is a memory setting of the run."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    levels = cfg.train.get("checkpoint_levels")
    if levels is not None:
        if not isinstance(levels, int) or isinstance(levels, bool) or not 0 <= levels <= len(model_cfg["enc_depths"]):
            raise ConfigError(f"train.checkpoint_levels={levels!r} must be null or 0..{len(model_cfg['enc_depths'])}")
        model_cfg["checkpoint_levels"] = levels
    return model_cfg


def _train(cfg: DictConfig, env: dist_env.DistEnv, step_hook: Callable[[int], None] | None = None,
           model_hook: Callable[[torch.nn.Module], None] | None = None) -> dict:
    last_path = checkpoint_path(Path(cfg.run_dir), "last")
    if env.is_main:
        remove_stale_temporaries(last_path.parent)
    state = load_resume_state(cfg, last_path)
    if state is not None and state.get("finished"):
        log.info("train: %s says training finished (step %d); nothing to do", last_path, state["step"])
        return {**read_train_metrics(Path(cfg.run_dir)), "step_losses": [], "preempted": False, "skipped": True}
    trainer = Trainer(cfg, env, state, step_hook, model_hook)
    try:
        preempted = trainer.fit()
    except BaseException:
        trainer.stop.restore()
        trainer.reporter.close()
        raise
    return trainer.finish(preempted)


class Trainer:
    """One training run: set up in the order that fixes the RNG draws, then epochs of optimizer steps.

    ``fit`` runs the epochs (:meth:`train_epoch`: micro-batches, :meth:`optimizer_step`, stop
    requests; :meth:`end_epoch`: validation and checkpoints); ``finish`` writes the metrics and
    turns a signal into the exit the module docstring describes.
    """

    def __init__(self, cfg: DictConfig, env: dist_env.DistEnv, state: dict | None,
                 step_hook: Callable[[int], None] | None = None,
                 model_hook: Callable[[torch.nn.Module], None] | None = None):
        self.started = time.perf_counter()
        self.cfg, self.env, self.step_hook = cfg, env, step_hook
        self.device = device = dist_env.device()
        run_dir = Path(cfg.run_dir)
        self.last_path, self.best_path = checkpoint_path(run_dir, "last"), checkpoint_path(run_dir, "best")
        # seed, data, model init, optimizer, resume: this order fixes the RNG draws
        seed = int(cfg.seed)
        seed_everything(seed)
        self.data = build_train_data(cfg, env.rank, env.world_size, device, seed)
        model_cfg = _model_config(cfg)
        model = build_model(model_cfg, NUM_CLASSES).to(device)
        _warn_large_model_on_cpu(model, device, env.is_main, self.data.total_steps)
        self.step_voxels = round(self.data.step_voxels)  # mean voxels of an optimizer step, every rank together
        self.lr, self.optimizer, self.scheduler = build_optimizer(model, cfg.optim, self.step_voxels,
                                                                  self.data.total_steps, device)
        start = restore(state, model, self.optimizer, self.scheduler, env.world_size, env.is_main, self.last_path,
                        self.data.total_steps)
        self.step, self.epoch, self.skip_batches = start.step, start.epoch, start.batch_in_epoch
        self.best_miou, self.total_steps = start.best_miou, start.total_steps
        if env.world_size > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        self.model = model
        if model_hook is not None:
            model_hook(model)
        self.use_amp = bool(cfg.train.amp) and device.type == "cuda"
        self.lovasz_weight = float(cfg.train.lovasz_weight)
        clip = cfg.optim.get("clip_grad_norm")
        self.clip_grad_norm = None if clip is None else float(clip)
        self.stop = StopFlag().install()
        self.reporter = Reporter(run_dir, env.is_main, self.total_steps, self.step, int(cfg.train.log_every))
        self.checkpointer = Checkpointer(cfg, model, model_cfg, self.optimizer, self.scheduler, env.is_main,
                                         env.world_size, self.step_voxels)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.steps_log = StepLog(self.reporter, device, env.world_size)
        self.step_lr = float(self.scheduler.get_last_lr()[0])
        self.last_val_epoch = -1
        self.last_save = time.perf_counter()  # when last.pt was last written (or the run began)

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.use_amp else contextlib.nullcontext()

    @property
    def done(self) -> bool:
        return self.epoch >= self.data.epochs or self.step >= self.total_steps

    def fit(self) -> bool:
        """Every remaining epoch; True when a stop request ended the run early (``last.pt`` written)."""
        self.model.train()
        if self.done:  # resumed from a stop at the last step: that epoch's end (BatchNorm, validation) is left
            self.end_epoch()
        while not self.done:
            if self.train_epoch():
                return True
            self.epoch += 1
            self.steps_log.flush(self.step, self.step_lr, self.epoch - 1)  # one read-back per epoch besides log_every
            self.end_epoch()
        self.steps_log.flush(self.step, self.step_lr, self.epoch)
        if self.env.is_main and self.last_val_epoch < 0 and not self.best_path.is_file():
            # no validation ran: best is the final model
            self.checkpointer.save(self.best_path, self.epoch, 0, self.step, self.best_miou, finished=True)
        return False

    def micro_step(self, batch: dict, micro_batches: int, sync: bool) -> torch.Tensor:
        """Forward and backward of one of ``micro_batches`` accumulated micro-batches (gradients all-reduced
        only when ``sync``); returns its loss."""
        b = to_device(batch, self.device, ("feat", "grid", "offsets", "label"))
        no_sync = self.env.world_size > 1 and not sync
        with self.model.no_sync() if no_sync else contextlib.nullcontext():
            with self.autocast():
                logits = self.model(b["feat"], b["grid"], b["offsets"])
            loss, _ = segmentation_loss(logits, b["label"], self.lovasz_weight)
            (loss / micro_batches).backward()
        self.steps_log.add_voxels(len(batch["feat"]))
        return loss.detach()

    def optimizer_step(self) -> None:
        if self.clip_grad_norm is not None:  # gradients are already all-reduced: every rank clips alike
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.optimizer.step()
        self.step_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used (logged)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def train_epoch(self) -> bool:
        """The optimizer steps of ``self.epoch`` from its first undone micro-batch; True when stopped."""
        data, accum = self.data, self.data.accum
        data.batches.set_epoch(self.epoch)
        data.batches.skip, micro, self.skip_batches = self.skip_batches, self.skip_batches, 0
        micro_steps = data.micro_steps(self.epoch)
        group_loss = None  # summed over the micro-batches of the current optimizer step
        for batch in data.loader:
            # micro-batches of one optimizer step; the epoch's last step may have fewer
            first = micro // accum * accum
            size = min(first + accum, micro_steps) - first
            loss = self.micro_step(batch, size, sync=micro + 1 == first + size)
            group_loss = loss if micro == first else group_loss + loss
            micro += 1
            if micro < first + size:
                continue
            self.optimizer_step()
            self.steps_log.add_step(group_loss / size)
            if self.step_hook is not None:
                self.step_hook(self.step)
            if self.check_stop(micro):
                return True
            if self.step >= self.total_steps:
                break
            self.save_if_due(micro)
        return False

    def save_if_due(self, micro: int) -> None:
        """``last.pt`` every ``train.checkpoint_every_min`` minutes, so a killed job (``kill -9``, a node
        failure) loses minutes, not the rest of an epoch. Rank 0 alone: saving needs no other rank."""
        every = self.cfg.train.get("checkpoint_every_min")
        if every is None or time.perf_counter() - self.last_save < 60.0 * float(every):
            return
        # rank 0 alone, so no collective: weights whose loss diverged are not saved, and the next
        # flush (every rank, at log_every or the epoch's end) raises TrainingDiverged
        if self.env.is_main and self.steps_log.pending_finite():
            started = time.perf_counter()
            self.checkpointer.save(self.last_path, self.epoch, micro, self.step, self.best_miou)
            self.steps_log.exclude(time.perf_counter() - started)  # throughput counts training, not saving
        self.last_save = time.perf_counter()

    def check_stop(self, micro: int) -> bool:
        """Log when due; if any rank was asked to stop, write ``last.pt`` at this step and say so."""
        stop_at = self.cfg.train.get("stop_at_step")
        if stop_at is not None and self.step >= int(stop_at):
            self.stop.request(f"train.stop_at_step={stop_at}")
        stopping = dist_env.any_rank(self.stop.requested)
        first = self.step == self.reporter.start_step + 1  # the first line comes after one step, not log_every
        if stopping or first or self.step % self.reporter.log_every == 0 or self.step >= self.total_steps:
            self.steps_log.flush(self.step, self.step_lr, self.epoch)
        if not stopping:
            return False
        self.stop.reason = self.stop.reason or ANOTHER_RANK
        self.checkpointer.save(self.last_path, self.epoch, micro, self.step, self.best_miou)
        if self.env.is_main:
            log.warning("train: stopping at step %d (%s); %s written, rerun to resume", self.step, self.stop.reason,
                        self.last_path)
        return True

    def end_epoch(self) -> None:
        """Validation when due (best.pt on a new best), then ``last.pt``."""
        if self.done:
            self.end_of_training_batch_norms()
        val_every = int(self.cfg.train.val_every)
        has_val = len(self.cfg.dataset.splits.get("val", [])) > 0
        if has_val and val_every > 0 and (self.epoch % val_every == 0 or self.done):
            # not through DDP: validation shards may differ in size
            confusion = validate(unwrap(self.model), self.cfg, self.device, self.autocast)
            miou = mean_iou(confusion)
            self.last_val_epoch = self.epoch
            self.reporter.validation(self.step, self.epoch, confusion)
            if miou > self.best_miou:
                self.best_miou = miou
                self.checkpointer.save(self.best_path, self.epoch, 0, self.step, self.best_miou)
        self.checkpointer.save(self.last_path, self.epoch, 0, self.step, self.best_miou, finished=self.done)
        self.last_save = time.perf_counter()
        self.steps_log.restart_clock()  # throughput counts training, not validation or saving

    def end_of_training_batch_norms(self) -> None:
        """BatchNorm statistics of the final weights (:mod:`.training.bn_recalibration`) before the
        last validation and the finished ``last.pt``: first with drop-path on, kept for Monte-Carlo
        passes, then with it off, the model's own."""
        wanted = int(self.cfg.train.bn_recalibration_batches)
        model = unwrap(self.model)
        for stochastic in (True, False):
            self.data.batches.set_epoch(self.epoch)
            self.data.batches.skip = 0
            used = recalibrate_batch_norms(model, self.data.loader, self.device, wanted, self.autocast, stochastic)
            if stochastic:  # the same on every rank, whether or not this one had batches
                model.stochastic_norm_stats = norm_statistics(model) if wanted > 0 else None
        if self.env.is_main and used:
            log.info("train: BatchNorm statistics re-estimated on %d micro-batches per rank, with drop-path on "
                     "(for Monte-Carlo passes) and off", used)

    def finish(self, preempted: bool) -> dict:
        """Metrics (written by rank 0), then the end a stop asks for: re-raise its signal or raise."""
        stop, log_, env = self.stop, self.steps_log, self.env
        if stop.signum is None:
            stop.restore()
        metrics = {
            "steps": self.step, "epochs": self.epoch, "total_steps": self.total_steps, "final_loss": log_.last_loss,
            "best_val_miou": self.best_miou if self.best_miou > float("-inf") else None,
            "voxels_per_s": log_.total_voxels * env.world_size / log_.train_seconds if log_.train_seconds else None,
            "voxels_seen_per_rank": log_.total_voxels, "peak_gpu_mem_gb": peak_gpu_mem_gb(self.device),
            "peak_rss_gb": peak_rss_gb(), "seconds": time.perf_counter() - self.started,
            "world_size": env.world_size, "step_voxels": self.step_voxels, "micro_batches_per_step": self.data.accum,
            "batch_voxels": self.data.budget, "lr": self.lr, "preempted": preempted, "device": str(self.device),
        }
        if env.is_main:
            if not preempted:
                self.reporter.hparams(self.cfg, {"best_val_miou": metrics["best_val_miou"] or 0.0,
                                                 "final_loss": log_.last_loss})
            write_train_metrics(Path(self.cfg.run_dir), metrics)
        self.reporter.close()
        if stop.signum is not None or stop.reason == ANOTHER_RANK:  # never go on with a half-trained model
            dist_env.barrier()
            dist_env.teardown()
            if stop.signum is not None:  # a real signal: let its previous owner act (default: terminate)
                stop.reraise()
            raise TrainingInterrupted(f"training stopped by {stop.reason} at step {self.step}; {self.last_path} "
                                      "written; rerun the same command to resume")
        return {**metrics, "step_losses": log_.step_losses, "param_digest": param_digest(unwrap(self.model)),
                "windows": log_.windows}
