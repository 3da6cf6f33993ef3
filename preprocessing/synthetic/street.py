"""What stands along one block of the street: its layout is drawn here, its shapes come from objects.py.

Per side of the road: parked vehicles in the parking lane, street lights and signs at the
curb, trees, bicycles, motorbikes and people on the sidewalk, then (in :mod:`.frontage`) the
buildings, yards, parks, open land or parking lots behind it. Traffic (oncoming and
overtaking vehicles, bicyclists, motorcyclists, pedestrians) moves along the road. The odds
of all of these come from the street's :class:`~.road.Style`.
"""
from __future__ import annotations

import numpy as np

from . import objects
from .builder import VEHICLE_LABEL, Builder
from .frontage import build_frontage, junction, lay_by
from .primitives import (BICYCLE, BICYCLIST, MOTORCYCLE, MOTORCYCLIST, MOVING, PERSON, Parts, rng_for)
from .road import BLOCK_LENGTH, CURB_HEIGHT, LOW_TERRAIN, PARKING_WIDTH, Block, Mover, StreetLayout

L = BLOCK_LENGTH
PARKED = {"car": 0.72, "van": 0.1, "motorcycle": 0.06, "truck": 0.05, "trailer": 0.03, "caravan": 0.02, "bus": 0.02}
DRIVING = {"car": 0.72, "van": 0.1, "truck": 0.1, "bus": 0.05, "caravan": 0.03}


STATIC_STREAM, TRAFFIC_STREAM = 0, 1


def build_block(scene: StreetLayout, k: int) -> Block:
    """The static layout of block k; its traffic is drawn apart (:func:`build_traffic`), as it is needed farther out."""
    rng = rng_for(scene.seed, scene.sequence, STATIC_STREAM, k)
    style = scene.style
    parking = rng.random(2) < style.parking
    street = np.full((2, 2), -10.0)
    for side in range(2):
        if rng.random() < style.junction:
            s = rng.uniform(0, L - 14)
            street[side] = s, s + rng.uniform(9, 14)
    if rng.random() < 0.5 and (street[:, 1] > 0).any():   # a crossing rather than a T-junction
        street[:] = street[int(np.argmax(street[:, 1]))]
    has_verge = rng.random(2) < style.verge
    has_verge[int(rng.integers(2))] |= rng.random() < 0.6    # most blocks have one on some side
    verge = np.where(has_verge, rng.uniform(0.4, 0.8, 2), 0.0)
    lot = _lots(rng, style.lot, parking)
    terrain = np.where(rng.random(2) < 0.5, LOW_TERRAIN, CURB_HEIGHT)
    b = Builder(scene, k, street, lot, parking)
    lay_by(b, rng, int(rng.integers(2)), verge, terrain)   # this block's lorry, bus or trailer
    for side, sign in ((0, -1.0), (1, 1.0)):
        _curbside(b, rng, side, sign, parking[side])
        build_frontage(b, rng, side, sign, terrain[side], verge[side])
        if street[side, 1] > 0:
            junction(b, rng, side, sign, parking[side])
    return Block(parking, street, terrain, Parts.concat(b.parts), verge, lot)


def _lots(rng, chance: float, parking: np.ndarray) -> np.ndarray:
    """Parking lots behind the sidewalk; a block with no parking lane or lot gets a small bay instead."""
    lot = np.full((2, 3), -10.0)
    for side in range(2):
        if rng.random() < chance:
            length = rng.uniform(18, 32)
            x0 = rng.uniform(0, L - length)
            lot[side] = x0, x0 + length, rng.uniform(8, 14)
    if not parking.any() and lot[:, 1].max() < 0:
        length = rng.uniform(10, 18)
        x0 = rng.uniform(0, L - length)
        lot[int(rng.integers(2))] = x0, x0 + length, rng.uniform(5.5, 8)
    return lot


