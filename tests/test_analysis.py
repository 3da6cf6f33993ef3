"""scalept.analysis on a hand-made sweep: Hydra job configs, metrics JSONs, one run without fusion metrics."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scalept.analysis import NoRunsError, analyse, collect, main
from scalept.data.semantickitti import CLASS_NAMES
from scalept.errors import ScalePTError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _train(points_per_s: float, gpu_gb: float, seconds: float, world_size: int) -> dict:
    return {"steps": 2000, "epochs": 10, "total_steps": 2000, "final_loss": 0.41, "best_val_miou": 0.52,
            "voxels_per_s": points_per_s, "voxels_seen_per_rank": 61_000_000, "peak_gpu_mem_gb": gpu_gb,
            "peak_rss_gb": 9.8, "seconds": seconds, "world_size": world_size, "step_voxels": 8_000_000,
            "lr": 0.002, "preempted": False, "device": "cuda:0"}


def _fuse(sampling: str, fusion: str, miou: float, first_iou: float) -> dict:
    iou = {name: round(0.3 + 0.03 * i, 3) for i, name in enumerate(CLASS_NAMES)}
    iou["car"], iou["motorcyclist"] = first_iou, None  # a class absent from the labels
    return {"fusion": fusion, "sampling": sampling, "dataset": "synthetic", "miou": miou, "accuracy": 0.884,
            "iou": iou, "timings_s": {"check": 0.1, "read": 20.0, "fuse": 30.0, "fill": 4.0, "write": 6.0,
                                      "score": 2.5, "total": 62.6},
            "frames_per_s": 65.2, "fusion_mpoints_per_s": 12.3}


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _job(sweep: Path, num: int, launch: Path, sampling: str, fusion: str, nodes: int, run_dir: str) -> None:
    hydra = sweep / str(num) / ".hydra"
    hydra.mkdir(parents=True)
    (hydra / "config.yaml").write_text(
        f"dataset:\n  name: synthetic\nsampling:\n  name: {sampling}\nmodel:\n  name: ptv3_tiny\n"
        f"fusion:\n  name: {fusion}\nrun_dir: {run_dir}\nseed: 0\nnodes: {nodes}\n")
    (hydra / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    version: 1.3.8\n    cwd: {launch}\n")


@pytest.fixture
def sweep(tmp_path: Path, monkeypatch) -> Path:
    """Launch dir tmp/launch; multirun dir below it; run dirs relative to the launch dir except one."""
    launch = tmp_path / "launch"
    sweep = launch / "multirun" / "2026-01-01" / "12-00-00"
    rel = "runs/${dataset.name}/${sampling.name}-${model.name}"
    _job(sweep, 0, launch, "block", "logit_average", 1, rel)
    _job(sweep, 1, launch, "hilbert", "logit_average", 1, rel)
    _job(sweep, 2, launch, "hilbert", "mc_uncertainty", 1, rel)  # inference/fusion never finished
    two_nodes = tmp_path / "elsewhere" / "block-2n"
    _job(sweep, 3, launch, "block", "logit_average", 2, str(two_nodes))
    block, hilbert = launch / "runs/synthetic/block-ptv3_tiny", launch / "runs/synthetic/hilbert-ptv3_tiny"
    _write(block / "train_metrics.json", _train(152_340.0, 21.4, 3600.0, 4))
    _write(block / "infer/logit_average/metrics.json", _fuse("block", "logit_average", 0.5512, 0.912))
    _write(block / "infer/logit_average/shard-000.json", {"rank": 0, "seconds": 310.0})
    _write(block / "infer/logit_average/shard-001.json", {"rank": 1, "seconds": 325.5})
    _write(hilbert / "train_metrics.json", _train(171_875.0, 18.9, 3200.0, 4))
    _write(hilbert / "infer/logit_average/metrics.json", _fuse("hilbert", "logit_average", 0.5731, 0.934))
    _write(two_nodes / "train_metrics.json", _train(289_000.0, 21.5, 1900.0, 8))
    _write(two_nodes / "infer/logit_average/metrics.json", _fuse("block", "logit_average", 0.5498, 0.910))
    monkeypatch.chdir(tmp_path)  # the launch dir must come from hydra.yaml, not from the cwd
    return sweep


def _rows(table: str) -> dict[tuple[str, str, str], list[str]]:
    rows = {}
    for line in table.split("## Per-class")[0].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("sampling", "---"):
            rows[tuple(cells[:3])] = cells
    return rows


def test_collect_resolves_run_dirs(sweep: Path):
    runs = collect(sweep)
    assert [(r.sampling, r.fusion, r.nodes) for r in runs] == [
        ("block", "logit_average", 1), ("block", "logit_average", 2),
        ("hilbert", "logit_average", 1), ("hilbert", "mc_uncertainty", 1)]
    assert runs[0].infer_s == 325.5  # the slowest rank
    assert runs[3].train is not None and runs[3].fuse is None
    assert runs[3].missing == ["infer/mc_uncertainty/metrics.json"]


def test_a_job_with_test_time_augmentation_is_read_from_its_tta_folder(tmp_path: Path, monkeypatch):
    """The default config predicts four rotations, whose outputs live in infer/<fusion>-tta0-90-180-270/."""
    launch, sweep = tmp_path / "launch", tmp_path / "launch" / "multirun" / "2026-01-01" / "12-00-00"
    _job(sweep, 0, launch, "knn", "logit_average", 1, "runs/knn")
    with (sweep / "0" / ".hydra" / "config.yaml").open("a") as config:
        config.write("infer:\n  tta:\n    rotations: [0, 90, 180, 270]\n    flip: false\n")
    run = launch / "runs" / "knn"
    _write(run / "train_metrics.json", _train(99_000.0, 12.0, 1000.0, 1))
    _write(run / "infer/logit_average/metrics.json", _fuse("knn", "logit_average", 0.40, 0.8))  # without TTA
    _write(run / "infer/logit_average-tta0-90-180-270/metrics.json", _fuse("knn", "logit_average", 0.52, 0.9))
    monkeypatch.chdir(tmp_path)
    (job,) = collect(sweep)
    assert job.fusion == "logit_average-tta0-90-180-270" and job.fuse["miou"] == 0.52 and not job.missing


def test_table_and_plots(sweep: Path, capsys):
    main([str(sweep)])
    out = sweep / "analysis"
    assert str(out) in capsys.readouterr().out
    table = (out / "comparison.md").read_text()
    rows = _rows(table)
    assert len(rows) == 4
    block = rows[("block", "logit_average", "1")]
    assert block[3:11] == ["55.12", "88.40", "152,340", "21.40", "9.80", "3600.0", "325.5", "62.6"]
    assert block[-1] == "ok"
    assert rows[("hilbert", "logit_average", "1")][3] == "57.31"
    assert rows[("block", "logit_average", "2")][5] == "289,000"
    missing = rows[("hilbert", "mc_uncertainty", "1")]
    assert missing[3] == "—" and missing[5] == "171,875"  # training numbers still shown
    assert missing[-1] == "missing infer/mc_uncertainty/metrics.json"
    iou_lines = [line for line in table.split("## Per-class")[1].splitlines() if line.startswith("| ")]
    assert iou_lines[0].split(" | ")[1:3] == ["car", "bicycle"]
    assert "| block/logit_average/1n | 91.2 | 33.0 |" in table
    assert "| hilbert/mc_uncertainty/1n | missing |" in table
    motorcyclist = iou_lines[0].strip("| ").split(" | ").index("motorcyclist")
    assert iou_lines[1].strip("| ").split(" | ")[motorcyclist] == "—"
    for name in ("miou", "iou_heatmap", "training", "stages", "scaling"):
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, name


def test_run_dirs_without_hydra_configs(tmp_path: Path):
    run = tmp_path / "runs" / "knn-ptv3_tiny"
    _write(run / "train_metrics.json", _train(99_000.0, 12.0, 1000.0, 1))
    _write(run / "infer/softmax_average/metrics.json", _fuse("knn", "softmax_average", 0.49, 0.8))
    only_train = tmp_path / "runs" / "block-ptv3_tiny"
    _write(only_train / "train_metrics.json", _train(88_000.0, 12.0, 1000.0, 1))
    files = analyse(tmp_path / "runs", tmp_path / "report")
    assert {f.name for f in files} == {"comparison.md", "miou.png", "iou_heatmap.png", "training.png", "stages.png"}
    rows = _rows((tmp_path / "report" / "comparison.md").read_text())
    assert rows[("knn", "softmax_average", "—")][3] == "49.00"
    assert rows[("block", "?", "—")][-1] == "missing infer/*/metrics.json"


def test_empty_sweep_is_one_line_error(tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NoRunsError, match=str(empty)) as err:
        collect(empty)
    assert isinstance(err.value, ScalePTError)
    with pytest.raises(SystemExit):
        main([str(empty)])
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and str(empty) in message
