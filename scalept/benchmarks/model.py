"""PTv3 speed and memory on real SemanticKITTI scans: ``python -m scalept.benchmarks.model``.

Cases: whole frames (batch 1 and 4) and 40k-voxel tiles (the 40k voxels nearest
a random point; batch 1 and 8), scans voxelized at 0.05 m. Each case times a
training step (forward, cross-entropy, backward, AdamW step) and an inference
forward under bf16 autocast (GPU; fp32 on CPU by default): median of the timed repeats after warm-ups, peak
GPU memory reset per case. Runs the full model on GPU and the tiny one on CPU
unless ``--model`` says otherwise. Prints a table and writes a JSON. By default every
pass sees the same batch; ``--fresh-inputs`` gives each pass a new one, as real data does.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from scipy.spatial import cKDTree

from scalept.data import semantickitti as kitti
from scalept.model import build_model, cast_for_inference, inference_autocast

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
GRID_SIZE = 0.05
TILE_POINTS = 40_000
CASES = {  # name: (kind, batch)
    "frame_b1": ("frame", 1),
    "frame_b4": ("frame", 4),
    "tile40k_b1": ("tile", 1),
    "tile40k_b8": ("tile", 8),
}


def voxelize(points: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One point per occupied 0.05 m cell: features (x, y, z, remission), grid from 0, class labels."""
    grid = np.floor(points[:, :3] / GRID_SIZE).astype(np.int64)
    _, first = np.unique(grid, axis=0, return_index=True)
    grid = grid[first] - grid[first].min(0)
    return points[first], grid, labels[first]


def load_scans(root: Path, sequence: str, limit: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    scans = sorted((root / "sequences" / sequence / "velodyne").glob("*.bin"))[:limit]
    if not scans:
        raise SystemExit(f"no scans under {root}/sequences/{sequence}/velodyne; pass --real or set SCALEPT_REAL_DATA")
    out = []
    for path in scans:
        points = kitti.read_points(path)
        label_path = path.parent.parent / "labels" / (path.stem + ".label")
        if label_path.is_file():
            labels = kitti.to_classes(kitti.read_labels(label_path, len(points)), label_path)
        else:
            labels = np.random.default_rng(0).integers(0, kitti.NUM_CLASSES, len(points))
        out.append(voxelize(points, labels))
    return out


def tile(scan, rng: np.random.Generator):
    """The TILE_POINTS voxels nearest a random voxel, grid shifted back to start at 0."""
    feat, grid, labels = scan
    centre = feat[rng.integers(len(feat)), :3]
    _, idx = cKDTree(feat[:, :3]).query(centre, k=min(TILE_POINTS, len(feat)))
    idx = np.sort(idx)
    return feat[idx], grid[idx] - grid[idx].min(0), labels[idx]


def variant(sample, rng: np.random.Generator):
    """The sample with a random 1 % of its voxels dropped: new sizes at every level, as real data has."""
    keep = rng.random(len(sample[0])) >= 0.01
    return tuple(a[keep] for a in sample)


def make_batch(samples, device: torch.device):
    feat = torch.from_numpy(np.concatenate([s[0] for s in samples])).float().to(device)
    grid = torch.from_numpy(np.concatenate([s[1] for s in samples])).int().to(device)
    labels = torch.from_numpy(np.concatenate([s[2] for s in samples])).long().to(device)
    offsets = torch.cumsum(torch.tensor([len(s[0]) for s in samples]), 0).to(device)
    return feat, grid, offsets, labels


def timed(fn, warmup: int, repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in seconds (device synchronised around each call)."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_case(model, batches: list, mode: str, args, device: torch.device) -> dict:
    """Time ``mode`` on the batches, one per pass in turn (one batch: the same input every pass)."""
    turn = itertools.cycle(batches)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)
    if mode == "train":
        model.float().train()  # undoes cast_for_inference of an earlier inference case
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-3)

        def step():
            feat, grid, offsets, labels = (t.to(device, non_blocking=True) for t in next(turn))
            with amp:
                loss = F.cross_entropy(model(feat, grid, offsets).float(), labels, ignore_index=kitti.IGNORE_INDEX)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    else:
        model.eval()
        if not args.cast_cache:  # what stage=infer does: weights stored in bf16/fp16, no cache of cast copies
            amp = inference_autocast(device.type, enabled=args.amp)
            cast_for_inference(model, device.type, args.amp)

        def step():
            feat, grid, offsets, _ = (t.to(device, non_blocking=True) for t in next(turn))
            with torch.no_grad(), amp:
                model(feat, grid, offsets)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, args.warmup, args.repeats, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    model.zero_grad(set_to_none=True)
    voxels = statistics.mean(len(b[0]) for b in batches)
    return {"ms": 1e3 * seconds, "voxels_per_s": voxels / seconds, "peak_gib": peak}


