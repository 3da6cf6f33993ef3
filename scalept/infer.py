"""The inference stage: predict every tile of ``infer.splits``, one shard of the work per rank.

``python -m scalept.launch stage=infer fusion=<name> run_dir=...`` loads
``<run_dir>/checkpoints/<infer.checkpoint>.pt`` (refusing one of another model
configuration) or the checkpoint file ``infer.checkpoint=<path>.pt``, reads the tile files
``<tiles_dir>/<sampling>/<SS>.h5`` of the sequences of ``infer.splits`` and writes, for every tile point, what fusion needs:

* ``logit_average``: the logits (float16), the mean over ``fusion.mc_passes``
  passes (stochastic when more than one);
* ``softmax_average``: the softmax probabilities (float16), likewise averaged;
  computed here on the accelerator, so fusion is a plain weighted sum;
* ``mc_uncertainty``: T = ``fusion.mc_passes`` stochastic passes (drop-path on)
  reduced to the mean softmax probabilities p̄ (float16) and the predictive
  entropy H = -Σ p̄ log p̄ (float32) per tile point.

The model runs per voxel; per-voxel outputs go to every point of the tile via
``batch['inverse']``.

The layout of the shard files, the planning of chunks and the checks that let a
rerun skip finished work are in :mod:`scalept.shards`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from scalept.atomic import atomic_path, remove_stale_temporaries
from scalept.checkpoint import checkpoint_path, load_checkpoint, model_signature
from scalept.data.batching import pack
from scalept.data.semantickitti import NUM_CLASSES
from scalept.data.tiles import TileFile, is_complete, open_checked, tile_file_path
from scalept.distributed import barrier, get_rank, get_world_size, session
from scalept.distributed import device as dist_device
from scalept.errors import ConfigError
from scalept.plan import Plan
from scalept.shards import (Chunk, ChunkWriter, chunk_owner, chunk_tiles, plan_chunks, predicted_sequences,
                            shard_chunks, shard_dir, shard_kind, tta_label, tta_views, usable_chunk_file)

log = logging.getLogger(__name__)

# The sub-configs this stage reads (scalept.steps hands it these and nothing else); model and
# train.grid_size only to check that the run's own checkpoint belongs to this configuration.
READS = ("run_dir", "seed", "tiles_dir", "dataset", "sampling", "preprocess", "model", "train", "infer", "fusion")

# --------------------------------------------------------------------------- checkpoint and model


def file_digest(path: str | os.PathLike) -> str:
    """SHA-1 of a file's bytes: which checkpoint a shard was predicted with."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def checkpoint_file(cfg: DictConfig) -> Path:
    """``infer.checkpoint``: ``best``/``last`` of ``<run_dir>/checkpoints``, or a ``.pt`` file of any run."""
    name = str(cfg.infer.checkpoint)
    return checkpoint_path(cfg.run_dir, name) if name in ("best", "last") else Path(name)


def load_model(cfg: DictConfig, device: torch.device):
    """The model of ``infer.checkpoint``, its grid size and the file's digest.

    The checkpoint describes itself (model config, classes, grid), so a file given by path needs
    nothing else; this run's own ``best``/``last`` must still match ``model`` and
    ``train.grid_size``, which catches a run_dir that belongs to another configuration.
    """
    from scalept.model import build_model, cast_for_inference

    path = checkpoint_file(cfg)
    own = str(cfg.infer.checkpoint) in ("best", "last")
    signature = model_signature(cfg.model, NUM_CLASSES, float(cfg.train.grid_size)) if own else None
    state = load_checkpoint(path, signature)
    model = build_model(state["model_cfg"], int(state["num_classes"]))
    model.load_state_dict(state["model"])
    model.stochastic_norm_stats = state.get("stochastic_norm_stats")  # moved to the device with the model
    cast_for_inference(model.to(device).eval(), device.type, bool(cfg.infer.amp))
    return model, float(state["grid_size"]), file_digest(path)


