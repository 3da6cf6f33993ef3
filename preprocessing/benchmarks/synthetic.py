"""Benchmark of the synthetic data generator: speed on one core, and realism against real scans.

    python -m preprocessing.benchmarks.synthetic [--frames 10] [--real DIR] [--json out.json]

Generation speed is measured in this process on one core: the BLAS/OpenMP thread pools are
limited to one thread before numpy is first imported (their sizes are fixed at import), and
the process is pinned to one CPU where the OS allows it. Realism is compared on what a
network sees: points per frame, range and height distributions, remission, and the share of
each of the 19 classes among labelled points. ``--real`` defaults to $SCALEPT_REAL_DATA (a
``.../dataset`` folder, or any folder with ``sequences/SS/velodyne``).
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from preprocessing.synthetic.generate import generate_dataset  # noqa: E402
from scalept.data.semantickitti import CLASS_NAMES, NUM_CLASSES, Sequence, list_sequences  # noqa: E402

log = logging.getLogger(__name__)
PERCENTILES = (5, 25, 50, 75, 95)


def pin_to_one_core() -> str:
    """Restrict this process to one CPU so the measured rate is per core; says what it did."""
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity on this OS); thread pools limited to 1"
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return f"pinned to CPU {cpu}; thread pools limited to 1"


def scan_statistics(root: str | os.PathLike, max_frames: int | None = None) -> dict:
    """Points per frame, range / z / remission percentiles and class shares over the scans under ``root``."""
    counts, ranges, zs, remissions = [], [], [], []
    classes = np.zeros(NUM_CLASSES, dtype=np.int64)
    labelled = ignored = 0
    for name in list_sequences(root):
        seq = Sequence(root, name)
        for i in range(len(seq) if max_frames is None else min(len(seq), max_frames)):
            frame = seq.frame(i)
            p = frame.points
            counts.append(len(p))
            ranges.append(np.linalg.norm(p[:, :3], axis=1))
            zs.append(p[:, 2])
            remissions.append(p[:, 3])
            if frame.labels is not None:
                labelled += 1
                ignored += int((frame.labels < 0).sum())
                classes += np.bincount(frame.labels[frame.labels >= 0], minlength=NUM_CLASSES)
    if not counts:
        raise ValueError(f"{root}: no scans found")
    r, z, rem = (np.concatenate(a) for a in (ranges, zs, remissions))
    scored = classes.sum()
    return {
        "frames": len(counts), "labelled_frames": labelled, "points_per_frame": float(np.mean(counts)),
        "range_percentiles": np.percentile(r, PERCENTILES).round(2).tolist(),
        "z_percentiles": np.percentile(z, PERCENTILES).round(2).tolist(),
        "remission_percentiles": np.percentile(rem, PERCENTILES).round(3).tolist(),
        "ignored_share": ignored / max(ignored + scored, 1) if labelled else None,
        "class_share": {n: float(c / scored) for n, c in zip(CLASS_NAMES, classes)} if scored else None,
        "classes_present": int((classes > 0).sum()) if scored else None,
    }


def time_generation(root: Path, frames: int, seed: int, scenes: int) -> dict:
    """Time ``frames`` consecutive full-size frames of sequence 00, file writes and street building included.

    Then, untimed, the first frame of ``scenes`` more sequences, so the realism statistics see
    several streets and not one stretch of road.
    """
    started = time.perf_counter()
    generate_dataset(root, {"00": frames}, seed=seed)
    seconds = time.perf_counter() - started
    generate_dataset(root, {f"{i:02d}": 1 for i in range(1, scenes + 1)}, seed=seed)
    return {"frames": frames, "seconds": seconds, "seconds_per_frame": seconds / frames,
            "frames_per_second": frames / seconds}


def _row(name: str, synthetic, real) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, int):
            return f"{v:,}"
        if isinstance(v, list):
            return " ".join(f"{x:g}" for x in v)
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3f}"
    return f"| {name:<28} | {fmt(synthetic):<32} | {fmt(real):<32} |"


def table(synthetic: dict, real: dict | None) -> str:
    real = real or {}
    rows = [f"| {'metric':<28} | {'synthetic':<32} | {'real':<32} |",
            "|" + "-" * 30 + "|" + "-" * 34 + "|" + "-" * 34 + "|"]
    rows.append(_row("frames compared", synthetic["frames"], real.get("frames")))
    rows.append(_row("of them labelled (classes)", synthetic["labelled_frames"], real.get("labelled_frames")))
    rows.append(_row("points per frame", synthetic["points_per_frame"], real.get("points_per_frame")))
    for key, label in (("range_percentiles", "range m p5/25/50/75/95"), ("z_percentiles", "z m p5/25/50/75/95"),
                       ("remission_percentiles", "remission p5/25/50/75/95")):
        rows.append(_row(label, synthetic[key], real.get(key)))
    rows.append(_row("ignored share (labelled)", synthetic["ignored_share"], real.get("ignored_share")))
    rows.append(_row(f"classes present (of {NUM_CLASSES})", synthetic["classes_present"], real.get("classes_present")))
    real_share = real.get("class_share") or {}
    for name in CLASS_NAMES:
        share = [synthetic["class_share"][name], real_share.get(name)]
        rows.append(f"| {'class ' + name:<28} | " + " | ".join(
            f"{'-' if v is None else f'{100 * v:.2f} %':<32}" for v in share) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m preprocessing.benchmarks.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=10, help="full-size frames to generate and time")
    parser.add_argument("--scenes", type=int, default=9, help="more sequences (one frame each) for the statistics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", default=os.environ.get("SCALEPT_REAL_DATA"),
                        help="real SemanticKITTI-format folder to compare with (default: $SCALEPT_REAL_DATA)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    pinning = pin_to_one_core()
    with tempfile.TemporaryDirectory(prefix="scalept-synthetic-") as tmp:
        timing = time_generation(Path(tmp), args.frames, args.seed, args.scenes)
        synthetic = scan_statistics(tmp)
    real = scan_statistics(args.real) if args.real else None
    print(f"generation: {timing['frames']} frames of sequence 00 in "
          f"{timing['seconds']:.2f} s = {timing['frames_per_second']:.2f} frames/s per core "
          f"({timing['seconds_per_frame'] * 1000:.0f} ms/frame; {pinning})")
    if real is None:
        print("no real data to compare with: pass --real or set SCALEPT_REAL_DATA")
    print(table(synthetic, real))
    result = {"timing": timing, "pinning": pinning, "synthetic": synthetic, "real": real}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
