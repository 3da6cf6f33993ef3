"""The synth stage (``stage=synth``): the synthetic dataset of ``dataset.splits``, missing frames only.

Sequences are independent (each street comes from (seed, sequence) alone), so they are
generated in parallel, one process per sequence, on the cores this process may use
(``dataset.synthetic.workers``); the files are the same whatever the number of processes.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from omegaconf import DictConfig

from scalept.data.dataset import split_sequences
from scalept.distributed import available_cores
from scalept.errors import ConfigError
from scalept.plan import Plan

from .generate import generate_dataset

log = logging.getLogger("scalept")

# The sub-configs this stage reads (scalept.steps hands it these and nothing else).
READS = ("dataset", "stage")


def _sequences(cfg: DictConfig) -> list[str]:
    return split_sequences(cfg.dataset.splits, list(cfg.dataset.splits), "dataset.splits")


def frames_on_disk(root: str | os.PathLike, sequence: str) -> int:
    """Scans of one sequence already written (``velodyne/*.bin``)."""
    return len(list((Path(root) / "sequences" / sequence / "velodyne").glob("*.bin")))


def plan(cfg: DictConfig) -> Plan:
    """Sequences with fewer frames on disk than ``dataset.synthetic.frames_per_sequence`` (none for real data)."""
    settings = cfg.dataset.get("synthetic")
    if settings is None:
        return Plan("synth", 0)
    wanted = int(settings.frames_per_sequence)
    sequences = _sequences(cfg)
    todo = [f"sequence {s}: {have} of {wanted} frames" for s in sequences
            if (have := frames_on_disk(cfg.dataset.root, s)) < wanted]
    return Plan("synth", len(sequences), todo, [f"{cfg.dataset.root}/sequences"])


def workers_for(setting: int | None, jobs: int) -> int:
    """Processes to generate ``jobs`` sequences with: the setting, else the cores this process may use."""
    cores = available_cores()
    return max(1, min(jobs, cores if setting is None else int(setting)))


def run(cfg: DictConfig) -> None:
    """Generate the synthetic dataset (frames that already exist are kept)."""
    settings = cfg.dataset.get("synthetic")
    if settings is None:
        if cfg.stage.name == "synth":
            raise ConfigError(f"stage=synth needs dataset=synthetic; dataset={cfg.dataset.name} is real data")
        log.info("dataset=%s is real data: nothing to generate", cfg.dataset.name)
        return
    frames, sequences = int(settings.frames_per_sequence), _sequences(cfg)
    workers = workers_for(settings.get("workers"), len(sequences))
    # generate_dataset's positional arguments, one sequence per call
    calls = [(str(cfg.dataset.root), {s: frames}, int(settings.seed), int(settings.azimuth_steps), 64, False,
              sys.stderr.isatty()) for s in sequences]
    if workers == 1:
        folders = [generate_dataset(*call)[0] for call in calls]
    else:  # forkserver: the workers start clean, without the threads torch may have started here
        log.info("synth: %d sequences on %d processes", len(sequences), workers)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
            folders = [paths[0] for paths in pool.map(generate_dataset, *zip(*calls))]
    for folder in folders:
        found = frames_on_disk(cfg.dataset.root, folder.name)
        if found > frames:  # the later stages read every frame of a sequence
            log.warning("synth: %s holds %d frames, more than dataset.synthetic.frames_per_sequence=%d, and every "
                        "one of them is used; delete the folder (or set another data_dir) to get %d", folder, found,
                        frames, frames)
    log.info("synth: dataset ready under %s", cfg.dataset.root)
