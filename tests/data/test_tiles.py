"""The HDF5 tile file: round trip, merging parts, lazy handles, and refusing incomplete files."""
from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest

from scalept.data.tiles import (FrameTiles, TileFile, TileFileError, fill_map, is_complete, merge_tile_files,
                                nearest_covered, write_tile_file)


def make_frames(n_frames, seed=0, first=0):
    rng = np.random.default_rng(seed)
    frames = []
    for f in range(n_frames):
        n = int(rng.integers(50, 200))
        tiles = [np.sort(rng.choice(n, size=int(rng.integers(1, n)), replace=False)).astype(np.int32)
                 for _ in range(int(rng.integers(1, 4)))]
        frames.append(FrameTiles(f"{first + f:06d}", rng.normal(size=(n, 4)).astype(np.float32),
                                 rng.integers(-1, 19, size=n).astype(np.int8), tiles))
    return frames


def assert_same(tile_file: TileFile, frames):
    assert tile_file.num_frames == len(frames)
    assert tile_file.num_tiles == sum(len(f.tiles) for f in frames)
    t = 0
    for f, expected in enumerate(frames):
        got = tile_file.frame(f)
        assert got.frame_id == expected.frame_id
        np.testing.assert_array_equal(got.points, expected.points)
        np.testing.assert_array_equal(got.labels, expected.labels)
        assert len(got.tiles) == len(expected.tiles)
        for a, b in zip(got.tiles, expected.tiles):
            np.testing.assert_array_equal(a, b)
            points, labels, indices = tile_file.tile(t)
            np.testing.assert_array_equal(indices, b)
            np.testing.assert_array_equal(points, expected.points[b])
            np.testing.assert_array_equal(labels, expected.labels[b])
            assert tile_file.tile_frame[t] == f
            t += 1


def test_round_trip(tmp_path):
    frames = make_frames(5)
    write_tile_file(tmp_path / "00.h5", frames, {"sampling": {"name": "knn", "max_points": 10}, "sequence": "00"})
    tile_file = TileFile(tmp_path / "00.h5")
    assert tile_file.attrs["sampling"] == {"name": "knn", "max_points": 10} and tile_file.attrs["sequence"] == "00"
    assert_same(tile_file, frames)


def test_merge_of_parts_equals_one_file(tmp_path):
    frames = make_frames(7, seed=3)
    parts = []
    for i, (lo, hi) in enumerate([(0, 3), (3, 4), (4, 7)]):
        parts.append(tmp_path / f"part{i}.h5")
        write_tile_file(parts[-1], frames[lo:hi], {})
    merge_tile_files(parts, tmp_path / "merged.h5", {"sequence": "01"})
    assert_same(TileFile(tmp_path / "merged.h5"), frames)
    assert TileFile(tmp_path / "merged.h5").attrs["sequence"] == "01"


def test_incomplete_or_missing_files_are_refused(tmp_path):
    with pytest.raises(TileFileError, match="tile file not found; run .*stage=preprocess"):
        TileFile(tmp_path / "missing.h5")
    path = tmp_path / "half.h5"
    with h5py.File(path, "w") as h5:  # what a writer killed before finishing leaves behind
        h5.create_dataset("points", data=np.zeros((3, 4), np.float32))
    assert not is_complete(path)
    with pytest.raises(TileFileError, match="incomplete"):
        TileFile(path)
    path.write_bytes(b"not hdf5 at all")
    assert not is_complete(path)
    write_tile_file(tmp_path / "part.h5", make_frames(1), {})
    with h5py.File(tmp_path / "part.h5", "a") as h5:
        del h5.attrs["complete"]
    with pytest.raises(TileFileError, match="part.h5: part file is incomplete"):
        merge_tile_files([tmp_path / "part.h5"], tmp_path / "out.h5", {})
    assert not (tmp_path / "out.h5").exists()


