"""Grid pooling (merge 2x2x2 cells along the serialized order) and unpooling."""
from __future__ import annotations

import torch
from torch import nn

from scalept.model.points import Level, gather


def _bn_act(channels: int, eps: float, momentum: float) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm1d(channels, eps=eps, momentum=momentum), nn.GELU())


class GridPool(nn.Module):
    """Linear, then the max over each merged cell, then BatchNorm and GELU.

    Cells are contiguous runs of order 0 (see ``points.pool_level``), so one
    ``segment_reduce`` over lengths does the max without a start value (its
    ``initial`` argument gives wrong maxima) and without atomics.
    """

    def __init__(self, in_channels: int, out_channels: int, bn_eps: float, bn_momentum: float):
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels)
        self.norm = _bn_act(out_channels, bn_eps, bn_momentum)

    def forward(self, feat: torch.Tensor, fine: Level) -> torch.Tensor:
        x = gather(self.proj(feat), fine.order[0])
        return self.norm(torch.segment_reduce(x, "max", lengths=fine.pool_lengths, axis=0))


class GridUnpool(nn.Module):
    """Skip features projected plus coarse features projected and gathered back to the fine points."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, bn_eps: float, bn_momentum: float):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(in_channels, out_channels), _bn_act(out_channels, bn_eps, bn_momentum))
        self.proj_skip = nn.Sequential(
            nn.Linear(skip_channels, out_channels), _bn_act(out_channels, bn_eps, bn_momentum)
        )

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor, fine: Level) -> torch.Tensor:
        return self.proj_skip(skip) + gather(self.proj(coarse), fine.cluster)
