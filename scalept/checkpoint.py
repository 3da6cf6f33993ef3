"""Checkpoints: ``<run_dir>/checkpoints/{last,best}.pt``, written atomically, loaded safely.

A checkpoint is a plain dict that ``torch.load(..., weights_only=True)`` accepts
(tensors, numbers, strings, lists and dicts only): :func:`model_record` (the weights,
the model config they were built from, the class names and the grid size), plus
whatever the trainer needs to resume (optimizer, scheduler, epoch, step, position in
the epoch, RNG states) and the run's resolved config.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from scalept.atomic import atomic_path, ensure_free_space
from scalept.errors import ScalePTError


class CheckpointError(ScalePTError, RuntimeError):
    """A checkpoint is missing, unreadable or of another model configuration."""


def checkpoint_path(run_dir: str | os.PathLike, which: str = "last") -> Path:
    if which not in ("last", "best"):
        raise CheckpointError(f"checkpoint must be 'last' or 'best', got {which!r}")
    return Path(run_dir) / "checkpoints" / f"{which}.pt"


# Model config keys that change how a run trains (memory, labels), not what its weights mean.
NOT_IN_SIGNATURE = ("name", "checkpoint_levels")


def _plain(model_cfg: Mapping) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(model_cfg, DictConfig):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    return dict(model_cfg)


def model_signature(model_cfg: Mapping, num_classes: int, grid_size: float) -> str:
    """What must match for weights to be reusable: the model config (less :data:`NOT_IN_SIGNATURE`),
    the classes and the grid.

    ``model_cfg`` may be a plain mapping or an OmegaConf node (``cfg.model``); both give the same string.
    """
    model = {k: v for k, v in _plain(model_cfg).items() if k not in NOT_IN_SIGNATURE}
    return json.dumps({"model": model, "num_classes": num_classes, "grid_size": grid_size}, sort_keys=True)


# What model_record writes and every reader needs: the weights and what they are.
RECORD_KEYS = frozenset({"model", "model_cfg", "num_classes", "class_names", "grid_size", "signature"})


def model_record(model: torch.nn.Module, model_cfg: Mapping, class_names: Sequence[str], grid_size: float) -> dict:
    """The part of every checkpoint that makes it self-describing: the weights, the model config they
    were built from, the classes and the grid, and the signature of the three."""
    model_cfg = _plain(model_cfg)
    record = {"model": model.state_dict(), "model_cfg": model_cfg, "num_classes": len(class_names),
              "class_names": list(class_names), "grid_size": float(grid_size),
              "signature": model_signature(model_cfg, len(class_names), float(grid_size))}
    stochastic_norm_stats = getattr(model, "stochastic_norm_stats", None)
    if stochastic_norm_stats is not None:  # the BatchNorm statistics of Monte-Carlo passes (model/ptv3.py)
        record["stochastic_norm_stats"] = stochastic_norm_stats
    return record


def save_checkpoint(path: str | os.PathLike, state: Mapping) -> None:
    """Write ``state`` (a :func:`model_record` plus anything else) atomically."""
    missing = RECORD_KEYS - set(state)
    if missing:
        raise ValueError(f"checkpoint state lacks {sorted(missing)}")
    ensure_free_space(path, _tensor_bytes(state) + (1 << 20))
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested state (what torch.save will write, give or take its headers)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def load_checkpoint(path: str | os.PathLike, signature: str | None = None, map_location="cpu") -> dict:
    """Load a checkpoint; with ``signature``, refuse one of another model configuration."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; train first (stage=train) or check run_dir")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"{path}: not a readable ScalePT checkpoint ({type(err).__name__}); delete it "
                              "or point run_dir elsewhere") from None
    if not isinstance(state, dict) or not RECORD_KEYS <= set(state):
        raise CheckpointError(f"{path}: not a self-describing ScalePT checkpoint (it lacks "
                              f"{sorted(RECORD_KEYS - set(state)) if isinstance(state, dict) else 'everything'}); "
                              "train again to write one")
    if signature is not None and state["signature"] != signature:
        raise CheckpointError(f"{path}: saved for another model configuration ({_difference(state['signature'], signature)}); "
                              "use the same model/train.grid_size as that run, or another run_dir")
    return state


def saved_progress(path: str | os.PathLike) -> dict | None:
    """``step`` and ``finished`` of a training checkpoint, without reading its tensors; None if unreadable."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - missing, half-written or not a checkpoint: no progress to report
        return None
    if not isinstance(state, dict):
        return None
    return {"step": int(state.get("step", 0)), "finished": bool(state.get("finished", False))}


def _difference(saved: str, wanted: str) -> str:
    a, b = json.loads(saved), json.loads(wanted)
    flat_a = {**{f"model.{k}": v for k, v in a["model"].items()}, **{k: v for k, v in a.items() if k != "model"}}
    flat_b = {**{f"model.{k}": v for k, v in b["model"].items()}, **{k: v for k, v in b.items() if k != "model"}}
    keys = sorted(k for k in set(flat_a) | set(flat_b) if flat_a.get(k) != flat_b.get(k))
    return ", ".join(f"{k}: saved {flat_a.get(k)!r}, now {flat_b.get(k)!r}" for k in keys[:3])
