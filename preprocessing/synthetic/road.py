"""The pieces a street is built of: road geometry, blocks and movers, and the street's dimensions.

Shared by :mod:`.scene` (which assembles a street) and :mod:`.street` (which builds its blocks
and traffic), so neither imports the other back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .primitives import Parts

BLOCK_LENGTH = 40.0
SENSOR_HEIGHT = 1.73   # HDL-64E above the road on the KITTI car
CURB_HEIGHT = 0.14     # sidewalks (and most terrain) stand this much above the road
PARKING_WIDTH = 2.4
LOW_TERRAIN = -0.35    # terrain below the road (lawns and verges sloping away)
GROUND_LEVELS = (CURB_HEIGHT, 0.0, LOW_TERRAIN)   # every surface height of the ground map, highest first
MAX_MOVER_WINDOW = 40.0


@dataclass
class Road:
    """A gently winding centre line y = A·sin(2πx/P + φ) over gently rolling ground.

    The ground height is a grade plus a long sine along world x, so distant ground sits a
    little above or below the sensor's horizon as in real drives.
    """

    amplitude: float
    period: float
    phase: float
    grade: float
    hill: float = 0.0
    hill_period: float = 300.0
    hill_phase: float = 0.0

    def _angle(self, x):
        return 2 * np.pi * x / self.period + self.phase

    def _axes(self, x):
        """Centre-line y, and cosine and sine of the road heading, at road coordinate x."""
        angle = self._angle(x)
        slope = self.amplitude * 2 * np.pi / self.period * np.cos(angle)
        c = 1.0 / np.sqrt(1.0 + slope * slope)
        return self.amplitude * np.sin(angle), c, slope * c

    def to_world(self, x, d):
        """World (x, y) and road heading of the point at lateral offset d (left positive) from the centre at x."""
        y, c, s = self._axes(x)
        return x - d * s, y + d * c, np.arctan2(s, c)

    def to_road(self, xw, yw):
        """Road coordinates (x, d) of world points: the inverse of :meth:`to_world`, by fixed-point steps."""
        x = np.asarray(xw, dtype=np.float64)
        if self.amplitude == 0:      # a straight street: the frames coincide (and the ground map is hot)
            return x, np.asarray(yw, dtype=np.float64)
        for _ in range(2):
            y, c, s = self._axes(x)
            x = x + ((xw - x) * c + (yw - y) * s) * c
        y, c, s = self._axes(x)
        return x, (yw - y) * c - (xw - x) * s

    def height(self, xw):
        return self.profile(xw)[0]

    def slope(self, xw):
        """dz/dx of the ground along world x."""
        return self.profile(xw)[1]

    def profile(self, xw):
        """Ground height of the road surface and its slope along world x."""
        w = 2 * np.pi / self.hill_period
        angle = w * xw + self.hill_phase
        return self.grade * xw + self.hill * np.sin(angle), self.grade + self.hill * w * np.cos(angle)


@dataclass
class Mover:
    """An object driving or walking along the road, present only for a time window around ``t_ref``."""

    parts: Parts       # in the object frame
    x: float           # road coordinate at t_ref
    d: float
    level: float       # height above the road surface (0 on the road, CURB_HEIGHT on the sidewalk)
    yaw: float         # relative to the road heading
    speed: float       # along the road, m/s
    t_ref: float
    window: float

    def placed(self, road: Road, t: float) -> Parts:
        xw, yw, heading = road.to_world(self.x + self.speed * (t - self.t_ref), self.d)
        return self.parts.placed(float(xw), float(yw), float(road.height(xw)) + self.level, float(heading) + self.yaw)


@dataclass
class Style:
    """The kind of street a sequence drives along: the odds each of its blocks draws its layout from.

    Drawn once per (seed, sequence), so short sequences differ in character (inner city,
    suburb, park-side, open country) and not only in where things stand.
    """

    frontage: np.ndarray   # (4,) odds of buildings / fenced yard / park / open land behind the sidewalk
    parking: float         # chance of a parking lane on one side of a block
    parked: float          # share of a parking lane's places taken
    junction: float        # chance of a side street on one side of a block
    lot: float             # chance of a parking lot behind the sidewalk on one side of a block
    verge: float           # chance of a strip of other ground (gravel, paving) behind the sidewalk
    traffic: float         # how busy the road is (a multiplier of moving vehicles)
    trees: float           # a multiplier of trees and bushes
    heavy: float           # a multiplier of trucks, buses, trailers and caravans among vehicles

    KINDS = np.array([[0.60, 0.10, 0.25, 0.05], [0.25, 0.35, 0.30, 0.10],
                      [0.05, 0.15, 0.65, 0.15], [0.05, 0.10, 0.40, 0.45]])

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Style:
        kind = int(rng.choice(4, p=[0.3, 0.35, 0.2, 0.15]))
        return cls(frontage=rng.dirichlet(25 * cls.KINDS[kind]), parking=rng.uniform(0.1, 0.3 - 0.04 * kind),
                   parked=rng.uniform(0.15, 0.35), junction=rng.uniform(0.06, 0.2), lot=rng.uniform(0.03, 0.12),
                   verge=rng.uniform(0.5, 0.7), traffic=rng.uniform(0.6, 1.6), trees=rng.uniform(1.4, 2.4),
                   heavy=rng.uniform(0.5, 2.0))


@dataclass
class Block:
    parking: np.ndarray   # (2,) bool: a parking lane on the right (0) / left (1) side
    street: np.ndarray    # (2, 2): block-local x interval of a side street per side, (-10, -10) if none
    terrain: np.ndarray   # (2,): height of the terrain beyond the sidewalk over the road, per side
    static: Parts         # in the world frame
    verge: np.ndarray     # (2,): width of the other-ground strip behind the sidewalk, per side (0: none)
    lot: np.ndarray       # (2, 3): block-local x interval and depth of a parking lot per side, (-10, -10, 0) if none


class StreetLayout(Protocol):
    """What the block and traffic builders of :mod:`.street` read of a street (a :class:`.scene.Scene`)."""

    seed: int
    sequence: str
    road: Road
    style: Style
    lanes: int            # lanes per direction
    median: float         # width of the raised island between the two directions (0: none)
    lane_width: float
    half_width: float     # centre line to the curb of the driving lanes
    sidewalk: np.ndarray  # (2,) sidewalk width right, left
    lawn: np.ndarray      # (2,) width of the grass strip between the curb and the sidewalk (0: none)
    ego_d: float          # the ego lane's lateral offset
    v0: float             # the ego vehicle's speed, m/s

    def lane_d(self, lane: int, oncoming: bool) -> float:
        """Lateral offset of the centre of lane ``lane`` (0 next to the centre line) of one direction."""

    def time_at(self, x: float) -> float:
        """When the ego vehicle passes road coordinate ``x``."""
