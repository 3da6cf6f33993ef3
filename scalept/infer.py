"""The inference stage: predict every tile of ``infer.splits``, one shard of the work per rank.

``python -m scalept.launch stage=infer fusion=<name> run_dir=...`` loads
``<run_dir>/checkpoints/<infer.checkpoint>.pt`` (refusing one of another model
configuration), reads the tile files ``<tiles_dir>/<sampling>/<SS>.h5`` of the
sequences of ``infer.splits`` and writes, for every tile point, what fusion needs:

* ``logit_average``: the logits (float16), the mean over ``fusion.mc_passes``
  passes (stochastic when more than one);
* ``softmax_average``: the softmax probabilities (float16), likewise averaged;
  computed here on the accelerator, so fusion is a plain weighted sum;
* ``mc_uncertainty``: T = ``fusion.mc_passes`` stochastic passes (drop-path on)
  reduced to the mean softmax probabilities p̄ (float16) and the predictive
  entropy H = -Σ p̄ log p̄ (float32) per tile point.

The model runs per voxel; per-voxel outputs go to every point of the tile via
``batch['inverse']``.

Output layout, all under ``<run_dir>/infer/<fusion.name>/``::

    manifest.json                         the plan (rank 0): sequences, frames, chunk size, world
                                          size, owner rank of every chunk, checkpoint digest, fusion
    shard-<RRR>-<SS>-<first>-<stop>.h5    one per (rank, chunk of frames [first, stop) of sequence SS)
    shard-<RRR>.json                      index of rank RRR: its chunk files, counts and timings,
                                          written when the rank has finished all of them

Work is cut into chunks of ``infer.frames_per_chunk`` consecutive frames of one
sequence, independent of the world size; chunk i is done by rank i mod world
size (round-robin, every tile exactly once over the ranks). A chunk file is
written under a temporary name and renamed when its last tile is in, with
``complete=True`` set last, so a killed job loses at most the chunk in flight. A
rerun (with any world size) skips each chunk for which some complete
``shard-*-<SS>-<first>-<stop>.h5`` exists that was made with the same checkpoint
(SHA-1 of the file), fusion kind, pass count and tiles; anything else is redone.
Ranks need no process group: each reads its rank and world size from
:mod:`scalept.distributed` (Slurm, torchrun or a single process) and writes only
its own files. Results are appended to the open file batch by batch, so memory is bounded by
the batch, never by the sequence. Batches never cross chunks and the RNG is
re-seeded per chunk, so MC passes give the same chunk whatever rank computes it.

Chunk file (HDF5)::

    /frame_ids            (F,)      S32     frame stems of the chunk's frames
    /frame_tile_offsets   (F+1,)    int64   frame f's tiles are rows frame_tile_offsets[f]:[f+1] of tile_ids
    /tile_ids             (T,)      int64   tile index in the sequence's tile file
    /tile_offsets         (T+1,)    int64   tile t's points are rows tile_offsets[t]:[t+1] below
    /point_index          (P,)      int32   point index within its frame
    /logits               (P, C)    float16 (kind "logits")
    /probs                (P, C)    float16 mean probabilities (kinds "probs" and "mc")
    /entropy              (P,)      float32 predictive entropy (kind "mc")
    attrs: format_version, complete, kind, fusion, mc_passes, num_classes, sequence, frame_start,
           frame_stop, sampling, checkpoint (SHA-1), rank, world_size
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from scalept.atomic import atomic_path
from scalept.checkpoint import checkpoint_path, load_checkpoint, model_signature
from scalept.data.semantickitti import NUM_CLASSES
from scalept.data.tiles import TileFile, tile_file_path
from scalept.errors import ConfigError, ScalePTError

from scalept.distributed import barrier, get_local_rank, get_rank, get_world_size

log = logging.getLogger(__name__)

SHARD_FORMAT_VERSION = 1
FUSIONS = {"logit_average": "logits", "softmax_average": "probs", "mc_uncertainty": "mc"}
"""Known fusion names and the kind of shard each needs."""
_FRAME_ID = "S32"


class InferenceError(ScalePTError, RuntimeError):
    """Inference output is missing, incomplete or inconsistent; the message names it and the fix."""


def shard_kind(fusion_name: str) -> str:
    """'logits', 'probs' or 'mc'; an unknown ``fusion.name`` is a one-line config error."""
    if fusion_name not in FUSIONS:
        raise ConfigError(f"fusion.name={fusion_name!r} is unknown; choose one of {', '.join(FUSIONS)} "
                          "(conf/fusion/*.yaml)")
    return FUSIONS[fusion_name]


def values_name(kind: str) -> str:
    """The per-point dataset of a shard kind: ``logits`` or ``probs``."""
    return "logits" if kind == "logits" else "probs"


def infer_dir(cfg: DictConfig) -> Path:
    """``<run_dir>/infer/<fusion.name>``: this fusion's shards (and, for most fusions, its outputs)."""
    shard_kind(str(cfg.fusion.name))
    return Path(cfg.run_dir) / "infer" / str(cfg.fusion.name)


