"""Ground-truth CT anatomy in Hounsfield units, as continuous functions of patient position.

A phantom is evaluated on any grid of LPS coordinates (mm), so every domain samples the very
same anatomy: a subject's chest is fixed by ``(subject, seed)`` alone; thickness and matrix size
only change where it is sampled. Shapes carry a linear partial-volume edge of one pixel, which
keeps the simulated edges band-limited like a real object seen through a detector.

Procedural phantoms (chest, head) draw every size, position and texture from a seeded RNG;
:class:`VolumePhantom` wraps a user's NIfTI file or DICOM series (HU) instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

AIR = -1000.0


@dataclass(frozen=True)
class Grid:
    """Sample positions: x (columns, patient left +), y (rows, posterior +), z (superior +)."""

    x: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor

    @property
    def pixel(self) -> float:
        return float(self.x[1] - self.x[0]) if len(self.x) > 1 else 1.0

    def block(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index ranges (z, y, x) of the samples inside the box [lo, hi] (xyz order, mm)."""
        out = []
        for axis, a, b in zip((self.z, self.y, self.x), lo[::-1], hi[::-1], strict=True):
            values = axis.numpy()
            i0 = int(np.searchsorted(values, a))
            i1 = int(np.searchsorted(values, b, side="right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return out[0], out[1], out[2]


def _occupancy(r2: torch.Tensor, radius: float, pixel: float) -> torch.Tensor:
    """Fraction of a pixel inside a shape of normalised squared radius ``r2`` (edge at 1).

    The signed distance to the edge is ``radius * (1 - r)``, to first order
    ``radius * (1 - r2) / 2``: exact where it matters (within a pixel of the edge), no sqrt.
    """
    return (r2.neg_().add_(1.0).mul_(0.5 * radius / pixel).add_(0.5)).clamp_(0.0, 1.0)


Value = float | Callable[[tuple[slice, slice, slice]], torch.Tensor]


def _paint(vol: torch.Tensor, occ: torch.Tensor, value: float | torch.Tensor) -> None:
    vol.lerp_(value if torch.is_tensor(value) else torch.tensor(value), occ)


class Painter:
    """Composites shapes into one HU volume sampled on ``grid``, cheaply (bounding boxes)."""

    def __init__(self, grid: Grid, background: float = AIR) -> None:
        self.g = grid
        self.vol = torch.full((len(grid.z), len(grid.y), len(grid.x)), background)

    def _coords(self, box: tuple[slice, slice, slice]):
        zs, ys, xs = box
        return (self.g.x[xs].view(1, 1, -1), self.g.y[ys].view(1, -1, 1),
                self.g.z[zs].view(-1, 1, 1))

    def ellipsoid(self, centre, radii, value: Value, keep: bool = False) -> torch.Tensor | None:
        """An ellipsoid; ``keep``: return its occupancy volume (to confine later shapes).

        ``value``: HU, or a function of the block (index ranges) for textured tissue."""
        c, r = np.asarray(centre, float), np.asarray(radii, float)
        box = self.g.block(c - r - 2 * self.g.pixel, c + r + 2 * self.g.pixel)
        if box is None:
            return None
        x, y, z = self._coords(box)
        r2 = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2
        occ = _occupancy(r2, float(min(r[:2])), self.g.pixel)
        _paint(self.vol[box], occ, value(box) if callable(value) else value)
        if not keep:
            return None
        full = torch.zeros_like(self.vol)
        full[box] = occ
        return full

    def prism(self, centre, radii, value, power: float = 2.0) -> None:
        """A super-ellipse extruded along z (body layers): computed once in 2D."""
        c, r = np.asarray(centre, float), np.asarray(radii, float)
        x, y = self.g.x.view(1, -1), self.g.y.view(-1, 1)
        rn = (((x - c[0]).abs() / r[0]) ** power + ((y - c[1]).abs() / r[1]) ** power)
        occ = _occupancy(rn ** (2.0 / power), float(min(r)), self.g.pixel)
        _paint(self.vol, occ.unsqueeze(0), value)

    def capsule(self, a, b, radius: float, value: float,
                within: torch.Tensor | None = None) -> None:
        """A segment from a to b with a round cross-section: vessels, airways, ribs."""
        a, b = np.asarray(a, float), np.asarray(b, float)
        pad = radius + 2 * self.g.pixel
        box = self.g.block(np.minimum(a, b) - pad, np.maximum(a, b) + pad)
        if box is None:
            return
        x, y, z = self._coords(box)
        d = b - a
        dd = max(float(d @ d), 1e-9)
        px, py, pz = x - a[0], y - a[1], z - a[2]
        # |p - t d|^2 = |p|^2 - t (2 p.d - t |d|^2), from separable terms: few block-size ops
        pd = (px * d[0] + py * d[1]) + pz * d[2]
        t = (pd / dd).clamp_(0.0, 1.0)
        r2 = ((px * px + py * py) + pz * pz).sub_(t * (2.0 * pd - t * dd)).div_(radius**2)
        occ = _occupancy(r2, radius, self.g.pixel)
        if within is not None:
            occ = occ * within[box]
        _paint(self.vol[box], occ, value)


def texture(grid: Grid, rng: np.random.Generator, scale_mm: float, extent_mm: float = 400.0
            ) -> torch.Tensor:
    """Smooth unit-variance random field fixed in patient space (same for every grid).

    Sampled on a coarse in-plane grid and upsampled: the field varies over ``scale_mm``, so
    this loses nothing and costs a fraction of sampling every pixel in 3D.
    """
    n = int(extent_mm / scale_mm) + 2
    coarse = torch.from_numpy(rng.standard_normal((1, 1, n, n, n)).astype(np.float32))
    m = min(len(grid.x), 2 * n)
    xs = torch.linspace(float(grid.x[0]), float(grid.x[-1]), m)
    ys = torch.linspace(float(grid.y[0]), float(grid.y[-1]), m)
    zz, yy, xx = torch.meshgrid(grid.z, ys, xs, indexing="ij")
    pts = torch.stack([xx, yy, zz], dim=-1).unsqueeze(0) / (extent_mm / 2)
    field = F.grid_sample(coarse, pts, mode="bilinear", padding_mode="border",
                          align_corners=True)[0]
    field = F.interpolate(field, size=(len(grid.y), len(grid.x)), mode="bilinear",
                          align_corners=True)[0]
    return field / 0.6  # trilinear smoothing of unit noise leaves about 0.6 std


class ChestPhantom:
    """Adult chest: body, fat, muscle, lungs with vessel and airway trees, heart, aorta, spine,
    ribs, sternum and 1-3 nodules (solid, part-solid or calcified)."""

    body_part = "CHEST"
    fov_mm = 380.0
    slice_spacing = 2.5

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.a = rng.uniform(140, 170)          # half width (left-right)
        self.b = rng.uniform(95, 120)           # half depth (anterior-posterior)
        self.fat = rng.uniform(8, 25)
        self.muscle = rng.uniform(10, 18)
        self.lung_hu = rng.uniform(-880, -830)
        self.seeds = rng.integers(0, 2**31, size=8)
        self.heart = (rng.uniform(10, 35), rng.uniform(-45, -25), rng.uniform(-50, -30))
        self.heart_r = (rng.uniform(50, 62), rng.uniform(42, 52), rng.uniform(48, 58))
        self.spine_y = self.b - rng.uniform(70, 80)
        self.nodules = [self._nodule() for _ in range(int(rng.integers(1, 4)))]
        self.trees = {side: self._trees(side, c, r) for side, c, r in self._lungs()}

    def _lungs(self):
        ca, cb = self.a - self.fat - self.muscle, self.b - self.fat - self.muscle
        for side in (-1, 1):
            yield side, (side * 0.48 * ca, 0.08 * cb, 10.0), (0.44 * ca, 0.82 * cb, 125.0)

    def _nodule(self):
        side, c, r = list(self._lungs())[int(self.rng.integers(0, 2))]
        u = self.rng.uniform(-0.6, 0.6, size=3)
        centre = np.asarray(c) + u * np.asarray(r)
        kind = self.rng.choice(["solid", "part-solid", "calcified"], p=[0.6, 0.3, 0.1])
        return centre, float(self.rng.uniform(3, 12)), str(kind)

    def _hilum(self, side: int, r) -> tuple[float, float, float]:
        return (side * 0.22 * r[0] / 0.44, 0.0, 15.0)

    def _trees(self, side: int, c, r) -> list:
        """Vascular trees of one lung: five trunks from the hilum."""
        segs = []
        for k, d0 in enumerate(([side, -0.3, 0.6], [side, 0.2, -0.7], [side, 0.6, 0.1],
                                [side, -0.6, -0.2], [side, 0.4, 0.6])):
            segs += self._tree(np.random.default_rng(self.seeds[2] + k + 10 * (side + 1)),
                               self._hilum(side, r), d0, 5.5, 30.0, 7, np.asarray(c),
                               np.asarray(r))
        return segs

    def _tree(self, rng, start, direction, radius, length, depth, lung_c, lung_r):
        """Branching segments (a, b, radius, generation) that stay inside the lung."""
        segs = []
        stack = [(np.asarray(start, float), np.asarray(direction, float), radius, length, 0)]
        while stack:
            a, d, r, ln, gen = stack.pop()
            d = d / np.linalg.norm(d)
            b = a + d * ln
            if np.sum(((b - lung_c) / lung_r) ** 2) > 0.95 or gen > depth:
                continue
            segs.append((a, b, r, gen))
            for _ in range(2):
                nd = d + rng.normal(0, 0.55, size=3)
                stack.append((b, nd, r * 0.72, ln * rng.uniform(0.7, 0.9), gen + 1))
        return segs

    def hu(self, grid: Grid) -> torch.Tensor:
        rng = np.random.default_rng(self.seeds[0])
        p = Painter(grid)
        tex = texture(grid, np.random.default_rng(self.seeds[1]), 25.0)
        a, b = self.a, self.b
        for scale_a, scale_b, hu in ((a, b, -95.0), (a - self.fat, b - self.fat, 48.0),
                                     (a - self.fat - self.muscle, b - self.fat - self.muscle,
                                      -70.0)):
            p.prism((0, 0), (scale_a, scale_b), hu + 6.0 * tex, power=2.4)
        lung_mask = torch.zeros_like(p.vol)
        for side, c, r in self._lungs():
            occ = p.ellipsoid(c, r, lambda box: self.lung_hu + 15.0 * tex[box] + 30.0
                              * grid.y[box[1]].view(1, -1, 1) / self.b, keep=True)
            if occ is not None:
                lung_mask = torch.maximum(lung_mask, occ)
            hilum = self._hilum(side, r)
            trees = self.trees[side]
            for a0, b0, rad, _ in trees:
                p.capsule(a0, b0, rad, 40.0, within=lung_mask)
            for a0, b0, rad, gen in trees:       # bronchi run beside the arteries
                if gen <= 3:
                    off = np.cross(b0 - a0, [0, 0, 1.0])
                    off = off / (np.linalg.norm(off) + 1e-9) * rad * 1.6
                    p.capsule(a0 + off, b0 + off, rad * 0.9, 30.0, within=lung_mask)
                    p.capsule(a0 + off, b0 + off, rad * 0.65, AIR, within=lung_mask)
            p.capsule((0, -20, 30), hilum, 6.0, 30.0)                        # main bronchus
            p.capsule((0, -20, 30), hilum, 4.5, AIR)
        p.capsule((0, -20, 170), (0, -20, 30), 9.0, 30.0)                    # trachea wall
        p.capsule((0, -20, 170), (0, -20, 30), 7.0, AIR)
        hx, hy, hz = self.heart
        hr = np.asarray(self.heart_r)
        p.ellipsoid((hx, hy, hz), hr, 48.0)                                  # myocardium
        p.ellipsoid((hx, hy, hz), hr - 9.0, 38.0)                           # blood pool
        for a0, b0, rad in (((-15, -25, -10), (-15, -25, 60), 14.0),         # ascending
                            ((-15, -25, 60), (24, self.spine_y - 18, 62), 12.5),  # arch
                            ((24, self.spine_y - 18, 62), (24, self.spine_y - 14, -200),
                             11.0)):                                          # descending
            p.capsule(a0, b0, rad, 40.0)
        self._spine_and_ribs(p, rng)
        for centre, r, kind in self.nodules:
            if kind == "part-solid":
                p.ellipsoid(centre, (r, r, r), lambda box: -450.0 + 60.0 * tex[box])
                p.ellipsoid(centre, (r / 2.5,) * 3, 25.0)
            elif kind == "calcified":
                p.ellipsoid(centre, (r / 2,) * 3, 450.0)
            else:
                p.ellipsoid(centre, (r, r * 0.85, r * 1.1), lambda box: 25.0 + 25.0 * tex[box])
        return p.vol

    def _spine_and_ribs(self, p: Painter, rng: np.random.Generator) -> None:
        yb = self.spine_y                                   # vertebral body centre (posterior)
        cavity = (self.a - self.fat - self.muscle, self.b - self.fat - self.muscle)
        for level in range(-8, 9):
            z0 = level * 27.0
            p.capsule((0, yb, z0 - 10), (0, yb, z0 + 10), 18.0, 700.0)       # cortex
            p.capsule((0, yb, z0 - 10), (0, yb, z0 + 10), 16.0, 220.0)       # cancellous
            p.capsule((0, yb, z0 + 11), (0, yb, z0 + 16), 17.0, 80.0)        # disc
            p.capsule((0, yb + 28, z0 - 8), (0, yb + 28, z0 + 8), 13.0, 650.0)  # arch
            p.capsule((0, yb + 28, z0 - 12), (0, yb + 28, z0 + 12), 8.0, 25.0)  # canal
            p.capsule((0, yb + 38, z0), (0, yb + 62, z0 - 12), 4.0, 650.0)   # spinous
            p.capsule((0, -cavity[1] - 6, z0 - 12), (0, -cavity[1] - 6, z0 + 12), 9.0, 350.0)
            for side in (-1, 1):                                            # one rib pair
                pts = []
                for k in range(10):
                    phi = math.pi * (0.08 + 0.85 * k / 9)                  # posterior->anterior
                    x = side * (cavity[0] + 6) * math.sin(phi)
                    y = (cavity[1] + 6) * math.cos(phi)
                    pts.append((x, y, z0 - 35.0 * k / 9 + rng.normal(0, 1.0)))
                for a0, b0 in zip(pts[:-1], pts[1:], strict=False):
                    p.capsule(a0, b0, 5.0, 700.0)
                    p.capsule(a0, b0, 3.0, 250.0)


class HeadPhantom:
    """Adult head: scalp, three-layer skull, grey and white matter, sulci and ventricles."""

    body_part = "HEAD"
    fov_mm = 240.0
    slice_spacing = 4.0

    def __init__(self, rng: np.random.Generator) -> None:
        self.r = np.array([rng.uniform(68, 78), rng.uniform(88, 100), rng.uniform(75, 85)])
        self.skull = rng.uniform(5, 8)
        self.vent = rng.uniform(0.8, 1.4)
        self.seed = int(rng.integers(0, 2**31))

    def hu(self, grid: Grid) -> torch.Tensor:
        p = Painter(grid)
        tex = texture(grid, np.random.default_rng(self.seed), 12.0)
        r, s = self.r, self.skull
        p.ellipsoid((0, 0, 0), r + 6, -80.0)                                 # scalp fat
        p.ellipsoid((0, 0, 0), r, 1000.0)                                    # outer table
        p.ellipsoid((0, 0, 0), r - s * 0.3, 450.0)                           # diploe
        p.ellipsoid((0, 0, 0), r - s * 0.7, 1000.0)                          # inner table
        p.ellipsoid((0, 0, 0), r - s, 8.0)                                   # CSF space
        p.ellipsoid((0, 0, 0), r - s - 2.5, lambda box: 38.0 + 1.5 * tex[box])   # grey matter
        p.ellipsoid((0, 0, 0), (r - s - 2.5) * 0.78, lambda box: 28.0 + tex[box])  # white
        sulci = (tex > 1.2).float() * (p.vol > 30).float() * (p.vol < 45).float()
        _paint(p.vol, sulci, 8.0)
        v = self.vent
        for side in (-1, 1):
            p.ellipsoid((side * 9 * v, -5, 12), (6 * v, 28, 12), 6.0)        # lateral ventricles
        p.ellipsoid((0, 5, 0), (2.0, 14, 8), 6.0)                             # third ventricle
        return p.vol


class VolumePhantom:
    """A user's CT volume (NIfTI or DICOM series, in HU) resampled to any grid."""

    body_part = ""
    slice_spacing: float

    def __init__(self, path: Path) -> None:
        import SimpleITK as sitk

        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            names = reader.GetGDCMSeriesFileNames(str(path))
            if not names:
                raise ValueError(f"no DICOM series in {path}")
            reader.SetFileNames(names)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
        image = sitk.Cast(image, sitk.sitkFloat32)
        self.data = torch.from_numpy(sitk.GetArrayFromImage(image))[None, None]  # z, y, x
        spacing = np.asarray(image.GetSpacing())
        direction = np.asarray(image.GetDirection()).reshape(3, 3)
        self.to_index = np.linalg.inv(direction * spacing)     # LPS mm -> continuous index
        size = np.asarray(image.GetSize())
        self.origin = np.asarray(image.GetOrigin())
        corner = self.origin + (direction * spacing) @ (size - 1)
        self.centre = (self.origin + corner) / 2
        self.size = size
        extent = np.abs(direction * spacing) @ size
        self.fov_mm = float(max(extent[0], extent[1]))
        self.slice_spacing = float(max(spacing[2], 0.5))

    def hu(self, grid: Grid) -> torch.Tensor:
        zz, yy, xx = torch.meshgrid(grid.z, grid.y, grid.x, indexing="ij")
        pts = torch.stack([xx, yy, zz], -1).double() + torch.from_numpy(self.centre)
        idx = (pts - torch.from_numpy(self.origin)) @ torch.from_numpy(self.to_index).T
        norm = (idx / torch.from_numpy(self.size - 1).clamp(min=1) * 2 - 1).float()
        out = F.grid_sample(self.data + 1000.0, norm[None], mode="bilinear",
                            padding_mode="zeros", align_corners=True)[0, 0]
        return out - 1000.0


Phantom = ChestPhantom | HeadPhantom | VolumePhantom
