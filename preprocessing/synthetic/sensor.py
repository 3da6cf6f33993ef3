"""A spinning 64-beam LiDAR (HDL-64E-like) ray-cast against a :class:`~.scene.Scene`.

Rays form a grid: beam (elevation) × azimuth column. Rather than test every ray against
every primitive, each primitive is bounded by the azimuth and elevation interval it covers
as seen from the sensor, and only the rays in that window are intersected, vectorised
with numpy, keeping the nearest hit per ray (a z-buffer). The ground is a plane with a
raised sidewalk level, intersected analytically and labelled by the scene's 2-D map.
"""
from __future__ import annotations

import numpy as np

from .primitives import BOX, CYLINDER, ELLIPSOID, GROUND_REMISSION, VEGETATION
from .road import GROUND_LEVELS
from .scene import Scene

# Upper block: 32 lasers from +2° down in 1/3° steps; lower block: 32 lasers in ~0.5° steps.
HDL64_ELEVATION_DEG = np.concatenate([np.linspace(2.0, -8.33, 32), np.linspace(-8.87, -24.9, 32)])
UNIT_CORNERS = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64)


def beam_elevations(beams: int) -> np.ndarray:
    """Beam elevations in radians, top beam first; other beam counts spread over the same field of view."""
    if beams == 64:
        return np.radians(HDL64_ELEVATION_DEG)
    return np.radians(np.interp(np.linspace(0, 63, beams), np.arange(64), HDL64_ELEVATION_DEG))


def _box(o, d, half):
    """Slab test against [-1, 1]^3: entry and exit distance, cosine of incidence at entry."""
    near, far = np.full(d[0].shape, -np.inf), np.full(d[0].shape, np.inf)
    cos = np.zeros(d[0].shape)
    for j in range(3):
        inv = 1.0 / d[j]
        t1, t2 = (-1.0 - o[j]) * inv, (1.0 - o[j]) * inv
        lo = np.minimum(t1, t2)
        entering = lo > near
        cos = np.where(entering, np.abs(d[j]) * half[j], cos)
        near = np.where(entering, lo, near)
        far = np.minimum(far, np.maximum(t1, t2))
    hit = (far >= near) & (near > 0)
    return np.where(hit, near, np.inf), far, cos


def _cylinder(o, d, half):
    """Unit cylinder along z with caps at z = ±1."""
    a = d[0] ** 2 + d[1] ** 2
    b = o[0] * d[0] + o[1] * d[1]
    c = o[0] ** 2 + o[1] ** 2 - 1.0
    root = np.sqrt(b * b - a * c)
    t = (-b - root) / a
    px, py, z = o[0] + t * d[0], o[1] + t * d[1], o[2] + t * d[2]
    side = (t > 0) & (np.abs(z) <= 1.0)
    cos = np.abs(px * d[0] + py * d[1]) / np.hypot(px / half[0], py / half[1])
    t_in = np.where(side, t, np.inf)
    if abs(o[2]) > 1.0:
        tc = (np.sign(o[2]) - o[2]) / d[2]
        cap = (tc > 0) & ((o[0] + tc * d[0]) ** 2 + (o[1] + tc * d[1]) ** 2 <= 1.0) & ~side
        t_in = np.where(cap, tc, t_in)
        cos = np.where(cap, np.abs(d[2]) * half[2], cos)
    return t_in, (-b + root) / a, cos


def _ellipsoid(o, d, half):
    """Unit sphere."""
    a = d[0] ** 2 + d[1] ** 2 + d[2] ** 2
    b = o[0] * d[0] + o[1] * d[1] + o[2] * d[2]
    root = np.sqrt(b * b - a * (o @ o - 1.0))
    t = (-b - root) / a
    p = [o[j] + t * d[j] for j in range(3)]
    cos = np.abs(p[0] * d[0] + p[1] * d[1] + p[2] * d[2]) / np.sqrt(
        (p[0] / half[0]) ** 2 + (p[1] / half[1]) ** 2 + (p[2] / half[2]) ** 2)
    return np.where(t > 0, t, np.inf), (-b + root) / a, cos