def infer_sequences(cfg: DictConfig) -> list[str]:
    """Sequences of the splits named in ``infer.splits``, each once, in order."""
    names: list[str] = []
    for split in cfg.infer.splits:
        if split not in cfg.dataset.splits:
            raise ConfigError(f"infer.splits names {split!r}, but dataset.splits has only "
                              f"{', '.join(cfg.dataset.splits)}")
        names += [str(s) for s in cfg.dataset.splits[split] if str(s) not in names]
    if not names:
        raise ConfigError(f"infer.splits={list(cfg.infer.splits)} holds no sequence; nothing to predict")
    return names


# --------------------------------------------------------------------------- planning and sharding


@dataclass(frozen=True)
class Chunk:
    """Frames ``[start, stop)`` of one sequence: the unit of inference output."""

    sequence: str
    start: int
    stop: int

    def file_name(self, rank: int) -> str:
        return f"shard-{rank:03d}-{self.sequence}-{self.start:06d}-{self.stop:06d}.h5"

    @property
    def pattern(self) -> str:
        """Glob matching this chunk's file whatever rank wrote it."""
        return f"shard-[0-9][0-9][0-9]-{self.sequence}-{self.start:06d}-{self.stop:06d}.h5"

    def __str__(self) -> str:
        return f"sequence {self.sequence} frames {self.start}-{self.stop - 1}"


def plan_chunks(frame_counts: Mapping[str, int], frames_per_chunk: int) -> list[Chunk]:
    """Every chunk of every sequence, in a stable order independent of the world size."""
    if int(frames_per_chunk) < 1:
        raise ConfigError(f"infer.frames_per_chunk={frames_per_chunk} must be >= 1")
    return [Chunk(str(s), lo, min(int(n), lo + int(frames_per_chunk)))
            for s, n in frame_counts.items() for lo in range(0, int(n), int(frames_per_chunk))]


def chunk_owner(index: int, world_size: int) -> int:
    """Round-robin: chunk ``index`` of the plan belongs to rank ``index mod world_size``."""
    return index % world_size


def shard_chunks(chunks: Sequence[Chunk], rank: int, world_size: int) -> list[Chunk]:
    """The chunks of ``rank``: every chunk belongs to exactly one rank of ``world_size``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return [c for i, c in enumerate(chunks) if chunk_owner(i, world_size) == rank]


def chunk_tiles(tile_file: TileFile, chunk: Chunk) -> range:
    """Indices (in the tile file) of the tiles of the chunk's frames."""
    return range(int(tile_file.frame_tile_offsets[chunk.start]), int(tile_file.frame_tile_offsets[chunk.stop]))


def shard_tiles(tile_files: Mapping[str, TileFile], chunks: Sequence[Chunk], rank: int,
                world_size: int) -> list[tuple[str, int]]:
    """(sequence, tile) pairs that ``rank`` predicts: the tiles of its chunks."""
    return [(c.sequence, t) for c in shard_chunks(chunks, rank, world_size) for t in chunk_tiles(tile_files[c.sequence], c)]


# --------------------------------------------------------------------------- checkpoint and model


def file_digest(path: str | os.PathLike) -> str:
    """SHA-1 of a file's bytes: which checkpoint a shard was predicted with."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def load_model(cfg: DictConfig, device: torch.device):
    """The model of ``<run_dir>/checkpoints/<infer.checkpoint>.pt``, its grid size and the file's digest."""
    from scalept.model import build_model

    path = checkpoint_path(cfg.run_dir, str(cfg.infer.checkpoint))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    signature = model_signature(model_cfg, NUM_CLASSES, float(cfg.train.grid_size))
    state = load_checkpoint(path, signature)
    model = build_model(state.get("model_cfg", model_cfg), int(state.get("num_classes", NUM_CLASSES)))
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return model, float(state.get("grid_size", cfg.train.grid_size)), file_digest(path)


def _device(cfg: DictConfig) -> torch.device:
    wanted = str(cfg.infer.get("device", "auto"))
    if wanted == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", get_local_rank() % torch.cuda.device_count())
        return torch.device("cpu")
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"infer.device={wanted} but no CUDA device is visible; use infer.device=auto or cpu")
    return torch.device(wanted)


