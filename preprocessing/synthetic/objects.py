"""Object shapes built from primitives, in an object frame: x forward, y left, z up from the ground.

Sizes follow the real things (a car is ~4.3 x 1.8 x 1.5 m, a person ~1.75 m), because the
network learns scale: an object of the wrong size is a different class to it.
"""
from __future__ import annotations

import numpy as np

from .primitives import (AXIS_X, AXIS_Y, BOX, BUILDING, CYLINDER, ELLIPSOID, FENCE, POLE, TRAFFIC_SIGN,
                         TRUNK, VEGETATION, PartList, Parts, material)


def length(parts: Parts) -> float:
    """Extent along the object's x axis (a vehicle's length), for spacing objects in a row."""
    reach = np.einsum("nj,nj->n", np.abs(parts.rot[:, 0, :]), parts.half)
    return float((parts.center[:, 0] + reach).max() - (parts.center[:, 0] - reach).min())


def _wheels(p: PartList, rng, xs, radius: float, width: float) -> None:
    """Axles as horizontal cylinders across the vehicle: from outside they look like its wheels."""
    tire = material("tire", rng)
    for x in xs:
        p.add(CYLINDER, (x, 0, radius), (radius, radius, width / 2), tire, axis=AXIS_Y)


def car(rng, label: int, instance: int) -> Parts:
    length, width, height = rng.uniform(3.8, 4.9), rng.uniform(1.7, 1.95), rng.uniform(1.4, 1.65)
    paint = material("car_paint", rng)
    p = PartList(label, instance)
    p.add(BOX, (0, 0, 0.64), (length / 2, width / 2, 0.36), paint)
    cabin = rng.uniform(0.45, 0.6) * length
    p.add(BOX, (-0.08 * length, 0, (1.0 + height) / 2), (cabin / 2, width / 2 - 0.08, (height - 1.0) / 2),
          material("glass", rng), porosity=0.4)
    p.add(BOX, (-0.08 * length, 0, height - 0.03), (cabin / 2 - 0.1, width / 2 - 0.12, 0.03), paint)
    _wheels(p, rng, (0.33 * length, -0.33 * length), 0.32, width - 0.1)
    return p.parts()


def van(rng, label: int, instance: int) -> Parts:
    """A delivery van or minibus: SemanticKITTI counts these as cars."""
    length, width, height = rng.uniform(4.8, 5.6), rng.uniform(1.9, 2.05), rng.uniform(1.9, 2.4)
    paint = material("car_paint", rng)
    p = PartList(label, instance)
    p.add(BOX, (-0.35, 0, 0.35 + height / 2), (length / 2 - 0.35, width / 2, height / 2 - 0.05), paint)
    p.add(BOX, (length / 2 - 0.4, 0, 0.75), (0.4, width / 2 - 0.05, 0.35), paint)
    _wheels(p, rng, (0.32 * length, -0.3 * length), 0.34, width - 0.1)
    return p.parts()


def truck(rng, label: int, instance: int) -> Parts:
    length = rng.uniform(5.0, 7.0) if rng.random() < 0.7 else rng.uniform(7.0, 10.0)
    width = rng.uniform(2.3, 2.55)
    cargo = length - 2.3
    p = PartList(label, instance)
    p.add(BOX, (length / 2 - 1.15, 0, 1.7), (1.1, width / 2, 1.2), material("truck", rng))
    p.add(BOX, (-1.15, 0, 2.2), (cargo / 2, width / 2, rng.uniform(1.2, 1.5)), material("truck", rng))
    _wheels(p, rng, (length / 2 - 1.4, -length / 2 + 1.5, -length / 2 + 2.8), 0.5, width - 0.1)
    return p.parts()


