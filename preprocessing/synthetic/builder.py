"""Placing one block's objects in road coordinates: the helper the street and frontage builders share."""
from __future__ import annotations

import numpy as np

from . import objects
from .primitives import CAR, MOTORCYCLE, MOVING, OTHER_VEHICLE, TRUCK, Parts
from .road import BLOCK_LENGTH, MAX_MOVER_WINDOW, PARKING_WIDTH, Mover, StreetLayout

L = BLOCK_LENGTH
VEHICLE_LABEL = {"car": CAR, "van": CAR, "truck": TRUCK, "bus": OTHER_VEHICLE, "trailer": OTHER_VEHICLE,
                 "caravan": OTHER_VEHICLE, "motorcycle": MOTORCYCLE}
OTHER_HEAVY = {"trailer": 0.55, "caravan": 0.3, "bus": 0.15}
HEAVY = {"truck": 1.0, **OTHER_HEAVY}
"""Odds of the heavy vehicle kinds, weighted further by the street's style (Builder.vehicle)."""


class Builder:
    """Places objects given in road coordinates of one block, and hands out instance ids."""

    def __init__(self, scene: StreetLayout, k: int, street: np.ndarray, lot: np.ndarray | None = None,
                 parking: np.ndarray | None = None, first_instance: int = 1):
        self.scene, self.k, self.street = scene, k, street
        self.lot = np.full((2, 3), -10.0) if lot is None else lot
        self.parking = np.zeros(2, dtype=bool) if parking is None else parking
        self.blocked: list[list[tuple[float, float]]] = [[(x0, x1)] if x1 > 0 else [] for x0, x1, _ in self.lot]
        self.x0 = k * L
        self.parts: list[Parts] = []
        self.movers: list[Mover] = []
        self._next = first_instance - 1

    def instance(self) -> int:
        """Instance ids are unique within a block and differ between neighbouring blocks (16 bits)."""
        self._next += 1
        return (self.k % 255) * 256 + min(self._next, 255)

    def walk_edge(self, side: int) -> float:
        """Lateral distance from the centre line to the back of this side's sidewalk."""
        scene = self.scene
        return scene.half_width + PARKING_WIDTH * self.parking[side] + scene.lawn[side] + scene.sidewalk[side]

    def free(self, side: int, start: float, end: float) -> bool:
        """Whether the block-local x interval keeps clear of this side's side street."""
        s0, s1 = self.street[side]
        return end < s0 - 1.0 or start > s1 + 1.0

    def clear(self, side: int, start: float, end: float) -> bool:
        """Like :meth:`free`, and also clear of this side's parking lot and lay-by (for what stands behind the sidewalk)."""
        return self.free(side, start, end) and all(end < b0 - 1.0 or start > b1 + 1.0 for b0, b1 in self.blocked[side])

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

    def heavy_mix(self) -> dict[str, float]:
        """Blocks take turns between a lorry and another heavy vehicle, so that a short drive sees both classes."""
        return {"truck": 1.0} if self.k % 2 == 0 else OTHER_HEAVY

    def vehicle(self, rng, mix: dict[str, float], moving: bool = False) -> tuple[str, Parts]:
        """A vehicle drawn from ``mix``, heavy kinds weighted by the street's style."""
        kinds = list(mix)
        p = np.array([mix[k] * (self.scene.style.heavy if k in HEAVY else 1.0) for k in kinds])
        kind = str(rng.choice(kinds, p=p / p.sum()))
        label = VEHICLE_LABEL[kind]
        return kind, getattr(objects, kind)(rng, MOVING[label] if moving else label, self.instance())