def predict_batch(model, batch: Mapping[str, torch.Tensor], device: torch.device, kind: str, passes: int,
                  amp: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Per tile point of the batch: mean logits ('logits'), mean probabilities ('probs'), or mean
    probabilities and their entropy ('mc').

    Returns float16 (P, C) values and, for 'mc', float32 (P,) entropy, on the host.
    """
    from scalept.model import stochastic_inference

    feat = batch["feat"].to(device, non_blocking=True)
    grid = batch["grid"].to(device, non_blocking=True)
    offsets = batch["offsets"].to(device, non_blocking=True)
    inverse = batch["inverse"].to(device, non_blocking=True)
    stochastic = kind == "mc" or passes > 1
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")
    total = None
    with torch.inference_mode(), autocast:
        for _ in range(passes):
            if stochastic:
                with stochastic_inference(model):
                    out = model(feat, grid, offsets)
            else:
                out = model(feat, grid, offsets)
            out = out.float()
            if kind != "logits":
                out = torch.softmax(out, dim=1)
            total = out if total is None else total.add_(out)
        mean = total.div_(passes)
        per_point = mean[inverse]
        entropy = None
        if kind == "mc":
            entropy = -(per_point * torch.log(per_point.clamp_min(1e-12))).sum(1)
            entropy = entropy.cpu().numpy()
        return per_point.half().cpu().numpy(), entropy


# --------------------------------------------------------------------------- shard files


class ChunkWriter:
    """Appends one chunk's tiles batch by batch into a temporary HDF5 file; ``close`` publishes it."""

    def __init__(self, path: Path, chunk: Chunk, tile_file: TileFile, kind: str, num_classes: int, attrs: dict):
        self.path, self.chunk, self.tile_file, self.kind = path, chunk, tile_file, kind
        self._atomic = atomic_path(path)
        self._tmp = self._atomic.__enter__()
        self.h5 = h5py.File(self._tmp, "w")
        rows = 1 << 15
        self.h5.create_dataset("point_index", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(rows,))
        name = values_name(kind)
        self.values = self.h5.create_dataset(name, shape=(0, num_classes), maxshape=(None, num_classes),
                                             dtype=np.float16, chunks=(rows, num_classes))
        if kind == "mc":
            self.h5.create_dataset("entropy", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(rows,))
        self.attrs = attrs
        self.tile_ids: list[int] = []
        self.tile_points: list[int] = []
        self.points = 0
        self._open = True

    def append(self, tiles: Sequence[int], point_counts: Sequence[int], point_index: np.ndarray,
               values: np.ndarray, entropy: np.ndarray | None) -> None:
        n = len(point_index)
        for name, data in (("point_index", point_index), (values_name(self.kind), values),
                           ("entropy", entropy)):
            if data is None:
                continue
            ds = self.h5[name]
            ds.resize(self.points + n, axis=0)
            ds[self.points:] = data
        self.points += n
        self.tile_ids += [int(t) for t in tiles]
        self.tile_points += [int(c) for c in point_counts]

    def close(self) -> None:
        expected = list(chunk_tiles(self.tile_file, self.chunk))
        if self.tile_ids != expected:
            self.abort()
            raise InferenceError(f"{self.path}: predicted tiles {self.tile_ids[:5]}... differ from the chunk's "
                                 f"tiles {expected[:5]}...; this is a bug")
        h5 = self.h5
        ft = self.tile_file.frame_tile_offsets[self.chunk.start : self.chunk.stop + 1]
        h5.create_dataset("frame_ids", data=np.array(self.tile_file.frame_ids[self.chunk.start : self.chunk.stop],
                                                     dtype=_FRAME_ID))
        h5.create_dataset("frame_tile_offsets", data=(ft - ft[0]).astype(np.int64))
        h5.create_dataset("tile_ids", data=np.asarray(self.tile_ids, dtype=np.int64))
        h5.create_dataset("tile_offsets", data=np.r_[0, np.cumsum(self.tile_points, dtype=np.int64)])
        for key, value in self.attrs.items():
            h5.attrs[key] = value
        h5.attrs["format_version"] = SHARD_FORMAT_VERSION
        h5.attrs["complete"] = True
        h5.close()
        self._open = False
        self._atomic.__exit__(None, None, None)

    def abort(self) -> None:
        """Drop the temporary file (idempotent; a no-op after ``close``)."""
        if not self._open:
            return
        self._open = False
        try:
            self.h5.close()
        finally:
            self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)


