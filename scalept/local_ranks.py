"""Data-parallel ranks on this machine for ``cluster=local`` (the key ``local_ranks``), as torchrun would start them.

Why: on a CPU one process barely uses a second core (PyTorch's intra-op threads gain
little on ptv3_tiny's small tensors: 45k voxels/s with two threads, 44k with one), while two
single-threaded ranks train 1.3x (the embedded default's 40k-voxel steps, 20k per rank) to 1.8x
(40k per rank) as many voxels per second (README, "Data-parallel scaling"). On a machine with
several GPUs, one rank per GPU is what a user expects.

The launcher process starts the ranks with :func:`torch.multiprocessing.start_processes`
(which ends the others when one fails) and waits; each rank gets torchrun's variables,
which :mod:`scalept.distributed` reads, and a share of the cores. Rank 0 logs as the
launcher would (console and Hydra's job log); the others print warnings and errors only.
"""
from __future__ import annotations

import logging
import logging.config
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

from scalept.distributed import available_cores
from scalept.errors import ConfigError, ScalePTError, one_line

log = logging.getLogger("scalept")

# auto on a machine without GPUs: one rank per core, at most this many. More ranks split
# the embedded default's 40k-voxel optimizer step into micro-batches below one tile.
MAX_CPU_RANKS = 4
# The steps worth several processes; synth and fuse run on rank 0 alone, tiling is quick.
PARALLEL_STEPS = ("train", "infer")
# Seconds the other ranks get to end on their own once one has failed (and to leave their
# one-line error) before they are sent SIGTERM.
GRACE_S = 10


def rank_count(setting, steps: list[str]) -> int:
    """Ranks for ``local_ranks=setting`` (``auto``: one per GPU, else one per core up to
    :data:`MAX_CPU_RANKS`); 1 when no step of ``steps`` runs in parallel."""
    if not any(step in PARALLEL_STEPS for step in steps):
        return 1
    if setting != "auto":
        return int(setting)  # checked by scalept.config_check
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return gpus or min(available_cores(), MAX_CPU_RANKS)


def _free_port() -> int:
    """A TCP port of the loopback interface that nothing listens on now (the ranks' rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _job_logging() -> dict | None:
    """Hydra's logging config of this job, resolved (its log file's path included), or None outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return OmegaConf.to_container(HydraConfig.get().job_logging, resolve=True)


def start(cfg: DictConfig, ranks: int, target: Callable[[DictConfig], None]) -> None:
    """Run ``target(cfg)`` (the launcher's steps) in ``ranks`` processes of one process group on this
    machine and wait for them.

    When a rank fails, the others get :data:`GRACE_S` to end on their own before torch's spawn
    stops them. The error raised here, once, is the one line of a :class:`ScalePTError` that any
    rank left in ``errors_dir``: a rank waiting on the one that failed fails in turn, with a mere
    "connection closed", and may be seen first. Without such a line: the failed rank's traceback,
    or a signal (e.g. out of memory) as one line.
    """
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)  # Hydra's own settings: the ranks run without Hydra
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, available_cores() // ranks)
    errors_dir = tempfile.mkdtemp(prefix="scalept-ranks-")
    settings = {"config": plain, "logging": _job_logging(), "world_size": ranks, "threads": threads,
                "port": _free_port(), "launcher_pid": os.getpid(), "errors_dir": errors_dir}
    log.info("local: %d ranks on this machine (local_ranks=%s), %d thread(s) each", ranks, cfg.local_ranks, threads)
    try:
        context = mp.start_processes(_rank_main, args=(settings, target), nprocs=ranks, join=False,
                                     start_method="spawn")
        while not context.join(grace_period=GRACE_S):
            pass
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as err:
        failed = f"rank-{err.error_index}.txt"  # its own line first, when it left one
        lines = sorted(Path(errors_dir).glob("rank-*.txt"), key=lambda p: p.name != failed)
        if lines:
            code, line = lines[0].read_text().split("\n", 1)
            raise (ConfigError if code == "2" else ScalePTError)(line) from None
        if isinstance(err, mp.ProcessExitedException) and err.exit_code < 0:
            raise ScalePTError(f"rank {err.error_index} of {ranks} was killed by signal {-err.exit_code} (SIGKILL "
                               "often means out of memory: lower local_ranks or train.batch_voxels)") from None
        raise
    finally:
        shutil.rmtree(errors_dir, ignore_errors=True)


def _end_with_the_launcher(launcher_pid: int) -> None:
    """Linux: SIGTERM this rank when the launcher dies (killed, not only interrupted), so no rank goes
    on writing into a run that a rerun is about to continue; training checkpoints on SIGTERM."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != launcher_pid:  # the launcher died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def _rank_main(index: int, settings: dict, target: Callable[[DictConfig], None]) -> None:
    """One rank: torchrun's variables, its threads, logging, then the launcher's steps in the process group."""
    _end_with_the_launcher(settings["launcher_pid"])
    os.environ.update({"RANK": str(index), "LOCAL_RANK": str(index), "WORLD_SIZE": str(settings["world_size"]),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(settings["port"])})
    torch.set_num_threads(settings["threads"])
    if index == 0 and settings["logging"] is not None:
        logging.config.dictConfig(settings["logging"])
    else:  # one rank logs progress; every rank reports its warnings and errors
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                            format=f"[%(asctime)s][%(name)s][%(levelname)s] - rank {index}: %(message)s")
    try:
        target(OmegaConf.create(settings["config"]))
    except ScalePTError as err:  # the launcher prints one rank's line, once (see start)
        line, code = one_line(err)
        Path(settings["errors_dir"], f"rank-{index}.txt").write_text(f"{code}\n{line}")
        sys.exit(code)