def build_traffic(scene: StreetLayout, k: int) -> list[Mover]:
    """Oncoming and overtaking vehicles, bicyclists and motorcyclists, pedestrians on the sidewalks.

    Each mover is tied to the block it is in when the ego vehicle enters that block.
    """
    b = Builder(scene, k, np.full((2, 2), -10.0), first_instance=129)   # ids apart from the static things
    _traffic(b, rng_for(scene.seed, scene.sequence, TRAFFIC_STREAM, k))
    return b.movers


def _parking_lane(b: Builder, rng, side: int, sign: float) -> None:
    """Vehicles parked along the curb, now and then a van, lorry or trailer among the cars."""
    scene = b.scene
    along = 0.0 if sign < 0 else np.pi        # heading of traffic on this side
    xl = rng.uniform(-1, 3)
    while xl < L - 2:
        _, obj = b.vehicle(rng, PARKED)
        length = objects.length(obj) + rng.uniform(0.6, 2.0)
        if rng.random() < scene.style.parked and b.free(side, xl, xl + length):
            b.put(obj, xl + length / 2, sign * (scene.half_width + 1.2), 0.0, along)
        xl += length


def _curbside(b: Builder, rng, side: int, sign: float, parking: bool) -> None:
    scene = b.scene
    curb = scene.half_width + PARKING_WIDTH * parking
    lawn = scene.lawn[side]
    outer = curb + lawn + scene.sidewalk[side]
    along = 0.0 if sign < 0 else np.pi        # heading of traffic on this side
    toward = along                            # yaw turning an object's +y toward the road
    if parking:
        _parking_lane(b, rng, side, sign)
    for xl in rng.uniform(2, L - 2, rng.binomial(2, 0.45)):
        if b.free(side, xl, xl):
            b.put(objects.streetlight(rng), xl, sign * (curb + 0.45), CURB_HEIGHT, toward)
    for xl in rng.uniform(2, L - 2, rng.binomial(2, 0.5)):
        if b.free(side, xl, xl):
            b.put(objects.traffic_sign(rng), xl, sign * (curb + 0.3), CURB_HEIGHT, toward)
    if max(lawn, scene.sidewalk[side]) >= 2.2 and rng.random() < 0.6 * scene.style.trees:
        at = curb + (lawn / 2 if lawn >= 2.2 else 0.9)     # in the grass strip, or in pits in the paving
        for xl in np.arange(rng.uniform(2, 8), L, rng.uniform(8, 14)):
            if b.free(side, xl - 1, xl + 1):
                b.put(objects.tree(rng, crown=rng.uniform(1.5, 3.0)), xl, sign * at, CURB_HEIGHT, 0.0)
    if lawn > 1.2 and rng.random() < 0.8:   # shrubs in the grass strip
        for xl in rng.uniform(1, L - 1, rng.integers(2, 7)):
            if b.free(side, xl - 1, xl + 1):
                b.put(objects.bush(rng, scale=min(1.0, lawn / 3)), xl, sign * (curb + lawn / 2), CURB_HEIGHT, 0.0)
    if rng.random() < 0.3:      # a railing along the back of the sidewalk
        xl = rng.uniform(0, L - 6)
        length = rng.uniform(5, 15)
        if b.free(side, xl, xl + length):
            b.put(objects.fence(rng, length), xl + length / 2, sign * (outer - 0.15), CURB_HEIGHT, 0.0)
    for make, label, p in ((objects.bicycle, BICYCLE, 0.6), (objects.motorcycle, MOTORCYCLE, 0.55)):
        if rng.random() < p:
            xl = rng.uniform(2, L - 5)
            edge = rng.random() < 0.5     # at the curb or against the back of the sidewalk
            for j in range(rng.integers(1, 4)):
                if b.free(side, xl, xl + 2.5):
                    b.put(make(rng, label, b.instance()), xl + 0.9 * j, sign * (curb + 1.0 if edge else outer - 0.7),
                          CURB_HEIGHT, toward + np.pi / 2 + rng.uniform(-0.3, 0.3))
    for _ in range(rng.poisson(0.6)):
        xl = rng.uniform(1, L - 1)
        if b.free(side, xl, xl):
            b.put(objects.person(rng, PERSON, b.instance()), xl, sign * rng.uniform(curb + lawn + 0.3, outer - 0.3),
                  CURB_HEIGHT, rng.uniform(0, 2 * np.pi))
    if rng.random() < 0.08:
        xl = rng.uniform(1, L - 1)
        if b.free(side, xl, xl):
            b.put(objects.bicyclist(rng, BICYCLIST, b.instance()), xl, sign * (curb + 0.6), CURB_HEIGHT, along)
    if side == 1 and rng.random() < 0.5:     # stopped at the far curb, engine running
        xl = rng.uniform(1, L - 1)
        if b.free(side, xl, xl):
            b.put(objects.motorcycle(rng, MOTORCYCLIST, b.instance(), rider=True), xl, curb - 0.7, 0.0, along)


