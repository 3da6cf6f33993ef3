"""Compare the runs of a sweep: ``python -m scalept.analysis <sweep dir> [--out DIR]``.

Finds the runs below the sweep directory, from each Hydra job's ``.hydra/config.yaml``
(its ``run_dir``, ``sampling.name``, ``fusion.name`` and ``infer.tta``, which name the
``infer/<fusion>[-tta<views>]/`` folder, ``nodes``; a relative ``run_dir`` is taken against the
launch directory, ``hydra.runtime.cwd`` of ``.hydra/hydra.yaml``) or directly (any directory
holding ``train_metrics.json`` or ``infer/<fusion>[-tta<views>]/metrics.json``),
and writes into ``--out`` (default ``<sweep dir>/analysis/``):

    comparison.md     one row per (sampling, fusion, nodes): mIoU, accuracy, training
                      throughput and peak memory, seconds per stage; a per-class IoU table
    miou.png          mIoU per strategy, one bar per fusion (and node count)
    iou_heatmap.png   per-class IoU of every run
    training.png      training throughput and peak memory per strategy
    stages.png        seconds per stage (train, infer, fuse), stacked
    scaling.png       training throughput against node count (only with several node counts)

A run without some metrics file gets a row saying which one is missing. A study's run_dir
(``stage=study``, with its ``study.json``) gets ``study.md`` and its plots instead
(:mod:`scalept.study_report`).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from scalept.data.semantickitti import CLASS_NAMES
from scalept import study_report
from scalept.errors import ScalePTError
from scalept.study import STUDY_INDEX

log = logging.getLogger("scalept.analysis")
STAGES = ("train", "infer", "fuse")


class NoRunsError(ScalePTError):
    """The given path holds no run that the analysis can read."""


@dataclass
class Run:
    sampling: str
    fusion: str
    nodes: int | None
    run_dir: Path
    train: dict | None = None
    fuse: dict | None = None
    infer_s: float | None = None
    missing: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.sampling}/{self.fusion}" + (f"/{self.nodes}n" if self.nodes is not None else "")

    def stage_seconds(self) -> dict[str, float | None]:
        fuse_s = (self.fuse or {}).get("timings_s", {}).get("total")
        return {"train": (self.train or {}).get("seconds"), "infer": self.infer_s, "fuse": fuse_s}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _job_points(sweep: Path) -> list[tuple[str, str, int | None, Path]]:
    """(sampling, fusion, nodes, run_dir) of every Hydra job below ``sweep``."""
    from omegaconf import OmegaConf

    points = []
    for config in sorted(sweep.rglob(".hydra/config.yaml")):
        try:
            cfg = OmegaConf.load(config)
            raw = OmegaConf.to_container(cfg, resolve=False).get("run_dir")
            try:
                run_dir = str(cfg.run_dir)
            except Exception:  # an interpolation needing this job's environment: keep it literal
                run_dir = str(raw)
            sampling, fusion = str(cfg.sampling.name), _output_folder(cfg)
            nodes = cfg.get("nodes")
        except Exception as err:
            log.warning("analysis: skipping %s (%s)", config, err)
            continue
        if raw is None:
            continue
        points.append((sampling, fusion, None if nodes is None else int(nodes),
                       _resolve(Path(run_dir), config.parent, sweep)))
    return points


def _output_folder(cfg) -> str:
    """The job's folder below ``<run_dir>/infer/`` as the stages name it; a config without ``infer.tta``
    predates test-time augmentation: one view."""
    from omegaconf import OmegaConf

    from scalept.shards import output_folder_name

    return output_folder_name(cfg.fusion, OmegaConf.select(cfg, "infer.tta") or {"rotations": [0], "flip": False})


def _resolve(run_dir: Path, hydra_dir: Path, sweep: Path) -> Path:
    """A relative run_dir against the launch directory (hydra.yaml), else the sweep's ancestors, else cwd."""
    if run_dir.is_absolute():
        return run_dir
    candidates = []
    hydra_cfg = hydra_dir / "hydra.yaml"
    if hydra_cfg.is_file():
        import yaml

        try:
            cwd = yaml.safe_load(hydra_cfg.read_text())["hydra"]["runtime"]["cwd"]
            candidates.append(Path(cwd))
        except (OSError, KeyError, TypeError, yaml.YAMLError):
            pass
    candidates += [sweep.resolve(), *sweep.resolve().parents, Path.cwd()]
    for base in candidates:
        if (base / run_dir).is_dir():
            return base / run_dir
    return candidates[0] / run_dir


def _direct_run_dirs(root: Path) -> set[Path]:
    found = {p.parent.resolve() for p in root.rglob("train_metrics.json")}
    found |= {p.parent.parent.parent.resolve() for p in root.rglob("infer/*/metrics.json")}
    return found


