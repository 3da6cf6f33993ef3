"""Rank / world / master resolution (Slurm, torchrun, nothing) and a real 2-process gloo DDP training on CPU."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gloo_ranks import free_port, run_ranks
from tiny_training import make_tiny_data

from scalept import distributed
from scalept.distributed import DistEnv, resolve_env
from scalept.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_nothing_set_is_a_single_process():
    assert resolve_env({}) == DistEnv(rank=0, world_size=1, local_rank=0, source="single")


def test_torchrun_variables():
    env = resolve_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node3",
                       "MASTER_PORT": "1234"})
    assert env == DistEnv(5, 8, 1, "node3", 1234, "torchrun")


def test_torchrun_variables_win_over_slurm():
    # torchrun started inside a Slurm step: its own variables describe the world
    env = resolve_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "a", "MASTER_PORT": "9",
                       "SLURM_PROCID": "7", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "3"})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (1, 2, 1, "torchrun")


def test_slurm_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    env = resolve_env({"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123",
                       "SLURM_JOB_NODELIST": "gpu[01-02]"})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (3, 4, 1, "slurm")
    assert env.master_addr == "127.0.0.1" and env.master_port == 20123
    env = resolve_env({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "MASTER_ADDR": "head", "MASTER_PORT": "4321"})
    assert (env.master_addr, env.master_port, env.local_rank) == ("head", 4321, 0)
    env = resolve_env({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]",
                       "SCALEPT_MASTER_ADDR": "127.0.0.1", "SCALEPT_MASTER_PORT": "2345"})  # slurm/local-cluster.sh
    assert (env.rank, env.master_addr, env.master_port) == (1, "127.0.0.1", 2345)


def test_a_batch_script_outside_srun_is_one_process():
    # sbatch sets SLURM_NTASKS for the whole job, but only srun starts its tasks
    assert resolve_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}).world_size == 1


def test_a_rank_outside_its_step_is_one_line():
    with pytest.raises(ConfigError, match="SLURM_PROCID=2 is outside the 2 tasks"):
        resolve_env({"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "2"})


def test_slurm_master_is_the_first_host_of_the_nodelist(monkeypatch, tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    env = resolve_env({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0",
                       "SLURM_JOB_NODELIST": "gpu[07-08]"})
    assert env.master_addr == "gpu07"


def test_getters_outside_a_job(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    distributed.init()
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.get_local_rank()) == (0, 1, 0)
    assert distributed.is_main() and not distributed.is_distributed()
    import torch

    t = torch.ones(3)
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.0, 1.0, 1.0]
    distributed.barrier()
    distributed.teardown()


RANK_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from scalept import distributed
from scalept.train import run
from tiny_training import compose_tiny
cfg = compose_tiny({data!r}, {run_dir!r}, "train.max_steps=3", "train.step_voxels=18000", "train.label_fraction=0.5",
                   "train.val_every=1")
result = run(cfg)
print("RESULT " + json.dumps({{"rank": distributed.get_env().rank, "world": result["world_size"],
                               "digest": result["param_digest"], "losses": result["step_losses"],
                               "best": result["best_val_miou"]}}))
"""


@pytest.mark.slow
def test_two_rank_gloo_training_keeps_replicas_identical(tmp_path_factory, tmp_path):
    data = make_tiny_data(tmp_path_factory.getbasetemp() / "tiny-data")  # shared with test_train
    run_dir = tmp_path / "run"
    outputs = run_ranks(RANK_SCRIPT.format(tests=str(ROOT / "tests"), data=str(data), run_dir=str(run_dir)))
    assert sorted(o["rank"] for o in outputs) == [0, 1]
    assert all(o["world"] == 2 for o in outputs)
    assert outputs[0]["digest"] == outputs[1]["digest"]  # gradients were averaged: same parameters
    assert outputs[0]["losses"] == outputs[1]["losses"] and len(outputs[0]["losses"]) == 3  # rank-averaged
    assert outputs[0]["best"] == pytest.approx(outputs[1]["best"])  # confusion summed over both ranks
    # only rank 0 wrote: one metrics file, checkpoints, one TensorBoard directory
    metrics = json.loads((run_dir / "train_metrics.json").read_text())
    # 18,000 voxels a step over 2 ranks with micro-batches of at most 4,500: 2 micro-batches per rank
    assert metrics["world_size"] == 2 and metrics["micro_batches_per_step"] == 2
    assert 12_000 <= metrics["step_voxels"] <= 18_000
    assert (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "tb").is_dir()