def _traffic(b: Builder, rng) -> None:
    scene = b.scene
    lanes, busy = scene.lanes, scene.style.traffic
    for _ in range(rng.poisson(0.5 * busy)):
        _, obj = b.vehicle(rng, DRIVING, moving=True)
        b.move(obj, rng.uniform(0, L), scene.lane_d(int(rng.integers(lanes)), True), 0.0, np.pi, -rng.uniform(8, 14))
    for heavy, p in (("truck", 0.15), ("bus", 0.04), ("caravan", 0.06)):
        if rng.random() < p:
            obj = getattr(objects, heavy)(rng, MOVING[VEHICLE_LABEL[heavy]], b.instance())
            b.move(obj, rng.uniform(0, L), scene.lane_d(int(rng.integers(lanes)), True), 0.0, np.pi,
                   -rng.uniform(8, 12))
    if lanes == 2 and rng.random() < 0.4 * busy:
        other = scene.lane_d(1, False) if scene.ego_d > scene.lane_d(1, False) else scene.lane_d(0, False)
        _, obj = b.vehicle(rng, DRIVING, moving=True)
        b.move(obj, rng.uniform(0, L), other, 0.0, 0.0, scene.v0 + rng.uniform(5, 8))
    if rng.random() < 0.5:
        # Our way at the curb where we drive in the inner lane, else on the sidewalk or coming toward us.
        rider = objects.bicyclist(rng, MOVING[BICYCLIST], b.instance())
        if lanes == 2 and scene.ego_d > scene.lane_d(1, False):
            b.move(rider, rng.uniform(0, L), -(scene.half_width - 0.4), 0.0, 0.0, rng.uniform(4, 6))
        elif rng.random() < 0.6:
            d = scene.half_width + PARKING_WIDTH + scene.lawn[0] + 0.7
            b.move(rider, rng.uniform(0, L), -d, CURB_HEIGHT, 0.0, rng.uniform(4, 6))
        else:
            b.move(rider, rng.uniform(0, L), scene.half_width - 0.4, 0.0, np.pi, -rng.uniform(4, 6))
    if rng.random() < 0.7:
        rider = objects.motorcycle(rng, MOVING[MOTORCYCLIST], b.instance(), rider=True)
        if lanes == 1 or rng.random() < 0.6:
            b.move(rider, rng.uniform(0, L), scene.lane_d(int(rng.integers(lanes)), True), 0.0, np.pi,
                   -rng.uniform(7, 13))
        else:      # overtaking us in the other lane of our direction
            other = scene.lane_d(1, False) if scene.ego_d > scene.lane_d(1, False) else scene.lane_d(0, False)
            b.move(rider, rng.uniform(0, L), other, 0.0, 0.0, scene.v0 + rng.uniform(5, 9))
    for side, sign in ((0, -1.0), (1, 1.0)):
        if rng.random() < 0.5:
            curb = scene.half_width + PARKING_WIDTH
            speed = rng.choice([-1.0, 1.0]) * rng.uniform(1.1, 1.6)
            b.move(objects.person(rng, MOVING[PERSON], b.instance()), rng.uniform(0, L),
                   sign * (curb + scene.lawn[side] + rng.uniform(0.3, scene.sidewalk[side] - 0.3)), CURB_HEIGHT,
                   0.0 if speed > 0 else np.pi, speed)