def _infer_seconds(infer_dir: Path) -> float | None:
    """Inference wall time: ranks run side by side, so the slowest shard."""
    seconds = [s.get("seconds") for s in map(_read_json, sorted(infer_dir.glob("shard-*.json"))) if s]
    seconds = [s for s in seconds if isinstance(s, (int, float))]
    return max(seconds) if seconds else None


def collect(sweep: Path) -> list[Run]:
    """Every (sampling, fusion, nodes) run found below ``sweep``, with whatever metrics it has."""
    sweep = Path(sweep)
    if not sweep.is_dir():
        raise NoRunsError(f"{sweep}: no such directory (expected a Hydra sweep dir or a run dir)")
    runs: dict[tuple, Run] = {}
    for sampling, fusion, nodes, run_dir in _job_points(sweep):
        runs.setdefault((sampling, fusion, nodes, run_dir.resolve()), Run(sampling, fusion, nodes, run_dir))
    covered = {key[3] for key in runs}
    for run_dir in sorted(_direct_run_dirs(sweep) - covered):
        fusions = sorted(p.parent.name for p in run_dir.glob("infer/*/metrics.json")) or ["?"]
        for fusion in fusions:
            fused = _read_json(run_dir / "infer" / fusion / "metrics.json") or {}
            sampling = fused.get("sampling") or run_dir.name.rsplit("-", 1)[0]
            runs.setdefault((sampling, fusion, None, run_dir), Run(sampling, fusion, None, run_dir))
    if not runs:
        raise NoRunsError(f"{sweep}: no runs found (no <job>/.hydra/config.yaml, train_metrics.json or "
                          "infer/<fusion>/metrics.json below it)")
    for run in runs.values():
        run.train = _read_json(run.run_dir / "train_metrics.json")
        if run.train is None:
            run.missing.append("train_metrics.json")
        infer_dir = run.run_dir / "infer" / run.fusion
        run.fuse = _read_json(infer_dir / "metrics.json")
        if run.fuse is None:
            run.missing.append(f"infer/{run.fusion if run.fusion != '?' else '*'}/metrics.json")
        run.infer_s = _infer_seconds(infer_dir)
    return sorted(runs.values(), key=lambda r: (r.sampling, r.fusion, r.nodes if r.nodes is not None else -1))


def _num(value, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "—"
    return fmt.format(value * scale)


def comparison_table(runs: list[Run]) -> str:
    head = ["sampling", "fusion", "nodes", "mIoU (%)", "accuracy (%)", "train voxels/s", "peak GPU mem (GB)",
            "peak RSS (GB)"] + [f"{s} (s)" for s in STAGES] + ["fusion frames/s", "status"]
    lines = ["# ScalePT sweep comparison", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        t, f = r.train or {}, r.fuse or {}
        secs = r.stage_seconds()
        status = "ok" if not r.missing else "missing " + ", ".join(r.missing)
        cells = [r.sampling, r.fusion, "—" if r.nodes is None else str(r.nodes), _num(f.get("miou"), 100),
                 _num(f.get("accuracy"), 100), _num(t.get("voxels_per_s", t.get("points_per_s")), fmt="{:,.0f}"),
                 _num(t.get("peak_gpu_mem_gb")), _num(t.get("peak_rss_gb"))]
        cells += [_num(secs[s], fmt="{:.1f}") for s in STAGES] + [_num(f.get("frames_per_s")), status]
        lines.append("| " + " | ".join(cells) + " |")
    classes = _class_names(runs)
    lines += ["", "## Per-class IoU (%)", "", "| run | " + " | ".join(classes) + " |",
              "|" + "---|" * (len(classes) + 1)]
    for r in runs:
        iou = (r.fuse or {}).get("iou")
        cells = [_num(iou.get(c), 100, "{:.1f}") for c in classes] if iou else ["missing"] * len(classes)
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _class_names(runs: list[Run]) -> list[str]:
    seen = [c for r in runs for c in ((r.fuse or {}).get("iou") or {})]
    return [c for c in CLASS_NAMES if c in seen] + sorted(set(seen) - set(CLASS_NAMES)) or list(CLASS_NAMES)


def _grouped_bars(ax, groups: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))], values, width, label=name)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(fontsize=8)