def view_of(feat: torch.Tensor, grid: torch.Tensor, offsets: torch.Tensor, rotation: int,
            flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch turned ``rotation`` degrees (a multiple of 90) about z, then mirrored in x.

    Quarter turns and mirrors map grid cells onto grid cells, so turning the voxels is exact: it
    gives the voxels (and representatives) that voxelizing the turned points would give, without
    going back to the loader. Each sample's grid minimum is moved back to 0.
    """
    if rotation % 360 == 0 and not flip:
        return feat, grid
    xy, cells = feat[:, :2], grid[:, :2]
    for _ in range(rotation // 90 % 4):
        xy, cells = torch.stack((-xy[:, 1], xy[:, 0]), 1), torch.stack((-cells[:, 1], cells[:, 0]), 1)
    if flip:
        xy, cells = xy * xy.new_tensor([-1.0, 1.0]), cells * cells.new_tensor([-1, 1])
    cells = torch.cat((cells, grid[:, 2:]), 1)
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    sample = torch.repeat_interleave(torch.arange(len(offsets), device=grid.device), counts,
                                     output_size=len(grid))
    lowest = cells.new_full((len(offsets), 3), torch.iinfo(cells.dtype).max)
    lowest.scatter_reduce_(0, sample[:, None].expand(-1, 3), cells, "amin")
    return torch.cat((xy, feat[:, 2:]), 1), cells - lowest[sample]


@dataclass(frozen=True)
class Prediction:
    """How every batch is predicted: what the shard stores (``kind``), MC passes, bf16, TTA views."""

    kind: str
    passes: int = 1
    amp: bool = True
    views: tuple[tuple[int, bool], ...] = ((0, False),)


def predict_batch(model, batch: Mapping[str, torch.Tensor], device: torch.device,
                  how: Prediction) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per tile point of the batch: mean logits ('logits'), mean probabilities ('probs'), or mean
    probabilities and their entropy ('mc'), over ``how.passes`` passes of each of ``how.views``
    (:func:`view_of`; test-time augmentation averages a tile's views as it averages MC passes).

    Returns float16 (P, C) values and, for 'mc', float32 (P,) entropy, in host memory. From a GPU
    they are still being copied when this returns: synchronize the stream (or an event recorded
    after the call) before reading them, which lets the caller write the previous batch meanwhile.
    """
    from scalept.model import inference_autocast, stochastic_inference

    feat = batch["feat"].to(device, non_blocking=True)
    grid = batch["grid"].to(device, non_blocking=True)
    offsets = batch["offsets"].to(device, non_blocking=True)
    inverse = batch["inverse"].to(device, non_blocking=True)
    kind, passes, views = how.kind, how.passes, how.views
    stochastic = kind == "mc" or passes > 1
    autocast = inference_autocast(device.type, enabled=how.amp and device.type == "cuda")
    total = None
    mode = stochastic_inference(model) if stochastic else contextlib.nullcontext()  # entered once per batch
    with torch.inference_mode(), autocast, mode:
        for rotation, flip in views:
            view_feat, view_grid = view_of(feat, grid, offsets, rotation, flip)
            for _ in range(passes):
                out = model(view_feat, view_grid, offsets).float()
                if kind != "logits":
                    out = torch.softmax(out, dim=1)
                total = out if total is None else total.add_(out)
        mean = total.div_(passes * len(views))
        per_point = mean[inverse]
        entropy = None
        if kind == "mc":
            entropy = _to_host(-(per_point * torch.log(per_point.clamp_min(1e-12))).sum(1))
        return _to_host(per_point.half()), entropy


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """An asynchronous copy into pinned host memory (the tensor itself on the CPU)."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------- the stage


def _batches(tile_files: Mapping[str, TileFile], chunks: Sequence[Chunk], budget: int):
    """Index lists into the flat (sequence, tile) list, each within ``budget`` tile points and cut at chunk
    boundaries (small tiles share a forward pass, a larger tile goes alone); batches per chunk.

    Points, not voxels: a tile's point count is in its file for free and bounds its voxel
    count, so no pass over the data is needed before the first prediction.
    """
    batches, per_chunk, flat = [], [], 0
    for chunk in chunks:
        tile_file = tile_files[chunk.sequence]
        tiles = chunk_tiles(tile_file, chunk)
        points = np.diff(tile_file.tile_offsets[tiles.start : tiles.stop + 1])
        mine = [[flat + i for i in step[0]] for step in pack(points, range(len(tiles)), budget, 1)]
        batches += mine
        per_chunk.append(len(mine))
        flat += len(tiles)
    return batches, per_chunk


def _loader(paths: list[Path], pairs: list[tuple[int, int]], batch_sampler, grid_size: float, workers: int,
            pin: bool) -> Iterator[dict]:
    from torch.utils.data import DataLoader

    from scalept.data.dataset import TileDataset, collate

    dataset = TileDataset(paths, grid_size, tiles=pairs)
    return iter(DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=workers,
                           pin_memory=pin))


def _check(cfg: DictConfig) -> tuple[str, int, int]:
    """(shard kind, MC passes, points per batch), each checked before the model is loaded."""
    kind = shard_kind(str(cfg.fusion.name))
    passes = int(cfg.fusion.mc_passes)
    if passes < 1:
        raise ConfigError(f"fusion.mc_passes={passes} must be >= 1")
    budget = cfg.infer.batch_points
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ConfigError(f"infer.batch_points={budget!r} must be a positive number of points, e.g. 400000")
    return kind, passes, budget


def _write_manifest(cfg: DictConfig, out_dir: Path, expect: dict, tile_files: Mapping[str, TileFile],
                    chunks: Sequence[Chunk], world_size: int) -> None:
    _write_json(out_dir / "manifest.json", {
        **expect, "world_size": world_size, "frames_per_chunk": int(cfg.infer.frames_per_chunk),
        "sequences": {s: f.num_frames for s, f in tile_files.items()},
        "tiles_dir": str(cfg.tiles_dir), "run_dir": str(cfg.run_dir),
        "chunks": [{"sequence": c.sequence, "start": c.start, "stop": c.stop, "rank": chunk_owner(i, world_size),
                    "file": c.file_name(chunk_owner(i, world_size))} for i, c in enumerate(chunks)],
    })


def _split_done(out_dir: Path, mine: Sequence[Chunk], tile_files: Mapping[str, TileFile],
                expect: dict) -> tuple[list[Chunk], list[Path]]:
    """(chunks to predict, shard files already usable) of this rank."""
    todo, done = [], []
    for chunk in mine:
        found, why = usable_chunk_file(out_dir, chunk, tile_files[chunk.sequence], expect)
        if found is not None:
            done.append(found)
        else:
            if why != "not found":
                log.info("infer: redoing %s (%s)", chunk, why)
            todo.append(chunk)
    return todo, done


def _predict_chunk(writer: ChunkWriter, batches: int, loader: Iterator[dict], model, device: torch.device,
                   how: Prediction, phase_s: dict) -> tuple[int, int]:
    """The chunk's batches through the model into its shard file; (tiles, tile points) written.

    One batch in flight: batch k's outputs are copied to the host while batch k-1's are written
    and batch k+1 is fetched, so the GPU's tail of a pass overlaps HDF5 and the loader.
    """
    tiles = points = 0
    pending = None

    def write(done) -> None:
        nonlocal tiles, points
        batch, values, entropy, copied = done
        t0 = time.perf_counter()
        if copied is not None:
            copied.synchronize()
        t1 = time.perf_counter()
        counts = np.diff(np.r_[0, batch["point_offsets"].numpy()])
        writer.append(batch["tile"].tolist(), counts, batch["point_index"].numpy().astype(np.int32), values.numpy(),
                      None if entropy is None else entropy.numpy())
        phase_s["predict"] += t1 - t0
        phase_s["write"] += time.perf_counter() - t1
        tiles += len(counts)
        points += len(values)

    try:
        for _ in range(batches):
            t0 = time.perf_counter()
            batch = next(loader)
            t1 = time.perf_counter()
            values, entropy = predict_batch(model, batch, device, how)
            copied = torch.cuda.Event() if device.type == "cuda" else None
            if copied is not None:
                copied.record()
            phase_s["read"] += t1 - t0
            phase_s["predict"] += time.perf_counter() - t1
            if pending is not None:
                write(pending)
            pending = batch, values, entropy, copied
        if pending is not None:
            write(pending)
        writer.close()
    except BaseException:
        writer.abort()  # idempotent: a full disk already dropped the temporary
        raise
    return tiles, points


def run(cfg: DictConfig, rank: int | None = None, world_size: int | None = None) -> dict:
    """Predict this rank's chunks; returns a summary (chunks done and skipped, tiles, frames, seconds).

    ``rank``/``world_size`` make this process one rank of a pretended world (tests, benchmarks);
    otherwise it is its rank of the job, in the launcher's process group or one of its own.
    """
    if rank is not None:
        return _predict(cfg, rank, get_world_size() if world_size is None else world_size)
    with session():
        return _predict(cfg, get_rank(), get_world_size())


def _predict(cfg: DictConfig, rank: int, world_size: int) -> dict:
    started = time.perf_counter()
    kind, passes, budget = _check(cfg)
    out_dir = shard_dir(cfg)
    remove_stale_temporaries(out_dir)
    sequences = predicted_sequences(cfg)
    device = dist_device(str(cfg.infer.device), "infer.device")
    model, grid_size, digest = load_model(cfg, device)  # one-line error if missing or of another config
    if device.type == "cuda":  # after the weights are on the device: CUDA is initialised, the peak counts them
        torch.cuda.reset_peak_memory_stats(device)
    paths = [tile_file_path(cfg.tiles_dir, cfg.sampling.name, s) for s in sequences]
    tile_files = dict(zip(sequences, open_checked(paths, cfg)))  # one line if missing or tiled otherwise
    chunks = plan_chunks({s: tile_files[s].num_frames for s in sequences}, int(cfg.infer.frames_per_chunk))
    expect = _expected_shards(cfg, kind, passes, digest)
    if rank == 0:
        _write_manifest(cfg, out_dir, expect, tile_files, chunks, world_size)
    mine = shard_chunks(chunks, rank, world_size)
    todo, done = _split_done(out_dir, mine, tile_files, expect)
    log.info("infer: rank %d/%d, fusion=%s, %d of its %d chunks to predict (%d finished before) on %s",
             rank, world_size, cfg.fusion.name, len(todo), len(mine), len(done), device)

    seq_index = {s: i for i, s in enumerate(sequences)}
    pairs = [(seq_index[c.sequence], t) for c in todo for t in chunk_tiles(tile_files[c.sequence], c)]
    batches, per_chunk = _batches(tile_files, todo, budget)
    how = Prediction(kind, passes, bool(cfg.infer.amp), tuple(tta_views(cfg.infer.tta)))
    tiles = points = frames = 0
    # where the time goes: checks, model and loader start; loader wait, model + copy, HDF5
    phase_s = {"setup": 0.0, "read": 0.0, "predict": 0.0, "write": 0.0}
    loader = _loader(paths, pairs, batches, grid_size, int(cfg.infer.num_workers), device.type == "cuda") \
        if pairs else None
    phase_s["setup"] = time.perf_counter() - started
    for chunk, n_batches in zip(todo, per_chunk):
        torch.manual_seed(_chunk_seed(int(cfg.seed), chunk))
        writer = ChunkWriter(out_dir / chunk.file_name(rank), chunk, tile_files[chunk.sequence], kind,
                             NUM_CLASSES, {**expect, "sequence": chunk.sequence, "frame_start": chunk.start,
                                           "frame_stop": chunk.stop, "rank": rank, "world_size": world_size})
        chunk_tiles_done, chunk_points = _predict_chunk(writer, n_batches, loader, model, device, how, phase_s)
        tiles, points, frames = tiles + chunk_tiles_done, points + chunk_points, frames + chunk.stop - chunk.start
        done.append(out_dir / chunk.file_name(rank))
    elapsed = time.perf_counter() - started
    summary = {"rank": rank, "world_size": world_size, "chunks": len(mine), "chunks_predicted": len(todo),
               "frames_predicted": frames, "tiles_predicted": tiles, "points_predicted": points,
               "seconds": elapsed, "phase_seconds": phase_s, "files": sorted(p.name for p in done),
               "peak_gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None}
    summary_path = out_dir / f"shard-{rank:03d}.json"
    if todo or not summary_path.exists():  # a rerun with nothing left keeps the timings of the run that predicted
        _write_json(summary_path, summary)
    log.info("infer: rank %d predicted %d frames (%d tiles, %d points) in %.1f s (%.2f frames/s); shards in %s",
             rank, frames, tiles, points, elapsed, frames / elapsed if elapsed else 0.0, out_dir)
    barrier()
    return summary


def _expected_shards(cfg: DictConfig, kind: str, passes: int, checkpoint_digest: str) -> dict:
    """What a finished shard must have been written with to be kept on a rerun."""
    expect = {"kind": kind, "fusion": str(cfg.fusion.name), "mc_passes": passes, "num_classes": NUM_CLASSES,
              "checkpoint": checkpoint_digest, "sampling": str(cfg.sampling.name)}
    label = tta_label(cfg.infer.tta)
    return expect if label is None else {**expect, "tta": label}  # shards from before TTA existed stay usable


def plan(cfg: DictConfig) -> Plan:
    """Chunks of frames without a usable shard (every chunk while tiles or checkpoint are missing)."""
    kind, passes, _ = _check(cfg)
    out_dir, sequences = shard_dir(cfg), predicted_sequences(cfg)
    paths = {s: tile_file_path(cfg.tiles_dir, cfg.sampling.name, s) for s in sequences}
    if not all(is_complete(p) for p in paths.values()):
        return Plan("infer", len(sequences), [f"sequence {s}: every frame, once tiled" for s in sequences],
                    [str(out_dir)])
    tile_files = {s: TileFile(p) for s, p in paths.items()}
    chunks = plan_chunks({s: f.num_frames for s, f in tile_files.items()}, int(cfg.infer.frames_per_chunk))
    todo = chunks
    checkpoint = checkpoint_file(cfg)
    if checkpoint.is_file():
        expect = _expected_shards(cfg, kind, passes, file_digest(checkpoint))
        todo = [c for c in chunks if usable_chunk_file(out_dir, c, tile_files[c.sequence], expect)[0] is None]
    return Plan("infer", len(chunks), [str(c) for c in todo], [str(out_dir)])


def _chunk_seed(seed: int, chunk: Chunk) -> int:
    """MC passes of a chunk draw the same masks whichever rank (or rerun) predicts it."""
    text = f"{seed}/{chunk.sequence}/{chunk.start}/{chunk.stop}".encode()
    return int.from_bytes(hashlib.sha1(text).digest()[:7], "little")
