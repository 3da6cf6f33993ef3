"""slurm/pipeline.sh on the real two-node test cluster: preprocessing array -> 2-node DDP train+infer
(one srun step, one process group, as cluster=slurm) -> fusion as its own afterok job."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_pipeline_sh_chains_preprocess_train_and_fuse(cluster, tmp_path, tiny_pipeline):
    # sbatch exports this environment to the jobs: the test's Python, and the master address that
    # works here (the node names n1, n2 do not resolve on the local cluster).
    env = {**cluster.env, "SCALEPT_PYTHON": sys.executable, "SCALEPT_MASTER_ADDR": "127.0.0.1"}
    started = time.monotonic()
    submit = subprocess.run([str(ROOT / "slurm" / "pipeline.sh"), "--nodes=2", "--ntasks-per-node=1",
                             "--sbatch=--mem=1G", *tiny_pipeline],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert submit.returncode == 0, submit.stderr[-3000:]
    jobs = dict(line.split("=", 1) for line in submit.stdout.split())
    assert list(jobs) == ["preprocess", "train", "fuse"], submit.stdout
    submitted = time.monotonic()
    assert "--array=0-1" in submit.stderr  # 00 and 08, 2 frames each: one unit per sequence

    finished = {}
    for stage in ("preprocess", "train", "fuse"):  # in dependency order, so the later waits are short
        finished[stage] = cluster.wait_finished(jobs[stage], timeout=240)
    done = time.monotonic()
    print(f"\npipeline.sh submitted in {submitted - started:.1f} s; jobs {jobs} finished {done - submitted:.1f} s later")

    def log(stage: str, job: str) -> str:
        path = tmp_path / f"slurm-scalept-{stage}-{job}.out"
        return path.read_text() if path.exists() else f"(no {path.name})"

    pre = finished["preprocess"]
    assert sorted(r["ArrayTaskId"] for r in pre) == ["0", "1"]
    assert {r["JobState"] for r in pre} == {"COMPLETED"}, [(r["ArrayTaskId"], r["JobState"]) for r in pre]

    (train,) = finished["train"]
    train_log = log("train", jobs["train"])
    assert train["JobState"] == "COMPLETED", train_log[-3000:]
    assert (train["NodeList"], train["NumNodes"], train["NumTasks"]) == ("n[1-2]", "2", "2")
    assert cluster.time(train, "StartTime") >= max(cluster.time(r, "EndTime") for r in pre)  # afterok on the whole array
    # ONE srun step (as cluster=slurm): each task starts once, rank 0 on n1 and rank 1 on n2, and
    # its one launcher process runs training and inference in one world of 2
    ranks = re.findall(r"scalept-(\w+): rank (\d) of (\d) on node (n\d)", train_log)
    assert sorted(ranks) == [("train", "0", "2", "n1"), ("train", "1", "2", "n2")], train_log[-3000:]
    launches = re.findall(rf"scalept-launch: job {jobs['train']}, rank (\d) of (\d) on node (n\d)", train_log)
    assert sorted(launches) == [("0", "2", "n1"), ("1", "2", "n2")], train_log[-3000:]
    assert json.loads((tmp_path / "run" / "train_metrics.json").read_text())["world_size"] == 2
    infer_dir = tmp_path / "run" / "infer" / "logit_average"
    assert sorted(p.name for p in infer_dir.glob("shard-*.json")) == ["shard-000.json", "shard-001.json"]
    for rank in ("0", "1"):  # per-rank Hydra dirs: the ranks did not clobber each other
        hydra_cfg = (tmp_path / "outputs" / "train" / jobs["train"] / rank / ".hydra" / "config.yaml").read_text()
        assert "- train\n- infer\n" in hydra_cfg.replace("  - ", "- ")  # stage.steps of the one step
    assert not (tmp_path / "outputs" / "infer").exists()  # no second srun step

    (fuse,) = finished["fuse"]
    assert fuse["JobState"] == "COMPLETED", log("fuse", jobs["fuse"])[-3000:]
    assert cluster.time(fuse, "StartTime") >= cluster.time(train, "EndTime")  # a separate job, after inference ended
    metrics = json.loads((infer_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["miou"] <= 1.0 and metrics["scored_sequences"] == ["08"]
    for stage in ("preprocess", "train", "fuse"):
        records = finished[stage]
        seconds = max(cluster.time(r, "EndTime") for r in records) - min(cluster.time(r, "StartTime") for r in records)
        print(f"  {stage} job {jobs[stage]}: {','.join(r['JobState'] for r in records)}, "
              f"{seconds.total_seconds():.0f} s on {','.join(sorted({r['NodeList'] for r in records}))}")