def read_shard_meta(path: Path) -> dict | None:
    """Attributes and tile bookkeeping of a complete chunk file (None if unreadable or unfinished)."""
    try:
        with h5py.File(path, "r") as h5:
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in h5.attrs.items()}
            if not attrs.get("complete") or attrs.get("format_version") != SHARD_FORMAT_VERSION:
                return None
            return {
                "path": path, "attrs": attrs,
                "frame_ids": [s.decode() for s in h5["frame_ids"][:]],
                "frame_tile_offsets": h5["frame_tile_offsets"][:],
                "tile_ids": h5["tile_ids"][:],
                "tile_offsets": h5["tile_offsets"][:],
            }
    except (OSError, KeyError):
        return None


def shard_problem(meta: dict | None, chunk: Chunk, tile_file: TileFile, expect: Mapping) -> str | None:
    """Why a chunk file cannot be used for ``chunk`` (None when it can)."""
    if meta is None:
        return "incomplete or unreadable"
    attrs = meta["attrs"]
    for key, value in expect.items():
        if attrs.get(key) != value:
            return f"made with {key}={attrs.get(key)!r}, now {value!r}"
    if meta["frame_ids"] != tile_file.frame_ids[chunk.start : chunk.stop]:
        return "its frames differ from the tile file's (re-tiled since?)"
    expected = np.asarray(chunk_tiles(tile_file, chunk), dtype=np.int64)
    if not np.array_equal(meta["tile_ids"], expected):
        missing = np.setdiff1d(expected, meta["tile_ids"])
        if len(missing):
            frames = np.unique(tile_file.tile_frame[missing])
            names = ", ".join(f"{chunk.sequence}/{tile_file.frame_ids[f]}" for f in frames[:3])
            return f"lacks {len(missing)} tile(s) (e.g. tile {int(missing[0])}) of frame(s) {names}"
        return f"holds tiles {meta['tile_ids'][:5].tolist()}... that are not the chunk's"
    counts = np.diff(tile_file.tile_offsets[expected[0] : expected[-1] + 2]) if len(expected) else np.zeros(0)
    if not np.array_equal(np.diff(meta["tile_offsets"]), counts):
        bad = int(np.flatnonzero(np.diff(meta["tile_offsets"]) != counts)[0])
        return f"tile {int(expected[bad])} has another number of points than in the tile file"
    return None


def find_chunk_files(out_dir: Path, chunk: Chunk) -> list[Path]:
    """Chunk files of ``chunk`` written by any rank, newest first."""
    return sorted(out_dir.glob(chunk.pattern), key=lambda p: p.stat().st_mtime, reverse=True)


def usable_chunk_file(out_dir: Path, chunk: Chunk, tile_file: TileFile, expect: Mapping) -> tuple[Path | None, str]:
    """A usable finished file of ``chunk``, or None and why not."""
    why = "not found"
    for path in find_chunk_files(out_dir, chunk):
        problem = shard_problem(read_shard_meta(path), chunk, tile_file, expect)
        if problem is None:
            return path, ""
        why = f"{path.name}: {problem}"
    return None, why


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------- the stage


def _batches(tile_files: Mapping[str, TileFile], chunks: Sequence[Chunk], batch_size: int):
    """Index lists into the flat (sequence, tile) list, cut at chunk boundaries; batches per chunk."""
    batches, per_chunk, flat = [], [], 0
    for chunk in chunks:
        n = len(chunk_tiles(tile_files[chunk.sequence], chunk))
        mine = [list(range(flat + lo, flat + min(n, lo + batch_size))) for lo in range(0, n, batch_size)]
        batches += mine
        per_chunk.append(len(mine))
        flat += n
    return batches, per_chunk


def _loader(paths: list[Path], pairs: list[tuple[int, int]], batch_sampler, grid_size: float, workers: int,
            pin: bool) -> Iterator[dict]:
    from torch.utils.data import DataLoader

    from scalept.data.dataset import TileDataset, collate

    dataset = TileDataset(paths, grid_size, tiles=pairs)
    return iter(DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=workers,
                           pin_memory=pin))


