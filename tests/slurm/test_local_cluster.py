"""ScalePT on a real Slurm cluster (two nodes on this machine): sbatch arrays, the Hydra submitit launcher, cancellation.

The `cluster` fixture (conftest.py) starts slurm/local-cluster.sh once per session; job ids
restart at 1 with each fresh cluster, so every test keeps its own submitit folder.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path


from scalept.data.semantickitti import Sequence
from scalept.data.tiles import TileFile, is_complete, tile_file_path

ROOT = Path(__file__).resolve().parents[2]


def launch(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "scalept.launch", *overrides]


def assert_complete_tiles(tiles_dir: Path, sampling: str, dataset_root: Path, sequences: list[str]) -> None:
    for name in sequences:
        path = tile_file_path(tiles_dir, sampling, name)
        assert path.exists() and is_complete(path), path
        assert TileFile(path).frame_ids == Sequence(dataset_root, name).frame_ids()
        assert not path.with_suffix(".parts").exists()  # every part merged and removed


def test_cluster_has_two_idle_nodes(cluster):
    nodes = cluster.run("sinfo", "-h", "-N", "-o", "%N %t %c").stdout.split("\n")
    assert sorted(line.split()[:2] for line in nodes if line) == [["n1", "idle"], ["n2", "idle"]]
    again = subprocess.run([str(ROOT / "slurm" / "local-cluster.sh"), "up"], env=cluster.env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "n1 idle, n2 idle" in again.stderr  # `up` is idempotent


def test_preprocess_sbatch_array_tiles_real_scans(cluster, real_root, tmp_path):
    """slurm/preprocess.sbatch as users submit it: one array task per unit, every tile file complete."""
    overrides = ["sampling=block", "dataset=semantickitti", f"dataset.root={real_root}", f"data_dir={tmp_path / 'data'}",
                 'dataset.splits.train=["00"]', 'dataset.splits.val=["08"]', "preprocess.frames_per_task=2"]
    dry = subprocess.run(launch("stage=preprocess", "preprocess.dry_run=true", *overrides), cwd=tmp_path,
                         env=cluster.env, capture_output=True, text=True, check=True, timeout=120)
    array = dry.stdout.strip().splitlines()[-1]
    assert array == "--array=0-3"  # 00: frames 0-2, 2-4, 4-6; 08: frame 0
    job = cluster.run("sbatch", "--parsable", array, "--mem=1G", f"--chdir={tmp_path}",
                      str(ROOT / "slurm" / "preprocess.sbatch"), *overrides).stdout.strip()
    records = cluster.wait_finished(job)
    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1", "2", "3"]
    assert {r["JobState"] for r in records} == {"COMPLETED"}, [(r["ArrayTaskId"], r["JobState"]) for r in records]
    logs = sorted(tmp_path.glob(f"slurm-scalept-preprocess-{job}_*.out"))
    assert len(logs) == 4
    assert_complete_tiles(tmp_path / "data" / "tiles" / "semantickitti", "block", real_root, ["00", "08"])


def test_hydra_multirun_is_one_array_job_of_two_tasks_on_two_nodes(cluster, synthetic_root, tmp_path):
    """`-m sampling=block,hilbert cluster=slurm nodes=2`: one array job, 2 tasks x 2 nodes, ranks split the units."""
    sweep = tmp_path / "sweep"
    data = tmp_path / "data"
    started = time.monotonic()
    run = subprocess.run(
        launch("-m", "stage=preprocess", "sampling=block,hilbert", "cluster=slurm", "nodes=2",
               f"dataset.root={synthetic_root}", 'dataset.splits.train=["00"]', f"data_dir={data}",
               "preprocess.frames_per_task=1",
               f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=10"),
        cwd=tmp_path, env=cluster.env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    print(f"multirun through submitit: {time.monotonic() - started:.1f} s")

    scripts = list((sweep / ".submitit").glob("*/*_submission.sh"))
    assert len(scripts) == 1, scripts  # the whole sweep is ONE sbatch call
    job = scripts[0].parent.name
    script = scripts[0].read_text()
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --job-name=scalept-preprocess"):
        assert line in script

    records = cluster.wait_finished(job, timeout=60)  # results are in: Slurm may still be completing the job
    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1"]
    for r in records:
        assert (r["JobState"], r["NodeList"], r["NumNodes"], r["NumTasks"]) == ("COMPLETED", "n[1-2]", "2", "2"), r

    rank_line = re.compile(r"rank (\d) of (\d) tasks of this job step \(node (n\d)\)")
    for point in ("0", "1"):
        seen = {}
        for task in ("0", "1"):
            log = (sweep / ".submitit" / f"{job}_{point}" / f"{job}_{point}_{task}_log.out").read_text()
            assert f"global_rank={task}(2)" in log  # submitit: SLURM_PROCID of SLURM_NTASKS=2
            (rank, world, node), = rank_line.findall(log)
            seen[rank] = (world, node)
        assert seen == {"0": ("2", "n1"), "1": ("2", "n2")}  # rank 0 on n1, rank 1 on n2

    for sampling in ("block", "hilbert"):  # 00 (3 frames) and 08 (2 frames): 5 units split over 2 ranks
        assert_complete_tiles(data / "tiles" / "synthetic", sampling, synthetic_root, ["00", "08"])
    for point in ("0", "1"):
        assert (sweep / point / ".hydra" / "config.yaml").exists()


def test_cancelled_job_ends_the_launch_instead_of_hanging(cluster, tmp_path):
    """scancel on a running launcher job: submitit learns it from (stand-in) sacct and the launch fails fast."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    sweep = tmp_path / "sweep"
    name = "scalept-cancel-me"
    launcher = subprocess.Popen(
        launch("-m", "stage=preprocess", "sampling=block,hilbert", "cluster=slurm", f"data_dir={tmp_path / 'data'}",
               f"hydra.sweep.dir={sweep}", f"hydra.launcher.name={name}", "hydra.launcher.setup=['sleep 600']"),
        cwd=tmp_path, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        job = ""
        while not job:
            assert launcher.poll() is None, launcher.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the launcher job never started running"
            running = cluster.run("squeue", "-h", "-t", "RUNNING", "-n", name, "-o", "%F").stdout.split()
            job = running[0] if len(running) == 2 else ""  # both array tasks in their `sleep` setup line
            time.sleep(0.5)

        answer = cluster.run("sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", job).stdout
        states = {key: info["State"] for key, info in SlurmInfoWatcher().read_info(answer).items()}
        assert states == {f"{job}_0": "RUNNING", f"{job}_1": "RUNNING"}  # as submitit parses sacct
        cluster.run("scancel", job)
        cancelled_at = time.monotonic()
        _, stderr = launcher.communicate(timeout=120)  # submitit's own grace for a late result file: 15 s
        waited = time.monotonic() - cancelled_at
    finally:
        if launcher.poll() is None:
            launcher.kill()
            cluster.run("scancel", "-n", name, check=False)
    print(f"launch ended {waited:.1f} s after scancel")
    assert launcher.returncode != 0
    assert f"Job {job}_0" in stderr and "state: CANCELLED" in stderr, stderr[-3000:]
    answer = cluster.run("sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", job).stdout
    states = {key: info["State"] for key, info in SlurmInfoWatcher().read_info(answer).items()}
    assert states == {f"{job}_0": "CANCELLED", f"{job}_1": "CANCELLED"}
