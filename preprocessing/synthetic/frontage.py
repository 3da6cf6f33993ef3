"""What stands behind the sidewalk of one side of a block: buildings, a fenced yard, a park, open land or a parking lot.

Also the furniture of a junction (signal masts, a vehicle waiting in the side street). The
odds come from the street's :class:`~.road.Style`, so an inner-city street is lined with
façades and an open-country road with terrain, guard rails and far trees.
"""
from __future__ import annotations

import numpy as np

from . import objects
from .builder import Builder
from .primitives import BICYCLIST, MOTORCYCLIST, PERSON
from .road import BLOCK_LENGTH, CURB_HEIGHT, PARKING_WIDTH

L = BLOCK_LENGTH
LOT = {"car": 0.85, "van": 0.08, "motorcycle": 0.04, "caravan": 0.03}
"""Odds of the vehicle kinds in a parking lot (heavy ones weighted further by the street's style)."""


def build_frontage(b: Builder, rng, side: int, sign: float, level: float, verge: float) -> None:
    """One of the four kinds of frontage (odds from the style), then far trees and buildings, and the lot if any."""
    outer = b.walk_edge(side) + verge
    away = 0.0 if sign > 0 else np.pi       # yaw turning a building's +y (its depth) away from the road
    kind = int(rng.choice(4, p=b.scene.style.frontage))
    if kind == 0:
        _buildings(b, rng, side, sign, outer, away, level)
    elif kind == 1:
        _yard(b, rng, side, sign, outer, away, level)
    elif kind == 2:
        _park(b, rng, side, sign, outer, level)
    else:
        _open(b, rng, side, sign, outer, level)
    _scatter(b, rng, side, sign, 22.0, 60.0, level, trees=rng.integers(3, 9), bushes=0, crown=(3.0, 5.5))
    if rng.random() < (0.8 if kind == 3 else 0.9):
        length = rng.uniform(15, 35)
        xl = rng.uniform(0, L)
        if b.clear(side, xl - length / 2, xl + length / 2):
            b.put(objects.building(rng, length, rng.uniform(10, 20)), xl, sign * rng.uniform(25, 55), level, away)
    if b.lot[side, 1] > 0:
        _parking_lot(b, rng, side, sign, b.walk_edge(side))


def lay_by(b: Builder, rng, side: int, verge: np.ndarray, level: np.ndarray) -> None:
    """A lorry, trailer, caravan or bus parked in a yard or lay-by behind the sidewalk, on ``side`` or the other.

    Every block has one (when there is room), lorries and the other heavy kinds taking turns,
    so that a drive of a few blocks shows both classes. Placed before the frontage, which then
    keeps clear of it.
    """
    obj = b.vehicle(rng, b.heavy_mix())[1]
    half = objects.length(obj) / 2 + 1.0
    for s in (side, 1 - side):
        d = b.walk_edge(s) + verge[s] + rng.uniform(5, 10)
        for xl in rng.uniform(half, L - half, 4):      # a few tries around side streets and lots
            if b.clear(s, xl - half, xl + half):
                b.put(obj, xl, (2 * s - 1) * d, float(level[s]), float(rng.choice([0.0, np.pi])))
                b.blocked[s].append((xl - half, xl + half))
                return


def _buildings(b: Builder, rng, side: int, sign: float, outer: float, away: float, level: float) -> None:
    setback = outer + (rng.uniform(0.5, 6.0) if rng.random() < 0.6 else 0.0)
    _row_of_buildings(b, rng, side, sign, setback, away, level)
    if setback > outer + 2:
        if rng.random() < 0.8:
            barrier = objects.fence if rng.random() < 0.35 else objects.hedge
            _along(b, rng, side, lambda n: barrier(rng, n), sign * (outer + 0.7), level)
        _scatter(b, rng, side, sign, outer + 0.8, setback - 0.8, level, trees=rng.integers(0, 2),
                 bushes=rng.integers(1, 6))


def _yard(b: Builder, rng, side: int, sign: float, outer: float, away: float, level: float) -> None:
    line = outer + rng.uniform(0.3, 2.0)
    barrier = objects.fence if rng.random() < 0.4 else objects.hedge
    _along(b, rng, side, lambda n: barrier(rng, n), sign * line, level)
    _scatter(b, rng, side, sign, line + 1.5, line + 14, level, trees=rng.integers(0, 4) * b.scene.style.trees,
             bushes=rng.integers(4, 10))
    if rng.random() < 0.6:
        length = rng.uniform(9, 16)
        xl = rng.uniform(0, L - length)
        if b.clear(side, xl, xl + length):
            b.put(objects.building(rng, length, rng.uniform(8, 12)), xl + length / 2,
                  sign * (line + rng.uniform(6, 12)), level, away)


def _park(b: Builder, rng, side: int, sign: float, outer: float, level: float) -> None:
    trees = b.scene.style.trees
    if rng.random() < 0.8:
        barrier = objects.fence if rng.random() < 0.25 else objects.hedge
        _along(b, rng, side, lambda n: barrier(rng, n), sign * (outer + 0.9), level)
    _scatter(b, rng, side, sign, outer + 1.5, outer + 25, level, trees=rng.integers(4, 10) * trees,
             bushes=rng.integers(6, 14) * trees)