def _val(value) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def plot(runs: list[Run], out: Path) -> list[Path]:
    """The comparison's figures that the runs have data for; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = sorted({r.sampling for r in runs})
    several_nodes = len({r.nodes for r in runs}) > 1
    trained = {(r.sampling, r.nodes): r.train for r in runs if r.train}  # fusions of a run share its training
    figures = {
        "miou.png": _miou_figure(plt, runs, strategies, several_nodes),
        "iou_heatmap.png": _iou_heatmap(plt, runs),
        "training.png": _training_figure(plt, trained, strategies),
        "stages.png": _stages_figure(plt, runs),
        "scaling.png": _scaling_figure(plt, trained, strategies) if several_nodes else None,
    }
    written = []
    for name, fig in figures.items():
        if fig is not None:
            fig.tight_layout()
            fig.savefig(out / name, dpi=100)
            plt.close(fig)
            written.append(out / name)
    return written


def _miou_figure(plt, runs: list[Run], strategies: list[str], several_nodes: bool):
    fused = [r for r in runs if r.fuse and isinstance(r.fuse.get("miou"), (int, float))]
    if not fused:
        return None
    keys = sorted({(r.fusion, r.nodes) for r in fused}, key=lambda k: (k[0], k[1] or 0))
    series = {}
    for fusion, nodes in keys:
        name = fusion + (f" ({nodes} nodes)" if several_nodes else "")
        by_s = {r.sampling: r.fuse["miou"] * 100 for r in fused if (r.fusion, r.nodes) == (fusion, nodes)}
        series[name] = [by_s.get(s, math.nan) for s in strategies]
    fig, ax = plt.subplots(figsize=(max(5, 1.5 * len(strategies)), 4))
    _grouped_bars(ax, strategies, series, "mIoU (%)")
    ax.set_title("mIoU per sampling strategy and fusion")
    return fig


def _iou_heatmap(plt, runs: list[Run]):
    with_iou = [r for r in runs if r.fuse and r.fuse.get("iou")]
    if not with_iou:
        return None
    classes = _class_names(with_iou)
    grid = [[_val(r.fuse["iou"].get(c)) * 100 for c in classes] for r in with_iou]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(classes) + 2), max(2.5, 0.4 * len(with_iou) + 1.5)))
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=8)
    ax.set_yticks(range(len(with_iou)), [r.label for r in with_iou], fontsize=8)
    fig.colorbar(image, ax=ax, label="IoU (%)")
    ax.set_title("Per-class IoU")
    return fig


def _training_figure(plt, trained: dict, strategies: list[str]):
    if not trained:
        return None
    node_counts = sorted({n for _, n in trained}, key=lambda n: n or 0)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 2.5 * len(strategies)), 4))
    panels = ((ax1, "voxels_per_s", "training voxels/s"), (ax2, "peak_gpu_mem_gb", "peak GPU memory (GB)"))
    for ax, key, ylabel in panels:
        series = {}
        for n in node_counts:
            values = [_val((trained.get((s, n)) or {}).get(key)) for s in strategies]
            if key == "peak_gpu_mem_gb" and all(math.isnan(v) for v in values):  # CPU run: process RSS
                values = [_val((trained.get((s, n)) or {}).get("peak_rss_gb")) for s in strategies]
                ylabel = "peak memory (GB, GPU or RSS)"
            series[f"{n} nodes" if n is not None else "runs"] = values
        _grouped_bars(ax, strategies, series, ylabel)
    ax1.set_title("Training throughput")
    ax2.set_title("Peak memory")
    return fig


def _stages_figure(plt, runs: list[Run]):
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(runs) + 2), 4))
    bottom = [0.0] * len(runs)
    for stage in STAGES:
        values = [_val(r.stage_seconds()[stage]) for r in runs]
        values = [0.0 if math.isnan(v) else v for v in values]
        ax.bar(range(len(runs)), values, 0.6, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks(range(len(runs)), [r.label for r in runs], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("seconds")
    ax.set_title("Time per stage")
    ax.legend(fontsize=8)
    return fig


def _scaling_figure(plt, trained: dict, strategies: list[str]):
    if not any(n is not None for _, n in trained):
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    for s in strategies:
        pts = sorted((n, _val(t.get("voxels_per_s", t.get("points_per_s"))))
                     for (s2, n), t in trained.items() if s2 == s and n)
        if pts:
            ax.plot([n for n, _ in pts], [v for _, v in pts], marker="o", label=s)
    ax.set_xlabel("nodes")
    ax.set_xticks(sorted({n for _, n in trained if n}))  # whole node counts only
    ax.set_ylabel("training voxels/s")
    ax.set_title("Scaling with node count")
    ax.legend(fontsize=8)
    return fig


def analyse(sweep: Path, out: Path | None = None) -> list[Path]:
    """Write comparison.md and the plots for ``sweep`` (study.md and its plots for a study's run_dir);
    returns the files written."""
    out = Path(out) if out is not None else Path(sweep) / "analysis"
    if (Path(sweep) / STUDY_INDEX).is_file():
        return study_report.write(Path(sweep), out)
    runs = collect(Path(sweep))
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(comparison_table(runs))
    return [out / "comparison.md", *plot(runs, out)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scalept.analysis", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="Hydra multirun directory (or a directory of run dirs)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: <sweep dir>/analysis)")
    args = parser.parse_args(argv)
    try:
        files = analyse(args.sweep_dir, args.out)
    except ScalePTError as err:  # the user's input: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"analysis written to {files[0].parent}:")
    for path in files:
        print(f"  {path}")


if __name__ == "__main__":
    main()
