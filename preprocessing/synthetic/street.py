"""What stands along one block of the street: its layout is drawn here, its shapes come from objects.py.

Per side of the road: parked cars in the parking lane, street lights and signs at the curb,
trees, bicycles and people on the sidewalk, then a frontage of buildings, a fenced yard or
a park, and far trees and buildings that give the upper beams something to hit. Traffic
(oncoming and overtaking cars, bicyclists, pedestrians) moves along the road.
"""
from __future__ import annotations

import numpy as np

from . import objects
from .primitives import BICYCLE, BICYCLIST, CAR, MOVING, OTHER_VEHICLE, PERSON, TRUCK, Parts, rng_for
from .road import BLOCK_LENGTH, CURB_HEIGHT, LOW_TERRAIN, MAX_MOVER_WINDOW, PARKING_WIDTH, Block, Mover, StreetLayout

L = BLOCK_LENGTH


class _Builder:
    """Places objects given in road coordinates of one block, and hands out instance ids."""

    def __init__(self, scene: StreetLayout, k: int, street: np.ndarray, first_instance: int = 1):
        self.scene, self.k, self.street = scene, k, street
        self.x0 = k * L
        self.parts: list[Parts] = []
        self.movers: list[Mover] = []
        self._next = first_instance - 1

    def instance(self) -> int:
        """Instance ids are unique within a block and differ between neighbouring blocks (16 bits)."""
        self._next += 1
        return (self.k % 255) * 256 + min(self._next, 255)

    def free(self, side: int, start: float, end: float) -> bool:
        """Whether the block-local x interval keeps clear of this side's side street."""
        s0, s1 = self.street[side]
        return end < s0 - 1.0 or start > s1 + 1.0

    def put(self, parts: Parts, xl: float, d: float, level: float, yaw: float) -> None:
        xw, yw, heading = self.scene.road.to_world(self.x0 + xl, d)
        z = float(self.scene.road.height(xw)) + level
        self.parts.append(parts.placed(float(xw), float(yw), z, float(heading) + yaw))

    def move(self, parts: Parts, xl: float, d: float, level: float, yaw: float, speed: float) -> None:
        """A mover that is at block-local x = xl when the ego vehicle enters the block.

        It exists only while it is far from the ego vehicle at the window's ends, so it never
        pops in or out of view.
        """
        t_ref = self.scene.time_at(self.x0)
        window = float(np.clip(150.0 / max(abs(speed - self.scene.v0), 1e-3), 15.0, MAX_MOVER_WINDOW))
        self.movers.append(Mover(parts, self.x0 + xl, d, level, yaw, speed, t_ref, window))


STATIC_STREAM, TRAFFIC_STREAM = 0, 1


def build_block(scene: StreetLayout, k: int) -> Block:
    """The static layout of block k; its traffic is drawn apart (:func:`build_traffic`), as it is needed farther out."""
    rng = rng_for(scene.seed, scene.sequence, STATIC_STREAM, k)
    parking = rng.random(2) < 0.2
    street = np.full((2, 2), -10.0)
    for side in range(2):
        if rng.random() < 0.12:
            s = rng.uniform(0, L - 12)
            street[side] = s, s + rng.uniform(8, 12)
    terrain = np.where(rng.random(2) < 0.35, LOW_TERRAIN, CURB_HEIGHT)
    b = _Builder(scene, k, street)
    for side, sign in ((0, -1.0), (1, 1.0)):
        _curbside(b, rng, side, sign, parking[side])
        _frontage(b, rng, side, sign, terrain[side])
    return Block(parking, street, terrain, Parts.concat(b.parts))


def build_traffic(scene: StreetLayout, k: int) -> list[Mover]:
    """Oncoming and overtaking vehicles, bicyclists at the right edge, pedestrians on the sidewalks.

    Each mover is tied to the block it is in when the ego vehicle enters that block.
    """
    b = _Builder(scene, k, np.full((2, 2), -10.0), first_instance=129)   # ids apart from the static things
    _traffic(b, rng_for(scene.seed, scene.sequence, TRAFFIC_STREAM, k))
    return b.movers