def bus(rng, label: int, instance: int) -> Parts:
    length, width = rng.uniform(10.0, 12.5), 2.5
    p = PartList(label, instance)
    p.add(BOX, (0, 0, 1.05), (length / 2, width / 2, 0.7), material("truck", rng))
    p.add(BOX, (0, 0, 2.4), (length / 2, width / 2, 0.65), material("glass", rng), porosity=0.3)
    _wheels(p, rng, (length / 2 - 2.5, -length / 2 + 3.0), 0.5, width - 0.1)
    return p.parts()


def trailer(rng, label: int, instance: int) -> Parts:
    """A box or flat-bed trailer left at the kerb (other-vehicle)."""
    length, width = rng.uniform(3.0, 7.0), rng.uniform(1.8, 2.5)
    p = PartList(label, instance)
    if rng.random() < 0.5:
        p.add(BOX, (0, 0, 1.45), (length / 2, width / 2, rng.uniform(0.8, 1.3)), material("truck", rng))
    else:
        p.add(BOX, (0, 0, 0.75), (length / 2, width / 2, 0.12), material("metal", rng))
        p.add(BOX, (0, 0, 1.05), (length / 2, width / 2, 0.2), material("truck", rng), porosity=0.5)
    p.add(BOX, (length / 2 + 0.6, 0, 0.55), (0.6, 0.05, 0.05), material("metal", rng))
    _wheels(p, rng, (0.0,), 0.38, width - 0.1)
    return p.parts()


def caravan(rng, label: int, instance: int) -> Parts:
    """A camper or small tram-like box on wheels, taller than a car (other-vehicle)."""
    length, width, height = rng.uniform(5.0, 8.0), rng.uniform(2.2, 2.5), rng.uniform(2.5, 3.1)
    p = PartList(label, instance)
    p.add(BOX, (0, 0, 0.45 + height / 2), (length / 2, width / 2, height / 2), material("truck", rng))
    p.add(BOX, (length / 2 + 0.7, 0, 0.55), (0.7, 0.05, 0.05), material("metal", rng))
    _wheels(p, rng, (-0.1 * length,), 0.4, width - 0.1)
    return p.parts()


def motorcycle(rng, label: int, instance: int, rider: bool = False) -> Parts:
    """A motorbike or scooter; with ``rider`` the whole of it is a motorcyclist, as SemanticKITTI labels it."""
    length = rng.uniform(1.8, 2.3)
    p = PartList(label, instance)
    for x in (0.36 * length, -0.36 * length):
        p.add(CYLINDER, (x, 0, 0.31), (0.31, 0.31, 0.06), material("tire", rng), axis=AXIS_Y)
    paint = material("car_paint", rng)
    p.add(BOX, (0, 0, 0.62), (0.3 * length, 0.2, 0.2), paint)
    p.add(BOX, (-0.12 * length, 0, 0.86), (0.22 * length, 0.15, 0.06), material("tire", rng))
    p.add(BOX, (0.36 * length, 0, 1.05), (0.04, 0.36, 0.03), material("metal", rng))
    if rider:
        p.add(BOX, (-0.05, 0, 0.72), (0.22, 0.2, 0.2), material("clothes", rng))
        _body(p, rng, 0.92, rng.uniform(0.95, 1.05), legs=False, lean=0.15)
        p.add(ELLIPSOID, (0.24, 0, 1.88), (0.15, 0.14, 0.15), material("car_paint", rng))   # helmet
    return p.parts()


def _body(p: PartList, rng, z0: float, scale: float, *, legs: bool = True, lean: float = 0.0) -> None:
    """Legs, torso and head of a person whose hips are at height ``z0``."""
    clothes, skin = material("clothes", rng), material("skin", rng)
    if legs:
        p.add(BOX, (0, 0, z0 / 2), (0.12 * scale, 0.17 * scale, z0 / 2), material("clothes", rng))
    p.add(ELLIPSOID, (lean, 0, z0 + 0.3 * scale), (0.14 * scale, 0.22 * scale, 0.34 * scale), clothes)
    p.add(ELLIPSOID, (1.6 * lean, 0, z0 + 0.76 * scale), (0.1 * scale, 0.09 * scale, 0.12 * scale), skin)


