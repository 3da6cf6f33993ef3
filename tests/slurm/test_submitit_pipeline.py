"""`-m stage=pipeline cluster=slurm nodes=2`: train+infer as one DDP world of 2 ranks, fusion as a dependent job."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time


def test_submitit_pipeline_job_is_one_ddp_world_and_fusion_follows(cluster, tmp_path, tiny_pipeline):
    run_dir = tmp_path / "run"
    sweep = tmp_path / "sweep"
    env = {**cluster.env, "SCALEPT_MASTER_ADDR": "127.0.0.1"}  # n1, n2 do not resolve on the local cluster
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "scalept.launch", "-m", "stage=pipeline", "sampling=hilbert", "cluster=slurm",
         "nodes=2", f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=10", *tiny_pipeline],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    print(f"\npipeline job through submitit: {time.monotonic() - started:.1f} s")

    scripts = sorted((sweep / ".submitit").glob("*/*_submission.sh"), key=lambda p: int(p.parent.name.split("_")[0]))
    assert len(scripts) == 2, scripts  # the array job of the sweep, then the fusion job rank 0 submitted
    job, fuse_job = (s.parent.name for s in scripts)
    assert "#SBATCH --nodes=2" in scripts[0].read_text() and "--array" not in scripts[0].read_text()  # one point
    fuse_script = scripts[1].read_text()
    assert f"#SBATCH --dependency=afterok:{job}" in fuse_script and "#SBATCH --nodes=1" in fuse_script

    (pipeline,) = cluster.wait_finished(job, timeout=60)
    assert (pipeline["JobState"], pipeline["NodeList"], pipeline["NumTasks"]) == ("COMPLETED", "n[1-2]", "2")
    (fuse,) = cluster.wait_finished(fuse_job, timeout=120)
    fuse_log = (sweep / ".submitit" / fuse_job / f"{fuse_job}_0_log.err")
    assert fuse["JobState"] == "COMPLETED", fuse_log.read_text()[-3000:] if fuse_log.exists() else fuse
    assert cluster.time(fuse, "StartTime") >= cluster.time(pipeline, "EndTime")  # a separate job, after inference ended

    rank_line = re.compile(r"scalept-launch: job \S+, rank (\d) of (\d) on node (n\d)")
    seen = {}
    for task in ("0", "1"):
        log = "".join((sweep / ".submitit" / job / f"{job}_{task}_log.{ext}").read_text() for ext in ("out", "err"))
        (rank, world, node), = rank_line.findall(log)
        seen[rank] = (world, node)
        assert ("fusion submitted as job" in log) == (rank == "0")
    assert seen == {"0": ("2", "n1"), "1": ("2", "n2")}  # rank 0 on n1, rank 1 on n2
    assert json.loads((run_dir / "train_metrics.json").read_text())["world_size"] == 2
    infer_dir = run_dir / "infer" / "logit_average"
    assert sorted(p.name for p in infer_dir.glob("shard-*.json")) == ["shard-000.json", "shard-001.json"]
    metrics = json.loads((infer_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["miou"] <= 1.0 and metrics["scored_sequences"] == ["08"]
    for name, record in (("pipeline", pipeline), ("fuse", fuse)):
        seconds = (cluster.time(record, "EndTime") - cluster.time(record, "StartTime")).total_seconds()
        print(f"  {name} job {record['JobId']}: {record['JobState']}, {seconds:.0f} s on {record['NodeList']}")
