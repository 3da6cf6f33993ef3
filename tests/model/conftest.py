"""Fixtures of the model tests: model configs composed with Hydra, small random clouds."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_model(name: str):
    """The ``model`` node of conf/config.yaml composed with ``model=<name>``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"model={name}"]).model


@pytest.fixture(name="compose_model")
def compose_model_fixture():
    return compose_model


@pytest.fixture(scope="session")
def tiny_cfg():
    return compose_model("ptv3_tiny")


@pytest.fixture
def make_model(tiny_cfg):
    """Builds ``ptv3_tiny`` (with optional key overrides) from a fixed seed."""
    from omegaconf import OmegaConf

    from scalept.model import build_model

    def make(num_classes: int = 5, seed: int = 0, **overrides):
        torch.manual_seed(seed)
        cfg = OmegaConf.merge(tiny_cfg, overrides)
        return build_model(cfg, num_classes)

    return make


@pytest.fixture
def cloud():
    return random_cloud


@pytest.fixture
def batch_of():
    return concat


def random_cloud(n: int, seed: int, extent=(12.0, 12.0, 3.0), grid_size: float = 0.05):
    """``n`` distinct grid cells in random order, shifted to start at 0, and their features (x, y, z, r)."""
    g = torch.Generator().manual_seed(seed)
    xyz = torch.rand(4 * n, 3, generator=g) * torch.tensor(extent)
    grid = torch.unique(torch.floor(xyz / grid_size).long(), dim=0)
    grid = grid[torch.randperm(len(grid), generator=g)[:n]]
    assert len(grid) == n, "extent too small for n distinct cells"
    grid = grid - grid.min(0).values
    feat = torch.cat([grid * grid_size, torch.rand(n, 1, generator=g)], dim=1).float()
    return feat, grid.int()


def concat(*clouds):
    """One batch from several (feat, grid) samples: features, grid, cumulative end offsets."""
    feat = torch.cat([c[0] for c in clouds])
    grid = torch.cat([c[1] for c in clouds])
    offsets = torch.cumsum(torch.tensor([len(c[0]) for c in clouds]), 0)
    return feat, grid, offsets
