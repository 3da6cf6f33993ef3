"""Z-order and Hilbert codes shared by the tiler (numpy) and the model (torch)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scalept import serialization as ser


def full_grid(depth: int) -> np.ndarray:
    side = np.arange(1 << depth)
    return np.stack(np.meshgrid(side, side, side, indexing="ij"), axis=-1).reshape(-1, 3)


@pytest.mark.parametrize("order", ser.ORDERS)
@pytest.mark.parametrize("depth", [1, 3, 5])
def test_codes_are_a_bijection_of_the_grid(order, depth):
    codes = ser.encode(full_grid(depth), order, depth=depth)
    assert np.array_equal(np.sort(codes), np.arange(1 << (3 * depth)))


@pytest.mark.parametrize("order", ["hilbert", "hilbert-trans"])
def test_hilbert_steps_to_a_face_neighbour(order):
    grid = full_grid(4)
    path = grid[np.argsort(ser.encode(grid, order, depth=4))]
    assert (np.abs(np.diff(path, axis=0)).sum(axis=1) == 1).all()


@pytest.mark.parametrize("order", ser.ORDERS)
def test_runs_of_eight_codes_fill_one_parent_cell(order):
    """Locality at every scale: codes sharing their high bits form one cube, and dropping
    3 bits gives the code of the parent cell (what the model's pooling relies on)."""
    grid = full_grid(4)
    codes = ser.encode(grid, order, depth=4)
    path = grid[np.argsort(codes)]
    assert (np.ptp(path.reshape(-1, 8, 3), axis=1) == 1).all()
    assert np.array_equal(codes >> 3, ser.encode(grid >> 1, order, depth=3))


def test_z_order_curve_is_local_on_average():
    grid = full_grid(5)
    path = grid[np.argsort(ser.encode(grid, "z", depth=5))]
    steps = np.abs(np.diff(path, axis=0)).max(axis=1)
    assert np.median(steps) == 1 and steps.mean() < 2


def test_trans_swaps_x_and_y():
    grid = np.random.default_rng(0).integers(0, 1000, (500, 3))
    for base in ("z", "hilbert"):
        assert np.array_equal(ser.encode(grid, f"{base}-trans", depth=10), ser.encode(grid[:, [1, 0, 2]], base, depth=10))


def test_batch_index_sits_above_the_curve_bits():
    rng = np.random.default_rng(1)
    grid = rng.integers(0, 1 << 16, (2000, 3))
    batch = rng.integers(0, 7, 2000)
    for order in ser.ORDERS:
        codes = ser.encode(grid, order, depth=16, batch=batch)
        assert np.array_equal(codes >> 48, batch)
        assert np.array_equal(codes & ((1 << 48) - 1), ser.encode(grid, order, depth=16))


def test_order_and_inverse_round_trip():
    grid = np.random.default_rng(2).integers(0, 4000, (3000, 3))
    for order in ser.ORDERS:
        codes = ser.encode(grid, order)
        perm = np.argsort(codes, kind="stable")
        inverse = np.empty_like(perm)
        inverse[perm] = np.arange(len(perm))
        assert np.array_equal(perm[inverse], np.arange(len(perm)))
        assert np.array_equal(codes[perm][inverse], codes)


def test_numpy_and_torch_agree_and_encode_orders_matches_encode():
    rng = np.random.default_rng(3)
    grid, batch = rng.integers(0, 1 << 16, (4000, 3)), rng.integers(0, 3, 4000)
    stacked = ser.encode_orders(grid, depth=16, batch=batch)
    tensor = ser.encode_orders(torch.from_numpy(grid), depth=16, batch=torch.from_numpy(batch), check=False)
    assert isinstance(tensor, torch.Tensor) and np.array_equal(tensor.numpy(), stacked)
    for i, order in enumerate(ser.ORDERS):
        assert np.array_equal(stacked[i], ser.encode(grid, order, depth=16, batch=batch))
        assert torch.equal(ser.encode(torch.from_numpy(grid), order, depth=16), torch.from_numpy(stacked[i] & ((1 << 48) - 1)))
    assert np.array_equal(ser.encode_orders(grid, ["hilbert-trans", "z"], depth=16), stacked[[3, 0]] & ((1 << 48) - 1))


def test_too_large_cloud_names_the_limit():
    with pytest.raises(ValueError, match="2\\^16"):
        ser.depth_for(1 << 16)
    grid = np.array([[0, 0, 0], [1 << 16, 0, 0]])
    with pytest.raises(ValueError, match="65536"):
        ser.encode(grid)
    with pytest.raises(ValueError, match="65536"):
        ser.encode_orders(grid, depth=16)
    assert ser.depth_for((1 << 16) - 1) == 16


def test_unknown_order_is_rejected():
    with pytest.raises(ValueError, match="unknown serialization order"):
        ser.encode_orders(np.zeros((1, 3), dtype=int), ["peano"])


def _skilling_hilbert(x: int, y: int, z: int, depth: int) -> int:
    """Reference: Skilling's transpose algorithm on one point, written independently of the library."""
    axes = [x, y, z]
    q = 1 << (depth - 1)
    while q > 1:
        low = q - 1
        for i in range(3):
            if axes[i] & q:
                axes[0] ^= low
            else:
                t = (axes[0] ^ axes[i]) & low
                axes[0] ^= t
                axes[i] ^= t
        q >>= 1
    for i in (1, 2):
        axes[i] ^= axes[i - 1]
    t, q = 0, 1 << (depth - 1)
    while q > 1:
        if axes[2] & q:
            t ^= q - 1
        q >>= 1
    axes = [a ^ t for a in axes]
    code = 0
    for b in reversed(range(depth)):
        for a in axes:
            code = (code << 1) | ((a >> b) & 1)
    return code


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 7, 11, 16])
def test_table_driven_hilbert_equals_skillings_algorithm(depth):
    rng = np.random.default_rng(depth)
    grid = rng.integers(0, 1 << depth, size=(600, 3))
    expected = [_skilling_hilbert(*map(int, p), depth) for p in grid]
    assert ser.encode(grid, "hilbert", depth).tolist() == expected
    assert ser.encode(torch.from_numpy(grid), "hilbert", depth).tolist() == expected
