"""Shapes the ray caster understands, the raw SemanticKITTI ids they carry, and their materials.

Every primitive is a unit shape (box, z-axis cylinder or sphere) scaled by half-sizes,
rotated and moved, so one affine map per primitive takes rays into a frame where the
intersection is trivial. Primitives are kept as parallel arrays (:class:`Parts`) so a
whole scene is culled and transformed with a few numpy operations per frame.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

BOX, CYLINDER, ELLIPSOID = 0, 1, 2

# Raw SemanticKITTI ids (low 16 bits of a .label value).
CAR, BICYCLE, MOTORCYCLE, TRUCK, OTHER_VEHICLE = 10, 11, 15, 18, 20
PERSON, BICYCLIST, MOTORCYCLIST = 30, 31, 32
ROAD, PARKING, SIDEWALK, OTHER_GROUND, BUILDING, FENCE, LANE_MARKING = 40, 44, 48, 49, 50, 51, 60
VEGETATION, TRUNK, TERRAIN, POLE, TRAFFIC_SIGN = 70, 71, 72, 80, 81
MOVING = {CAR: 252, BICYCLIST: 253, PERSON: 254, MOTORCYCLIST: 255, TRUCK: 258, OTHER_VEHICLE: 259}
"""The raw id SemanticKITTI gives a moving object of each class."""

# Mean remission and the spread between objects of one material (car paint colours,
# façade materials); the sensor adds per-return noise and the incidence-angle fall-off.
MATERIALS = {
    "asphalt": (0.27, 0.0), "lane_paint": (0.6, 0.0), "paving": (0.35, 0.0), "grass": (0.41, 0.0),
    "parking": (0.25, 0.0), "facade": (0.34, 0.10), "fence": (0.28, 0.08), "leaves": (0.38, 0.04),
    "bark": (0.39, 0.04), "metal": (0.26, 0.05), "sign": (0.85, 0.07), "car_paint": (0.2, 0.12),
    "glass": (0.04, 0.02), "tire": (0.05, 0.02), "truck": (0.32, 0.10), "clothes": (0.42, 0.12),
    "skin": (0.47, 0.05), "bicycle": (0.22, 0.08), "gravel": (0.31, 0.0), "rail": (0.45, 0.05),
}
GROUND_MATERIAL = {ROAD: "asphalt", LANE_MARKING: "lane_paint", PARKING: "parking", SIDEWALK: "paving",
                   OTHER_GROUND: "gravel", TERRAIN: "grass"}
GROUND_REMISSION = np.zeros(1 << 8, dtype=np.float64)
for _label, _name in GROUND_MATERIAL.items():
    GROUND_REMISSION[_label] = MATERIALS[_name][0]


def rng_for(seed: int, sequence: str, *keys: int) -> np.random.Generator:
    """An independent random stream for (seed, sequence, keys).

    Every block of a scene and every frame draws from its own stream, so any frame can be
    rendered alone and gives the same bytes however many frames are generated with it.
    """
    # numpy pads seeds with zeros, so [s, q] and [s, q, 0] would be one stream: the key count ends the list.
    return np.random.default_rng([int(seed) % (1 << 32), zlib.crc32(sequence.encode()),
                                  *[int(k) % (1 << 32) for k in keys], len(keys) + 1])


def material(name: str, rng: np.random.Generator) -> float:
    """The mean remission of one object made of ``name``."""
    mean, spread = MATERIALS[name]
    return float(np.clip(mean + spread * rng.standard_normal(), 0.01, 0.95))


def rot_z(yaw: np.ndarray | float) -> np.ndarray:
    """Rotation matrices about z, shape (..., 3, 3); a scalar yaw takes a short path (blocks add thousands)."""
    if np.ndim(yaw) == 0:
        c, s = float(np.cos(yaw)), float(np.sin(yaw))
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    c, s = np.cos(yaw), np.sin(yaw)
    zero, one = np.zeros_like(c), np.ones_like(c)
    return np.stack([np.stack([c, -s, zero], -1), np.stack([s, c, zero], -1),
                     np.stack([zero, zero, one], -1)], -2)


# Turns a cylinder's axis from z to y (wheels, sign discs) or x.
AXIS_Y = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])
AXIS_X = np.array([[0.0, 0, 1], [0, 1, 0], [-1, 0, 0]])


@dataclass
class Parts:
    """Primitives as parallel arrays."""

    kind: np.ndarray       # (n,) BOX / CYLINDER / ELLIPSOID
    center: np.ndarray     # (n, 3)
    rot: np.ndarray        # (n, 3, 3) local → parent frame
    half: np.ndarray       # (n, 3) half-sizes along the local axes
    label: np.ndarray      # (n,) raw SemanticKITTI id
    instance: np.ndarray   # (n,) instance id (0 for stuff)
    remission: np.ndarray  # (n,) mean remission
    porosity: np.ndarray   # (n,) share of rays that pass through (foliage, mesh, glass)

    def __len__(self) -> int:
        return len(self.kind)

    @staticmethod
    def concat(items: list[Parts]) -> Parts:
        items = [p for p in items if len(p)] or [EMPTY]
        return Parts(*(np.concatenate([getattr(p, f) for p in items]) for f in Parts.__dataclass_fields__))

    def subset(self, index: np.ndarray) -> Parts:
        return Parts(*(getattr(self, f)[index] for f in Parts.__dataclass_fields__))

    def placed(self, x: float, y: float, z: float, yaw: float) -> Parts:
        """These parts, given in an object frame, turned by ``yaw`` and moved to (x, y, z)."""
        r = rot_z(yaw)
        return Parts(self.kind, self.center @ r.T + np.array([x, y, z]), r @ self.rot, self.half,
                     self.label, self.instance, self.remission, self.porosity)

    def bounding_radius(self) -> np.ndarray:
        return np.linalg.norm(self.half, axis=1)


EMPTY = Parts(np.zeros(0, np.int8), np.zeros((0, 3)), np.zeros((0, 3, 3)), np.zeros((0, 3)),
              np.zeros(0, np.uint32), np.zeros(0, np.uint32), np.zeros(0), np.zeros(0))


class PartList:
    """Collects primitives one by one while an object is built, then packs them into :class:`Parts`."""

    def __init__(self, label: int, instance: int = 0):
        self.label, self.instance = label, instance
        self.rows: list[tuple] = []

    def add(self, kind: int, center, half, remission: float, *, yaw: float = 0.0, axis: np.ndarray | None = None,
            porosity: float = 0.0, label: int | None = None) -> PartList:
        rot = rot_z(yaw) if axis is None else rot_z(yaw) @ axis
        self.rows.append((kind, center, rot, half, self.label if label is None else label, remission, porosity))
        return self

    def parts(self) -> Parts:
        if not self.rows:
            return EMPTY
        kind, center, rot, half, label, remission, porosity = zip(*self.rows)
        n = len(kind)
        return Parts(np.array(kind, np.int8), np.array(center, float).reshape(n, 3), np.array(rot),
                     np.array(half, float).reshape(n, 3), np.array(label, np.uint32),
                     np.full(n, self.instance, np.uint32), np.array(remission, float), np.array(porosity, float))
