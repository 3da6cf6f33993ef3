"""``python -m preprocessing.synthetic --root data/synthetic/dataset --sequences 00:40 01:10 --seed 0``."""
from __future__ import annotations

import argparse
import logging

from .generate import generate_dataset


def _sequence(text: str) -> tuple[str, int]:
    name, sep, frames = text.partition(":")
    if not sep or not name or not frames.isdigit() or int(frames) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME:FRAMES such as 00:40, got {text!r}")
    return name, int(frames)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m preprocessing.synthetic", description=__doc__)
    parser.add_argument("--root", required=True, help="the .../dataset folder to write sequences/SS/ into")
    parser.add_argument("--sequences", nargs="+", type=_sequence, required=True, metavar="NAME:FRAMES")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--azimuth-steps", type=int, default=2083, help="columns per sweep (2083 ≈ 120k points)")
    parser.add_argument("--beams", type=int, default=64)
    parser.add_argument("--overwrite", action="store_true", help="re-render frames that already exist")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    generate_dataset(args.root, dict(args.sequences), seed=args.seed, azimuth_steps=args.azimuth_steps,
                     beams=args.beams, overwrite=args.overwrite, progress=True)


if __name__ == "__main__":
    main()