def _curbside(b: _Builder, rng, side: int, sign: float, parking: bool) -> None:
    scene = b.scene
    curb = scene.half_width + PARKING_WIDTH * parking
    outer = curb + scene.sidewalk[side]
    along = 0.0 if sign < 0 else np.pi        # heading of traffic on this side
    toward = along                            # yaw turning an object's +y toward the road
    if parking:
        xl = rng.uniform(-1, 3)
        while xl < L - 2:
            length = 4.7 + rng.uniform(0.3, 3.0)
            if rng.random() < 0.5 and b.free(side, xl, xl + length):
                kind = rng.choice(["car", "truck", "bus"], p=[0.9, 0.06, 0.04])
                label = {"car": CAR, "truck": TRUCK, "bus": OTHER_VEHICLE}[kind]
                obj = getattr(objects, kind)(rng, label, b.instance())
                b.put(obj, xl + 2.4, sign * (scene.half_width + 1.2), 0.0, along)
                length += 0.0 if kind == "car" else 6.0
            xl += length
    if rng.random() < 0.6:
        xl = rng.uniform(2, L - 2)
        if b.free(side, xl, xl):
            b.put(objects.streetlight(rng), xl, sign * (curb + 0.45), CURB_HEIGHT, toward)
    if rng.random() < 0.7:
        xl = rng.uniform(2, L - 2)
        if b.free(side, xl, xl):
            b.put(objects.traffic_sign(rng), xl, sign * (curb + 0.3), CURB_HEIGHT, toward)
    if scene.sidewalk[side] >= 2.2 and rng.random() < 0.7:
        for xl in np.arange(rng.uniform(2, 8), L, rng.uniform(8, 14)):
            if b.free(side, xl - 1, xl + 1):
                b.put(objects.tree(rng, crown=rng.uniform(1.5, 3.0)), xl, sign * (curb + 0.9), CURB_HEIGHT, 0.0)
    if rng.random() < 0.3:
        xl = rng.uniform(2, L - 5)
        for j in range(rng.integers(1, 4)):
            if b.free(side, xl, xl + 2.5):
                b.put(objects.bicycle(rng, BICYCLE, b.instance()), xl + 0.75 * j, sign * (outer - 0.5), CURB_HEIGHT,
                      toward + np.pi / 2 + rng.uniform(-0.2, 0.2))
    for _ in range(rng.poisson(0.5)):
        xl = rng.uniform(1, L - 1)
        if b.free(side, xl, xl):
            b.put(objects.person(rng, PERSON, b.instance()), xl, sign * rng.uniform(curb + 0.5, outer - 0.3),
                  CURB_HEIGHT, rng.uniform(0, 2 * np.pi))
    if rng.random() < 0.05:
        xl = rng.uniform(1, L - 1)
        if b.free(side, xl, xl):
            b.put(objects.bicyclist(rng, BICYCLIST, b.instance()), xl, sign * (curb + 0.6), CURB_HEIGHT, along)


def _frontage(b: _Builder, rng, side: int, sign: float, level: float) -> None:
    scene = b.scene
    outer = scene.half_width + PARKING_WIDTH + scene.sidewalk[side]   # behind the widest curb line
    away = 0.0 if sign > 0 else np.pi       # yaw turning a building's +y (its depth) away from the road
    kind = rng.choice(["buildings", "yard", "park"], p=[0.25, 0.35, 0.4])
    if kind == "buildings":
        setback = outer + (rng.uniform(0.5, 6.0) if rng.random() < 0.6 else 0.0)
        _row_of_buildings(b, rng, side, sign, setback, away, level)
        if setback > outer + 2:
            if rng.random() < 0.5:
                _along(b, rng, side, lambda n: objects.hedge(rng, n), sign * (outer + 0.7), level)
            _scatter(b, rng, side, sign, outer + 0.8, setback - 0.8, level, trees=rng.integers(0, 2),
                     bushes=rng.integers(1, 6))
    elif kind == "yard":
        line = outer + rng.uniform(0.3, 2.0)
        barrier = objects.fence if rng.random() < 0.4 else objects.hedge
        _along(b, rng, side, lambda n: barrier(rng, n), sign * line, level)
        _scatter(b, rng, side, sign, line + 1.5, line + 14, level, trees=rng.integers(0, 4),
                 bushes=rng.integers(1, 6))
        if rng.random() < 0.6:
            length = rng.uniform(9, 16)
            xl = rng.uniform(0, L - length)
            if b.free(side, xl, xl + length):
                b.put(objects.building(rng, length, rng.uniform(8, 12)), xl + length / 2,
                      sign * (line + rng.uniform(6, 12)), level, away)
    else:
        if rng.random() < 0.5:
            _along(b, rng, side, lambda n: objects.hedge(rng, n), sign * (outer + 0.9), level)
        _scatter(b, rng, side, sign, outer + 1.5, outer + 25, level, trees=rng.integers(4, 10),
                 bushes=rng.integers(3, 9))
    _scatter(b, rng, side, sign, 22.0, 60.0, level, trees=rng.integers(3, 9), bushes=0, crown=(3.0, 5.5))
    if rng.random() < 0.6:
        length = rng.uniform(15, 35)
        b.put(objects.building(rng, length, rng.uniform(10, 20)), rng.uniform(0, L), sign * rng.uniform(40, 70),
              level, away)