def _open(b: Builder, rng, side: int, sign: float, outer: float, level: float) -> None:
    """Verges and fields: a guard rail or a pasture fence now and then, a few bushes and trees."""
    r = rng.random()
    if r < 0.4:
        _along(b, rng, side, lambda n: objects.guard_rail(rng, n), sign * (outer + 0.5), level, gaps=False)
    elif r < 0.7:
        _along(b, rng, side, lambda n: objects.fence(rng, n), sign * (outer + rng.uniform(2, 8)), level)
    if rng.random() < 0.5:
        _along(b, rng, side, lambda n: objects.hedge(rng, n), sign * (outer + rng.uniform(1.5, 4)), level)
    _scatter(b, rng, side, sign, outer + 2, outer + 30, level, trees=rng.integers(0, 4), bushes=rng.integers(3, 10))


def _row_of_buildings(b: Builder, rng, side: int, sign: float, setback: float, away: float, level: float) -> None:
    """Façades along the street with gaps between some of them."""
    xl = rng.uniform(0, 4)
    while xl < L - 6:
        length = min(rng.uniform(8, 26), L - xl)
        if b.clear(side, xl, xl + length):
            b.put(objects.building(rng, length, rng.uniform(8, 16)), xl + length / 2, sign * setback, level, away)
        xl += length + (rng.uniform(2, 8) if rng.random() < 0.5 else 0.0)


def _along(b: Builder, rng, side: int, make, d: float, level: float, gaps: bool = True) -> None:
    """Segments of a fence, hedge or rail along the block, broken by gates and side streets."""
    xl = rng.uniform(0, 2)
    while xl < L - 3:
        length = min(rng.uniform(6, 20), L - xl)
        if b.clear(side, xl, xl + length):
            b.put(make(length), xl + length / 2, d, level, 0.0)
        xl += length + (rng.uniform(1, 4) if gaps else 0.05)


def _scatter(b: Builder, rng, side: int, sign: float, a0: float, a1: float, level: float, *, trees: float,
             bushes: float, crown: tuple[float, float] | None = None) -> None:
    for _ in range(round(trees)):
        xl = rng.uniform(0, L)
        if b.clear(side, xl - 3, xl + 3):
            radius = rng.uniform(*crown) if crown else None
            b.put(objects.tree(rng, crown=radius), xl, sign * rng.uniform(a0, a1), level, 0.0)
    for _ in range(round(bushes)):
        xl = rng.uniform(0, L)
        if b.clear(side, xl - 1.5, xl + 1.5):
            b.put(objects.bush(rng), xl, sign * rng.uniform(a0, a1), level, 0.0)


def _parking_lot(b: Builder, rng, side: int, sign: float, edge: float) -> None:
    """Rows of vehicles parked nose-in on a lot at road level (never an empty one), with a lamp post."""
    x0, x1, depth = b.lot[side]
    rows = [edge + min(3.0, depth / 2)] + ([edge + depth - 3.0] if depth > 12 else [])
    for row, a in enumerate(rows):
        slots = np.arange(x0 + 1.4, x1 - 1.2, rng.uniform(2.5, 2.9))
        taken = rng.random(len(slots)) < b.scene.style.parked
        taken[int(rng.integers(len(slots)))] |= row == 0
        for xl in slots[taken]:
            _, obj = b.vehicle(rng, LOT)
            b.put(obj, xl, sign * a, 0.0, -sign * np.pi / 2 + np.pi * (rng.random() < 0.3))
    b.put(objects.streetlight(rng), rng.uniform(x0 + 2, x1 - 2), sign * (edge + depth - 0.3), 0.0, 0.0)
    if rng.random() < 0.5:   # fenced off at the back
        b.put(objects.fence(rng, x1 - x0), (x0 + x1) / 2, sign * (edge + depth + 0.3), 0.0, 0.0)


def junction(b: Builder, rng, side: int, sign: float, parking: bool) -> None:
    """Signal masts or signs at the corners of a side street, and now and then someone waiting in it."""
    scene = b.scene
    s0, s1 = b.street[side]
    curb = scene.half_width + PARKING_WIDTH * parking
    toward = 0.0 if sign < 0 else np.pi
    signals = rng.random() < 0.5
    for xl in (s0 - 1.2, s1 + 1.2):
        if signals:
            b.put(objects.traffic_light(rng, reach=rng.uniform(0, 3)), xl, sign * (curb + 0.5), CURB_HEIGHT, toward)
        elif rng.random() < 0.7:
            b.put(objects.traffic_sign(rng), xl, sign * (curb + 0.4), CURB_HEIGHT, toward)
    if rng.random() < 0.7:
        r = rng.random()
        face = -sign * np.pi / 2     # heading toward the main road
        lane = s0 + 2.0 + 0.28 * (s1 - s0 - 4.0) if sign < 0 else s1 - 2.0 - 0.28 * (s1 - s0 - 4.0)
        if r < 0.3:
            obj = objects.motorcycle(rng, MOTORCYCLIST, b.instance(), rider=True)
        elif r < 0.4:
            obj = objects.bicyclist(rng, BICYCLIST, b.instance())
        else:
            obj = b.vehicle(rng, {"car": 0.8, "van": 0.1, "truck": 0.1})[1]
        b.put(obj, lane, sign * (curb + scene.lawn[side] + scene.sidewalk[side] + rng.uniform(4, 9)), 0.0, face)
    if rng.random() < 0.4:
        b.put(objects.person(rng, PERSON, b.instance()), rng.uniform(s0 + 1, s1 - 1),
              sign * (curb + rng.uniform(0.5, 2.0)), 0.0, rng.uniform(0, 2 * np.pi))