def test_handle_is_lazy_and_not_pickled(tmp_path):
    frames = make_frames(2)
    write_tile_file(tmp_path / "00.h5", frames, {})
    tile_file = TileFile(tmp_path / "00.h5")
    assert tile_file._h5 is None
    tile_file.tile(0)
    assert tile_file._h5 is not None
    clone = pickle.loads(pickle.dumps(tile_file))  # what a DataLoader worker receives
    assert clone._h5 is None
    assert_same(clone, frames)


def with_fill(frames):
    return [FrameTiles(f.frame_id, f.points, f.labels, f.tiles, fill_map(f.points, f.tiles)) for f in frames]


def test_fill_map_points_every_untiled_point_at_its_nearest_tiled_point(tmp_path):
    frames = with_fill(make_frames(6, seed=5))
    for frame in frames:
        covered = np.zeros(len(frame.points), bool)
        for tile in frame.tiles:
            covered[tile] = True
        assert frame.fill[:, 0].tolist() == np.flatnonzero(~covered).tolist()
        assert covered[frame.fill[:, 1]].all()
        # nearest: no tiled point is closer than the chosen one
        xyz = frame.points[:, :3]
        for point, source in frame.fill[:5]:
            distances = np.linalg.norm(xyz[covered] - xyz[point], axis=1)
            assert np.linalg.norm(xyz[source] - xyz[point]) == pytest.approx(distances.min())
    parts = []
    for i, (lo, hi) in enumerate([(0, 2), (2, 6)]):
        parts.append(tmp_path / f"part{i}.h5")
        write_tile_file(parts[-1], frames[lo:hi], {})
    merge_tile_files(parts, tmp_path / "merged.h5", {})
    for path in (parts[1], tmp_path / "merged.h5"):
        tile_file = TileFile(path)
        assert tile_file.has_fill_map
        first = 0 if path.name == "merged.h5" else 2
        for f in range(tile_file.num_frames):
            np.testing.assert_array_equal(tile_file.fill(f), frames[first + f].fill)
    # a part without a fill map (written by an older ScalePT) makes a merged file without one
    write_tile_file(parts[0], make_frames(2, seed=5), {})
    merge_tile_files(parts, tmp_path / "mixed.h5", {})
    assert not TileFile(tmp_path / "mixed.h5").has_fill_map
    assert_same(TileFile(tmp_path / "mixed.h5"), frames)


def test_nothing_to_fill_without_a_tiled_point_or_when_every_point_is_tiled(tmp_path):
    missing, source = nearest_covered(np.zeros((4, 3), np.float32), np.zeros(4, bool))
    assert len(missing) == len(source) == 0
    points = np.zeros((5, 4), np.float32)
    frames = [FrameTiles("000000", points, np.zeros(5, np.int8), [np.arange(5, dtype=np.int32)],
                         fill_map(points, [np.arange(5)]))]
    assert frames[0].fill.shape == (0, 2)
    write_tile_file(tmp_path / "00.h5", frames, {})
    merge_tile_files([tmp_path / "00.h5"], tmp_path / "merged.h5", {})
    for path in (tmp_path / "00.h5", tmp_path / "merged.h5"):
        assert TileFile(path).fill(0).shape == (0, 2)


@pytest.mark.parametrize("name", ["points", "labels", "tile_indices"])
def test_damaged_bytes_are_a_one_line_error_naming_the_file(tmp_path, name):
    path = tmp_path / "00.h5"
    write_tile_file(path, with_fill(make_frames(3, seed=7)), {})
    with h5py.File(path, "r") as h5:
        chunk = h5[name].id.get_chunk_info(0)
    with open(path, "r+b") as f:  # overwrite bytes inside the first chunk, as a bad disk or a copy might
        f.seek(chunk.byte_offset + chunk.size // 2)
        f.write(b"\xde\xad\xbe\xef")
    tile_file = TileFile(path)
    with pytest.raises(TileFileError) as err:
        tile_file.frame(0)
    message = str(err.value)
    assert message.startswith(f"{path}: {name} rows") and "damaged" in message and "\n" not in message
