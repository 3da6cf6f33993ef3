"""Who am I in a data-parallel job: rank, world size, local rank, master address and port.

The environment is read in this order:

1. torchrun-style variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
   ``MASTER_ADDR``, ``MASTER_PORT``), set by ``torchrun``;
2. an srun task (plain sbatch scripts and submitit jobs alike: ``SLURM_PROCID``,
   ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``, ``SLURM_JOB_NODELIST``): the master is
   ``SCALEPT_MASTER_ADDR`` or the first host of the node list (``scontrol show
   hostnames``), the port ``SCALEPT_MASTER_PORT``, ``MASTER_PORT`` or one derived from
   the job id, so every task of a step agrees on them without talking to the others;
   a batch script outside srun is one process, whatever ``SLURM_NTASKS`` says;
3. nothing: a single process (rank 0 of 1).

This is the one place that answers the question: the launcher, the sbatch scripts and
every stage read it.

:func:`session` holds the job's one process group (NCCL when CUDA is there, gloo
otherwise, started only when the world has more than one process) around the steps
of a job; :func:`init` and :func:`teardown` are its two halves. Its rendezvous is a
TCPStore that rank 0 serves on a socket bound to the master address only (not every
interface of its node); the other ranks connect to it.
The getters below are safe to call before, after or without :func:`init`.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from scalept.errors import ConfigError, ScalePTError

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
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:  # a task of an srun step (also submitit's)
        return _slurm_env(env)
    return DistEnv()


def _slurm_env(env) -> DistEnv:
    """An srun task: rank and world of its job step; every task derives the same master without talking."""
    rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"])
    if not 0 <= rank < world:
        raise ConfigError(f"SLURM_PROCID={rank} is outside the {world} tasks of SLURM_STEP_NUM_TASKS")
    job = env.get("SLURM_JOB_ID", "0")
    port = env.get("SCALEPT_MASTER_PORT") or env.get("MASTER_PORT")
    if port is None:  # jobs sharing a node rarely collide
        port = 20000 + int(job) % 20000 if job.isdigit() else DEFAULT_PORT
    host = env.get("SCALEPT_MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST",
                                                                       env.get("SLURM_NODELIST", "")))
    return DistEnv(rank=rank, world_size=world, local_rank=int(env.get("SLURM_LOCALID", 0)),
                   master_addr=host or env.get("MASTER_ADDR", "127.0.0.1"), master_port=int(port), source="slurm")


_ENV: DistEnv | None = None
_CONTROL: dist.ProcessGroup | None = None
_OWNED = False  # whether session() started the running group (and so ends it)
_STORE: dist.TCPStore | None = None  # the rendezvous of the running group
_LISTENER: socket.socket | None = None  # rank 0: the socket the store serves on, bound to the master address


def available_cores() -> int:
    """Cores this process may use (its affinity mask, e.g. a Slurm allocation), else every core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
    it again while a group runs returns the same environment. The rendezvous is
    :func:`_rendezvous`: rank 0 listens on the master address only.
    """
    global _ENV, _STORE
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
        timeout = datetime.timedelta(seconds=timeout_s)
        _STORE = _rendezvous(_ENV, timeout)
        try:
            dist.init_process_group(backend, store=_STORE, rank=_ENV.rank, world_size=_ENV.world_size,
                                    timeout=timeout)
        except BaseException:
            _close_store()
            raise
    return _ENV


def _variables(env: DistEnv) -> str:
    """The variables that set the master of ``env``, for error messages."""
    return "MASTER_ADDR / MASTER_PORT" if env.source == "torchrun" else "SCALEPT_MASTER_ADDR / SCALEPT_MASTER_PORT"


def _rendezvous(env: DistEnv, timeout: datetime.timedelta) -> dist.TCPStore:
    """The job's TCPStore: rank 0 serves it on a socket bound to the master address alone, the others connect.

    torch's own server would listen on every interface of rank 0's node; binding the socket
    here keeps it to the address every rank was told, and turns a wrong address or a busy
    port into one line.
    """
    global _LISTENER
    host = env.master_addr.strip("[]")  # an IPv6 literal may come bracketed
    if env.rank != 0:
        try:
            return dist.TCPStore(host, env.master_port, env.world_size, is_master=False, timeout=timeout)
        except (RuntimeError, OSError) as err:  # DistStoreError / DistNetworkError are RuntimeErrors
            raise ScalePTError(f"rank {env.rank} could not reach the master {host}:{env.master_port} within "
                               f"{timeout.total_seconds():.0f} s ({str(err).strip().splitlines()[0]}); check that "
                               f"rank 0 started and that {_variables(env)} name an address of its node") from None
    _LISTENER = _listen(host, env.master_port, _variables(env))
    try:  # the store closes the descriptor it is given: it gets a copy, _LISTENER keeps its own until teardown
        return dist.TCPStore(host, env.master_port, env.world_size, is_master=True, timeout=timeout,
                             master_listen_fd=os.dup(_LISTENER.fileno()))
    except (RuntimeError, OSError) as err:  # waits for every rank to connect
        _close_store()
        raise ScalePTError(f"rank 0 served {host}:{env.master_port} but not all {env.world_size} ranks connected "
                           f"within {timeout.total_seconds():.0f} s ({str(err).strip().splitlines()[0]}); check "
                           f"that every task started and can reach that address") from None
    except BaseException:
        _close_store()
        raise


def _listen(host: str, port: int, variables: str) -> socket.socket:
    """A TCP socket listening on ``host:port`` (IPv4, IPv6 or a host name), or one ConfigError line."""
    where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ConfigError(f"master address {where} does not resolve ({err.strerror}); "
                          f"set {variables} to an address of rank 0's node") from None
    failure: OSError | None = None
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a rerun need not wait out TIME_WAIT
            sock.bind(address)
            sock.listen(2048)
            return sock
        except OSError as err:
            sock.close()
            failure = failure or err
    raise _bind_error(failure, where, variables)


def _bind_error(err: OSError | None, where: str, variables: str) -> ConfigError:
    """One line saying why rank 0 could not listen on the master address and which variable fixes it."""
    reason = getattr(err, "strerror", None) or "no address to bind"
    if isinstance(err, OSError) and err.errno == errno.EADDRINUSE:
        return ConfigError(f"master port {where} is already in use on rank 0's node; set {variables} "
                           f"to a free port")
    if isinstance(err, OSError) and err.errno == errno.EADDRNOTAVAIL:
        return ConfigError(f"master address {where} is not an address of rank 0's node "
                           f"({socket.gethostname()}); set {variables} to one of its addresses")
    return ConfigError(f"rank 0 cannot listen on the master address {where} ({reason}); "
                       f"set {variables} to an address of its node and a free port")


def _close_store() -> None:
    """Drop the rendezvous store and close rank 0's listening socket."""
    global _STORE, _LISTENER
    _STORE = None
    if _LISTENER is not None:
        _LISTENER.close()
        _LISTENER = None


def teardown() -> None:
    """End the process group (if any) and its rendezvous; the getters fall back to the environment afterwards."""
    global _CONTROL, _OWNED
    if dist.is_initialized():
        dist.destroy_process_group()
    _close_store()
    _CONTROL, _OWNED = None, False


@contextlib.contextmanager
def session(backend: str | None = None):
    """The job's one process group, for as long as the outermost ``with`` lasts.

    The launcher opens it around every step of a multi-task job, so training, inference
    and the barriers between steps share one group and one rendezvous; a stage run on its
    own (tests, benchmarks, torchrun) opens it itself. Only the ``with`` that started the
    group ends it, so a stage inside the launcher's session leaves it running.
    """
    global _OWNED
    started = not dist.is_initialized()
    env = init(backend)
    if started and dist.is_initialized():
        _OWNED = True
    try:
        yield env
    finally:
        if started and _OWNED:
            teardown()


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


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
