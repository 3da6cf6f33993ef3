"""The training stage on a tiny synthetic problem (CPU): learning, resume, checkpoints, subsets, logging."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import socket

import numpy as np
import pytest
import torch

from scalept import train
from scalept.checkpoint import CheckpointError, checkpoint_path, load_checkpoint
from scalept.data.dataset import split_tile_files
from scalept.data.tiles import TileFile, TileFileError
from scalept.errors import ConfigError, ScalePTError
from tiny_training import TRAIN_SEQUENCES, compose_tiny, make_tiny_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.getbasetemp() / "tiny-data")  # shared with test_distributed


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and fast enough at this size
    yield
    torch.set_num_threads(threads)


# 2 epochs of 12 tiles (frame 0 of each sequence, ~2,000 voxels each) in micro-batches of 2-3 tiles,
# validated after each epoch
RESUME = ("train.label_fraction=0.25", "train.batch_voxels=6000", "train.epochs=2", "train.val_every=1")


def steps_per_epoch(cfg) -> list[int]:
    """Optimizer steps of each epoch as the stage plans them."""
    data = train.build_train_data(cfg, 0, 1, torch.device("cpu"), int(cfg.seed))
    return [math.ceil(data.micro_steps(e) / data.accum) for e in range(data.epochs)]


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    torch.set_num_threads(1)
    return run_dir, train.run(compose_tiny(data_dir, run_dir, *RESUME))


@pytest.mark.slow
def test_loss_decreases_and_files_are_written(data_dir, tmp_path):
    cfg = compose_tiny(data_dir, tmp_path, "train.max_steps=24", "train.val_every=0", "train.label_fraction=0.25")
    result = train.run(cfg)
    losses = [loss for _, loss in result["step_losses"]]
    assert len(losses) == 24 and result["steps"] == 24
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:3]), losses
    saved = json.loads((tmp_path / "train_metrics.json").read_text())
    for key in ("steps", "epochs", "final_loss", "best_val_miou", "voxels_per_s", "peak_rss_gb", "seconds"):
        assert key in saved
    assert saved["voxels_per_s"] > 0 and saved["final_loss"] == pytest.approx(losses[-1])
    # without validation, best.pt is the final model
    assert load_checkpoint(checkpoint_path(tmp_path, "best"))["finished"]


@pytest.mark.slow
def test_resume_continues_the_same_loss_curve(data_dir, tmp_path, uninterrupted, monkeypatch):
    _, reference = uninterrupted
    expected = dict(reference["step_losses"])
    first, second_epoch = steps_per_epoch(compose_tiny(data_dir, tmp_path, *RESUME))
    assert first >= 3 and second_epoch >= 3, "the plan must give room to stop mid-epoch in both epochs"
    total = first + second_epoch
    assert sorted(expected) == list(range(1, total + 1)) and reference["total_steps"] == total

    # 1) a real SIGUSR2 during step 2 (mid-epoch 0), with a launcher's handler installed before us
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    calls = {"n": 0}
    loss_fn = train.segmentation_loss

    def loss_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGUSR2)
        return loss_fn(*args, **kwargs)

    monkeypatch.setattr(train, "segmentation_loss", loss_then_signal)
    try:
        with pytest.raises(train.TrainingInterrupted, match="SIGUSR2 at step 2"):
            train.run(compose_tiny(data_dir, tmp_path, *RESUME))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    monkeypatch.setattr(train, "segmentation_loss", loss_fn)
    assert seen == [signal.SIGUSR2]  # the launcher's handler ran after the checkpoint
    state = load_checkpoint(checkpoint_path(tmp_path, "last"))
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (2, 0, 2)
    assert signal.getsignal(signal.SIGUSR2) is previous

    # 2) resume; simulated preemption 2 steps into epoch 1 (after a validation)
    stop = first + 2
    second = train.run(compose_tiny(data_dir, tmp_path, *RESUME, f"train.stop_at_step={stop}"))
    assert second["preempted"] and [s for s, _ in second["step_losses"]] == list(range(3, stop + 1))
    # 3) resume to the end
    third = train.run(compose_tiny(data_dir, tmp_path, *RESUME))
    assert [s for s, _ in third["step_losses"]] == list(range(stop + 1, total + 1))

    resumed = {}
    for part in (second, third):
        resumed.update(dict(part["step_losses"]))
    for step, loss in resumed.items():
        assert loss == pytest.approx(expected[step], abs=1e-6), (step, loss, expected[step])
    assert third["best_val_miou"] == pytest.approx(reference["best_val_miou"], abs=1e-9)
    assert third["param_digest"] == reference["param_digest"]

    # 4) a finished run is skipped
    again = train.run(compose_tiny(data_dir, tmp_path, *RESUME))
    assert again["skipped"] and again["steps"] == total


def test_a_killed_writers_temporary_checkpoint_is_removed_when_training_starts(data_dir, tmp_path, dead_pid):
    stale = tmp_path / "checkpoints" / f".last.pt.tmp-{socket.gethostname()}-{dead_pid()}"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a checkpoint")
    train.run(compose_tiny(data_dir, tmp_path, "train.max_steps=1", "train.val_every=0"))
    assert not stale.exists() and checkpoint_path(tmp_path, "last").is_file()


@pytest.mark.slow
def test_a_crash_mid_epoch_resumes_from_the_periodic_checkpoint(data_dir, tmp_path, uninterrupted, monkeypatch):
    _, reference = uninterrupted
    expected = dict(reference["step_losses"])
    loss_fn, calls = train.segmentation_loss, {"n": 0}

    def loss_then_crash(*args, **kwargs):  # as kill -9 would: no handler, no checkpoint on the way out
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("node lost")
        return loss_fn(*args, **kwargs)

    monkeypatch.setattr(train, "segmentation_loss", loss_then_crash)
    with pytest.raises(RuntimeError, match="node lost"):
        train.run(compose_tiny(data_dir, tmp_path, *RESUME, "train.checkpoint_every_min=1e-9"))  # after every step
    monkeypatch.setattr(train, "segmentation_loss", loss_fn)
    state = load_checkpoint(checkpoint_path(tmp_path, "last"))
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (2, 0, 2)  # mid-epoch, the last whole step
    resumed = train.run(compose_tiny(data_dir, tmp_path, *RESUME))
    assert [s for s, _ in resumed["step_losses"]] == list(range(3, reference["total_steps"] + 1))
    for step, loss in resumed["step_losses"]:
        assert loss == pytest.approx(expected[step], abs=1e-6), step
    assert resumed["param_digest"] == reference["param_digest"]


def test_a_diverged_loss_stops_training_in_one_line_before_any_checkpoint_holds_it(data_dir, tmp_path,
                                                                                      monkeypatch):
    """A nan loss from step 3 on (as when the lr is too high): the run must fail, not train to the
    end and exit 0 with nan weights, and last.pt must stay at the last finite step."""
    from scalept.errors import TrainingDiverged

    loss_fn, calls = train.segmentation_loss, {"n": 0}

    def diverging(*args, **kwargs):
        calls["n"] += 1
        loss, parts = loss_fn(*args, **kwargs)
        return (loss * float("nan") if calls["n"] >= 3 else loss), parts

    monkeypatch.setattr(train, "segmentation_loss", diverging)
    with pytest.raises(TrainingDiverged) as err:  # a save is due after every step, a flush at the epoch's end
        train.run(compose_tiny(data_dir, tmp_path, *RESUME, "train.checkpoint_every_min=1e-9", "train.log_every=100"))
    message = str(err.value)
    assert "nan at step 3" in message and "optim.lr" in message and "\n" not in message
    state = load_checkpoint(checkpoint_path(tmp_path, "last"))
    assert state["step"] == 2 and not state["finished"]
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert not (tmp_path / "train_metrics.json").exists()


def test_checkpoint_of_another_model_is_refused_in_one_line(data_dir, uninterrupted):
    run_dir, _ = uninterrupted
    cfg = compose_tiny(data_dir, run_dir, *RESUME, "model.enc_channels=[16,16,32,32,32]")
    with pytest.raises(CheckpointError) as err:
        train.run(cfg)
    assert "\n" not in str(err.value) and "enc_channels" in str(err.value)
    with pytest.raises(CheckpointError, match="not found"):
        train.run(compose_tiny(data_dir, run_dir / "elsewhere", *RESUME, "train.resume=true"))


def test_checkpoints_describe_themselves_and_memory_settings_do_not_refuse_them(data_dir, uninterrupted):
    from scalept.data.semantickitti import CLASS_NAMES
    from scalept.model import build_model

    run_dir, _ = uninterrupted
    state = load_checkpoint(checkpoint_path(run_dir, "best"))
    assert state["class_names"] == list(CLASS_NAMES) and state["num_classes"] == len(CLASS_NAMES)
    assert state["grid_size"] == 0.2 and state["model_cfg"]["enc_channels"] == [16, 16, 32, 32, 64]
    build_model(state["model_cfg"], state["num_classes"]).load_state_dict(state["model"])  # nothing else needed
    # recomputation is a memory setting: the finished run is found (and skipped), not refused
    again = train.run(compose_tiny(data_dir, run_dir, *RESUME, "model.checkpoint_levels=2"))
    assert again["skipped"]


def test_tensorboard_has_the_scalars_images_and_hparams(uninterrupted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, reference = uninterrupted
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/voxels_per_s", "val/mIoU"} <= scalars
    assert any(tag.startswith("val/IoU/") for tag in scalars)
    assert "train/gpu_mem_gb" not in scalars  # CPU run
    assert "val/confusion" in events.Tags()["images"]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, reference["total_steps"] + 1))
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


def test_label_fraction_takes_every_kth_frame(data_dir):
    assert train.frame_subset(10, 1.0).tolist() == list(range(10))
    assert train.frame_subset(10, 0.5).tolist() == [0, 2, 4, 6, 8]
    assert train.frame_subset(10, 0.1).tolist() == [0]
    assert train.frame_subset(10, 0.3).tolist() == [0, 3, 6, 9]  # k = round(1 / 0.3) = 3
    with pytest.raises(ConfigError):
        train.frame_subset(10, 0.0)
    cfg = compose_tiny(data_dir, data_dir / "unused")
    files = [TileFile(p) for p in split_tile_files(cfg.tiles_dir, cfg.sampling.name, TRAIN_SEQUENCES)]
    pairs = train.label_fraction_tiles(files, 0.5)
    for f, tile_file in enumerate(files):
        chosen = sorted(t for g, t in pairs if g == f)
        expected = [t for t in range(tile_file.num_tiles) if tile_file.tile_frame[t] in (0, 2)]
        assert chosen == expected and chosen
    # counted over all training frames: 1/8 of two 4-frame sequences is frame 0 of the first one alone
    assert {(g, int(files[g].tile_frame[t])) for g, t in train.label_fraction_tiles(files, 0.125)} == {(0, 0)}


def test_lr_scaling_rules():
    assert train.scaled_lr(0.002, 48, 12, "none") == 0.002
    assert train.scaled_lr(0.002, 48, 12, "linear") == pytest.approx(0.008)
    assert train.scaled_lr(0.002, 48, 12, "sqrt") == pytest.approx(0.004)
    assert train.scaled_lr(0.002, 3, 12, "sqrt") == pytest.approx(0.001)
    with pytest.raises(ConfigError):
        train.scaled_lr(0.002, 3, 12, "cubic")


def test_block_parameters_get_the_block_lr(compose_cfg):
    from scalept.model import build_model
    from scalept.model.blocks import Block

    model = build_model(compose_cfg("model=ptv3_tiny").model, 19)
    base, blocks = train.param_groups(model, 0.01, 0.1, 0.005)
    assert blocks["lr"] == pytest.approx(0.001) and base["lr"] == 0.01
    in_blocks = {id(p) for m in model.modules() if isinstance(m, Block) for p in m.parameters()}
    assert {id(p) for p in blocks["params"]} == in_blocks
    assert len(base["params"]) + len(blocks["params"]) == len(list(model.parameters()))
    assert math.isclose(sum(p.numel() for g in (base, blocks) for p in g["params"]),
                        sum(p.numel() for p in model.parameters()))


def test_onecycle_schedule_and_lr_from_the_real_step_voxels(data_dir, tmp_path):
    cfg = compose_tiny(data_dir, tmp_path, "train.max_steps=2", "train.val_every=0", "train.step_voxels=9000",
                       "train.label_fraction=0.25", "optim.lr_scaling=linear", "optim.reference_voxels=4000")
    result = train.run(cfg)
    # 9,000 voxels a step on one rank with micro-batches of at most 4,500: 2 micro-batches a step
    assert result["micro_batches_per_step"] == 2 and result["batch_voxels"] == 4500
    assert 6000 <= result["step_voxels"] <= 9000  # the plan's mean: tiles of ~2,000 voxels do not fill it exactly
    assert result["lr"] == pytest.approx(0.01 * result["step_voxels"] / 4000)
    state = load_checkpoint(checkpoint_path(tmp_path, "last"))
    assert state["scheduler"]["total_steps"] == 2 and state["step"] == 2


def test_tiles_of_other_settings_are_refused_in_one_line(data_dir, tmp_path):
    # the tiny tiles were cut at 2,500 points; this run asks for 3,000
    with pytest.raises(TileFileError) as err:
        train.run(compose_tiny(data_dir, tmp_path, "sampling.max_points=3000"))
    message = str(err.value)
    assert "00.h5: built with sampling=" in message and '"max_points": 2500' in message and "\n" not in message
    assert not (tmp_path / "checkpoints").exists()


def test_training_on_sequences_without_labels_is_refused(real_root, tmp_path, compose_cfg):
    from scalept.data.semantickitti import Sequence, list_sequences
    from scalept.steps import run_step

    unlabelled = [s for s in list_sequences(real_root) if not Sequence(real_root, s).has_labels]
    assert unlabelled, "the real scans' README promises unlabelled sequences"
    cfg = compose_cfg(f"data_dir={tmp_path}", f"run_dir={tmp_path / 'run'}", "stage=train", "model=ptv3_tiny",
                      "dataset=semantickitti", f"dataset.root={real_root}", f"dataset.splits.train=[{unlabelled[0]}]",
                      "dataset.splits.val=[]", "sampling=block", "train.num_workers=0")
    run_step("preprocess", cfg)
    with pytest.raises(ScalePTError, match=rf"dataset.splits.train has sequences without labels \({unlabelled[0]}:"):
        train.run(cfg)


def test_progress_lines_carry_the_total_and_an_eta(data_dir, tmp_path, caplog):
    """Redirected output (a Slurm log) gets a line after the first step and then every log_every steps,
    each with step N/M, the share done and the time left."""
    cfg = compose_tiny(data_dir, tmp_path, "train.max_steps=6", "train.val_every=0", "train.log_every=4")
    with caplog.at_level(logging.INFO, logger="scalept.train"):
        train.run(cfg)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/6", "4/6", "6/6"], lines
    assert all(re.search(r"\(\d+%\) epoch \d+ loss [\d.]+ .* voxels/s, ETA \d+m\d\ds$", line) for line in lines), lines
    assert lines[-1].endswith("ETA 0m00s")


def test_model_hook_sees_the_trained_model_once_before_the_first_step(data_dir, tmp_path):
    """``model_hook`` gets the model the steps train (a plain module on one process; DDP-wrapped on
    several, as the 2-rank run of tests/benchmarks/test_scaling.py checks), before any step."""
    events = []
    cfg = compose_tiny(data_dir, tmp_path, "train.max_steps=2", "train.val_every=0")
    result = train.run(cfg, step_hook=lambda step: events.append(step), model_hook=events.append)
    model = events[0]
    assert isinstance(model, torch.nn.Module) and not isinstance(model, torch.nn.parallel.DistributedDataParallel)
    assert events[1:] == [1, 2]
    assert result["param_digest"] == train.param_digest(model)  # the very module that was trained


def test_clip_grad_norm_bounds_the_gradient_each_step_sees(data_dir, tmp_path, monkeypatch):
    """With ``optim.clip_grad_norm`` the optimizer steps on gradients of at most that global norm; without
    it the same steps see larger ones (so the bound is the clipping's doing)."""
    seen = []
    original_step = torch.optim.AdamW.step

    def recording_step(optimizer, *args, **kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return original_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    common = ("train.max_steps=3", "train.val_every=0", "train.bn_recalibration_batches=0")
    train.run(compose_tiny(data_dir, tmp_path / "free", *common))
    free, seen[:] = list(seen), []
    train.run(compose_tiny(data_dir, tmp_path / "clipped", *common, "optim.clip_grad_norm=0.01"))
    assert len(free) == len(seen) == 3
    assert min(free) > 0.02, free
    assert max(seen) <= 0.01 * (1 + 1e-4), seen


def test_the_full_model_on_a_cpu_is_announced_with_an_estimate(caplog):
    from omegaconf import OmegaConf

    from scalept.launch import CONF_DIR
    from scalept.model import build_model

    full = build_model(OmegaConf.load(CONF_DIR / "model" / "ptv3.yaml"), 19)
    tiny = build_model(OmegaConf.load(CONF_DIR / "model" / "ptv3_tiny.yaml"), 19)
    with caplog.at_level(logging.WARNING, logger="scalept.train"):
        train._warn_large_model_on_cpu(tiny, torch.device("cpu"), True, 300)
        assert not caplog.records
        train._warn_large_model_on_cpu(full, torch.device("cpu"), True, 300)
    assert len(caplog.records) == 1
    assert "46.2 M-parameter model on the CPU" in caplog.text and "300 steps take about 45 min" in caplog.text


def test_a_run_stopped_at_its_last_step_finishes_when_rerun(data_dir, tmp_path):
    """The stop comes before the epoch's end: the rerun does that end (BatchNorm statistics,
    validation, a finished last.pt) instead of leaving the run 'to do' forever."""
    from scalept.checkpoint import saved_progress

    stopped = train.run(compose_tiny(data_dir, tmp_path, "train.max_steps=2", "train.stop_at_step=2"))
    assert stopped["preempted"] and saved_progress(checkpoint_path(tmp_path, "last")) == {"step": 2, "finished": False}
    before = load_checkpoint(checkpoint_path(tmp_path, "last"))["model"]
    rerun = train.run(compose_tiny(data_dir, tmp_path, "train.max_steps=2"))
    assert rerun["steps"] == 2 and rerun["step_losses"] == [] and rerun["best_val_miou"] is not None
    assert saved_progress(checkpoint_path(tmp_path, "last")) == {"step": 2, "finished": True}
    after = load_checkpoint(checkpoint_path(tmp_path, "last"))["model"]
    stats = [k for k in after if k.endswith("running_var")]
    assert stats and all(torch.equal(before[k], after[k]) for k in after if k not in stats and "running" not in k
                         and not k.endswith("num_batches_tracked"))
    assert any(not torch.equal(before[k], after[k]) for k in stats)  # re-estimated
    mc_stats = load_checkpoint(checkpoint_path(tmp_path, "last"))["stochastic_norm_stats"]  # drop-path on
    assert sorted(f"{name}.running_var" for name in mc_stats) == sorted(stats)
    assert any(not torch.equal(mc_stats[k.removesuffix(".running_var")][1], after[k]) for k in stats)