def _arguments(argv) -> argparse.Namespace:
    """The command line, with the defaults that depend on the device filled in."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_real = os.environ.get("SCALEPT_REAL_DATA", "../shared/data/semantickitti-real")
    parser.add_argument("--real", type=Path, default=Path(default_real), help="SemanticKITTI root (sequences/...)")
    parser.add_argument("--sequence", default="08", help="sequence whose scans are used")
    parser.add_argument("--model", choices=["ptv3", "ptv3_tiny"], help="default: ptv3 on GPU, ptv3_tiny on CPU")
    parser.add_argument("--json", type=Path, help="output file (default: model-benchmark-<model>-<device>.json)")
    parser.add_argument("--cases", default="", help="comma-separated substrings of case names, e.g. 'tile,frame_b1'")
    parser.add_argument("--modes", default="train,infer", help="which of train, infer to time")
    parser.add_argument("--warmup", type=int, help="untimed passes (default 5 on GPU, 1 on CPU)")
    parser.add_argument("--repeats", type=int, help="timed passes (default 20 on GPU, 2 on CPU)")
    parser.add_argument("--fresh-inputs", action="store_true",
                        help="a different batch every pass (new tiles, 1 %% of voxels dropped): catches per-shape "
                             "costs that one repeated input hides, e.g. kernels planned per input size")
    parser.add_argument("--cast-cache", action=argparse.BooleanOptionalAction, default=False,
                        help="keep autocast's cache of cast weights at inference (stage=infer does not)")
    parser.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, help="bf16 autocast (default: on GPU only; CPUs without "
        "bf16 matrix units run it several times slower than fp32)"
    )
    parser.add_argument("--checkpoint", type=int, metavar="LEVELS", help="override the model's checkpoint_levels: "
                        "recompute the blocks of the LEVELS finest levels (0: none, 5: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.model = args.model or ("ptv3" if gpu else "ptv3_tiny")
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.repeats = args.repeats if args.repeats is not None else (20 if gpu else 2)
    args.amp = gpu if args.amp is None else args.amp
    return args


def main(argv=None) -> dict:
    args = _arguments(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    wanted = [w for w in args.cases.split(",") if w]
    cases = {k: v for k, v in CASES.items() if not wanted or any(w in k for w in wanted)}
    modes = [m for m in ("train", "infer") if m in args.modes.split(",")]

    torch.manual_seed(0)
    cfg = OmegaConf.load(CONF_DIR / f"{args.model}.yaml")
    if args.checkpoint is not None:
        cfg.checkpoint_levels = args.checkpoint
    model = build_model(cfg, kitti.NUM_CLASSES).to(device)
    scans = load_scans(args.real, args.sequence, limit=8)
    rng = np.random.default_rng(0)

    rows = []
    for name, (kind, size) in cases.items():
        def sample(i):
            return scans[i % len(scans)] if kind == "frame" else tile(scans[i % len(scans)], rng)

        if args.fresh_inputs:  # a new input every pass, as in training and inference on real data
            # kept on the host and copied in each pass (timed, as a loader's copy is), so the
            # peak memory counts one batch, not all of them
            batches = [make_batch([variant(sample(i), rng) for i in range(size)], torch.device("cpu"))
                       for _ in range(args.warmup + args.repeats)]
        else:
            batches = [make_batch([sample(i) for i in range(size)], device)]
        for mode in modes:
            try:
                result = run_case(model, batches, mode, args, device)
            except torch.OutOfMemoryError:
                result = {"ms": None, "voxels_per_s": None, "peak_gib": None, "error": "out of memory"}
                torch.cuda.empty_cache()
            rows.append({"case": name, "mode": mode, "batch": size,
                         "voxels": round(statistics.mean(len(b[0]) for b in batches)), **result})
            print_row(rows[-1])

    report = {
        "model": args.model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name(device) if gpu else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "amp_bf16": args.amp,
        "checkpoint_levels": cfg.checkpoint_levels,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "scans": len(scans),
        "fresh_inputs": args.fresh_inputs,
        "cases": rows,
    }
    path = args.json or Path(f"model-benchmark-{args.model}-{device.type}.json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.model} ({report['parameters'] / 1e6:.1f} M parameters) on {report['device']}; wrote {path}")
    return report


_HEADER = False


def print_row(row: dict) -> None:
    global _HEADER
    if not _HEADER:
        print(f"{'case':<12} {'mode':<6} {'voxels':>8} {'ms':>9} {'voxels/s':>11} {'peak GiB':>9}")
        _HEADER = True
    if row["ms"] is None:
        print(f"{row['case']:<12} {row['mode']:<6} {row['voxels']:>8} {row['error']}")
        return
    peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
    print(
        f"{row['case']:<12} {row['mode']:<6} {row['voxels']:>8} {row['ms']:>9.1f} "
        f"{row['voxels_per_s']:>11,.0f} {peak:>9}",
        flush=True,
    )


if __name__ == "__main__":
    main()
