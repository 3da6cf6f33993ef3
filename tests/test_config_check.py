"""The config check at launch: every shipped option passes, each bad value is one line naming its key."""
from __future__ import annotations

import subprocess
import sys

import pytest

from scalept.config_check import RULES, UNCHECKED, check_config, check_output_dirs
from scalept.errors import ConfigError
from scalept.launch import CONF_DIR

GROUPS = ["dataset", "sampling", "model", "train", "optim", "infer", "fusion", "stage", "cluster"]


@pytest.mark.parametrize("group, option", [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))
                                           if not p.stem.startswith("site")])
def test_every_shipped_option_passes(compose_cfg, group, option):
    check_config(compose_cfg(f"{group}={option}"))


@pytest.mark.parametrize("overrides, key", [
    (["train.grid_size=0"], "train.grid_size=0"),  # trained "successfully" on one voxel per tile before
    (["sampling.max_points=abc"], "sampling.max_points='abc'"),
    (["infer.checkpoint=foo"], "infer.checkpoint='foo'"),
    (["infer.checkpoint=model.ckpt"], "infer.checkpoint='model.ckpt'"),
    (["dataset.synthetic.workers=0"], "dataset.synthetic.workers=0"),
    (["dry_run=maybe"], "dry_run='maybe'"),
    (["local_ranks=0"], "local_ranks=0"),
    (["infer.tta.rotations=[0,45]"], "infer.tta.rotations=[0, 45]"),
    (["dataset.splits.val=[8]"], "dataset.splits.val=[8]"),  # read sequences/08 but wrote 8.h5 before
    (["fusion=mc_uncertainty", "fusion.weighting=entropi"], "fusion.weighting='entropi'"),  # failed after infer
    (["fusion=mc_uncertainty", "fusion.temperature=0"], "fusion.temperature=0"),
    (["train.label_fraction=1.5"], "train.label_fraction=1.5"),
    (["train.augmentation.scale=[1.1,0.9]"], "train.augmentation.scale=[1.1, 0.9]"),
    (["optim.lr_scaling=cubic"], "optim.lr_scaling='cubic'"),
    (["infer.device=gpu"], "infer.device='gpu'"),
    (["train.amp=yes"], "train.amp='yes'"),
    (["preprocess.crop.min_range=70"], "preprocess.crop.min_range=70"),
    (["sampling=hilbert", "sampling.overlap=40000"], "sampling.overlap=40000"),
    (["infer.splits=[valid]"], "infer.splits names 'valid'"),
    (["model.enc_channels=[16,16,32,32]"], "model.enc_channels=[16, 16, 32, 32] needs 5 entries"),
    (["model.dec_heads=[2,2,3,4]"], "model.dec_channels=[16, 16, 32, 32]: 32 channels do not split into 3 heads"),
    (["model.orders=[z,peano]"], "model.orders=['z', 'peano']"),
    (["model.drop_path=1.5"], "model.drop_path=1.5"),
    (["model.stem_kernel=4"], "model.stem_kernel=4"),
])
def test_a_bad_value_is_one_line_naming_it(compose_cfg, overrides, key):
    with pytest.raises(ConfigError) as err:
        check_config(compose_cfg(*overrides))
    message = str(err.value)
    assert message.startswith(key) and "\n" not in message


def test_the_cli_refuses_before_any_work_with_exit_code_2(tmp_path):
    args = [sys.executable, "-m", "scalept.launch", "train.grid_size=0", f"data_dir={tmp_path}",
            f"hydra.run.dir={tmp_path}/run"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]  # stderr: Slurm --error files
    assert len(errors) == 1 and "train.grid_size=0 is not valid: use a number > 0" in errors[0]
    assert "ERROR" not in done.stdout  # once, not on both streams
    assert not (tmp_path / "synthetic").exists()  # nothing was generated


def test_output_folders_that_cannot_be_made_are_refused_before_work(compose_cfg, tmp_path):
    a_file = tmp_path / "runs"
    a_file.write_text("not a folder")
    in_the_way = r"^run_dir=.*runs/x: cannot make the folder \(.*runs is a file, not a folder\)"
    with pytest.raises(ConfigError, match=in_the_way):
        check_output_dirs(compose_cfg(f"data_dir={tmp_path}", f"run_dir={a_file}/x"))
    with pytest.raises(ConfigError, match=r"^tiles_dir=/proc/scalept-tiles: cannot make the folder \(.+\); point"):
        check_output_dirs(compose_cfg(f"data_dir={tmp_path}", "tiles_dir=/proc/scalept-tiles"))
    check_output_dirs(compose_cfg(f"data_dir={tmp_path / 'new' / 'data'}", f"run_dir={tmp_path / 'run'}"))


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_every_key_of_every_shipped_option_has_a_rule(compose_cfg):
    """A new YAML key needs a rule in config_check (or a place in UNCHECKED): nothing goes unchecked by accident."""
    from omegaconf import OmegaConf

    keys = {k for g in GROUPS for p in (CONF_DIR / g).glob("*.yaml") if not p.stem.startswith("site")
            for k in _leaves(OmegaConf.to_container(compose_cfg(f"{g}={p.stem}"), resolve=False))}
    assert "model.enc_channels" in keys and "train.grid_size" in keys
    free = [k for k in keys if k not in RULES and not k.startswith(UNCHECKED)]
    assert not free, f"keys without a rule in scalept/config_check.py: {sorted(free)}"
