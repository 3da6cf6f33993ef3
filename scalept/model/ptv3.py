"""Point Transformer V3 (U-Net of serialized patch-attention blocks), written from its description (docs/architecture.md, "The model")."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from scalept import serialization
from scalept.model.blocks import Block, Stochastic
from scalept.model.points import Level, first_level, pool_level
from scalept.model.pooling import GridPool, GridUnpool
from scalept.model.sparse import SubMConv


def _rates(drop_path: float, depths: Sequence[int]) -> list[list[float]]:
    """Drop-path rate per block, rising linearly from 0 to ``drop_path`` over the blocks, per stage."""
    flat = torch.linspace(0.0, drop_path, sum(depths)).tolist()
    bounds = [sum(depths[:i]) for i in range(len(depths) + 1)]
    return [flat[bounds[i] : bounds[i + 1]] for i in range(len(depths))]


def _check_stage_lists(levels: int, encoder: Sequence[Sequence], decoder: Sequence[Sequence]) -> None:
    if not all(len(v) == levels for v in encoder):
        raise ValueError("enc_depths, enc_channels, enc_heads and enc_patch_size must have one entry per stage")
    if not all(len(v) == levels - 1 for v in decoder):
        raise ValueError("decoder lists must have one entry fewer than the encoder lists")


def _stage_blocks(depth: int, channels: int, heads: int, patch: int, rates: Sequence[float], level: int,
                  orders: int, block_args: Mapping) -> nn.ModuleList:
    """One stage's blocks; block i serializes with order i mod ``orders`` and shares level's CPE key."""
    return nn.ModuleList(Block(channels, heads, patch, i % orders, f"cpe{level}", drop_path=rates[i], **block_args)
                         for i in range(depth))


NormStatistics = dict[str, tuple[torch.Tensor, torch.Tensor]]


class PTv3(nn.Module):
    """PTv3 segmentation network: ``model(feat, grid, offsets) -> logits``.

    ``feat`` (N, in_channels) float features, ``grid`` (N, 3) non-negative
    integer grid coordinates (unique within a sample), ``offsets`` (B,)
    cumulative end offsets of the samples concatenated in the batch (e.g.
    ``[n0, n0 + n1]``). Returns (N, num_classes) logits in the input order.
    Encoder stage s > 0 starts by pooling 2x2x2 cells; the decoder walks back up
    with unpooling and blocks, and a linear head classifies every point.
    """

    # BatchNorm running statistics that match drop-path on, by module name, for
    # :func:`stochastic_inference` (set when training ends; saved in checkpoints beside the weights)
    stochastic_norm_stats: NormStatistics | None = None

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 4,
        orders: Sequence[str] = serialization.ORDERS,
        shuffle_orders: bool = True,
        stem_kernel: int = 5,
        enc_depths: Sequence[int] = (2, 2, 2, 6, 2),
        enc_channels: Sequence[int] = (32, 64, 128, 256, 512),
        enc_heads: Sequence[int] = (2, 4, 8, 16, 32),
        enc_patch_size: Sequence[int] = (1024,) * 5,
        dec_depths: Sequence[int] = (2, 2, 2, 2),
        dec_channels: Sequence[int] = (64, 64, 128, 256),
        dec_heads: Sequence[int] = (4, 4, 8, 16),
        dec_patch_size: Sequence[int] = (1024,) * 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.3,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
        checkpoint_levels: int = 0,
    ):
        super().__init__()
        levels = len(enc_depths)
        _check_stage_lists(levels, (enc_channels, enc_heads, enc_patch_size), (dec_depths, dec_channels, dec_heads,
                                                                                dec_patch_size))
        self.orders = list(orders)
        serialization.encode_orders(torch.zeros(1, 3, dtype=torch.int64), self.orders)  # validates names
        self.shuffle_orders = shuffle_orders
        self.checkpoint_levels = checkpoint_levels
        block_args = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        blocks = partial(_stage_blocks, orders=len(self.orders), block_args=block_args)
        self.stem_conv = SubMConv(in_channels, enc_channels[0], stem_kernel, "stem", bias=False)
        self.stem_norm = nn.Sequential(nn.BatchNorm1d(enc_channels[0], eps=bn_eps, momentum=bn_momentum), nn.GELU())
        self.pools = nn.ModuleList(
            GridPool(enc_channels[s - 1], enc_channels[s], bn_eps, bn_momentum) for s in range(1, levels)
        )
        rates = _rates(drop_path, enc_depths)
        self.encoder = nn.ModuleList(
            blocks(enc_depths[s], enc_channels[s], enc_heads[s], enc_patch_size[s], rates[s], s) for s in range(levels)
        )
        # Decoder stage s works on level s; it is entered from level s + 1 (deepest first) and its
        # drop-path rates fall towards the output, mirroring the encoder.
        rates = [r[::-1] for r in _rates(drop_path, dec_depths)]
        coarse = [*dec_channels[1:], enc_channels[-1]]
        self.unpools = nn.ModuleList(
            GridUnpool(coarse[s], enc_channels[s], dec_channels[s], bn_eps, bn_momentum) for s in range(levels - 1)
        )
        self.decoder = nn.ModuleList(
            blocks(dec_depths[s], dec_channels[s], dec_heads[s], dec_patch_size[s], rates[s], s)
            for s in range(levels - 1)
        )
        self.head = nn.Linear(dec_channels[0], num_classes)

    def _blocks(self, blocks: nn.ModuleList, x: torch.Tensor, level: Level, depth: int) -> torch.Tensor:
        # Checkpoint only the finest levels: they hold most activation memory (most
        # points), while the coarse levels' many small blocks would cost recompute
        # launches for little memory.
        recompute = depth < self.checkpoint_levels and torch.is_grad_enabled()
        for block in blocks:
            if recompute:
                x = checkpoint(block, x, level, use_reentrant=False)
            else:
                x = block(x, level)
        return x

    def forward(self, feat: torch.Tensor, grid: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        orders = self.orders
        if self.training and self.shuffle_orders:
            orders = [orders[i] for i in torch.randperm(len(orders)).tolist()]
        levels = [first_level(grid, offsets, orders)]
        x = self.stem_norm(self.stem_conv(feat, levels[0]))
        skips = []
        for s, blocks in enumerate(self.encoder):
            if s > 0:
                levels.append(pool_level(levels[-1]))
                x = self.pools[s - 1](x, levels[-2])
            x = self._blocks(blocks, x, levels[s], s)
            skips.append(x)
        for s in reversed(range(len(self.decoder))):
            x = self.unpools[s](x, skips[s], levels[s])
            x = self._blocks(self.decoder[s], x, levels[s], s)
        return self.head(x)

    def set_stochastic(self, enabled: bool = True) -> PTv3:
        """MC switch: keep drop-path and dropout active in eval mode, so repeated passes differ."""
        for module in self.modules():
            if isinstance(module, Stochastic):
                module.stochastic = enabled
        return self

    @property
    def stochastic(self) -> bool:
        return any(m.stochastic for m in self.modules() if isinstance(m, Stochastic))

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()`` and casts move ``stochastic_norm_stats`` with the buffers they belong beside."""
        super()._apply(fn, recurse)
        if self.stochastic_norm_stats is not None:
            self.stochastic_norm_stats = {name: (fn(mean), fn(var))
                                          for name, (mean, var) in self.stochastic_norm_stats.items()}
        return self


