"""The synthetic SemanticKITTI generator: on-disk format, determinism, idempotence, geometry and realism."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from preprocessing.synthetic import generate_dataset
from preprocessing.synthetic.__main__ import main as cli_main
from preprocessing.synthetic.generate import FRAME_PERIOD, lidar_poses, render_frame
from preprocessing.synthetic.primitives import AXIS_X, AXIS_Y, BOX, CYLINDER, ELLIPSOID, PartList
from preprocessing.synthetic.road import SENSOR_HEIGHT
from preprocessing.synthetic.scene import Scene
from preprocessing.synthetic.sensor import Sensor
from scalept.data.semantickitti import (CLASS_NAMES, KNOWN_RAW_IDS, Sequence, read_calib, read_labels, read_points,
                                        to_classes)

STEPS = 256          # azimuth columns: ~14k points a frame, fast enough for tests
SEQUENCES = {"00": 6, "01": 3}
THINGS = {10, 252, 11, 15, 18, 258, 20, 259, 30, 254, 31, 253, 32, 255}
STATIC = {50, 51, 71, 80, 81}   # building, fence, trunk, pole, sign: never move


def files(root: Path, sequence: str) -> list[Path]:
    base = root / "sequences" / sequence
    return sorted((base / "velodyne").glob("*.bin")) + sorted((base / "labels").glob("*.label"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "dataset"
    generate_dataset(root, SEQUENCES, seed=0, azimuth_steps=STEPS)
    return root


def test_files_are_semantickitti_format(dataset):
    for name, frames in SEQUENCES.items():
        base = dataset / "sequences" / name
        assert sorted(p.name for p in (base / "velodyne").iterdir()) == [f"{i:06d}.bin" for i in range(frames)]
        assert sorted(p.name for p in (base / "labels").iterdir()) == [f"{i:06d}.label" for i in range(frames)]
        for i in range(frames):
            scan, label = base / "velodyne" / f"{i:06d}.bin", base / "labels" / f"{i:06d}.label"
            assert scan.stat().st_size % 16 == 0 and scan.stat().st_size // 16 == label.stat().st_size // 4
            points = read_points(scan)
            raw = read_labels(label, len(points))
            assert points.dtype == np.float32 and np.isfinite(points).all()
            assert 0.0 <= points[:, 3].min() and points[:, 3].max() < 1.0
            semantic, instance = raw & 0xFFFF, raw >> 16
            assert set(np.unique(semantic).tolist()) <= KNOWN_RAW_IDS
            is_thing = np.isin(semantic, list(THINGS))
            assert (instance[is_thing] > 0).all() and (instance[~is_thing] == 0).all()
        seq = Sequence(dataset, name)
        assert len(seq) == frames and seq.has_labels
        frame = seq.frame(0)
        assert (frame.labels >= 0).all(), "every synthetic point carries a scored class"
        assert set(read_calib(base / "calib.txt")) == {"P0", "P1", "P2", "P3", "Tr"}
        np.testing.assert_allclose(seq.times(), np.arange(frames) * FRAME_PERIOD)


def test_deterministic_for_a_seed(dataset, tmp_path):
    """Same seed: same bytes, even with fewer frames; another seed: another street."""
    generate_dataset(tmp_path / "a", {"00": 2}, seed=0, azimuth_steps=STEPS)
    generate_dataset(tmp_path / "b", {"00": 2}, seed=1, azimuth_steps=STEPS)
    for i, path in enumerate(files(tmp_path / "a", "00")):
        assert path.read_bytes() == files(dataset, "00")[[0, 1, 6, 7][i]].read_bytes()
    other = zip(files(tmp_path / "a", "00"), files(tmp_path / "b", "00"))
    assert all(p.read_bytes() != q.read_bytes() for p, q in other)


def test_sequences_are_independent(dataset, tmp_path):
    """A sequence generated alone equals the same sequence generated beside others."""
    generate_dataset(tmp_path, {"01": 3}, seed=0, azimuth_steps=STEPS)
    ours, theirs = files(tmp_path, "01"), files(dataset, "01")
    assert len(ours) == len(theirs) == 6
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(ours, theirs))
    assert (tmp_path / "sequences" / "01" / "poses.txt").read_text() == \
        (dataset / "sequences" / "01" / "poses.txt").read_text()
    assert files(dataset, "00")[0].read_bytes() != files(dataset, "01")[0].read_bytes()


def test_major_classes_in_a_small_sequence(dataset):
    seen = set()
    for name in SEQUENCES:
        seq = Sequence(dataset, name)
        for i in range(len(seq)):
            seen.update(CLASS_NAMES[c] for c in np.unique(seq.frame(i).labels))
    assert {"road", "sidewalk", "terrain", "building", "vegetation", "trunk", "pole", "car"} <= seen


def test_rarer_classes_appear_along_the_streets():
    """All 19 classes, sampled far along three streets as well as at their start."""
    sensor = Sensor(azimuth_steps=512)
    seen = set()
    for name in ("00", "01", "02"):
        scene = Scene(0, name)
        for index in (0, 150, 300):
            seen.update(CLASS_NAMES[c] for c in np.unique(to_classes(render_frame(scene, sensor, index)[1])))
    assert set(CLASS_NAMES) <= seen, f"missing {sorted(set(CLASS_NAMES) - seen)}"


SHORT_STREETS, SHORT_FRAMES = [f"{i:02d}" for i in range(10, 16)], 8


@pytest.fixture(scope="module")
def short_streets() -> dict[str, np.ndarray]:
    """Per-class point counts of six short streets (8 frames each, as a held-out street), at 512 columns."""
    sensor = Sensor(azimuth_steps=512)
    counts = {}
    for name in SHORT_STREETS:
        scene = Scene(0, name)
        classes = np.concatenate([to_classes(render_frame(scene, sensor, i)[1]) for i in range(SHORT_FRAMES)])
        counts[name] = np.bincount(classes[classes >= 0], minlength=len(CLASS_NAMES))
    return counts


def test_every_class_in_short_streets(short_streets):
    """Training needs every class: a street of 8 frames nearly always shows all 19 of them."""
    complete = [name for name, c in short_streets.items() if (c > 0).all()]
    assert len(complete) >= len(short_streets) - 1, {
        name: [CLASS_NAMES[j] for j in np.flatnonzero(c == 0)] for name, c in short_streets.items()}
    assert (sum(short_streets.values()) > 0).all()


def test_class_shares_near_real_scans(short_streets):
    """Ground, buildings and vegetation dominate as in real scans; no rare class swamps them."""
    total = sum(short_streets.values())
    share = dict(zip(CLASS_NAMES, total / total.sum()))
    big = ("road", "sidewalk", "building", "vegetation", "terrain")
    assert sum(share[c] for c in big) > 0.65
    assert 0.15 < share["road"] < 0.4 and share["sidewalk"] > 0.08 and share["vegetation"] + share["terrain"] > 0.2
    assert share["car"] < 0.12
    for name in set(CLASS_NAMES) - set(big) - {"car"}:
        assert share[name] < 0.06, f"{name}: {share[name]:.3f}"
    for name, c in short_streets.items():   # each street alone, too: no street is all road or all trees
        s = c / c.sum()
        assert sum(s[CLASS_NAMES.index(n)] for n in big) > 0.5, name


def _layout(scene: Scene) -> np.ndarray:
    """The ground labels on a grid over the first 200 m of the street and 15 m either side, in road coordinates."""
    x, d = np.meshgrid(np.arange(0.0, 200.0), np.arange(-15.0, 15.0, 0.5))
    xw, yw, _ = scene.road.to_world(x.ravel(), d.ravel())
    return scene.ground(xw, yw)[0]


def test_streets_differ_in_layout():
    """The street's kind comes from (seed, sequence): lanes, medians, curves and frontage vary between streets."""
    scenes = [Scene(0, f"{i:02d}") for i in range(16)]
    assert len({s.lanes for s in scenes}) == 2 and len({s.median > 0 for s in scenes}) == 2
    assert len({s.road.amplitude == 0 for s in scenes}) == 2
    assert len({int(np.argmax(s.style.frontage)) for s in scenes}) >= 3, "city, suburb, park, open land"
    for key in ("parking", "junction", "traffic", "trees"):
        values = [getattr(s.style, key) for s in scenes]
        assert max(values) > 1.5 * min(values), key
    maps = [_layout(s) for s in scenes[:5]]
    differ = [(a != b).mean() for i, a in enumerate(maps) for b in maps[i + 1:]]
    assert min(differ) > 0.15, "lanes, parking, sidewalks, lawns and side streets differ between any two streets"
    assert (_layout(Scene(0, "00")) == maps[0]).all(), "and the same street again for the same (seed, sequence)"