def _row_of_buildings(b: _Builder, rng, side: int, sign: float, setback: float, away: float, level: float) -> None:
    """Façades along the street with gaps between some of them."""
    xl = rng.uniform(0, 4)
    while xl < L - 6:
        length = min(rng.uniform(8, 26), L - xl)
        if b.free(side, xl, xl + length):
            b.put(objects.building(rng, length, rng.uniform(8, 16)), xl + length / 2, sign * setback, level, away)
        xl += length + (rng.uniform(2, 8) if rng.random() < 0.5 else 0.0)


def _along(b: _Builder, rng, side: int, make, d: float, level: float) -> None:
    """Segments of a fence or hedge along the block, broken by gates and side streets."""
    xl = rng.uniform(0, 2)
    while xl < L - 3:
        length = min(rng.uniform(6, 20), L - xl)
        if b.free(side, xl, xl + length):
            b.put(make(length), xl + length / 2, d, level, 0.0)
        xl += length + rng.uniform(1, 4)


def _scatter(b: _Builder, rng, side: int, sign: float, a0: float, a1: float, level: float, *, trees: int, bushes: int,
             crown: tuple[float, float] | None = None) -> None:
    for _ in range(trees):
        xl = rng.uniform(0, L)
        if b.free(side, xl - 3, xl + 3):
            radius = rng.uniform(*crown) if crown else None
            b.put(objects.tree(rng, crown=radius), xl, sign * rng.uniform(a0, a1), level, 0.0)
    for _ in range(bushes):
        xl = rng.uniform(0, L)
        if b.free(side, xl - 1.5, xl + 1.5):
            b.put(objects.bush(rng), xl, sign * rng.uniform(a0, a1), level, 0.0)


def _traffic(b: _Builder, rng) -> None:
    scene = b.scene
    lanes, width = scene.lanes, scene.lane_width
    if rng.random() < 0.7:
        kind = rng.choice(["car", "truck", "bus"], p=[0.85, 0.1, 0.05])
        label = MOVING[{"car": CAR, "truck": TRUCK, "bus": OTHER_VEHICLE}[kind]]
        d = width * (rng.integers(lanes) + 0.5)
        b.move(getattr(objects, kind)(rng, label, b.instance()), rng.uniform(0, L), d, 0.0, np.pi,
               -rng.uniform(8, 14))
    if lanes == 2 and rng.random() < 0.4:
        other = -width * (0.5 if scene.ego_d < -width else 1.5)
        b.move(objects.car(rng, MOVING[CAR], b.instance()), rng.uniform(0, L), other, 0.0, 0.0,
               scene.v0 + rng.uniform(5, 8))
    if rng.random() < 0.15:
        b.move(objects.bicyclist(rng, MOVING[BICYCLIST], b.instance()), rng.uniform(0, L),
               -(scene.half_width - 0.35), 0.0, 0.0, rng.uniform(4, 6))
    for side, sign in ((0, -1.0), (1, 1.0)):
        if rng.random() < 0.5:
            curb = scene.half_width + PARKING_WIDTH
            speed = rng.choice([-1.0, 1.0]) * rng.uniform(1.1, 1.6)
            b.move(objects.person(rng, MOVING[PERSON], b.instance()), rng.uniform(0, L),
                   sign * rng.uniform(curb + 0.5, curb + scene.sidewalk[side] - 0.3), CURB_HEIGHT,
                   0.0 if speed > 0 else np.pi, speed)
