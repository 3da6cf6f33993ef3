"""The fusion stage: tile predictions back to one label per point, written and scored.

``python -m scalept.launch stage=fuse fusion=<name> run_dir=...`` runs as its own
process (a separate Slurm job after inference). It reads every chunk file that
stage=infer wrote under ``<run_dir>/infer/<fusion.name>[-tta<views>]/`` (layout: see
:mod:`scalept.infer`, laid out as :mod:`scalept.shards` says), first checks that every tile of every frame of
``infer.splits`` is there (a missing shard or tile stops the stage with one line
naming it, never a silently lower mIoU), then per frame:

* ``logit_average``: per point, the mean of the logits of every tile holding it; argmax;
* ``softmax_average``: the mean of the tiles' softmax probabilities; argmax;
* ``mc_uncertainty``: tiles' mean MC probabilities p̄ weighted by exp(-H / temperature)
  (``weighting: entropy``), or the tile of lowest entropy H alone (``weighting: lowest``);
  the fused per-point entropy is written beside the predictions;
* points outside every tile (range-cropped) take the label (and entropy) of the
  nearest point that has a prediction: gathered through the tile file's fill map,
  found once by preprocessing (``scipy.spatial.cKDTree`` here for older tile files).

Outputs, beside the shards (``<...>-lowest/`` for ``weighting: lowest``, which reuses the
mc_uncertainty shards)::

    sequences/SS/predictions/NNNNNN.label   raw SemanticKITTI ids (uint32), the submission format
    sequences/SS/entropy/NNNNNN.npy         float16 fused entropy per point (mc_uncertainty)
    metrics.json  iou.md  confusion.png     scores over the sequences that have labels

The per-frame reductions (:mod:`scalept.fusion_kernels`) run on the GPU when ``fuse.device``
finds one, else on the CPU. The stage skips its work on a rerun when ``metrics.json`` was
written from the same shards, tile files and settings (their names, sizes and mtimes) and every
prediction file is there; otherwise it recomputes everything.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from omegaconf import DictConfig

from scalept.atomic import atomic_path
from scalept.data.semantickitti import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, to_raw, write_labels
from scalept.data.tiles import TileFile, tile_file_path
from scalept.distributed import device as dist_device
from scalept.errors import ConfigError, ScalePTError
from scalept.fusion_kernels import WEIGHTINGS, fill_from_map, fill_nearest, fuse_frame
from scalept.metrics import (accuracy, confusion_matrix, iou_per_class, iou_table, mean_iou, mean_iou_present,
                             save_confusion_png)
from scalept.plan import Plan
from scalept.shards import (Chunk, InferenceError, fusion_output_dir, plan_chunks, predicted_sequences, shard_dir,
                            shard_kind, usable_chunk_file, values_name)

log = logging.getLogger(__name__)

# The sub-configs this stage reads (scalept.steps hands it these and nothing else).
READS = ("run_dir", "tiles_dir", "dataset", "sampling", "infer", "fusion", "fuse")

# --------------------------------------------------------------------------- reading the shards


def read_manifest(shard_dir: Path) -> dict:
    path = shard_dir / "manifest.json"
    if not path.is_file():
        raise InferenceError(f"{shard_dir}: no inference output (manifest.json missing); run stage=infer with the "
                             "same run_dir, sampling and fusion first")
    return json.loads(path.read_text())


def check_shards(cfg: DictConfig) -> tuple[dict, dict[str, TileFile], dict[str, list[tuple[Chunk, Path]]]]:
    """Every frame of every sequence has a usable chunk file with all its tiles; else one-line error."""
    folder = shard_dir(cfg)
    manifest = read_manifest(folder)
    sequences = predicted_sequences(cfg)
    tile_files = {s: TileFile(tile_file_path(cfg.tiles_dir, cfg.sampling.name, s)) for s in sequences}
    for s in sequences:
        inferred = manifest["sequences"].get(s)
        if inferred != tile_files[s].num_frames:
            what = "was not predicted" if inferred is None else f"was predicted with {inferred} frames, " \
                                                                f"its tile file has {tile_files[s].num_frames}"
            raise InferenceError(f"{folder}: sequence {s} {what}; rerun stage=infer with infer.splits="
                                 f"{list(cfg.infer.splits)}")
    expect = {k: manifest[k] for k in ("kind", "fusion", "mc_passes", "num_classes", "checkpoint", "sampling")}
    if expect["sampling"] != cfg.sampling.name:
        raise InferenceError(f"{folder}: predicted with sampling={expect['sampling']}, fusing with "
                             f"sampling={cfg.sampling.name}; use the same sampling (or run_dir)")
    world = int(manifest["world_size"])
    owners = {(c["sequence"], c["start"], c["stop"]): c["rank"] for c in manifest["chunks"]}
    chunks = plan_chunks({s: tile_files[s].num_frames for s in sequences}, int(manifest["frames_per_chunk"]))
    found: dict[str, list[tuple[Chunk, Path]]] = {s: [] for s in sequences}
    for chunk in chunks:
        path, why = usable_chunk_file(folder, chunk, tile_files[chunk.sequence], expect)
        if path is None:
            rank = owners.get((chunk.sequence, chunk.start, chunk.stop), "?")
            name = chunk.file_name(rank) if isinstance(rank, int) else chunk.pattern
            raise InferenceError(f"{folder}: missing inference for {chunk}: shard {name} of rank {rank}/{world} "
                                 f"{'not found' if why == 'not found' else 'unusable (' + why + ')'}; rerun "
                                 "stage=infer with the same config (finished chunks are kept)")
        found[chunk.sequence].append((chunk, path))
    return manifest, tile_files, found


# --------------------------------------------------------------------------- outputs


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


# --------------------------------------------------------------------------- the stage


@dataclass
class _Settings:
    """``cfg.fusion`` checked once, before any shard is read."""

    method: str
    kind: str
    weighting: str
    temperature: float
    device: torch.device

    @classmethod
    def of(cls, cfg: DictConfig) -> _Settings:
        method = str(cfg.fusion.name)
        device = dist_device(str(cfg.fuse.device), "fuse.device")  # one line if CUDA is asked for but absent
        kind = shard_kind(method)
        weighting, temperature = cfg.fusion.get("weighting"), cfg.fusion.get("temperature")  # mc_uncertainty's keys
        if method == "mc_uncertainty":
            if weighting not in WEIGHTINGS:
                raise ConfigError(f"fusion.weighting={weighting!r} is unknown; choose one of {', '.join(WEIGHTINGS)}")
            if weighting == "entropy" and temperature <= 0:
                raise ConfigError(f"fusion.temperature={temperature} must be > 0")
        return cls(method, kind, weighting, temperature, device)


@dataclass
class _Tally:
    """What the frames add up to: the confusion matrix, point counts and seconds per phase."""

    confusion: np.ndarray = field(default_factory=lambda: np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64))
    missed: np.ndarray = field(default_factory=lambda: np.zeros(NUM_CLASSES, dtype=np.int64))  # labelled, unpredicted
    counts: dict = field(default_factory=lambda: dict.fromkeys(
        ["frames", "frames_scored", "points", "tile_points", "fused", "filled", "scored", "unpredicted"], 0))
    # read: waiting for the reader thread; read_io: the reader's own time, mostly hidden behind the rest
    timings: dict = field(default_factory=lambda: dict.fromkeys(
        ["check", "read", "read_io", "fuse", "fill", "write", "score"], 0.0))


@dataclass
class _ChunkInputs:
    """Everything fusion reads for one chunk of frames, read with one call per array."""

    chunk: Chunk
    tile_file: TileFile
    rows: np.ndarray  # (F+1,) frame f's rows are rows[f]:rows[f+1] of the arrays below
    point_index: np.ndarray
    values: np.ndarray
    entropy: np.ndarray | None
    labels: np.ndarray | None  # the chunk's frames' labels, at frame_offsets - frame_offsets[start]
    fill: np.ndarray | None  # the chunk's fill rows, at frame_fill_offsets - frame_fill_offsets[start]
    xyz: np.ndarray | None  # points of the chunk's frames, for tile files without a fill map
    seconds: float = 0.0


def _read_chunk(path: Path, tf: TileFile, chunk: Chunk, kind: str, scored: bool) -> _ChunkInputs:
    t0 = time.perf_counter()
    with h5py.File(path, "r") as h5:
        tile_offsets = h5["tile_offsets"][:]
        rows = tile_offsets[h5["frame_tile_offsets"][:]]
        point_index, values = h5["point_index"][:], h5[values_name(kind)][:]
        entropy = h5["entropy"][:] if kind == "mc" else None
    points = slice(tf.frame_offsets[chunk.start], tf.frame_offsets[chunk.stop])
    labels = tf.read("labels", points) if scored else None
    fill = xyz = None
    if tf.has_fill_map:
        fill = tf.read("fill", slice(tf.frame_fill_offsets[chunk.start], tf.frame_fill_offsets[chunk.stop]))
    else:
        xyz = tf.read("points", points)[:, :3]
    return _ChunkInputs(chunk, tf, rows, point_index, values, entropy, labels, fill, xyz, time.perf_counter() - t0)


def _fuse_chunk(inputs: _ChunkInputs, settings: _Settings, target: Path, tally: _Tally) -> None:
    """Fuse, fill, write and score the frames of one chunk."""
    tf, chunk = inputs.tile_file, inputs.chunk
    point_base = tf.frame_offsets[chunk.start]
    fill_base = tf.frame_fill_offsets[chunk.start] if tf.has_fill_map else 0
    for i, f in enumerate(range(chunk.start, chunk.stop)):
        t1 = time.perf_counter()
        rows = slice(inputs.rows[i], inputs.rows[i + 1])
        p_lo, p_hi = tf.frame_offsets[f] - point_base, tf.frame_offsets[f + 1] - point_base
        fused = fuse_frame(p_hi - p_lo, inputs.point_index[rows], inputs.values[rows], settings.method,
                           None if inputs.entropy is None else inputs.entropy[rows], settings.weighting,
                           settings.temperature, settings.device)
        t2 = time.perf_counter()
        if inputs.fill is None:
            filled = fill_nearest(inputs.xyz[p_lo:p_hi], fused.covered, fused.pred, fused.entropy)
        else:
            fill = inputs.fill[tf.frame_fill_offsets[f] - fill_base : tf.frame_fill_offsets[f + 1] - fill_base]
            filled = fill_from_map(fill, fused.covered, f"{tf.path} frame {tf.frame_ids[f]}", fused.pred,
                                   fused.entropy)
        t3 = time.perf_counter()
        write_labels(target / "predictions" / f"{tf.frame_ids[f]}.label", to_raw(fused.pred))
        if fused.entropy is not None:
            _save_npy(target / "entropy" / f"{tf.frame_ids[f]}.npy", fused.entropy.astype(np.float16))
        t4 = time.perf_counter()
        if inputs.labels is not None:
            _score(fused.pred, inputs.labels[p_lo:p_hi].astype(np.int64), tally)
        t5 = time.perf_counter()
        for key, dt in zip(("fuse", "fill", "write", "score"), (t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            tally.timings[key] += dt
        counts = tally.counts
        counts["frames"] += 1
        counts["points"] += int(p_hi - p_lo)
        counts["tile_points"] += int(rows.stop - rows.start)
        counts["fused"] += int(fused.covered.sum())
        counts["filled"] += filled


def _score(pred: np.ndarray, labels: np.ndarray, tally: _Tally) -> None:
    counts = tally.counts
    valid = pred >= 0  # only a frame without any tile has no prediction
    tally.confusion += confusion_matrix(pred[valid], labels[valid], NUM_CLASSES)
    unpredicted = labels[~valid & (labels != IGNORE_INDEX)]
    if len(unpredicted):  # misses of their class, not points left out of the score
        tally.missed += np.bincount(unpredicted, minlength=NUM_CLASSES)
        counts["unpredicted"] += len(unpredicted)
    counts["scored"] += int((labels != IGNORE_INDEX).sum())
    counts["frames_scored"] += 1


def run(cfg: DictConfig) -> dict:
    """Fuse, write predictions and scores; returns the metrics written to metrics.json.

    One thread reads the next chunk's arrays while this one fuses and writes the current chunk's
    frames: HDF5 reads (and their decompression) overlap the fusion kernels and the label writes.
    """
    started = time.perf_counter()
    settings = _Settings.of(cfg)
    manifest, tile_files, found = check_shards(cfg)
    out_dir = fusion_output_dir(cfg)
    digest = inputs_digest(settings, tile_files, found)
    finished = _finished_metrics(out_dir, digest, tile_files, settings.kind == "mc")
    if finished is not None:
        log.info("fuse: %s is up to date with its shards and tile files; nothing to do (delete it to fuse again)",
                 out_dir / "metrics.json")
        return finished
    # the first call of the scatter kernels in a process is slow: pay it before the timed loop
    fuse_frame(2, np.array([0, 1, 1]), np.zeros((3, NUM_CLASSES), np.float16), settings.method,
               np.zeros(3, np.float32) if settings.kind == "mc" else None, settings.weighting, settings.temperature,
               settings.device)
    tally = _Tally()
    tally.timings["check"] = time.perf_counter() - started
    scored_sequences = [s for s in found if bool(tile_files[s].attrs.get("has_labels", False))]
    work = [(s, chunk, path) for s, chunk_files in found.items() for chunk, path in chunk_files]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuse-read") as reader:
        def read(i):
            s, chunk, path = work[i]
            return reader.submit(_read_chunk, path, tile_files[s], chunk, settings.kind, s in scored_sequences)

        pending = read(0) if work else None
        for i, (sequence, _, _) in enumerate(work):
            t0 = time.perf_counter()
            inputs = pending.result()
            pending = read(i + 1) if i + 1 < len(work) else None
            tally.timings["read"] += time.perf_counter() - t0  # waiting for the reader: what overlap did not hide
            tally.timings["read_io"] += inputs.seconds
            _fuse_chunk(inputs, settings, out_dir / "sequences" / sequence, tally)
    tally.timings["total"] = time.perf_counter() - started
    metrics = {**_metrics(cfg, settings, manifest, found, scored_sequences, tally, out_dir), "inputs_sha1": digest}
    _write_scores(cfg, settings, metrics, tally, out_dir)
    return metrics


def plan(cfg: DictConfig) -> Plan:
    """Done when ``metrics.json`` was written from the same shards and tile files, as :func:`run` decides."""
    settings = _Settings.of(cfg)
    out_dir = fusion_output_dir(cfg)
    outputs = [str(out_dir / "sequences"), str(out_dir / "metrics.json")]
    try:
        _, tile_files, found = check_shards(cfg)
    except ConfigError:
        raise
    except ScalePTError:  # shards or tiles not there yet: everything is left
        return Plan("fuse", 1, ["every predicted frame, once inference is done"], outputs)
    if _finished_metrics(out_dir, inputs_digest(settings, tile_files, found), tile_files,
                         settings.kind == "mc") is not None:
        return Plan("fuse", 1, [], outputs)
    frames = sum(tf.num_frames for tf in tile_files.values())
    return Plan("fuse", 1, [f"{frames} frames of sequences {', '.join(tile_files)}"], outputs)


def inputs_digest(settings: _Settings, tile_files: dict[str, TileFile], found: dict) -> str:
    """SHA-1 over what fusion reads: its settings and the name, size and mtime of every shard and tile file."""
    files = [tf.path for tf in tile_files.values()] + [path for pairs in found.values() for _, path in pairs]
    stats = [(str(p), st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()]]
    text = json.dumps([settings.method, settings.weighting, settings.temperature, str(settings.device), stats])
    return hashlib.sha1(text.encode()).hexdigest()


def _finished_metrics(out_dir: Path, inputs: str, tile_files: dict[str, TileFile], with_entropy: bool) -> dict | None:
    """The metrics of an earlier run on the same inputs whose prediction files are all there, else None."""
    path = out_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if metrics.get("inputs_sha1") != inputs:
        return None
    for sequence, tf in tile_files.items():  # the sequences fused: those of infer.splits
        target = out_dir / "sequences" / sequence
        if not all((target / "predictions" / f"{frame}.label").is_file() for frame in tf.frame_ids):
            return None
        if with_entropy and not all((target / "entropy" / f"{frame}.npy").is_file() for frame in tf.frame_ids):
            return None
    return metrics


def _metrics(cfg: DictConfig, settings: _Settings, manifest: dict, found: dict, scored_sequences: list[str],
             tally: _Tally, out_dir: Path) -> dict:
    confusion, missed, counts, timings = tally.confusion, tally.missed, tally.counts, tally.timings
    method, weighting = settings.method, settings.weighting
    iou = iou_per_class(confusion, missed)
    scored = bool(scored_sequences) and confusion.sum() + missed.sum() > 0
    return {
        "fusion": method, "weighting": weighting if method == "mc_uncertainty" else None,
        "temperature": settings.temperature if method == "mc_uncertainty" and weighting == "entropy" else None,
        "mc_passes": manifest["mc_passes"], "sampling": str(cfg.sampling.name), "dataset": str(cfg.dataset.name),
        "run_dir": str(cfg.run_dir), "checkpoint_sha1": manifest["checkpoint"],
        "sequences": list(found), "scored_sequences": scored_sequences,
        "miou": mean_iou(confusion, missed) if scored else None,
        "miou_present": mean_iou_present(confusion, missed) if scored else None,
        "accuracy": accuracy(confusion, missed) if scored else None,
        "iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(CLASS_NAMES, iou)} if scored else None,
        "confusion": confusion.tolist(), "missed_per_class": missed.tolist(),
        **{f"num_{k}": v for k, v in counts.items()},
        "timings_s": timings,
        "frames_per_s": counts["frames"] / timings["total"] if timings["total"] else None,
        "fusion_mpoints_per_s": counts["tile_points"] / timings["fuse"] / 1e6 if timings["fuse"] else None,
        "predictions": str(out_dir / "sequences"),
    }


def _write_scores(cfg: DictConfig, settings: _Settings, metrics: dict, tally: _Tally, out_dir: Path) -> None:
    """metrics.json always; iou.md and confusion.png when something was scored; the log lines."""
    with atomic_path(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    method, counts, miou = settings.method, tally.counts, metrics["miou"]
    if miou is not None:
        table = iou_table(iou_per_class(tally.confusion, tally.missed), miou, metrics["accuracy"],
                          metrics["miou_present"])
        header = (f"# {method} fusion, sampling={cfg.sampling.name}\n\nSequences "
                  f"{', '.join(metrics['scored_sequences'])}: {counts['frames_scored']} frames, "
                  f"{counts['scored']} scored points.\n\n")
        with atomic_path(out_dir / "iou.md") as tmp:
            tmp.write_text(header + table)
        save_confusion_png(out_dir / "confusion.png", tally.confusion,
                           f"{method} / {cfg.sampling.name}: mIoU {100 * miou:.1f}%")
        log.info("fuse: per-class IoU (%s fusion, sampling=%s)\n%s", method, cfg.sampling.name, table.rstrip())
    else:
        log.info("fuse: no labelled sequence among %s: predictions written, nothing scored",
                 ", ".join(metrics["sequences"]))
    if counts["unpredicted"]:
        log.warning("fuse: %d labelled points got no prediction (frames with no point inside preprocess.crop) and "
                    "count as misses of their class", counts["unpredicted"])
    log.info("fuse: %d frames (%d points: %d fused, %d filled by nearest neighbour) in %.1f s; fusion %.1f M "
             "tile points/s; predictions in %s", counts["frames"], counts["points"], counts["fused"],
             counts["filled"], tally.timings["total"], metrics["fusion_mpoints_per_s"] or 0.0, out_dir / "sequences")
