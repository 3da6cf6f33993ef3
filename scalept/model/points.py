"""Index bookkeeping of PTv3: serialized orders, attention patches and pooling clusters.

A :class:`Level` describes the points of one resolution of the U-Net: their
grid coordinates, sample index and, per serialization order, the curve code,
the order (serialized position -> point) and its inverse. Points are never
moved; the network gathers through these index maps. Features flow separately.

Host synchronisations are limited to one per level (the per-sample point
counts, which size the padded attention batch and the pooled level).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from scalept import serialization

# Codes always use the full 16 bits per axis: a sample's order then never
# depends on the other samples of its batch (the Hilbert curve's orientation
# changes with the depth), and one depth serves every cloud the codes can hold.
DEPTH = serialization.MAX_DEPTH
MAX_BATCH = 1 << (63 - 3 * DEPTH)


@dataclass(eq=False)
class Patches:
    """Where each serialized point goes in the padded attention batch, for one order.

    ``gather`` lists point indices row by row: first ``full`` patches of
    ``size`` points, then ``small`` sequences of ``small_len`` rows (samples
    with fewer points than a patch, padded and masked by ``mask``). ``scatter``
    gives, per point, the row holding its own output.
    """

    gather: torch.Tensor
    scatter: torch.Tensor
    size: int
    full: int
    small: int
    small_len: int
    mask: torch.Tensor | None


@dataclass(eq=False)
class Level:
    """Points of one resolution; see the module docstring."""

    grid: torch.Tensor  # (N, 3) int32 grid coordinates at this resolution
    batch: torch.Tensor  # (N,) int64 sample index
    counts: torch.Tensor  # (B,) int64 points per sample, on the device
    counts_host: list[int]  # the same counts on the host (sizes of padded batches)
    codes: torch.Tensor  # (K, N) int64 curve codes, sample index in the bits above
    order: torch.Tensor  # (K, N) serialized position -> point
    inverse: torch.Tensor  # (K, N) point -> serialized position
    spatial_shape: list[int]  # extent of the grid per axis (spconv needs it on the host)
    indice_dict: dict = field(default_factory=dict)  # spconv rulebooks shared by this level's convs
    cluster: torch.Tensor | None = None  # (N,) merged cell of each point in the next level
    pool_lengths: torch.Tensor | None = None  # points per merged cell, in order 0
    _plans: dict = field(default_factory=dict)
    _patches: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.grid.shape[0]

    @property
    def batch_size(self) -> int:
        return len(self.counts_host)

    @cached_property
    def indices(self) -> torch.Tensor:
        """spconv's (N, 4) int32 indices: sample, x, y, z."""
        return torch.cat([self.batch.to(torch.int32)[:, None], self.grid], dim=1)

    def patches(self, size: int, k: int) -> Patches:
        """Padded attention batch of order ``k`` with patches of ``size`` points (cached)."""
        key = (size, k)
        if key not in self._patches:
            if size not in self._plans:
                self._plans[size] = _patch_plan(self.counts, self.counts_host, size)
            serial, unpad, full, small, small_len, mask = self._plans[size]
            self._patches[key] = Patches(
                gather=self.order[k][serial],
                scatter=unpad[self.inverse[k]],
                size=size,
                full=full,
                small=small,
                small_len=small_len,
                mask=mask,
            )
        return self._patches[key]


