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
class Block:
    parking: np.ndarray   # (2,) bool: a parking lane on the right (0) / left (1) side
    street: np.ndarray    # (2, 2): block-local x interval of a side street per side, (-10, -10) if none
    terrain: np.ndarray   # (2,): height of the terrain beyond the sidewalk over the road, per side
    static: Parts         # in the world frame


class StreetLayout(Protocol):
    """What the block and traffic builders of :mod:`.street` read of a street (a :class:`.scene.Scene`)."""

    seed: int
    sequence: str
    road: Road
    lanes: int            # lanes per direction
    lane_width: float
    half_width: float     # centre line to the curb of the driving lanes
    sidewalk: np.ndarray  # (2,) sidewalk width right, left
    ego_d: float          # the ego lane's lateral offset
    v0: float             # the ego vehicle's speed, m/s

    def time_at(self, x: float) -> float:
        """When the ego vehicle passes road coordinate ``x``."""
