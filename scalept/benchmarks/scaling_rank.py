"""One rank of a ``python -m scalept.benchmarks.scaling`` run: ``python -m scalept.benchmarks.scaling_rank SPEC``.

:func:`scalept.benchmarks.scaling.run_ranks` starts one such process per rank with torchrun's
variables and a spec file (the phase and the stage's config). The rank runs the real stage and
writes its figures to ``rank<N>.json`` beside the spec: for training, the stage's result with
every step's all-reduce intervals (:class:`AllreduceTimer`); for inference, the stage's summary;
peak memory for both. The parent module's docstring defines the figures.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks


class AllreduceTimer:
    """A DDP communication hook: DDP's default all-reduce, with each bucket's start and end noted per step."""

    def __init__(self):
        self.cuda, self.current, self.steps = False, [], {}
        self.ddp: dict = {}

    def attach(self, model: torch.nn.Module) -> None:
        """Register on a DDP model (a single process has no all-reduce) and note DDP's settings."""
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return
        self.cuda = next(model.parameters()).device.type == "cuda"
        self.ddp = {"bucket_cap_mb": model.bucket_bytes_cap / 2**20, "gradient_as_bucket_view":
                    model.gradient_as_bucket_view, "static_graph": model.static_graph,
                    "find_unused_parameters": model.find_unused_parameters,
                    "broadcast_buffers": model.broadcast_buffers}
        model.register_comm_hook(None, self.hook)

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()  # on the current stream: in the callback, after the all-reduce on its stream
        return event

    def hook(self, group, bucket):
        record = [self.now(), None]
        self.current.append(record)

        def done(fut):
            record[1] = self.now()
            return fut.value()

        return default_hooks.allreduce_hook(group, bucket).then(done)

    def end_step(self, step: int) -> None:
        """``train.run``'s step hook: the buckets noted since the last step belong to ``step``."""
        self.steps[step], self.current = self.current, []

    def per_step(self) -> list[tuple[int, float, float, int]]:
        """(step, all-reduce ms, exposed ms, buckets) of every step that all-reduced."""
        if self.cuda:
            torch.cuda.synchronize()
        rows = []
        for step, records in sorted(self.steps.items()):
            if not records:
                continue
            first = records[0][0]
            spans = sorted((self.ms(first, a), self.ms(first, b)) for a, b in records)
            busy, reach = 0.0, float("-inf")
            for start, end in spans:  # the union of the intervals
                busy += max(0.0, end - max(start, reach))
                reach = max(reach, end)
            rows.append((step, busy, reach - max(s for s, _ in spans), len(spans)))
        return rows

    def ms(self, first, mark) -> float:
        return first.elapsed_time(mark) if self.cuda else 1e3 * (mark - first)


def peak_memory_gib() -> float:
    """CUDA's peak allocated memory of this process, else its peak RSS (kB on Linux)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def epoch_first_steps(cfg, rank: int, world: int) -> list[int]:
    """The first optimizer step of every epoch after the first, as the stage plans them."""
    from scalept.training.data import build_train_data

    data = build_train_data(cfg, rank, world, torch.device("cpu"), int(cfg.seed))
    firsts, step = [], 0
    for epoch in range(data.epochs):
        firsts.append(step + 1)
        step += -(-data.micro_steps(epoch) // data.accum)
    return firsts[1:]


def rank_main(spec_path: Path) -> None:
    """One rank of a run (a process started by :func:`run_ranks`): the stage, then its figures as JSON."""
    spec = json.loads(spec_path.read_text())
    cfg = OmegaConf.create(spec["cfg"])
    OmegaConf.set_struct(cfg, True)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if spec["phase"] == "train":
        from scalept import train

        timer = AllreduceTimer()
        result = train.run(cfg, step_hook=timer.end_step, model_hook=timer.attach)
        keep = ("steps", "epochs", "final_loss", "step_losses", "windows", "batch_voxels", "micro_batches_per_step",
                "step_voxels", "lr")
        figures = {**{k: result[k] for k in keep}, "allreduce": timer.per_step(), "ddp": timer.ddp,
                   "epoch_first_steps": epoch_first_steps(cfg, rank, world)}
    else:
        from scalept import infer

        figures = infer.run(cfg)
    figures["peak_memory_gib"] = peak_memory_gib()
    (spec_path.parent / f"rank{rank}.json").write_text(json.dumps(figures) + "\n")


if __name__ == "__main__":
    rank_main(Path(sys.argv[1]))
