"""Who am I in a data-parallel job: rank, world size, local rank, master address and port.

The environment is read in this order:

1. torchrun-style variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
   ``MASTER_ADDR``, ``MASTER_PORT``): set by ``torchrun`` and exported by
   submitit's ``TorchDistributedEnvironment().export()``, so a submitit job
   that exported them is read exactly like a torchrun job;
2. Slurm (``srun`` sets ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``
   and ``SLURM_JOB_NODELIST``): the master is the first host of the node list
   (``scontrol show hostnames``; ``MASTER_ADDR`` or 127.0.0.1 when scontrol is
   absent), the port ``MASTER_PORT`` or one derived from the job id, so every
   task of a job agrees on it without talking to the others;
3. nothing: a single process (rank 0 of 1).

:func:`init` starts the default process group (NCCL when CUDA is there, gloo
otherwise) when the world has more than one process; :func:`teardown` ends it.
The getters below are safe to call before, after or without :func:`init`.
"""
from __future__ import annotations

import datetime
import os
import shutil
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from scalept.errors import ConfigError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job; ``source`` is ``torchrun``, ``slurm`` or ``single``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    source: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str | None:
    """First host name of a Slurm node list (``node[01-04],gpu7`` -> ``node01``) via scontrol."""
    if not nodelist or shutil.which("scontrol") is None:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def resolve_env(environ: dict[str, str] | None = None) -> DistEnv:
    """The :class:`DistEnv` described by ``environ`` (default ``os.environ``); starts nothing."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = env.get("SLURM_JOB_ID", "0")
        if "MASTER_PORT" in env:
            port = int(env["MASTER_PORT"])
        else:  # every task of the job derives the same port; jobs sharing a node rarely collide
            port = 20000 + int(job) % 20000 if job.isdigit() else DEFAULT_PORT
        host = _first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=host or env.get("MASTER_ADDR", "127.0.0.1"), master_port=port, source="slurm",
        )
    return DistEnv()


_ENV: DistEnv | None = None
_CONTROL: dist.ProcessGroup | None = None
_STORE: dist.TCPStore | None = None  # job_barrier's


def get_env() -> DistEnv:
    """This process's :class:`DistEnv` (resolved once, at :func:`init` or at the first call)."""
    global _ENV
    if _ENV is None:
        _ENV = resolve_env()
    return _ENV


def get_rank() -> int:
    """Global rank of this process, 0 .. world size - 1 (0 outside a job)."""
    return dist.get_rank() if dist.is_initialized() else get_env().rank


def get_world_size() -> int:
    """Number of processes of the job (1 outside a job)."""
    return dist.get_world_size() if dist.is_initialized() else get_env().world_size


def get_local_rank() -> int:
    """Rank of this process on its node: which GPU it drives."""
    return get_env().local_rank


def is_main() -> bool:
    """True on global rank 0, the one process that writes logs, TensorBoard and checkpoints."""
    return get_rank() == 0


def is_distributed() -> bool:
    """True while a process group of more than one process is running."""
    return dist.is_initialized() and dist.get_world_size() > 1


def device(wanted: str = "auto", key: str = "device") -> torch.device:
    """``auto``: ``cuda:<local rank>`` when CUDA is available, else the CPU; otherwise the device
    named (``cpu``, ``cuda``, ``cuda:<i>``), refused in one line naming the config ``key`` when it
    asks for CUDA and none is visible."""
    if wanted == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", get_local_rank() % torch.cuda.device_count())
        return torch.device("cpu")
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}={wanted} but no CUDA device is visible; use {key}=auto or cpu")
    return torch.device(wanted)


def init(backend: str | None = None, timeout_s: float = 1800.0) -> DistEnv:
    """Resolve the environment and, for more than one process, start the default process group.

    ``backend`` defaults to NCCL when CUDA is available and gloo otherwise. The
    CUDA device of the local rank is selected before the group starts. Inside a
    Slurm task with ``--cpus-per-task`` (and no ``OMP_NUM_THREADS``) torch uses that
    many threads: ranks sharing a node would otherwise each start one per core and
    wait on each other (spconv's CPU convolutions slow down about tenfold). Calling
    it again while a group runs returns the same environment.
    """
    global _ENV
    _ENV = resolve_env()
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and not os.environ.get("OMP_NUM_THREADS"):  # the task's cores, not every core of a shared node
        torch.set_num_threads(max(1, int(cpus)))
    if _ENV.world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(device())
        os.environ.setdefault("MASTER_ADDR", _ENV.master_addr)
        os.environ.setdefault("MASTER_PORT", str(_ENV.master_port))
        dist.init_process_group(backend, init_method=f"tcp://{_ENV.master_addr}:{_ENV.master_port}",
                                rank=_ENV.rank, world_size=_ENV.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return _ENV


def teardown() -> None:
    """End the process group (if any); the getters fall back to the environment afterwards."""
    global _CONTROL
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL = None


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def job_barrier(name: str, timeout_s: float = 1800.0) -> None:
    """Wait until every process of the job has reached ``name``, with or without a process group.

    For the launcher between the stages of one multi-task job: each stage starts and ends
    its own process group, so this uses a TCP store of its own on ``MASTER_PORT + 1``
    (served by rank 0, kept for the life of the process). No-op for a single process.
    """
    global _STORE
    env = resolve_env()
    if env.world_size <= 1:
        return
    if _STORE is None:
        _STORE = dist.TCPStore(env.master_addr, env.master_port + 1, env.world_size, env.rank == 0,
                               timeout=datetime.timedelta(seconds=timeout_s))
    _STORE.set(f"barrier/{name}/{env.rank}", "1")
    _STORE.wait([f"barrier/{name}/{rank}" for rank in range(env.world_size)])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over every rank, in place, and return it (unchanged for a single process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on at least one rank.

    Runs on a CPU (gloo) side group, so asking every step costs a small message
    and never waits for the GPU stream.
    """
    global _CONTROL
    if not is_distributed():
        return flag
    if _CONTROL is None:
        _CONTROL = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_CONTROL)
    return bool(value.item())