def person(rng, label: int, instance: int) -> Parts:
    scale = rng.uniform(0.88, 1.08)
    p = PartList(label, instance)
    _body(p, rng, 0.86 * scale, scale)
    return p.parts()


def _bicycle_frame(p: PartList, rng) -> None:
    paint = material("bicycle", rng)
    for x in (0.53, -0.53):
        p.add(CYLINDER, (x, 0, 0.34), (0.34, 0.34, 0.025), material("tire", rng), axis=AXIS_Y, porosity=0.55)
    p.add(BOX, (0, 0, 0.58), (0.45, 0.025, 0.1), paint)
    p.add(BOX, (0.45, 0, 0.98), (0.03, 0.28, 0.025), paint)
    p.add(BOX, (-0.25, 0, 0.88), (0.12, 0.07, 0.03), paint)


def bicycle(rng, label: int, instance: int) -> Parts:
    p = PartList(label, instance)
    _bicycle_frame(p, rng)
    return p.parts()


def bicyclist(rng, label: int, instance: int) -> Parts:
    """A rider on a bicycle; SemanticKITTI labels both as bicyclist."""
    p = PartList(label, instance)
    _bicycle_frame(p, rng)
    p.add(BOX, (-0.1, 0, 0.65), (0.18, 0.16, 0.28), material("clothes", rng))
    _body(p, rng, 0.92, rng.uniform(0.9, 1.05), legs=False, lean=0.12)
    return p.parts()


def tree(rng, *, crown: float | None = None) -> Parts:
    """A trunk (71) under a leafy crown (70) that only partly hides it."""
    radius = crown or rng.uniform(1.5, 3.6)
    trunk_r = rng.uniform(0.08, 0.22)
    trunk_h = rng.uniform(1.5, 2.8) + 0.3 * radius
    p = PartList(TRUNK)
    p.add(CYLINDER, (0, 0, trunk_h / 2), (trunk_r, trunk_r, trunk_h / 2), material("bark", rng))
    leaves, z = material("leaves", rng), trunk_h + 0.4 * radius
    p.add(ELLIPSOID, (0, 0, z), (radius, radius * rng.uniform(0.8, 1.0), radius * rng.uniform(0.8, 1.25)), leaves,
          yaw=rng.uniform(0, np.pi), porosity=0.15, label=VEGETATION)
    for _ in range(rng.integers(0, 3)):
        offset = rng.uniform(-0.5, 0.5, 3) * radius
        p.add(ELLIPSOID, (offset[0], offset[1], z + offset[2]), np.full(3, radius * rng.uniform(0.5, 0.75)), leaves,
              porosity=0.15, label=VEGETATION)
    return p.parts()


def bush(rng, scale: float = 1.0) -> Parts:
    rx, ry, rz = scale * rng.uniform(0.5, 1.5), scale * rng.uniform(0.5, 1.5), rng.uniform(0.4, 1.0)
    return PartList(VEGETATION).add(ELLIPSOID, (0, 0, 0.7 * rz), (rx, ry, rz), material("leaves", rng),
                                    yaw=rng.uniform(0, np.pi), porosity=0.2).parts()


def hedge(rng, length: float) -> Parts:
    width, height = rng.uniform(0.6, 1.3), rng.uniform(0.8, 1.9)
    return PartList(VEGETATION).add(BOX, (0, 0, height / 2), (length / 2, width / 2, height / 2),
                                    material("leaves", rng), porosity=0.2).parts()


def fence(rng, length: float) -> Parts:
    """A fence along x; wire mesh lets part of the rays through, a wooden one does not."""
    height = rng.uniform(1.0, 2.0)
    p = PartList(FENCE)
    p.add(BOX, (0, 0, height / 2), (length / 2, 0.03, height / 2), material("fence", rng),
          porosity=float(rng.choice([0.0, 0.3, 0.6])))
    for x in np.arange(-length / 2, length / 2 + 0.01, 2.5):
        p.add(BOX, (x, 0, height / 2), (0.04, 0.04, height / 2), material("metal", rng))
    return p.parts()