def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` along the rows, with a backward that sums in a fixed order on the CPU.

    The CPU backward of ``x[index]`` accumulates repeated indices in an order that depends on
    thread timing, so two CPU trainings on a busy machine drift apart; ``index_select``'s
    (``index_add_``) does not. On the GPU neither is bit-reproducible (atomics) and ``x[index]``
    trains ~3 % faster (H200, full ptv3), so it stays there.
    """
    return x.index_select(0, index) if x.device.type == "cpu" else x[index]


def _sort(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort(codes, dim=1, stable=True)
    positions = torch.arange(codes.shape[1], device=codes.device).expand_as(order)
    inverse = torch.empty_like(order).scatter_(1, order, positions)
    return order, inverse


def first_level(grid: torch.Tensor, offsets: torch.Tensor, orders: list[str]) -> Level:
    """Finest level from grid coordinates and cumulative per-sample end offsets."""
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"grid coordinates must be (N, 3), got {tuple(grid.shape)}")
    n = grid.shape[0]
    offsets = offsets.to(device=grid.device, dtype=torch.int64).reshape(-1)
    if offsets.numel() == 0 or offsets.numel() > MAX_BATCH:
        raise ValueError(f"offsets must name between 1 and {MAX_BATCH} samples, got {offsets.numel()}")
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    if n == 0:
        raise ValueError("the batch holds no points")
    grid = grid.to(torch.int32)
    # One read-back: per-sample counts, total, and the coordinate range.
    stats = torch.cat([counts, offsets[-1:], grid.amin().view(1).long(), grid.amax(0).long()]).tolist()
    counts_host, total, lo, hi = stats[:-5], stats[-5], stats[-4], stats[-3:]
    if total != n or min(counts_host) < 1:
        raise ValueError(
            f"offsets must be increasing cumulative end offsets ending at the number of points ({n}) "
            f"with no empty sample; got counts {counts_host[:8]}{'...' if len(counts_host) > 8 else ''}"
        )
    if lo < 0:
        raise ValueError(f"grid coordinates must be non-negative (subtract each sample's minimum), got {lo}")
    serialization.depth_for(max(hi))  # raises a clear error past 2^16 cells per axis
    batch = torch.repeat_interleave(torch.arange(len(counts_host), device=grid.device), counts, output_size=n)
    codes = serialization.encode_orders(grid, orders, depth=DEPTH, batch=batch, check=False)
    order, inverse = _sort(codes)
    return Level(grid, batch, counts, counts_host, codes, order, inverse, [h + 1 for h in hi])


def pool_level(fine: Level) -> Level:
    """Merge 2x2x2 cells by dropping the lowest 3 bits of the codes.

    Records on ``fine`` the cluster of each point and the cluster sizes along
    order 0 (where each cluster is a contiguous run), which pooling reduces over.
    Dropping 3 bits of a Z-order or Hilbert code gives the code of the parent
    cell at one bit less per axis, so the coarse codes need no re-encoding.
    """
    n = fine.size
    device = fine.grid.device
    order0 = fine.order[0]
    key = (fine.codes[0] >> 3)[order0]
    first = torch.ones(n, dtype=torch.bool, device=device)
    first[1:] = key[1:] != key[:-1]
    cid = torch.cumsum(first, 0) - 1  # cluster of each serialized position
    ends = torch.cumsum(fine.counts, 0)
    coarse_counts = cid[ends - 1] - cid[ends - fine.counts] + 1
    counts_host = coarse_counts.tolist()
    m = sum(counts_host)
    lengths = torch.zeros(m, dtype=torch.int64, device=device).scatter_add_(0, cid, torch.ones_like(cid))
    head = order0[torch.cumsum(lengths, 0) - lengths]
    fine.cluster = cid[fine.inverse[0]]
    fine.pool_lengths = lengths
    codes = fine.codes[:, head] >> 3
    order, inverse = _sort(codes)
    shape = [(s + 1) // 2 for s in fine.spatial_shape]
    return Level(fine.grid[head] >> 1, fine.batch[head], coarse_counts, counts_host, codes, order, inverse, shape)


def _patch_plan(counts: torch.Tensor, counts_host: list[int], size: int):
    """Padding of serialized positions into patches of ``size``, shared by all orders.

    A sample of at least ``size`` points is padded to a multiple of ``size`` by
    repeating its own points from the patch before, so its last patch holds its
    last ``size`` distinct points and no patch crosses two samples. Smaller
    samples form one shorter sequence each, padded to the longest of them and
    masked. Returns (serialized position per row, row per serialized position,
    number of full patches, number of short sequences, their length, key mask).
    """
    device = counts.device
    n = sum(counts_host)
    rows = sum(-(-c // size) * size for c in counts_host if c >= size)
    small_counts = [c for c in counts_host if c < size]
    small, small_len = len(small_counts), max(small_counts, default=0)
    samples = torch.arange(len(counts_host), device=device)
    starts = torch.cumsum(counts, 0) - counts
    is_full = counts >= size

    padded = torch.where(is_full, (counts + size - 1) // size * size, 0)
    pad_start = torch.cumsum(padded, 0) - padded
    seg = torch.repeat_interleave(samples, padded, output_size=rows)
    j = torch.arange(rows, device=device) - pad_start[seg]
    j = torch.where(j < counts[seg], j, j - size)
    serial_full = starts[seg] + j

    width = torch.where(is_full, 0, small_len)
    small_start = torch.cumsum(width, 0) - width
    seg = torch.repeat_interleave(samples, width, output_size=small * small_len)
    j = torch.arange(small * small_len, device=device) - small_start[seg]
    serial_small = starts[seg] + torch.minimum(j, counts[seg] - 1)
    mask = (j < counts[seg]).view(small, 1, 1, small_len) if small else None

    row_start = torch.where(is_full, pad_start, rows + small_start)
    seg = torch.repeat_interleave(samples, counts, output_size=n)
    unpad = torch.arange(n, device=device) - starts[seg] + row_start[seg]
    return torch.cat([serial_full, serial_small]), unpad, rows // size, small, small_len, mask
