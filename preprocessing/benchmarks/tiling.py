"""Tiling throughput: frames per second on one core, per strategy, with and without HDF5 writing.

    python -m preprocessing.benchmarks.tiling [--real PATH] [--synthetic-frames 8] [--json out.json]

Real scans come from ``--real`` (default: $SCALEPT_REAL_DATA); synthetic ones are
generated at full size (~120k points) into a temporary folder. Each case is the
median over ``--repeats`` passes over all frames. Strategy parameters are the
defaults of conf/sampling/*.yaml, composed with Hydra.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from preprocessing.preprocess import frame_rng, tile_frame
from preprocessing.tiling import STRATEGIES
from scalept.data.semantickitti import IGNORE_INDEX, Sequence
from scalept.data.tiles import FrameTiles, write_tile_file
from scalept.config_check import CONF_DIR


def load_frames(root: Path, names: list[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    frames = []
    for name in names:
        sequence = Sequence(root, name)
        for i in range(len(sequence)):
            frame = sequence.frame(i)
            labels = frame.labels if frame.labels is not None else np.full(len(frame.points), IGNORE_INDEX)
            frames.append((f"{name}/{sequence.scans[i].stem}", frame.points, labels))
    return frames


def time_strategy(frames, sampling: dict, crop: dict, repeats: int, out_dir: Path) -> dict:
    tile_only, with_write, tiles_per_frame = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        tiled = []
        for frame_id, points, labels in frames:
            tiles = tile_frame(points, sampling, crop, frame_rng(sampling.get("seed", 0), *frame_id.split("/")))
            tiled.append(FrameTiles(frame_id.split("/")[1], points, labels, tiles))
        middle = time.perf_counter()
        write_tile_file(out_dir / f"{sampling['name']}.h5", tiled, {"sampling": sampling})
        end = time.perf_counter()
        tile_only.append(len(frames) / (middle - start))
        with_write.append(len(frames) / (end - start))
        tiles_per_frame = [len(f.tiles) for f in tiled]
    return {"tiling_fps": statistics.median(tile_only), "tiling_and_hdf5_fps": statistics.median(with_write),
            "tiles_per_frame": float(np.mean(tiles_per_frame))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", default=os.environ.get("SCALEPT_REAL_DATA"), help="real SemanticKITTI root")
    parser.add_argument("--synthetic-frames", type=int, default=8, help="full-size synthetic frames to generate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES))
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = compose(config_name="config")
        samplings = {s: OmegaConf.to_container(compose(config_name="config", overrides=[f"sampling={s}"]).sampling)
                     for s in args.strategies}
    crop = OmegaConf.to_container(base.preprocess.crop)
    datasets = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic_frames:
            from preprocessing.synthetic.generate import generate_dataset

            generate_dataset(Path(tmp) / "synthetic", {"00": args.synthetic_frames}, seed=0)
            datasets["synthetic"] = load_frames(Path(tmp) / "synthetic", ["00"])
        if args.real:
            datasets["real"] = load_frames(Path(args.real), ["08", "00"])
        results = {}
        for data_name, frames in datasets.items():
            for strategy, sampling in samplings.items():
                results[f"{data_name}/{strategy}"] = {
                    "frames": len(frames), "mean_points": float(np.mean([len(f[1]) for f in frames])),
                    **time_strategy(frames, sampling, crop, args.repeats, Path(tmp)),
                }
    print("| data | strategy | frames | points/frame | tiles/frame | tiling frames/s/core | "
          "with HDF5 frames/s/core |\n|---|---|---|---|---|---|---|")
    for key, r in results.items():
        data_name, strategy = key.split("/")
        print(f"| {data_name} | {strategy} | {r['frames']} | {r['mean_points']:,.0f} | {r['tiles_per_frame']:.1f} | "
              f"{r['tiling_fps']:.1f} | {r['tiling_and_hdf5_fps']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
