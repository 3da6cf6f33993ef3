"""The training stage itself, timed: ``python -m scalept.benchmarks.train_stage``.

Unlike ``benchmarks.model`` (one model step on a fixed batch), this runs ``stage=train``
as a user does — loader workers, augmentation, voxelization, voxel-budget batches, loss,
optimizer, logging — on real-size tiles (Hilbert windows of 40k points at 0.05 m) for a
fixed number of optimizer steps per preset, and prints steady-state voxels/s, ms per
optimizer step, peak allocated and reserved GPU memory, and the share of the steady
state the GPU was busy (NVML's utilisation: time with a kernel running). The first
logging window (start-up, kernel plans, allocator growth) is left out of every figure.

Data: full-size synthetic streets generated here (``--synthetic-sequences`` x
``--synthetic-frames``, one process per sequence), or the scans under ``--real``.
Presets: ``small_gpu`` and ``outdoor`` as shipped, and ``uncapped`` (one micro-batch of
``--uncapped-voxels`` per step, no recomputation: what one big GPU can do).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from scalept.benchmarks.gpu import BusySampler
from scalept.launch import CONF_DIR
from scalept.steps import run_step

PRESETS = {
    "small_gpu": ["train=small_gpu"],
    "outdoor": ["train=outdoor"],
    "uncapped": ["train=outdoor", "train.step_voxels=null", "train.checkpoint_levels=0"],
}


def make_synthetic(work: Path, preset: str, args) -> list[str]:
    """Full-size synthetic sequences 00, 01, ... under ``work`` (stage=synth: one process per sequence)."""
    names = [f"{i:02d}" for i in range(args.synthetic_sequences)]
    cfg = compose_run(work, names, preset, args)
    with open_dict(cfg):
        cfg.dataset.synthetic.frames_per_sequence = args.synthetic_frames
    run_step("synth", cfg)
    return names


def compose_run(work: Path, data: list[str], preset: str, args) -> object:
    overrides = [
        f"data_dir={work}", "stage=train", f"model={args.model}", "optim=adamw", "sampling=hilbert", *PRESETS[preset],
        f"run_dir={work / 'runs' / preset}", f"train.max_steps={args.steps}", "train.val_every=0",
        f"train.log_every={args.window}", f"train.num_workers={args.workers}", "train.resume=false",
        f"dataset.splits.train=[{','.join(data)}]", "dataset.splits.val=[]",
    ]
    if preset == "uncapped":
        overrides.append(f"train.batch_voxels={args.uncapped_voxels}")
    if args.real:
        overrides += ["dataset=semantickitti", f"dataset.root={args.real}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[o for o in overrides if o] + args.override)


def steady_state(result: dict, busy: BusySampler) -> dict:
    """Figures of every logging window after the first."""
    windows = result["windows"][1:]
    if not windows:
        raise SystemExit("too few steps for a steady state: raise --steps or lower --window")
    steps = sum(w[0] for w in windows)
    voxels = sum(w[1] for w in windows)
    seconds = sum(w[2] for w in windows)
    start = result["windows"][0][3]
    return {
        "steps": steps, "voxels_per_s": voxels * result["world_size"] / seconds, "ms_per_step": 1e3 * seconds / steps,
        "voxels_per_step": voxels * result["world_size"] / steps,
        "micro_batches_per_step": result["micro_batches_per_step"], "batch_voxels": result["batch_voxels"],
        "gpu_busy": busy.mean_between(start, windows[-1][3]),
    }


def profile_steps(cfg, first: int, count: int, out: Path) -> None:
    """Profile ``count`` optimizer steps from step ``first`` (CPU + CUDA); prints the busiest kernels."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from scalept import train

    sched = schedule(wait=first - 1, warmup=1, active=count, repeat=1)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], schedule=sched) as prof:
        train.run(cfg, step_hook=lambda step: prof.step())
    events = prof.key_averages()
    table = events.table(sort_by="self_cuda_time_total", row_limit=30)
    kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
    syncs = {e.key: e.count for e in events if any(k in e.key for k in ("Synchronize", "item", "nonzero", "Memcpy"))}
    gpu_ms = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3
    summary = (f"profile: {count} steps from step {first}: {kernels / count:,.0f} GPU kernels and "
               f"{gpu_ms / count:.1f} ms of GPU time per step; host syncs and copies: {syncs}")
    print(summary)
    print(table)
    out.write_text(summary + "\n\n" + table + "\n")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="small_gpu,outdoor,uncapped", help="comma-separated: " + ", ".join(PRESETS))
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per preset")
    parser.add_argument("--window", type=int, default=5, help="steps per logging window (the first is warm-up)")
    parser.add_argument("--workers", type=int, default=6, help="loader processes")
    parser.add_argument("--model", default="ptv3", choices=["ptv3", "ptv3_tiny"])
    parser.add_argument("--real", type=Path, help="SemanticKITTI root whose labelled sequences are trained on")
    parser.add_argument("--synthetic-sequences", type=int, default=8)
    parser.add_argument("--synthetic-frames", type=int, default=8)
    parser.add_argument("--uncapped-voxels", type=int, default=1_000_000, help="micro-batch of the uncapped preset")
    parser.add_argument("--work", type=Path, help="data and runs folder (default: a temporary one)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile STEPS steady-state steps of --profile-preset (torch.profiler)")
    parser.add_argument("--profile-preset", help="preset to profile (default: the first of --presets)")
    parser.add_argument("--json", type=Path, default=Path("train-stage-benchmark.json"))
    parser.add_argument("override", nargs="*", help="extra Hydra overrides for every preset, e.g. train.amp=false")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="scalept-train-bench-"))
    from scalept import train

    if args.real:  # the labelled sequences: training refuses the others
        from scalept.data.semantickitti import Sequence, list_sequences

        data = [s for s in list_sequences(args.real) if Sequence(args.real, s).has_labels]
    else:
        data = make_synthetic(work, args.presets.split(",")[0], args)
    presets = [p for p in args.presets.split(",") if p]
    run_step("preprocess", compose_run(work, data, presets[0], args))
    gpu = torch.cuda.is_available()
    rows = []
    for preset in presets:
        cfg = compose_run(work, data, preset, args)
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with BusySampler() as busy:
            result = train.run(cfg)
        row = {"preset": preset, **steady_state(result, busy),
               "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
               "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if gpu else None,
               "final_loss": result["final_loss"]}
        rows.append(row)
        print_row(row)
    if args.profile:
        preset = args.profile_preset or presets[0]
        profile_steps(compose_run(work, data, preset, args), args.window + 1, args.profile,
                      args.json.with_suffix(f".profile-{preset}.txt"))
    report = {"device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
              "data": f"real scans of {args.real}" if args.real else
              f"synthetic, {args.synthetic_sequences} x {args.synthetic_frames} frames",
              "steps": args.steps, "window": args.window, "workers": args.workers, "rows": rows}
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return report


def print_row(row: dict) -> None:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    print(f"{row['preset']:<10} {row['voxels_per_s'] / 1e6:6.2f} M voxels/s {row['ms_per_step']:8.1f} ms/step "
          f"{row['voxels_per_step'] / 1e6:5.2f} M voxels/step ({row['micro_batches_per_step']} x "
          f"{row['batch_voxels']:,}) peak {fmt(row['peak_allocated_gib'], '.2f')} GiB allocated "
          f"{fmt(row['peak_reserved_gib'], '.2f')} reserved, GPU busy {fmt(row['gpu_busy'], '.0%')}", flush=True)


if __name__ == "__main__":
    main()