def _world(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    return points[:, :3] @ pose[:3, :3].T + pose[:3, 3]


def test_consecutive_frames_overlap(dataset):
    """Static structure of frame t+1, put into the world with the poses, lies on that of frame t.

    Compared within 30 m, where 256 columns sample a surface finer than the 0.5 m tolerance.
    """
    seq = Sequence(dataset, "00")
    poses = seq.poses()
    for t in range(len(seq) - 1):
        a, b = seq.frame(t), seq.frame(t + 1)
        raw_a = read_labels(seq.label_path(t)) & 0xFFFF
        raw_b = read_labels(seq.label_path(t + 1)) & 0xFFFF
        near_b = np.linalg.norm(b.points[:, :3], axis=1) < 30
        static_a, static_b = a.points[np.isin(raw_a, list(STATIC))], b.points[np.isin(raw_b, list(STATIC)) & near_b]
        tree = cKDTree(_world(static_a, poses[t]))
        near = tree.query(_world(static_b, poses[t + 1]), distance_upper_bound=0.5)[0] < 0.5
        assert near.mean() > 0.8
        # Without the motion the same structure does not line up: the poses carry the overlap.
        unmoved = cKDTree(static_a[:, :3]).query(static_b[:, :3], distance_upper_bound=0.5)[0] < 0.5
        assert near.mean() > unmoved.mean() + 0.1
        all_near = cKDTree(_world(a.points, poses[t])).query(_world(b.points, poses[t + 1]),
                                                              distance_upper_bound=1.0)[0] < 1.0
        assert all_near.mean() > 0.8


def test_range_and_sensor_height(dataset):
    seq = Sequence(dataset, "00")
    for i in range(len(seq)):
        points = seq.frame(i).points
        rng = np.linalg.norm(points[:, :3], axis=1)
        assert rng.max() <= 80.0 and rng.min() > 1.0
        road = np.isin(read_labels(seq.label_path(i)) & 0xFFFF, [40, 60]) & (rng < 12)
        assert abs(np.median(points[road, 2]) + SENSOR_HEIGHT) < 0.1


def test_poses_read_back_equal_the_simulated_ones(dataset):
    for name, frames in SEQUENCES.items():
        read = Sequence(dataset, name).poses()
        simulated = lidar_poses(Scene(0, name), frames)
        np.testing.assert_allclose(read, simulated, atol=1e-9)
        np.testing.assert_allclose(read[0], np.eye(4), atol=1e-12)
        step = np.linalg.norm(np.diff(read[:, :3, 3], axis=0), axis=1)
        assert ((step > 0.7) & (step < 1.3)).all(), "about 10 m/s at 10 Hz"


def test_rerun_skips_existing_frames_and_fills_in_missing_ones(tmp_path):
    generate_dataset(tmp_path, {"00": 3}, seed=0, azimuth_steps=STEPS)
    paths = files(tmp_path, "00")
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in paths}
    deleted = tmp_path / "sequences" / "00" / "velodyne" / "000001.bin"
    deleted.unlink()
    generate_dataset(tmp_path, {"00": 3}, seed=0, azimuth_steps=STEPS)
    for p in paths:
        assert p.read_bytes() == before[p][1]
        if p.stem != "000001":
            assert p.stat().st_mtime_ns == before[p][0], f"{p.name} was rewritten"
    assert not list((tmp_path / "sequences" / "00").rglob(".*tmp*")), "no temporary files left behind"
    generate_dataset(tmp_path, {"00": 3}, seed=0, azimuth_steps=STEPS, overwrite=True)
    assert paths[0].stat().st_mtime_ns != before[paths[0]][0]


