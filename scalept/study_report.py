"""The study's comparison (``python -m scalept.analysis <study run_dir>``), from the ``study.json`` index.

Writes into the output folder::

    study.md          per evaluation: fused mIoU (official 19 classes), its difference to whole-frame
                      inference (sampling=none) with the same weights, fusion and TTA, accuracy,
                      inference frames/s and peak GPU memory; the trainings (time, voxels/s, peak
                      memory); per-class IoU of every evaluation
    study_miou.png    mIoU per tiling, one bar per fusion (x TTA), per label fraction
    study_delta.png   the difference to the whole frame, the same bars
    study_iou.png     per-class IoU of every evaluation (heat map)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from scalept.data.semantickitti import CLASS_NAMES
from scalept.study import STUDY_INDEX


def _read(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _inference(shards: Path) -> dict:
    """Frames/s (frames over the slowest rank's seconds) and peak GPU memory of one evaluation's inference."""
    summaries = [s for s in map(_read, sorted(Path(shards).glob("shard-*.json"))) if s]
    seconds = max((s["seconds"] for s in summaries), default=None)
    frames = sum(s.get("frames_predicted", 0) for s in summaries)
    peaks = [s["peak_gpu_mem_gb"] for s in summaries if s.get("peak_gpu_mem_gb") is not None]
    return {"frames_per_s": frames / seconds if seconds and frames else None,
            "peak_gpu_mem_gb": max(peaks, default=None)}


def rows(index: dict) -> list[dict]:
    """One dict per evaluation: its settings, metrics, inference figures and the whole-frame difference."""
    out = []
    for ev in index["evaluations"]:
        metrics = _read(Path(ev["metrics"])) or {}
        out.append({**ev, "miou": metrics.get("miou"), "accuracy": metrics.get("accuracy"),
                    "iou": metrics.get("iou"), **_inference(Path(ev["shards"]))})
    whole = {(r["label_fraction"], r["fusion"], r["tta"]): r["miou"] for r in out if r["sampling"] == "none"}
    for r in out:
        base = whole.get((r["label_fraction"], r["fusion"], r["tta"]))
        r["delta"] = r["miou"] - base if r["miou"] is not None and base is not None else None
    return out


def _num(value, scale: float = 100.0, fmt: str = "{:.2f}") -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "—"
    return fmt.format(value * scale)


def _label(r: dict) -> str:
    return f"{r['fusion']}{' +TTA' if r['tta'] else ''}"


def table(index: dict, evaluations: list[dict]) -> str:
    lines = [f"# ScalePT study: {index['model']} on {index['dataset']} ({index['train']} schedule)", "",
             "mIoU: the official mean over all 19 classes (%). Δ whole frame: points against sampling=none with "
             f"the same weights, fusion and TTA (TTA: z-rotations {index['tta_rotations']}).", "",
             "| label fraction | sampling | fusion | TTA | mIoU | Δ whole frame | accuracy | infer frames/s | "
             "infer peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in evaluations:
        lines.append(f"| {r['label_fraction']:g} | {r['sampling']} | {r['fusion']} | {'yes' if r['tta'] else 'no'} | "
                     f"{_num(r['miou'])} | {_num(r['delta'], fmt='{:+.2f}')} | {_num(r['accuracy'])} | "
                     f"{_num(r['frames_per_s'], 1, '{:.1f}')} | {_num(r['peak_gpu_mem_gb'], 1)} |")
    lines += ["", "## Trainings", "", "| label fraction | tiles | steps | seconds | voxels/s | peak GPU GB | "
              "final loss |", "|---|---|---|---|---|---|---|"]
    for t in index["trainings"]:
        m = _read(Path(t["run_dir"]) / "train_metrics.json") or {}
        lines.append(f"| {t['label_fraction']:g} | {t['sampling']} | {m.get('steps', '—')} | "
                     f"{_num(m.get('seconds'), 1, '{:.0f}')} | {_num(m.get('voxels_per_s'), 1, '{:,.0f}')} | "
                     f"{_num(m.get('peak_gpu_mem_gb'), 1)} | {_num(m.get('final_loss'), 1, '{:.3f}')} |")
    lines += ["", "## Per-class IoU (%)", "", "| evaluation | " + " | ".join(CLASS_NAMES) + " |",
              "|" + "---|" * (len(CLASS_NAMES) + 1)]
    for r in evaluations:
        iou = r["iou"] or {}
        lines.append(f"| {r['label_fraction']:g} {r['sampling']} {_label(r)} | "
                     + " | ".join(_num(iou.get(c), fmt="{:.1f}") for c in CLASS_NAMES) + " |")
    return "\n".join(lines) + "\n"


def _bars(evaluations: list[dict], key: str, ylabel: str, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted({r["label_fraction"] for r in evaluations}, reverse=True)
    fig, axes = plt.subplots(len(fractions), 1, figsize=(10, 3.5 * len(fractions)), squeeze=False)
    for ax, fraction in zip(axes[:, 0], fractions):
        mine = [r for r in evaluations if r["label_fraction"] == fraction]
        samplings = list(dict.fromkeys(r["sampling"] for r in mine))
        series = list(dict.fromkeys(_label(r) for r in mine))
        width = 0.8 / len(series)
        for i, name in enumerate(series):
            values = {r["sampling"]: r[key] for r in mine if _label(r) == name}
            heights = [100 * values[s] if isinstance(values.get(s), float) else 0.0 for s in samplings]
            ax.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(samplings))], heights, width,
                   label=name)
        ax.set_xticks(range(len(samplings)), samplings)
        ax.set_ylabel(ylabel)
        ax.set_title(f"label fraction {fraction:g}")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _heatmap(evaluations: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.array([[100 * ((r["iou"] or {}).get(c) or 0.0) for c in CLASS_NAMES] for r in evaluations])
    fig, ax = plt.subplots(figsize=(12, 0.3 * len(evaluations) + 2))
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(evaluations)), [f"{r['label_fraction']:g} {r['sampling']} {_label(r)}"
                                            for r in evaluations], fontsize=7)
    fig.colorbar(image, ax=ax, label="IoU (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(study_dir: Path, out: Path) -> list[Path]:
    """study.md and the plots of the study whose index is ``<study_dir>/study.json``."""
    index = json.loads((Path(study_dir) / STUDY_INDEX).read_text())
    evaluations = rows(index)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.md").write_text(table(index, evaluations))
    done = [r for r in evaluations if r["miou"] is not None]
    plots = [_bars(done, "miou", "mIoU (%)", out / "study_miou.png"),
             _bars(done, "delta", "Δ mIoU vs whole frame (points)", out / "study_delta.png"),
             _heatmap(done, out / "study_iou.png")] if done else []
    return [out / "study.md", *plots]