INTERSECT = {BOX: _box, CYLINDER: _cylinder, ELLIPSOID: _ellipsoid}


class Sensor:
    """Ray grid, ego-vehicle self-occlusion and return model of the simulated scanner."""

    def __init__(self, beams: int = 64, azimuth_steps: int = 2083, max_range: float = 80.0,
                 range_noise: float = 0.015, dropout: float = 0.01):
        self.elevation = beam_elevations(beams)
        self.azimuth = 2 * np.pi * np.arange(azimuth_steps) / azimuth_steps
        self.step = 2 * np.pi / azimuth_steps
        self.max_range, self.range_noise, self.dropout = max_range, range_noise, dropout
        ce = np.cos(self.elevation)[:, None]
        self.dirs = np.stack([ce * np.cos(self.azimuth), ce * np.sin(self.azimuth),
                              np.sin(self.elevation)[:, None] * np.ones(azimuth_steps)])
        self.blocked = self._ego_vehicle()
        self._ground_rays = np.flatnonzero(~self.blocked.ravel() & (self.dirs[2].ravel() < 0.1))
        self._ground_dirs = self.dirs.reshape(3, -1)[:, self._ground_rays]

    def _ego_vehicle(self) -> np.ndarray:
        """Rays that hit the car the scanner sits on, and so return nothing.

        The lowest beams graze the roof, bonnet and boot. The share of each beam's azimuths
        lost this way, fore and aft first, is fitted to the real HDL-64E scans' elevation
        histogram: nothing above -19°, about a quarter at -21°, nearly all of the -24.9° beam.
        """
        el = np.degrees(self.elevation)
        lost = np.interp(el, [-25.0, -24.6, -24.2, -23.0, -22.0, -20.5, -19.0, -18.5],
                         [0.95, 0.88, 0.55, 0.42, 0.28, 0.22, 0.03, 0.0])
        # |sin(azimuth)| < sin(pi/2 * share) covers that share of the circle around the car's axis.
        return np.abs(np.sin(self.azimuth))[None, :] < np.sin(np.pi / 2 * lost)[:, None]

    def scan(self, scene: Scene, t: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One sweep at time t: (N, 4) float32 x, y, z, remission in the sensor frame and (N,) uint32 labels."""
        pose = scene.lidar_pose(t)
        rot, origin = pose[:3, :3], pose[:3, 3]
        shape = self.dirs.shape[1:]
        depth = np.full(shape, np.inf)
        index = np.full(shape, -1, dtype=np.int64)
        cosine = np.ones(shape)
        ground = np.zeros(shape, dtype=np.uint32)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            parts = scene.primitives(t, origin[:2], self.max_range)
            self._objects(parts, rot, origin, depth, index, cosine, rng.random((2, *shape)))
            self._ground(scene, rot, origin, depth, index, ground, cosine)

        valid = (depth <= self.max_range) & ~self.blocked
        idx = index[valid]
        thing = idx >= 0
        idx = np.where(thing, idx, 0)
        ground_label = ground[valid]
        if len(parts):
            raw = np.where(thing, parts.label[idx], ground_label)
            instance = np.where(thing, parts.instance[idx], 0)
            base = np.where(thing, parts.remission[idx], GROUND_REMISSION[ground_label])
        else:
            raw, instance, base = ground_label, np.zeros_like(ground_label), GROUND_REMISSION[ground_label]
        distance = depth[valid] + self.range_noise * rng.standard_normal(idx.size)
        # Returns weaken with incidence and range; weak ones read as 0, as in KITTI where
        # most returns beyond ~40 m have remission 0, and some are lost altogether.
        noise = rng.standard_normal((2, idx.size))
        signal = base * (0.85 + 0.15 * cosine[valid]) * (1 + 0.2 * noise[0]) * np.exp(-(distance / 42.0) ** 2)
        remission = np.clip(1.08 * signal + 0.03 * noise[1], 0.0, 0.99)
        keep_p = 1.0 - self.dropout - 0.2 * (remission < 0.02) - 0.1 * (distance / self.max_range) ** 2
        keep = (rng.random(idx.size) < keep_p) & (distance > 0.5) & (distance <= self.max_range)
        xyz = self.dirs[:, valid][:, keep].T * distance[keep, None]
        points = np.column_stack([xyz, remission[keep]]).astype(np.float32)
        labels = (instance[keep].astype(np.uint32) << 16) | raw[keep].astype(np.uint32)
        return points, labels

    def _ground(self, scene: Scene, rot, origin, depth, index, ground, cosine) -> None:
        """Ground of a few flat levels (sidewalk, road, low terrain) over the rolling road surface.

        Each ray is followed down through the levels, highest first. It hits the top of a
        region where it crosses that region's level above it, or a vertical face (a curb)
        where, between two level crossings, it passes over a region higher than itself.
        """
        road = scene.road
        rays = self._ground_rays
        world = rot @ self._ground_dirs
        height = origin[2] - road.height(origin[0])                # sensor height over the road
        den = world[2] - road.slope(origin[0]) * world[0]           # descent against the ground under the car
        keep = den < -1e-4
        rays, world, den = rays[keep], world[:, keep], den[keep]
        n = rays.size
        t_hit, label = np.full(n, np.inf), np.zeros(n, dtype=np.uint32)
        face = np.zeros(n, dtype=bool)
        pending, t_prev = np.arange(n), None

        def look(tt, sel):
            return scene.ground(origin[0] + tt * world[0][sel], origin[1] + tt * world[1][sel])

        nearest = depth.ravel()[rays]
        for j, level in enumerate(GROUND_LEVELS):
            t = self._crossing(road, origin, world[:, pending], level, (level - height) / den[pending])
            ok = (t < self.max_range + 1) & ((t < nearest[pending]) if j == 0 else True)
            pending, t = pending[ok], t[ok]
            if j > 0:
                t_prev = t_prev[ok]
            end_label, end_level = look(t, pending)
            blocked = np.zeros(pending.size, dtype=bool)
            if j > 0:
                # Faces: over a region at the previous level or higher while between the two crossings.
                above = GROUND_LEVELS[j - 1] - 1e-6
                long = (t - t_prev) * np.hypot(world[0][pending], world[1][pending]) > 1.5
                t_out = t_prev.copy()
                for f in (0.25, 0.5, 0.75, 1.0):
                    check = np.flatnonzero(~blocked & (long if f < 1.0 else True))
                    tt = t_prev[check] + f * (t[check] - t_prev[check])
                    over = (look(tt, pending[check])[1] if f < 1.0 else end_level[check]) >= above
                    hit = check[over]
                    t_face, face_label = self._bisect(look, pending[hit], t_out[hit], tt[over], above)
                    t_hit[pending[hit]], label[pending[hit]] = t_face, face_label
                    face[pending[hit]] = True
                    blocked[hit] = True
                    t_out[check] = tt
            top = ~blocked & (end_level >= level - 1e-6)
            t_hit[pending[top]], label[pending[top]] = t[top], end_label[top]
            pending, t_prev = pending[~(blocked | top)], t[~(blocked | top)]
        hit = t_hit < nearest
        slope = road.slope(origin[0] + t_hit[hit] * world[0][hit])
        cos = np.where(face[hit], 0.6, np.abs(world[2][hit] - slope * world[0][hit]) / np.sqrt(1 + slope ** 2))
        depth.ravel()[rays[hit]] = t_hit[hit]
        index.ravel()[rays[hit]] = -1
        ground.ravel()[rays[hit]] = label[hit]
        cosine.ravel()[rays[hit]] = cos

    @staticmethod
    def _crossing(road, origin, world, level, t):
        """Distance along rays to the road surface raised by ``level``: Newton steps from a planar guess."""
        for _ in range(2):
            h, dh = road.profile(origin[0] + t * world[0])
            step = (origin[2] + t * world[2] - h - level) / (world[2] - dh * world[0])
            t = t - step
        return np.where((np.abs(step) < 1e-3) & (t > 0), t, np.inf)

    @staticmethod
    def _bisect(look, sel, t_out, t_in, above, steps: int = 6):
        """Narrow down where a ray first passes over ground at height ``above`` or more; its label there."""
        for _ in range(steps):
            mid = 0.5 * (t_out + t_in)
            over = look(mid, sel)[1] >= above
            t_in = np.where(over, mid, t_in)
            t_out = np.where(over, t_out, mid)
        return t_in, look(t_in, sel)[0]

    def _objects(self, parts, rot, origin, depth, index, cosine, noise) -> None:
        """Intersect each primitive with the rays of its angular window; keep the nearest hit per ray."""
        if not len(parts):
            return
        local = np.einsum("ji,njk->nik", rot, parts.rot)            # primitive → sensor rotation
        centre = (parts.center - origin) @ rot
        to_unit = local.transpose(0, 2, 1) / parts.half[:, :, None]  # sensor direction → unit-shape frame
        start = -np.einsum("nij,nj->ni", to_unit, centre)
        corners = centre[:, None, :] + np.einsum("nij,nkj->nki", local, UNIT_CORNERS[None] * parts.half[:, None, :])
        windows = self._windows(centre, corners)
        for i, (b0, b1, c0, c1) in enumerate(windows):
            if b1 <= b0 or c1 < c0:
                continue
            intersect, m, o, half = INTERSECT[int(parts.kind[i])], to_unit[i], start[i], parts.half[i]
            for a0, a1 in self._column_slices(c0, c1):
                sl = (slice(b0, b1), slice(a0, a1))
                dx, dy, dz = self.dirs[0][sl], self.dirs[1][sl], self.dirs[2][sl]
                d = [m[j, 0] * dx + m[j, 1] * dy + m[j, 2] * dz for j in range(3)]
                t_in, t_out, cos = intersect(o, d, half)
                porosity = parts.porosity[i]
                if porosity > 0:
                    t_in = np.where(noise[0][sl] < porosity, np.inf, t_in)
                    if parts.label[i] == VEGETATION:   # leaves: returns from inside the crown too
                        t_in = t_in + noise[1][sl] ** 2 * 0.5 * (t_out - t_in)
                better = t_in < depth[sl]
                np.copyto(depth[sl], t_in, where=better)
                np.copyto(index[sl], i, where=better)
                np.copyto(cosine[sl], cos, where=better)

    def _windows(self, centre, corners) -> list[tuple[int, int, int, int]]:
        """Beam range [b0, b1) and azimuth column range [c0, c1] (may wrap) each primitive can cover."""
        dh = np.hypot(centre[:, 0], centre[:, 1])
        rxy = np.hypot(corners[..., 0] - centre[:, None, 0], corners[..., 1] - centre[:, None, 1]).max(axis=1)
        hmin, hmax = np.maximum(dh - rxy, 1e-3), dh + rxy
        zmin, zmax = corners[..., 2].min(axis=1), corners[..., 2].max(axis=1)
        el_hi = np.where(zmax > 0, np.arctan2(zmax, hmin), np.arctan2(zmax, hmax))
        el_lo = np.where(zmin < 0, np.arctan2(zmin, hmin), np.arctan2(zmin, hmax))
        neg = -self.elevation
        b0 = np.searchsorted(neg, -el_hi, side="left")
        b1 = np.searchsorted(neg, -el_lo, side="right")
        az = np.arctan2(centre[:, 1], centre[:, 0])
        rel = np.angle(np.exp(1j * (np.arctan2(corners[..., 1], corners[..., 0]) - az[:, None])))
        lo, hi = az + rel.min(axis=1), az + rel.max(axis=1)
        inside = dh - rxy <= 0.05
        c0 = np.where(inside, 0, np.ceil(lo / self.step - 1e-9)).astype(np.int64)
        c1 = np.where(inside, len(self.azimuth) - 1, np.floor(hi / self.step + 1e-9)).astype(np.int64)
        return list(zip(b0.tolist(), b1.tolist(), c0.tolist(), c1.tolist()))

    def _column_slices(self, c0: int, c1: int) -> list[tuple[int, int]]:
        n = len(self.azimuth)
        if c1 - c0 + 1 >= n:
            return [(0, n)]
        a = c0 % n
        e = a + (c1 - c0) + 1
        return [(a, e)] if e <= n else [(a, n), (0, e - n)]
