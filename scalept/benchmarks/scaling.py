"""Data-parallel scaling on one host: ``python -m scalept.benchmarks.scaling``.

Starts 1, 2, 4 ... ranks as processes (:mod:`.scaling_rank`) with torchrun's variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, read by
:mod:`scalept.distributed`): NCCL
and one GPU per rank, or gloo on a CPU. It times the real stages on real-size tiles:

* training, weak scaling: every rank forwards ``--micro-batches`` micro-batches of the
  preset's ``train.batch_voxels`` per step at any world size (``train.step_voxels`` = N x
  that, null for one), ``--steps`` steps. Figures come from rank 0's logging windows after
  ``--warmup`` steps (rank 0 waits for the slowest rank at every all-reduce; its clock, as
  the stage's, leaves out its checkpoint writes). Efficiency: voxels/s(N) / (N x voxels/s(1)).
* inference, strong scaling: every frame of the sequences, one frame per chunk, shared by
  N ranks, with the 1-rank training's weights. Efficiency: frames/s(N) / (N x frames/s(1)),
  on the slowest rank's time without its start-up (model load, loader); end to end in the JSON.

All-reduce: a DDP communication hook runs DDP's default all-reduce and notes, per bucket,
when it was called (its gradients ready) and when its all-reduce had finished (CUDA events
on the streams; wall clock with gloo). Per step, ``allreduce`` is the union of those
intervals, time with an all-reduce in flight, which DDP overlaps with the rest of backward;
``exposed`` runs from the last bucket's call (backward's last gradient) to the end of every
all-reduce: what the step waits for. ``compute`` is the step less ``exposed``. Both include
waiting for a slower rank (tiles differ in size); an epoch's first step (others wait for rank
0's ``last.pt``) is left out. The hook adds a little Python per bucket; BatchNorm buffers
broadcast at every forward are not counted. The JSON's ``ddp`` gives the settings train.py wraps
DDP with (its defaults: 25 MB buckets, no gradient bucket views, no static graph). Peak memory:
CUDA's max allocated, else peak RSS. Every rank starts with NVLink multicast off (NO_MULTICAST).
``--compare-loss`` trains 1 rank and the largest world size on one global step (N x the
per-rank budget, accumulated on 1 rank) and gives both loss curves.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from scalept.launch import CONF_DIR
from scalept.steps import run_step, stage_config

# NVLink multicast (NVLS) stays off in every process this benchmark starts.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def compose_run(args, data: list[str], *extra: str):
    """conf/ composed for one benchmark run; ``args.override`` last, so the user's keys win."""
    optim = "adamw" if args.model == "ptv3" else "adamw_tiny"
    overrides = [
        f"data_dir={args.work / 'data'}", f"model={args.model}", f"optim={optim}", "sampling=hilbert",
        f"train={args.preset}", f"train.max_steps={args.steps}", "train.val_every=0", "train.resume=false",
        f"train.log_every={args.window}", f"train.num_workers={args.workers}", "train.checkpoint_every_min=null",
        "train.bn_recalibration_batches=0",  # after the last step, outside every figure: time saved per run
        f"infer.num_workers={args.workers}", "infer.frames_per_chunk=1", "infer.tta.rotations=[0]",  # one view
        f"dataset.splits.train=[{','.join(data)}]", f"dataset.splits.val=[{','.join(data)}]", "infer.splits=[val]",
    ]
    overrides += ["dataset=semantickitti", f"dataset.root={args.real}"] if args.real else \
        [f"dataset.synthetic.frames_per_sequence={args.synthetic_frames}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides + list(extra) + args.override)


def prepare_data(args) -> list[str]:
    """The sequences trained on and predicted: ``--sequences``, else the labelled ones of ``--real``, else
    ``--synthetic-sequences`` full-size streets generated here."""
    if args.real:
        from scalept.data.semantickitti import Sequence, list_sequences

        data = args.sequences or [s for s in list_sequences(args.real) if Sequence(args.real, s).has_labels]
    else:
        data = args.sequences or [f"{i:02d}" for i in range(args.synthetic_sequences)]
        run_step("synth", compose_run(args, data))
    run_step("preprocess", compose_run(args, data, "preprocess.splits=[train]"))
    return data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, threads: int) -> dict:
    """This process's environment, minus Slurm's, plus one rank's torchrun variables, its threads and NVLS off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
    for key, value in {**NO_MULTICAST, "OMP_WAIT_POLICY": "PASSIVE"}.items():  # the user's values win
        env.setdefault(key, value)
    return env


def run_ranks(phase: str, cfg, world: int, out: Path, args) -> list[dict]:
    """``phase`` (train or infer) of ``cfg`` on ``world`` rank processes; each rank's result, by rank."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "spec.json"
    spec.write_text(json.dumps({"phase": phase, "cfg": OmegaConf.to_container(stage_config(phase, cfg))}))
    port, procs = free_port(), []
    deadline = time.monotonic() + args.timeout
    with contextlib.ExitStack() as logs:
        for rank in range(world):
            log = logs.enter_context(open(out / f"rank{rank}.log", "w"))
            procs.append(subprocess.Popen([sys.executable, "-m", "scalept.benchmarks.scaling_rank", str(spec)],
                                          env=rank_env(rank, world, port, args.threads), stdout=log,
                                          stderr=subprocess.STDOUT))
        while any(proc.poll() is None for proc in procs) and time.monotonic() < deadline:
            if any(proc.returncode for proc in procs):  # one rank failed: the others would wait for it
                break
            time.sleep(0.2)
        for proc in procs:  # only the processes started here
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = sorted((proc.returncode < 0, r) for r, proc in enumerate(procs) if proc.returncode != 0)
    if failed:  # the first rank that failed by itself, rather than one killed here
        failed = [r for _, r in failed]
        tail = (out / f"rank{failed[0]}.log").read_text()[-3000:]
        why = f"ran past --timeout {args.timeout:.0f} s" if time.monotonic() >= deadline else \
            f"exited {procs[failed[0]].returncode}"
        raise SystemExit(f"{phase} with {world} ranks: rank {failed[0]} {why}; "
                         f"its log ({out / f'rank{failed[0]}.log'}) ends:\n{tail}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def steady_windows(windows: list, warmup: int) -> tuple[int, list]:
    """(steps left out, windows after them): whole logging windows until ``warmup`` steps are out."""
    skipped, index = 0, 0
    while index < len(windows) and skipped < warmup:
        skipped, index = skipped + windows[index][0], index + 1
    if index >= len(windows):
        raise SystemExit(f"no steady state after {skipped} warm-up steps: raise --steps or lower --warmup")
    return skipped, windows[index:]


def allreduce_means(rank: dict, skipped: int) -> tuple[float, float]:
    """(all-reduce ms, exposed ms) per step of one rank, after the warm-up and without epochs' first steps."""
    rows = [r for r in rank["allreduce"] if r[0] > skipped and r[0] not in rank["epoch_first_steps"]]
    return (sum(r[1] for r in rows) / len(rows), sum(r[2] for r in rows) / len(rows)) if rows else (0.0, 0.0)


def summarize_train(world: int, ranks: list[dict], warmup: int) -> dict:
    """One row of the weak-scaling table: rank 0's steady-state time, every rank's voxels."""
    first = ranks[0]
    skipped, windows = steady_windows(first["windows"], warmup)
    steps, seconds = sum(w[0] for w in windows), sum(w[2] for w in windows)
    voxels = sum(w[1] for r in ranks for w in steady_windows(r["windows"], warmup)[1])  # same windows on every rank
    step_ms = 1e3 * seconds / steps
    reduce_ms, exposed_ms = zip(*(allreduce_means(r, skipped) for r in ranks))
    allreduce, exposed = sum(reduce_ms) / world, sum(exposed_ms) / world
    return {
        "world_size": world, "steps": first["steps"], "steady_steps": steps, "warmup_steps": skipped,
        "epochs": first["epochs"], "steps_per_s": steps / seconds, "voxels_per_s": voxels / seconds,
        "ms_per_step": step_ms, "voxels_per_step_per_rank": voxels / steps / world,
        "batch_voxels": first["batch_voxels"], "micro_batches_per_step": first["micro_batches_per_step"],
        "allreduce_ms_per_step": allreduce, "exposed_allreduce_ms_per_step": exposed,
        "compute_ms_per_step": step_ms - exposed, "allreduce_share": allreduce / step_ms,
        "allreduce_ms_per_rank": list(reduce_ms), "exposed_allreduce_ms_per_rank": list(exposed_ms),
        "buckets": first["allreduce"][-1][3] if first["allreduce"] else 0,
        "peak_memory_gib_per_rank": [r["peak_memory_gib"] for r in ranks], "final_loss": first["final_loss"],
        "ddp": first["ddp"],
    }


def summarize_infer(world: int, ranks: list[dict]) -> dict:
    """One row of the strong-scaling table: the tile set's frames over the slowest rank's time."""
    frames = sum(r["frames_predicted"] for r in ranks)
    wall = max(r["seconds"] for r in ranks)
    work = max(r["seconds"] - r["phase_seconds"]["setup"] for r in ranks)
    return {"world_size": world, "frames": frames, "tiles": sum(r["tiles_predicted"] for r in ranks),
            "frames_per_s": frames / work, "frames_per_s_end_to_end": frames / wall, "seconds": work,
            "seconds_end_to_end": wall, "frames_per_rank": [r["frames_predicted"] for r in ranks],
            "peak_memory_gib_per_rank": [r["peak_memory_gib"] for r in ranks]}


def add_efficiency(rows: list[dict], key: str, name: str, per_rank: bool = True) -> None:
    """``row[name]`` = row[key] / (N x the 1-rank row's; 1 x with ``per_rank`` false), in place."""
    base = next(r[key] for r in rows if r["world_size"] == 1)
    for row in rows:
        row[name] = row[key] / ((row["world_size"] if per_rank else 1) * base)


def train_scaling(args, data: list[str], sizes: list[int]) -> list[dict]:
    """Weak scaling: the same micro-batches per rank and step at every world size, ``--steps`` steps each."""
    budget = args.batch_voxels or compose_run(args, data).train.batch_voxels
    rows = []
    for world in sizes:
        step = "null" if args.micro_batches == 1 else world * args.micro_batches * budget
        cfg = compose_run(args, data, f"train.batch_voxels={budget}", f"train.step_voxels={step}",
                          f"run_dir={args.work / 'runs' / f'train-w{world}'}")
        ranks = run_ranks("train", cfg, world, args.work / "logs" / f"train-w{world}", args)
        rows.append(summarize_train(world, ranks, args.warmup))
        print_train(rows[-1])
    add_efficiency(rows, "voxels_per_s", "efficiency")
    add_efficiency(rows, "steps_per_s", "steps_efficiency", per_rank=False)  # step time(1) / step time(N)
    return rows


def infer_scaling(args, data: list[str], sizes: list[int]) -> list[dict]:
    """Strong scaling: every frame of ``data`` predicted by N ranks with the 1-rank training's weights."""
    weights = args.work / "runs" / "train-w1" / "checkpoints" / "last.pt"
    rows = []
    for world in sizes:
        cfg = compose_run(args, data, f"infer.checkpoint={weights}", f"run_dir={args.work / 'runs' / f'infer-w{world}'}")
        rows.append(summarize_infer(world, run_ranks("infer", cfg, world, args.work / "logs" / f"infer-w{world}", args)))
        print_infer(rows[-1])
    add_efficiency(rows, "frames_per_s", "efficiency")
    add_efficiency(rows, "frames_per_s_end_to_end", "efficiency_end_to_end")
    return rows


def compare_loss(args, data: list[str], world: int) -> dict:
    """1 rank and ``world`` ranks, same global step (``world`` x the per-rank budget): both loss curves."""
    budget = args.batch_voxels or compose_run(args, data).train.batch_voxels
    curves = {}
    for n in (1, world):
        cfg = compose_run(args, data, f"train.batch_voxels={budget}", f"train.step_voxels={world * budget}",
                          f"run_dir={args.work / 'runs' / f'loss-w{n}'}")
        first = run_ranks("train", cfg, n, args.work / "logs" / f"loss-w{n}", args)[0]
        curves[n] = {"losses": [loss for _, loss in first["step_losses"]],
                     "micro_batches_per_step": first["micro_batches_per_step"], "lr": first["lr"]}
    final = {n: sum(c["losses"][-args.window:]) / len(c["losses"][-args.window:]) for n, c in curves.items()}
    return {"world_sizes": [1, world], "step_voxels": world * budget, "batch_voxels": budget,
            "final_loss_steps": args.window, "final_loss": {str(n): v for n, v in final.items()},
            "final_loss_relative_difference": abs(final[world] - final[1]) / abs(final[1]),
            "max_abs_step_difference": max(abs(a - b) for a, b in zip(curves[1]["losses"], curves[world]["losses"])),
            "curves": {str(n): c for n, c in curves.items()}}


TRAIN_HEADER = ("train: weak scaling, ms per step (all-reduce: mean over ranks; peak: the largest rank's)\n"
                "       ranks  steps/s     voxels/s  vox/step/rank   eff   ms/step   compute allreduce   exposed  "
                "peak GiB")


def print_train(row: dict) -> None:
    eff = f"{row['efficiency']:6.2f}" if "efficiency" in row else "     -"
    print(f"train  {row['world_size']:>5} {row['steps_per_s']:8.3f} {row['voxels_per_s']:12,.0f} "
          f"{row['voxels_per_step_per_rank']:14,.0f} {eff} {row['ms_per_step']:9.1f} {row['compute_ms_per_step']:9.1f} "
          f"{row['allreduce_ms_per_step']:9.1f} {row['exposed_allreduce_ms_per_step']:9.1f} "
          f"{max(row['peak_memory_gib_per_rank']):9.2f}", flush=True)


def print_infer(row: dict) -> None:
    eff = f"{row['efficiency']:6.2f}" if "efficiency" in row else "     -"
    e2e = f" {row['efficiency_end_to_end']:6.2f}" if "efficiency_end_to_end" in row else ""
    print(f"infer  {row['world_size']:>5} {row['frames_per_s']:8.2f} frames/s {eff}   end to end "
          f"{row['frames_per_s_end_to_end']:6.2f} frames/s{e2e}   {row['frames']} frames "
          f"{row['frames_per_rank']}, peak {max(row['peak_memory_gib_per_rank']):.2f} GiB", flush=True)


def print_tables(report: dict) -> None:
    print(f"\n{report['device']}, {report['backend']}, {report['model']} train={report['preset']}\n{TRAIN_HEADER}")
    for row in report["train"]:
        print_train(row)
    if report["infer"]:
        print("infer: strong scaling, the slowest rank's time without start-up (end to end: with it)")
        for row in report["infer"]:
            print_infer(row)
    if report.get("compare_loss"):
        c = report["compare_loss"]
        finals = ", ".join(f"{n} rank(s) {v:.4f}" for n, v in c["final_loss"].items())
        print(f"loss, global step of {c['step_voxels']:,} voxels: final (mean of the last {c['final_loss_steps']} "
              f"steps) {finals}; relative difference {c['final_loss_relative_difference']:.3f}")


def parse_args(argv=None) -> argparse.Namespace:
    """Options; the defaults follow the machine (GPUs: ptv3 outdoor, 1,2,4 ranks; CPU: ptv3_tiny embedded, 1,2)."""
    gpus = torch.cuda.device_count()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", default=",".join(str(n) for n in (1, 2, 4) if n <= gpus) if gpus else "1,2",
                        help="comma-separated rank counts; 1 (the baseline) must be one of them")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of every training run")
    parser.add_argument("--window", type=int, default=5, help="steps per logging window (train.log_every)")
    parser.add_argument("--warmup", type=int, help="steps left out of the steady state (default: --window)")
    parser.add_argument("--preset", default="outdoor" if gpus else "embedded", help="conf/train option")
    parser.add_argument("--model", default="ptv3" if gpus else "ptv3_tiny", choices=["ptv3", "ptv3_tiny"])
    parser.add_argument("--batch-voxels", type=int, help="voxels per rank per micro-batch (default: the preset's)")
    parser.add_argument("--micro-batches", type=int, default=1, help="micro-batches per rank per training step")
    parser.add_argument("--workers", type=int, default=4 if gpus else 0, help="loader processes per rank")
    parser.add_argument("--threads", type=int, help="threads per rank (default: OMP_NUM_THREADS, else cores / "
                        "the largest world size, so every world size gets the same cores per rank)")
    parser.add_argument("--stages", default="train,infer", help="train, infer or both (infer needs train's 1 rank)")
    parser.add_argument("--compare-loss", action="store_true",
                        help="also train 1 rank and the largest world size on the same global step")
    parser.add_argument("--real", type=Path, help="SemanticKITTI root (default: synthetic streets made here)")
    parser.add_argument("--sequences", type=lambda text: text.split(","),
                        help="comma-separated sequences to train on and predict (default: every one)")
    parser.add_argument("--synthetic-sequences", type=int, default=16 if gpus else 4, help="full-size streets")
    parser.add_argument("--synthetic-frames", type=int, default=8, help="frames per synthetic street")
    parser.add_argument("--work", type=Path, help="data, runs and rank logs (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one run of all its ranks may take")
    parser.add_argument("--json", type=Path, default=Path("scaling-benchmark.json"))
    parser.add_argument("override", nargs="*", help="extra Hydra overrides for every run, e.g. train.amp=false")
    args = parser.parse_args(argv)
    args.warmup = args.window if args.warmup is None else args.warmup
    if not set(args.stages.split(",")) <= {"train", "infer"}:
        parser.error(f"--stages={args.stages}: train, infer or train,infer")
    args.sizes = sorted({int(n) for n in args.world_sizes.split(",") if n})
    if 1 not in args.sizes:
        parser.error("--world-sizes must include 1: efficiency is measured against one rank")
    if gpus and args.sizes[-1] > gpus:
        parser.error(f"--world-sizes asks for {args.sizes[-1]} ranks, one GPU each, but {gpus} are visible")
    cores = len(os.sched_getaffinity(0))
    args.threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or max(1, cores // args.sizes[-1])
    args.work = (args.work or Path(tempfile.mkdtemp(prefix="scalept-scaling-"))).resolve()
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    for key, value in NO_MULTICAST.items():
        os.environ.setdefault(key, value)
    stages = set(args.stages.split(","))
    data = prepare_data(args)
    gpu = torch.cuda.device_count() > 0
    report = {"device": torch.cuda.get_device_name() if gpu else f"cpu, {args.threads} thread(s) per rank",
              "backend": "nccl" if gpu else "gloo", "torch": torch.__version__, "model": args.model,
              "preset": args.preset, "world_sizes": args.sizes, "steps": args.steps, "warmup": args.warmup,
              "window": args.window, "workers": args.workers, "overrides": args.override,
              "data": (f"real scans of {args.real}" if args.real else f"synthetic, {args.synthetic_frames} frames "
                       "a street") + f"; sequences {', '.join(data)}",
              "environment": {k: os.environ[k] for k in NO_MULTICAST}, "train": [], "infer": []}
    print(TRAIN_HEADER, flush=True)
    if "train" in stages or "infer" in stages:  # inference predicts with the 1-rank training's weights
        report["train"] = train_scaling(args, data, args.sizes if "train" in stages else [1])
    if "infer" in stages:
        report["infer"] = infer_scaling(args, data, args.sizes)
    if args.compare_loss:
        report["compare_loss"] = compare_loss(args, data, args.sizes[-1])
    print_tables(report)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json} (runs and rank logs in {args.work})")
    return report


if __name__ == "__main__":
    main()