def norm_statistics(model: nn.Module) -> NormStatistics:
    """A copy of every BatchNorm's running mean and variance, by module name."""
    return {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def load_norm_statistics(model: nn.Module, stats: NormStatistics) -> None:
    modules = dict(model.named_modules())
    for name, (mean, var) in stats.items():
        modules[name].running_mean.copy_(mean)
        modules[name].running_var.copy_(var)


@contextmanager
def stochastic_inference(model: PTv3):
    """Eval mode with drop-path/dropout on (Monte-Carlo passes), restoring the previous state.

    BatchNorm uses ``model.stochastic_norm_stats`` meanwhile when the model has them: statistics
    averaged with drop-path off make stochastic passes collapse (training/bn_recalibration.py).
    """
    was_training, was_stochastic = model.training, model.stochastic
    saved = None
    if model.stochastic_norm_stats is not None:
        saved = norm_statistics(model)
        load_norm_statistics(model, model.stochastic_norm_stats)
    model.eval().set_stochastic(True)
    try:
        yield model
    finally:
        if saved is not None:
            load_norm_statistics(model, saved)
        model.train(was_training).set_stochastic(was_stochastic)


def inference_autocast(device_type: str, enabled: bool = True) -> torch.autocast:
    """bf16 autocast for inference, without autocast's cache of cast weights.

    The cache pays off when a weight is used again in the same autocast region (forward and
    backward of a training step). An inference pass uses each weight once, so the cache only
    keeps a bf16 copy of every Linear weight (about 90 MB for ptv3) alive until the pass ends.
    """
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=False)


def cast_for_inference(model: PTv3, device_type: str, amp: bool) -> PTv3:
    """Store the weights in the precision that bf16 inference computes in, in place; returns the model.

    Under :func:`inference_autocast` every Linear casts its weight and bias to bf16 and every sparse
    convolution its weight to fp16 at each call, so holding them in those types gives the same
    outputs from about half the weight memory. Norm layers keep fp32, as autocast computes them.
    Without autocast on a GPU (``amp`` off, or the CPU) nothing changes. ``model.float()`` undoes it.
    """
    if not (amp and device_type == "cuda"):
        return model
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.to(torch.bfloat16)
        elif isinstance(module, SubMConv):
            module.conv.to(torch.float16)
    return model


_CONFIG_KEYS = {
    "in_channels", "orders", "shuffle_orders", "stem_kernel", "enc_depths", "enc_channels", "enc_heads",
    "enc_patch_size", "dec_depths", "dec_channels", "dec_heads", "dec_patch_size", "mlp_ratio", "qkv_bias",
    "drop_path", "attn_drop", "proj_drop", "bn_eps", "bn_momentum", "checkpoint_levels",
}  # fmt: skip


def build_model(cfg: Mapping, num_classes: int) -> PTv3:
    """PTv3 from a ``conf/model/*.yaml`` mapping (plain dict or OmegaConf); ``name`` is ignored."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:
        pass
    cfg = {k: v for k, v in dict(cfg).items() if k != "name"}
    unknown = sorted(set(cfg) - _CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown model config keys {unknown}; known: {sorted(_CONFIG_KEYS)}")
    return PTv3(num_classes=num_classes, **cfg)