def test_cli(tmp_path):
    cli_main(["--root", str(tmp_path), "--sequences", "3:1", "--azimuth-steps", "128"])
    assert len(Sequence(tmp_path, "03")) == 1
    with pytest.raises(SystemExit):
        cli_main(["--root", str(tmp_path), "--sequences", "03"])


def test_windowed_ray_casting_matches_brute_force():
    """The per-primitive azimuth/elevation windows never miss a ray that hits the primitive."""
    sensor = Sensor(azimuth_steps=720)
    rng = np.random.default_rng(0)
    shape = sensor.dirs.shape[1:]
    for trial in range(60):
        kind = (BOX, CYLINDER, ELLIPSOID)[trial % 3]
        centre = np.append(rng.uniform(-15, 15, 2), rng.uniform(-2, 3))
        axis = (None, AXIS_X, AXIS_Y)[trial // 3 % 3]
        parts = PartList(10).add(kind, centre, rng.uniform(0.05, 3, 3), 0.3, yaw=rng.uniform(0, 2 * np.pi),
                                 axis=axis).parts()
        depths = []
        for windows in (sensor._windows, lambda c, k: [(0, shape[0], 0, shape[1] - 1)] * len(c)):
            depth = np.full(shape, np.inf)
            with np.errstate(all="ignore"):
                sensor._windows, original = windows, sensor._windows
                try:
                    sensor._objects(parts, np.eye(3), np.zeros(3), depth, np.full(shape, -1), np.ones(shape),
                                    np.ones((2, *shape)))
                finally:
                    sensor._windows = original
            depths.append(depth)
        np.testing.assert_array_equal(np.isfinite(depths[0]), np.isfinite(depths[1]))
        np.testing.assert_allclose(depths[0][np.isfinite(depths[0])], depths[1][np.isfinite(depths[1])])


def test_remission_follows_materials(dataset):
    seq = Sequence(dataset, "00")
    points = np.concatenate([seq.frame(i).points for i in range(len(seq))])
    raw = np.concatenate([read_labels(seq.label_path(i)) & 0xFFFF for i in range(len(seq))])
    near = np.linalg.norm(points[:, :3], axis=1) < 20
    lane, asphalt = points[(raw == 60) & near, 3], points[(raw == 40) & near, 3]
    assert lane.mean() > asphalt.mean() + 0.15, "lane markings are brighter than asphalt"


def test_close_to_real_scans(real_root, tmp_path):
    """Full-size frames: point count, ranges and the big classes within a loose margin of real scans."""
    from preprocessing.benchmarks.synthetic import scan_statistics

    generate_dataset(tmp_path, {"00": 1, "01": 1}, seed=0)
    synthetic, real = scan_statistics(tmp_path), scan_statistics(real_root)
    assert abs(synthetic["points_per_frame"] / real["points_per_frame"] - 1) < 0.2
    for s, r in zip(synthetic["range_percentiles"][1:4], real["range_percentiles"][1:4]):
        assert abs(s / r - 1) < 0.35
    assert abs(synthetic["z_percentiles"][2] - real["z_percentiles"][2]) < 0.3
    ground = ("road", "sidewalk", "terrain", "vegetation", "building")
    assert sum(synthetic["class_share"][c] for c in ground) > 0.6
    assert sum(real["class_share"][c] for c in ground) > 0.6
