"""End-to-end inference + fusion throughput per sampling strategy: ``python -m scalept.benchmarks.pipeline``.

    python -m scalept.benchmarks.pipeline [--real PATH] [--synthetic-frames 4] [--strategies ...]
                                          [--fusion logit_average] [--batch-points 400000] [--workers 0]
                                          [--json runs/benchmarks/pipeline.json]

For every strategy the frames are tiled first (not timed), then stage=infer
(tiles read -> logits -> shards) and stage=fuse (shards -> fused labels written,
scored) run as the launcher runs them, and frames/s is frames / (infer + fuse
seconds); "f/s w/o fixed" leaves out what each stage pays once (checks, model load, loader
processes; the scores' table and figure), which a long evaluation (4,071 frames) amortises. On a GPU it also reports the share of that time
the GPU was busy and the peak allocated memory. Weights are random (a checkpoint saved here): the figures are about
speed, the mIoU is meaningless. Model: ``ptv3`` (train=outdoor, 0.05 m) on a GPU,
``ptv3_tiny`` (train=embedded, 0.1 m) on the CPU. Real scans come from ``--real``
(default $SCALEPT_REAL_DATA), else full-size synthetic frames are generated.

Fusion alone is timed on one thread per method on a frame-sized problem
(120k points, 1.3 tiles per point, 19 classes): millions of tile-point rows per
second per core, plus the nearest-neighbour fill of 5 % uncovered points.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from scalept.benchmarks.gpu import BusySampler
from scalept.launch import CONF_DIR
from scalept.steps import run_step

ALL_STRATEGIES = sorted(p.stem for p in (CONF_DIR / "sampling").glob("*.yaml"))


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _save_checkpoint(cfg) -> None:
    from scalept.checkpoint import checkpoint_path, model_record, save_checkpoint
    from scalept.data.semantickitti import CLASS_NAMES
    from scalept.model import build_model

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    torch.manual_seed(0)
    model = build_model(model_cfg, len(CLASS_NAMES))
    save_checkpoint(checkpoint_path(cfg.run_dir, str(cfg.infer.checkpoint)),
                    model_record(model, model_cfg, CLASS_NAMES, float(cfg.train.grid_size)))


def _warm_up(cfg) -> None:
    """One forward pass first: the first call of a process pays for kernel set-up, not for inference."""
    from scalept.data.semantickitti import NUM_CLASSES
    from scalept.model import build_model, cast_for_inference, inference_autocast

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = cast_for_inference(build_model(cfg.model, NUM_CLASSES).to(device).eval(), device.type, True)
    grid = torch.unique(torch.randint(0, 200, (20000, 3)), dim=0).int().to(device)
    feat = torch.rand(len(grid), 4, device=device)
    with torch.inference_mode(), inference_autocast(device.type, enabled=device.type == "cuda"):
        model(feat, grid, torch.tensor([len(grid)], device=device))
    from scalept.fusion_kernels import fuse_frame
    from scalept.metrics import save_confusion_png

    index = np.arange(1000) % 700
    fuse_frame(700, index, np.zeros((1000, NUM_CLASSES), np.float16), "logit_average")
    with tempfile.TemporaryDirectory() as tmp:  # matplotlib's first figure costs about a second
        save_confusion_png(Path(tmp) / "warm.png", np.eye(NUM_CLASSES), "warm-up")


def pipeline_case(base: list[str], strategy: str, fusion: str) -> dict:
    from scalept import fuse, infer

    cfg = _compose(base + [f"sampling={strategy}", f"fusion={fusion}"])
    started = time.perf_counter()
    run_step("preprocess", cfg)
    tiling_s = time.perf_counter() - started
    _save_checkpoint(cfg)
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with BusySampler() as busy:
        started = time.perf_counter()
        summary = infer.run(cfg, rank=0, world_size=1)
        infer_end = time.perf_counter()
        metrics = fuse.run(cfg)
        fuse_end = time.perf_counter()
    infer_s, fuse_s = infer_end - started, fuse_end - infer_end
    frames = metrics["num_frames"]
    fuse_timings = metrics["timings_s"]
    fixed_s = summary["phase_seconds"]["setup"] + fuse_timings["check"] + fuse_s - fuse_timings["total"]
    return {
        "gpu_busy": busy.mean_between(started, fuse_end), "gpu_busy_infer": busy.mean_between(started, infer_end),
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        "strategy": strategy, "fusion": fusion, "frames": frames, "tiles": summary["tiles_predicted"],
        "points": metrics["num_points"], "tile_points": metrics["num_tile_points"],
        "overlap": metrics["num_tile_points"] / max(1, metrics["num_fused"]), "filled": metrics["num_filled"],
        "tiling_s": tiling_s, "infer_s": infer_s, "fuse_s": fuse_s,
        "fps": frames / (infer_s + fuse_s), "infer_fps": frames / infer_s, "fuse_fps": frames / fuse_s,
        # without the costs paid once per stage (checks, model load, loader processes; fusion's checks,
        # its iou.md and confusion.png): the rate that a long evaluation (4,071 val frames) approaches
        "fixed_s": fixed_s, "fps_without_fixed": frames / (infer_s + fuse_s - fixed_s),
        "fusion_mpts_per_s": metrics["fusion_mpoints_per_s"], "miou_random_weights": metrics["miou"],
        "infer_phase_s": summary["phase_seconds"], "fuse_phase_s": metrics.get("timings_s", {}),
    }


def fusion_alone(points: int = 120_000, overlap: float = 1.3, classes: int = 19, repeats: int = 15,
                 device: str = "cpu") -> dict:
    """Per method: M tile-point rows/s on one thread (on ``device``, host copies included); and the
    nearest-neighbour fill in M points/s."""
    from scalept.fusion_kernels import fill_nearest, fuse_frame

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(0)
        extra = int((overlap - 1) * points)
        index = np.concatenate([np.arange(points), rng.integers(0, points, extra)]).astype(np.int32)
        logits = rng.normal(size=(len(index), classes)).astype(np.float16)
        probs = np.exp(logits.astype(np.float32))
        probs /= probs.sum(1, keepdims=True)
        entropy = -(probs * np.log(probs)).sum(1).astype(np.float32)
        probs = probs.astype(np.float16)
        cases = {
            "logit_average": lambda: fuse_frame(points, index, logits, "logit_average", device=device),
            "softmax_average": lambda: fuse_frame(points, index, probs, "softmax_average", device=device),
            "mc_uncertainty/entropy": lambda: fuse_frame(points, index, probs, "mc_uncertainty", entropy,
                                                         device=device),
            "mc_uncertainty/lowest": lambda: fuse_frame(points, index, probs, "mc_uncertainty", entropy,
                                                        weighting="lowest", device=device),
        }
        results = {}
        for name, case in cases.items():
            case()
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                case()
                times.append(time.perf_counter() - started)
            t = statistics.median(times)
            results[name] = {"mrows_per_s": len(index) / t / 1e6, "mpoints_per_s": points / t / 1e6, "ms": 1e3 * t,
                             "frames_per_s": 1 / t}
        if device != "cpu":
            return {"points": points, "rows": len(index), "classes": classes, "device": device, "methods": results}
        xyz = rng.normal(scale=20.0, size=(points, 3)).astype(np.float32)
        covered = np.hypot(xyz[:, 0], xyz[:, 1]) < np.quantile(np.hypot(xyz[:, 0], xyz[:, 1]), 0.95)
        times = []
        for _ in range(repeats):
            labels = np.where(covered, 1, -1)
            started = time.perf_counter()
            fill_nearest(xyz, covered, labels)
            times.append(time.perf_counter() - started)
        t = statistics.median(times)
        results["fill_nearest (5% uncovered)"] = {"mrows_per_s": None, "mpoints_per_s": points / t / 1e6, "ms": 1e3 * t}
        return {"points": points, "rows": len(index), "classes": classes, "device": "cpu, 1 thread",
                "methods": results}
    finally:
        torch.set_num_threads(threads)


def print_report(results: dict, gpu: bool) -> None:
    """The tables of :func:`main`: per strategy, then by phase, then fusion alone."""
    print(f"\nInference + fusion, {results['data']}; model {results['model']} on {results['device']}; "
          f"fusion {results['fusion']}")
    header = (f"{'strategy':<11} {'frames':>6} {'tiles':>6} {'overlap':>7} {'infer s':>8} {'fuse s':>7} "
              f"{'frames/s':>8} {'fixed s':>7} {'f/s w/o fixed':>13} {'infer f/s':>9} {'fuse f/s':>8} "
              f"{'fusion Mrows/s':>14}")
    print(header)
    print("-" * len(header))
    for r in results["pipeline"]:
        print(f"{r['strategy']:<11} {r['frames']:>6} {r['tiles']:>6} {r['overlap']:>7.2f} {r['infer_s']:>8.2f} "
              f"{r['fuse_s']:>7.2f} {r['fps']:>8.2f} {r['fixed_s']:>7.2f} {r['fps_without_fixed']:>13.2f} "
              f"{r['infer_fps']:>9.2f} {r['fuse_fps']:>8.1f} "
              f"{r['fusion_mpts_per_s'] or 0:>14.1f}")
    if gpu:
        print("\nGPU busy (NVML: time with a kernel running) and peak allocated memory")
        for r in results["pipeline"]:
            busy = {k: "-" if r[k] is None else f"{r[k]:.0%}" for k in ("gpu_busy", "gpu_busy_infer")}
            print(f"  {r['strategy']:<11} busy {busy['gpu_busy']:>4} end to end, {busy['gpu_busy_infer']:>4} in "
                  f"inference; peak {r['peak_allocated_gib']:.2f} GiB")
    print("\ninfer seconds by phase (setup: checks, model load, loader start; read: waiting for the loader; "
          "predict: model + copy to host; write: HDF5)")
    for r in results["pipeline"]:
        print(f"  {r['strategy']:<11} " + "  ".join(f"{k} {v:6.2f}" for k, v in r["infer_phase_s"].items()))
    print("fuse seconds by phase (read: waiting for the reader thread; read_io: its own time, overlapped)")
    for r in results["pipeline"]:
        print(f"  {r['strategy']:<11} " + "  ".join(f"{k} {v:6.2f}" for k, v in r["fuse_phase_s"].items()))
    for fa in results["fusion_alone"]:
        print(f"\nFusion alone on {fa['device']}: {fa['points']} points, {fa['rows']} tile-point rows, "
              f"{fa['classes']} classes (one frame; host copies included)")
        for name, r in fa["methods"].items():
            rows = f"{r['mrows_per_s']:6.1f} M rows/s" if r["mrows_per_s"] else " " * 15
            print(f"  {name:<28} {rows}  {r['mpoints_per_s']:6.1f} M points/s  {r['ms']:6.1f} ms")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", default=os.environ.get("SCALEPT_REAL_DATA"), help="real SemanticKITTI root")
    parser.add_argument("--synthetic-frames", type=int, default=4, help="full-size synthetic frames without --real")
    parser.add_argument("--strategies", nargs="*", default=ALL_STRATEGIES)
    parser.add_argument("--fusion", default="logit_average")
    parser.add_argument("--model", default=None, help="ptv3 or ptv3_tiny (default: ptv3 on GPU, tiny on CPU)")
    parser.add_argument("--batch-points", type=int, default=400_000, help="infer.batch_points")
    parser.add_argument("--workers", type=int, default=0, help="infer.num_workers (DataLoader processes)")
    parser.add_argument("--tta-rotations", default="0",
                        help="infer.tta.rotations, comma-separated (0: one view, how the README figures were taken)")
    parser.add_argument("--json", type=Path, default=Path("runs/benchmarks/pipeline.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    gpu = torch.cuda.is_available()
    model = args.model or ("ptv3" if gpu else "ptv3_tiny")
    train = "outdoor" if model == "ptv3" else "embedded"
    results: dict = {"device": torch.cuda.get_device_name() if gpu else f"cpu ({os.cpu_count()} cores)",
                     "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                     "model": model, "fusion": args.fusion, "workers": args.workers, "batch_points": args.batch_points,
                     "tta_rotations": args.tta_rotations}
    with tempfile.TemporaryDirectory() as tmp:
        base = [f"data_dir={tmp}", f"model={model}", f"train={train}", f"infer.batch_points={args.batch_points}",
                f"infer.num_workers={args.workers}", "infer.frames_per_chunk=4",
                f"infer.tta.rotations=[{args.tta_rotations}]", f"run_dir={tmp}/runs/${{sampling.name}}"]
        if args.real:
            from scalept.data.semantickitti import Sequence, list_sequences

            names = list_sequences(args.real)
            labelled = [s for s in names if Sequence(args.real, s).has_labels]
            others = [s for s in names if s not in labelled]
            base += ["dataset=semantickitti", f"dataset.root={args.real}", f"dataset.splits.val={labelled}",
                     f"dataset.splits.test={others}", "dataset.splits.train=[]", "preprocess.splits=[val,test]",
                     "infer.splits=[val,test]"]
            results["data"] = f"real scans {args.real} (sequences {', '.join(names)})"
        else:
            run_step("synth", _compose(base + [f"dataset.synthetic.frames_per_sequence={args.synthetic_frames}",
                                               "dataset.splits.train=[]"]))
            base += ["preprocess.splits=[val]", "infer.splits=[val]"]
            results["data"] = f"synthetic, {args.synthetic_frames} full-size frames"
        _warm_up(_compose(base))
        results["pipeline"] = []
        for strategy in args.strategies:
            row = pipeline_case(base, strategy, args.fusion)
            results["pipeline"].append(row)
            print(f"  {strategy:<11} {row['fps']:7.2f} frames/s", flush=True)
    results["fusion_alone"] = [fusion_alone()] + ([fusion_alone(device="cuda")] if gpu else [])

    print_report(results, gpu)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {args.json}")
    return results


if __name__ == "__main__":
    main()