def building(rng, length: float, depth: float) -> Parts:
    """A block with a façade on its -y side (toward the road), sometimes with a lower annex."""
    height = rng.uniform(5.0, 18.0)
    p = PartList(BUILDING)
    facade = material("facade", rng)
    p.add(BOX, (0, depth / 2, height / 2), (length / 2, depth / 2, height / 2), facade)
    if rng.random() < 0.35:
        annex = rng.uniform(0.3, 0.8) * length
        p.add(BOX, (rng.uniform(-0.5, 0.5) * (length - annex), -0.8, 1.6), (annex / 2, 0.8, 1.6), facade)
    return p.parts()


def guard_rail(rng, length: float) -> Parts:
    """A crash barrier on posts along x: SemanticKITTI counts guard rails as fence."""
    p = PartList(FENCE)
    height = rng.uniform(0.6, 0.8)
    p.add(BOX, (0, 0, height), (length / 2, 0.05, 0.17), material("rail", rng))
    for x in np.arange(-length / 2 + 1, length / 2, 4.0):
        p.add(BOX, (x, 0.08, height / 2), (0.05, 0.05, height / 2), material("metal", rng))
    return p.parts()


def streetlight(rng) -> Parts:
    """A pole with an arm reaching over the road (+y)."""
    height, arm = rng.uniform(6.0, 9.0), rng.uniform(1.0, 2.5)
    metal = material("metal", rng)
    p = PartList(POLE)
    p.add(CYLINDER, (0, 0, height / 2), (0.1, 0.1, height / 2), metal)
    p.add(BOX, (0, arm / 2, height - 0.1), (0.05, arm / 2, 0.05), metal)
    return p.parts()


def traffic_sign(rng) -> Parts:
    """A sign plate on a thin pole; the plate faces -x (oncoming traffic) and is retro-reflective."""
    height = rng.uniform(2.0, 2.6)
    p = PartList(POLE)
    p.add(CYLINDER, (0, 0, height / 2), (0.04, 0.04, height / 2), material("metal", rng))
    size = rng.uniform(0.3, 0.6) if rng.random() < 0.7 else rng.uniform(0.6, 1.0)
    sign = material("sign", rng)
    if rng.random() < 0.5:
        p.add(CYLINDER, (0.06, 0, height + size), (size, size, 0.02), sign, axis=AXIS_X, label=TRAFFIC_SIGN)
    else:
        p.add(BOX, (0.06, 0, height + size), (0.02, size, size), sign, label=TRAFFIC_SIGN)
    if rng.random() < 0.3:
        p.add(BOX, (0.06, 0, height - 0.25), (0.02, 0.3, 0.15), sign, label=TRAFFIC_SIGN)
    return p.parts()




def traffic_light(rng, reach: float) -> Parts:
    """A mast at a crossing with signal heads on it and on an arm over the road (+y); heads count as signs."""
    height = rng.uniform(3.5, 5.5)
    metal, sign = material("metal", rng), material("sign", rng)
    p = PartList(POLE)
    p.add(CYLINDER, (0, 0, height / 2), (0.09, 0.09, height / 2), metal)
    p.add(BOX, (0.15, 0, 2.6), (0.12, 0.18, 0.45), sign, label=TRAFFIC_SIGN)
    if reach > 0:
        p.add(BOX, (0, reach / 2, height - 0.15), (0.06, reach / 2, 0.06), metal)
        p.add(BOX, (0.12, reach, height - 0.6), (0.12, 0.18, 0.45), sign, label=TRAFFIC_SIGN)
    p.add(BOX, (0.05, 0, height - 1.1), (0.03, 0.5, 0.25), sign, label=TRAFFIC_SIGN)   # street-name plate
    return p.parts()
