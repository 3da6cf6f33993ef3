"""A procedural street: road geometry, the labelled ground map, the objects along it and the ego trajectory.

The street is endless along its road and cut into blocks of :data:`BLOCK_LENGTH` metres.
Each block draws its layout from its own random stream (seed, sequence, block index)
and is built on first use, so a frame depends only on (seed, sequence, frame index) and
never on which other frames were rendered before it. Everything here is in the world
frame: the road runs along +x and the ego vehicle starts at x = 0.
"""
from __future__ import annotations

import numpy as np

from .primitives import LANE_MARKING, OTHER_GROUND, PARKING, ROAD, SIDEWALK, TERRAIN, Parts, rng_for
from .road import (BLOCK_LENGTH, CURB_HEIGHT, MAX_MOVER_WINDOW, PARKING_WIDTH, SENSOR_HEIGHT, Block, Mover, Road,
                   Style)
from .street import build_block, build_traffic

SIDE_WALK = 2.0   # sidewalk width along a side street


class Scene:
    """One sequence's street, built block by block from (seed, sequence)."""

    def __init__(self, seed: int, sequence: str):
        self.seed, self.sequence = seed, sequence
        rng = rng_for(seed, sequence)
        self.road = Road(amplitude=rng.uniform(0, 14) * (rng.random() < 0.65), period=rng.uniform(350, 800),
                         phase=rng.uniform(0, 2 * np.pi), grade=rng.uniform(-0.02, 0.02),
                         hill=rng.uniform(0.3, 1.5), hill_period=rng.uniform(200, 400),
                         hill_phase=rng.uniform(0, 2 * np.pi))
        self.style = Style.draw(rng)
        self.lanes = int(rng.choice([1, 2], p=[0.78, 0.22]))           # lanes per direction
        self.lane_width = rng.uniform(3.0, 3.6)
        self.median = rng.uniform(1.0, 2.0) if rng.random() < 0.08 + 0.3 * (self.lanes == 2) else 0.0
        self.half_width = self.median / 2 + self.lanes * self.lane_width
        self.sidewalk = rng.uniform(2.0, 4.5, 2)                      # right, left
        self.lawn = np.where(rng.random(2) < 0.6, rng.uniform(1.0, 4.0, 2), 0.0)   # grass between curb and walk
        self.ego_d = self.lane_d(int(rng.integers(self.lanes)), oncoming=False)
        self.v0, self.va = rng.uniform(9.0, 11.0), rng.uniform(0.0, 1.0)
        self.vw, self.vphase = 2 * np.pi / rng.uniform(15, 45), rng.uniform(0, 2 * np.pi)
        self.wobble = rng.uniform(0, 2 * np.pi, 2)
        self._blocks: dict[int, Block] = {}
        self._traffic: dict[int, list[Mover]] = {}

    def lane_d(self, lane: int, oncoming: bool) -> float:
        d = self.median / 2 + self.lane_width * (lane + 0.5)
        return d if oncoming else -d

    # --- ego trajectory -------------------------------------------------------------------
    def ego_speed(self, t):
        return self.v0 + self.va * np.sin(self.vw * t + self.vphase)

    def ego_x(self, t):
        """Road coordinate of the ego vehicle at time t (speed oscillates gently around v0)."""
        return self.v0 * t + self.va / self.vw * (np.cos(self.vphase) - np.cos(self.vw * t + self.vphase))

    def time_at(self, x: float) -> float:
        """When the ego vehicle passes road coordinate x (Newton steps on :meth:`ego_x`)."""
        t = x / self.v0
        for _ in range(4):
            t -= (self.ego_x(t) - x) / self.ego_speed(t)
        return float(t)

    def lidar_pose(self, t: float) -> np.ndarray:
        """4x4 world pose of the LiDAR (x forward, y left, z up) at time t."""
        d = self.ego_d + 0.15 * np.sin(0.37 * t + self.wobble[0])
        xw, yw, heading = self.road.to_world(self.ego_x(t), d)
        yaw = heading + 0.01 * np.sin(1.3 * t + self.wobble[1])
        forward = np.array([np.cos(yaw), np.sin(yaw), self.road.slope(xw) * np.cos(yaw)])
        forward /= np.linalg.norm(forward)
        left = np.array([-np.sin(yaw), np.cos(yaw), 0.0])
        pose = np.eye(4)
        pose[:3, :3] = np.stack([forward, left, np.cross(forward, left)], axis=1)
        pose[:3, 3] = xw, yw, self.road.height(xw) + SENSOR_HEIGHT
        return pose

    # --- blocks ---------------------------------------------------------------------------
    def block(self, k: int) -> Block:
        if k not in self._blocks:
            self._blocks[k] = build_block(self, k)
        return self._blocks[k]

    def traffic(self, k: int) -> list[Mover]:
        if k not in self._traffic:
            self._traffic[k] = build_traffic(self, k)
        return self._traffic[k]

    def primitives(self, t: float, xy: np.ndarray, radius: float) -> Parts:
        """World-frame primitives that may be seen within ``radius`` of ``xy`` at time t."""
        x = float(self.road.to_road(xy[0], xy[1])[0])
        near = range(int(np.floor((x - radius - 20) / BLOCK_LENGTH)),
                     int(np.floor((x + radius + 20) / BLOCK_LENGTH)) + 1)
        reach = range(int(np.floor(self.ego_x(t - MAX_MOVER_WINDOW) / BLOCK_LENGTH)) - 1,
                      int(np.floor(self.ego_x(t + MAX_MOVER_WINDOW) / BLOCK_LENGTH)) + 1)
        for cache, first in ((self._blocks, near.start), (self._traffic, reach.start)):
            for k in [k for k in cache if k < first - 2]:
                del cache[k]
        items = [self.block(k).static for k in near]
        for k in reach:
            items += [m.placed(self.road, t) for m in self.traffic(k) if abs(t - m.t_ref) <= m.window]
        parts = Parts.concat(items)
        dist = np.linalg.norm(parts.center[:, :2] - xy, axis=1) - parts.bounding_radius()
        return parts.subset(np.flatnonzero(dist < radius))

    # --- ground ---------------------------------------------------------------------------
    def ground(self, xw: np.ndarray, yw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw label and surface height over the road level of the ground at world points.

        Across the road from the centre: a raised median island (other ground) where the
        street has one, lanes with markings, a parking lane where the block has one, the curb,
        a grass strip where the street has one and the sidewalk (CURB_HEIGHT up), a strip of
        other ground or a parking lot, then terrain at the block's level; side streets cut
        through at road level, with a sidewalk along each edge.
        """
        x, d = self.road.to_road(xw, yw)
        k = np.floor(x / BLOCK_LENGTH).astype(np.int64)
        if k.size == 0:
            return np.zeros(0, np.uint32), np.zeros(0)
        k0 = int(k.min())
        blocks = [self.block(j) for j in range(k0, int(k.max()) + 1)]
        parking, street, terrain, verge, lot = (np.array([getattr(b, f) for b in blocks])
                                                for f in ("parking", "street", "terrain", "verge", "lot"))
        row, side = k - k0, (d > 0).astype(np.int64)
        a, xl = np.abs(d), x - k * BLOCK_LENGTH
        curb = self.half_width + PARKING_WIDTH * parking[row, side]
        lawn = self.lawn[side]
        walk = curb + lawn + self.sidewalk[side]
        sidewalk = a < walk
        label = np.where(sidewalk & (a >= curb + lawn), SIDEWALK, TERRAIN).astype(np.uint32)
        paved = sidewalk
        if verge.any():
            strip = ~sidewalk & (a < walk + verge[row, side])
            label[strip] = OTHER_GROUND
            paved = sidewalk | strip
        level = np.where(paved, CURB_HEIGHT, terrain[row, side])
        flat = a < curb
        if (lot[:, :, 1] > 0).any():
            lots = lot[row, side]
            flat = flat | (~sidewalk & (xl >= lots[:, 0]) & (xl < lots[:, 1]) & (a < walk + lots[:, 2]))
        label[flat] = PARKING
        on_road = a < self.half_width
        label[on_road] = ROAD
        label[self._markings(x, a) & on_road] = LANE_MARKING
        if (street[:, :, 1] > 0).any() or self.median > 0:
            crossing = (street[row, :, 0] <= xl[:, None]) & (xl[:, None] < street[row, :, 1])
            across = street[row, side]
            in_street = crossing[np.arange(k.size), side] & ~on_road
            walks = in_street & ((xl < across[:, 0] + SIDE_WALK) | (xl >= across[:, 1] - SIDE_WALK)) & ~flat
            label[walks] = SIDEWALK
            in_street &= ~walks
            island = (a < self.median / 2) & ~crossing.any(axis=1)
            label[island] = OTHER_GROUND
            label[in_street] = ROAD
            level[flat | in_street] = 0.0
            level[island | walks] = CURB_HEIGHT
            return label, level
        level[flat] = 0.0
        return label, level

    def _markings(self, x: np.ndarray, a: np.ndarray) -> np.ndarray:
        """Edge lines, the centre line (none beside a median) and dashed lines between lanes."""
        marks = np.abs(a - (self.half_width - 0.3)) < 0.075
        dashed = np.mod(x, 9.0) < 3.0
        inner = self.median / 2
        if self.median > 0:
            marks |= np.abs(a - inner - 0.3) < 0.075
        elif self.lanes == 1:
            marks |= (a < 0.075) & dashed
        else:
            marks |= a < 0.1
        if self.lanes == 2:
            marks |= (np.abs(a - inner - self.lane_width) < 0.075) & dashed
        return marks