GROUP_SCRIPT = """
import sys
from scalept import distributed
import torch
with distributed.session("gloo") as env:
    total = distributed.all_reduce_sum(torch.tensor([float(env.rank + 1)]))
    print(f"SUM {env.rank} {total.item():g}", flush=True)
    if env.rank == 0:
        sys.stdin.readline()  # the test reads the listening sockets meanwhile
    distributed.barrier()
"""


def _listening(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on ``port``, read from /proc/net/tcp and tcp6."""
    found = set()
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(socket.inet_ntop(family, raw))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the listening sockets from /proc/net/tcp")
def test_two_gloo_ranks_rendezvous_on_the_master_address_only():
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(SLURM_STEP_NUM_TASKS="2", SCALEPT_MASTER_ADDR="127.0.0.1", SCALEPT_MASTER_PORT=str(port),
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    procs = [subprocess.Popen([sys.executable, "-c", GROUP_SCRIPT], cwd=ROOT, env={**env, "SLURM_PROCID": str(rank)},
                              text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for rank in range(2)]
    try:
        first = procs[0].stdout.readline()  # rank 0 prints its sum once both ranks joined, then waits on stdin
        listening = _listening(port)
        procs[0].stdin.write("\n")
        procs[0].stdin.flush()
        outputs = [first + p.communicate(timeout=120)[0] for p in procs]
    finally:
        for proc in procs:
            proc.kill() if proc.poll() is None else None
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "SUM 0 3" in outputs[0] and "SUM 1 3" in outputs[1], outputs  # 1 + 2 over both ranks
    assert listening == {"127.0.0.1"}, listening  # not 0.0.0.0 or ::


def _rank0(monkeypatch, addr: str, port: int) -> None:
    """This process as rank 0 of 2 with the master given; the module's resolved env is restored afterwards."""
    monkeypatch.setattr(distributed, "_ENV", None)
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("SCALEPT_MASTER_ADDR", addr)
    monkeypatch.setenv("SCALEPT_MASTER_PORT", str(port))


def test_a_master_address_not_on_rank_0s_node_is_one_line(monkeypatch):
    port = free_port()
    _rank0(monkeypatch, "192.0.2.1", port)  # TEST-NET-1: never an address of this machine
    started = time.monotonic()
    with pytest.raises(ConfigError) as raised:
        distributed.init("gloo", timeout_s=60)
    message = str(raised.value)
    assert time.monotonic() - started < 5 and "\n" not in message
    assert f"192.0.2.1:{port} is not an address of rank 0's node" in message and "SCALEPT_MASTER_ADDR" in message
    assert not distributed.is_distributed() and distributed._LISTENER is None


def test_a_busy_master_port_is_one_line(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _rank0(monkeypatch, "127.0.0.1", port)
        with pytest.raises(ConfigError, match=rf"^master port 127.0.0.1:{port} is already in use .*SCALEPT_MASTER_PORT"):
            distributed.init("gloo", timeout_s=60)


def test_an_unknown_master_host_is_one_line(monkeypatch):
    _rank0(monkeypatch, "no-such-host.invalid", free_port())
    with pytest.raises(ConfigError, match=r"^master address no-such-host.invalid:\d+ does not resolve"):
        distributed.init("gloo", timeout_s=60)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_rank_0_listens_on_ipv4_ipv6_and_host_names(host):
    if ":" in host and not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        sock = distributed._listen(host, 0, "SCALEPT_MASTER_ADDR")
    except ConfigError as err:
        pytest.skip(f"this machine has no {host}: {err}")
    with sock:
        assert sock.getsockname()[0] in {"127.0.0.1", "::1"}