def run(cfg: DictConfig, rank: int | None = None, world_size: int | None = None) -> dict:
    """Predict this rank's chunks; returns a summary (chunks done and skipped, tiles, frames, seconds)."""
    started = time.perf_counter()
    kind = shard_kind(str(cfg.fusion.name))
    passes = int(cfg.fusion.get("mc_passes", 1))
    if passes < 1:
        raise ConfigError(f"fusion.mc_passes={passes} must be >= 1")
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    batch_size = int(cfg.infer.batch_size)
    if batch_size < 1:
        raise ConfigError(f"infer.batch_size={batch_size} must be >= 1")
    out_dir = infer_dir(cfg)
    sequences = infer_sequences(cfg)
    device = _device(cfg)
    model, grid_size, digest = load_model(cfg, device)  # one-line error if missing or of another config
    paths = [tile_file_path(cfg.tiles_dir, cfg.sampling.name, s) for s in sequences]
    tile_files = {s: TileFile(p) for s, p in zip(sequences, paths)}  # one-line error if a file is missing
    chunks = plan_chunks({s: tile_files[s].num_frames for s in sequences}, int(cfg.infer.frames_per_chunk))
    expect = {"kind": kind, "fusion": str(cfg.fusion.name), "mc_passes": passes, "num_classes": NUM_CLASSES,
              "checkpoint": digest, "sampling": str(cfg.sampling.name)}
    if rank == 0:
        _write_json(out_dir / "manifest.json", {
            **expect, "world_size": world_size, "frames_per_chunk": int(cfg.infer.frames_per_chunk),
            "sequences": {s: tile_files[s].num_frames for s in sequences},
            "tiles_dir": str(cfg.tiles_dir), "run_dir": str(cfg.run_dir),
            "chunks": [{"sequence": c.sequence, "start": c.start, "stop": c.stop, "rank": chunk_owner(i, world_size),
                        "file": c.file_name(chunk_owner(i, world_size))} for i, c in enumerate(chunks)],
        })

    mine = shard_chunks(chunks, rank, world_size)
    todo, done = [], []
    for chunk in mine:
        found, why = usable_chunk_file(out_dir, chunk, tile_files[chunk.sequence], expect)
        if found is not None:
            done.append(found)
        else:
            if why != "not found":
                log.info("infer: redoing %s (%s)", chunk, why)
            todo.append(chunk)
    log.info("infer: rank %d/%d, fusion=%s, %d of its %d chunks to predict (%d finished before) on %s",
             rank, world_size, cfg.fusion.name, len(todo), len(mine), len(done), device)

    seq_index = {s: i for i, s in enumerate(sequences)}
    pairs = [(seq_index[c.sequence], t) for c in todo for t in chunk_tiles(tile_files[c.sequence], c)]
    batches, per_chunk = _batches(tile_files, todo, batch_size)
    amp = bool(cfg.infer.get("amp", True))
    tiles = points = frames = 0
    loader = _loader(paths, pairs, batches, grid_size, int(cfg.infer.num_workers), device.type == "cuda") \
        if pairs else None
    for chunk, n_batches in zip(todo, per_chunk):
        torch.manual_seed(_chunk_seed(int(cfg.seed), chunk))
        writer = ChunkWriter(out_dir / chunk.file_name(rank), chunk, tile_files[chunk.sequence], kind,
                             NUM_CLASSES, {**expect, "sequence": chunk.sequence, "frame_start": chunk.start,
                                           "frame_stop": chunk.stop, "rank": rank, "world_size": world_size})
        try:
            for _ in range(n_batches):
                batch = next(loader)
                values, entropy = predict_batch(model, batch, device, kind, passes, amp)
                counts = np.diff(np.r_[0, batch["point_offsets"].numpy()])
                writer.append(batch["tile"].tolist(), counts, batch["point_index"].numpy().astype(np.int32),
                              values, entropy)
                tiles += len(counts)
                points += len(values)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        frames += chunk.stop - chunk.start
        done.append(out_dir / chunk.file_name(rank))
    elapsed = time.perf_counter() - started
    summary = {"rank": rank, "world_size": world_size, "chunks": len(mine), "chunks_predicted": len(todo),
               "frames_predicted": frames, "tiles_predicted": tiles, "points_predicted": points,
               "seconds": elapsed, "files": sorted(p.name for p in done)}
    _write_json(out_dir / f"shard-{rank:03d}.json", summary)
    log.info("infer: rank %d predicted %d frames (%d tiles, %d points) in %.1f s (%.2f frames/s); shards in %s",
             rank, frames, tiles, points, elapsed, frames / elapsed if elapsed else 0.0, out_dir)
    barrier()
    return summary


def _chunk_seed(seed: int, chunk: Chunk) -> int:
    """MC passes of a chunk draw the same masks whichever rank (or rerun) predicts it."""
    text = f"{seed}/{chunk.sequence}/{chunk.start}/{chunk.stop}".encode()
    return int.from_bytes(hashlib.sha1(text).digest()[:7], "little")
