"""One simulated series end to end: geometry, ground truth, physics, DICOM files.

Determinism: the anatomy depends on ``(subject, seed)`` only (and the phantom), the geometry on
the modality, phantom and ``slices``/``size``; noise and UIDs also on the domain. So two
domains of one subject are a ground-truth pair: same patient, frame of reference and slice
positions, different scanner. A CT domain that reconstructs another's raw data
(``raw_data_of``) draws that domain's noise: the same acquisition with another kernel.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch
from pydicom.uid import generate_uid
from tqdm import tqdm

from trainers.simulation import ct_physics, mr_physics
from trainers.simulation.dicom_writer import (
    CT_RESCALE_INTERCEPT,
    SeriesContext,
    write_enhanced,
    write_single_frames,
)
from trainers.simulation.domains import DOMAINS, CTDomain, Domain, MRDomain, find_domain
from trainers.simulation.phantoms import ChestPhantom, Grid, HeadPhantom, Phantom, VolumePhantom

log = structlog.get_logger(component="simulate")

PHANTOMS = {"chest": ChestPhantom, "head": HeadPhantom}
DEFAULT_SIZE = {"CT": 512, "MR": 256}
DEFAULT_SLICES = 32
MR_FOV_MM, MR_SLICE_SPACING = 240.0, 4.0
SUB_SLICE_MM = 1.0       # z-integration step: a slice of thickness T averages ceil(T) planes


@dataclass(frozen=True)
class Geometry:
    """Axial slices, first row anterior, first column patient right (HFS), instances from
    inferior to superior (z ascending, which the phantoms' bounding boxes rely on)."""

    size: int
    pixel: float
    z: tuple[float, ...]             # slice centres in instance order (ascending)

    @property
    def xy(self) -> torch.Tensor:
        return (torch.arange(self.size, dtype=torch.float32) - self.size / 2 + 0.5) * self.pixel

    @property
    def spacing(self) -> float:
        return abs(self.z[0] - self.z[1]) if len(self.z) > 1 else 0.0

    def positions(self) -> list[list[float]]:
        corner = float(self.xy[0])
        return [[corner, corner, z] for z in self.z]

    def sample_grid(self, thickness: float, start: int = 0, stop: int | None = None
                    ) -> tuple[Grid, int]:
        """Sub-slice planes covering each slab of ``thickness``: (grid, planes per slice)."""
        n_sub = max(1, math.ceil(thickness / SUB_SLICE_MM - 1e-6))
        offsets = (torch.arange(n_sub) + 0.5) / n_sub * thickness - thickness / 2
        z = (torch.tensor(self.z[start:stop])[:, None] + offsets[None, :]).flatten()
        xy = self.xy
        return Grid(xy, xy, z.float()), n_sub


def _rng(*parts: object) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(str(p).encode()) for p in parts])


def _check(modality: str, domain: str | None, size: int, slices: int) -> Domain | None:
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be CT or MR, not {modality!r}")
    if size < 32 or size > 1024 or size % 2:
        raise ValueError(f"size must be an even number of pixels from 32 to 1024, not {size}")
    if slices < 1 or slices > 2000:
        raise ValueError(f"slices must be from 1 to 2000, not {slices}")
    if domain is None:
        return None
    found = find_domain(domain)
    if found.modality != modality:
        raise ValueError(f"domain {domain!r} is {found.modality}, not {modality}")
    return found


def make_phantom(subject: int = 0, seed: int = 0, phantom: str = "chest",
                 volume: Path | None = None) -> Phantom:
    """The CT anatomy of one subject: a procedural phantom or the user's volume."""
    if volume is not None:
        return VolumePhantom(Path(volume))
    if phantom not in PHANTOMS:
        raise ValueError(f"unknown phantom {phantom!r}; known: {', '.join(PHANTOMS)}")
    return PHANTOMS[phantom](_rng("anatomy", phantom, seed, subject))


def geometry(modality: str, slices: int, size: int, phantom: Phantom | None = None) -> Geometry:
    """Slice geometry shared by every domain of a modality (and phantom)."""
    fov, spacing = ((phantom.fov_mm, phantom.slice_spacing) if modality == "CT" and phantom
                    else (MR_FOV_MM, MR_SLICE_SPACING))
    z = tuple(round(spacing * (k - (slices - 1) / 2), 4) for k in range(slices))
    return Geometry(size, fov / size, z)


def ground_truth(modality: str, subject: int = 0, seed: int = 0, slices: int = DEFAULT_SLICES,
                 size: int | None = None, thickness: float = SUB_SLICE_MM,
                 phantom: str = "chest", volume: Path | None = None) -> np.ndarray:
    """The noise-free anatomy on the series' slices, averaged over ``thickness`` (mm).

    CT: HU, (slices, size, size). MR: tissue fractions, (3, slices, size, size) in the order
    of ``trainers.simulation.mr_physics.TISSUES`` (GM, WM, CSF).
    """
    size = size or DEFAULT_SIZE[modality]
    _check(modality, None, size, slices)
    if modality == "CT":
        ph = make_phantom(subject, seed, phantom, volume)
        geo = geometry("CT", slices, size, ph)
        return _ct_truth(ph, geo, thickness).numpy()
    return _mr_truth(subject, seed, geometry("MR", slices, size), thickness).numpy()


def _ct_truth(ph: Phantom, geo: Geometry, thickness: float, start: int = 0,
              stop: int | None = None) -> torch.Tensor:
    grid, n_sub = geo.sample_grid(thickness, start, stop)
    hu = ph.hu(grid)
    return hu.view(-1, n_sub, geo.size, geo.size).mean(1)


def _mr_truth(subject: int, seed: int, geo: Geometry, thickness: float) -> torch.Tensor:
    grid, n_sub = geo.sample_grid(thickness)
    maps = mr_physics.tissue_maps(_rng("anatomy", "brain", seed, subject), grid.x, grid.y,
                                  grid.z)
    return maps.view(3, -1, n_sub, geo.size, geo.size).mean(2)


def simulate_series(modality: str, domain: str, out_dir: Path | str, subject: int = 0,
                    slices: int = DEFAULT_SLICES, size: int | None = None, seed: int = 0,
                    *, noise_seed: int = 0, phantom: str = "chest", volume: Path | None = None,
                    enhanced: bool = False, jpeg2000: bool = False,
                    progress: bool | None = None) -> list[Path]:
    """Write one synthetic series of ``domain`` to ``out_dir``; return the files written.

    ``noise_seed`` draws another noise realisation of the same acquisition (for noise power
    measurements); ``progress=None`` shows a bar on stderr only when it is a terminal.
    """
    size = size or DEFAULT_SIZE[modality]
    dom = _check(modality, domain, size, slices)
    assert dom is not None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stored, geo, ph = _acquire(dom, subject, slices, size, seed, noise_seed, phantom, volume,
                               progress)
    if ph is not None:
        body_part = ph.body_part
        anatomy = f"{phantom if volume is None else Path(volume).resolve()}"
    else:
        body_part, anatomy = "BRAIN", "brain"
    index = list(DOMAINS).index(domain)
    key = f"{seed}/{subject}/{modality}/{anatomy}/{slices}/{size}"
    ctx = SeriesContext(
        domain=dom, subject=subject, seed=seed, pixel=geo.pixel, positions=geo.positions(),
        slice_spacing=geo.spacing, body_part=body_part,
        study_uid=generate_uid(entropy_srcs=["study", key, domain]),
        series_uid=generate_uid(entropy_srcs=["series", key, domain, str(noise_seed),
                                              "enhanced" if enhanced else "single-frame"]),
        frame_of_reference_uid=generate_uid(entropy_srcs=["frame-of-reference", key]),
        series_number=100 + index, date="20250101", time=f"{8 + index // 6:02d}{index % 6}000")
    writer = write_enhanced if enhanced else write_single_frames
    paths = writer(stored, ctx, out, jpeg2000)
    log.info("simulated", domain=domain, modality=modality, slices=slices, size=size,
             files=len(paths), series_uid=ctx.series_uid, out=str(out))
    return paths


def acquire_volume(domain: Domain, subject: int = 0, slices: int = DEFAULT_SLICES,
                   size: int | None = None, seed: int = 0, *, noise_seed: int = 0,
                   phantom: str = "chest", volume: Path | None = None,
                   progress: bool | None = False) -> np.ndarray:
    """The stored integers (slices, size, size) that ``domain``'s scanner writes for one
    subject: what ``simulate_series`` puts in its files (CT: HU + 1024), without them.

    Takes the domain itself, so a variant made with ``dataclasses.replace`` (another
    exposure, resolution or SNR; ``snr``/``mas`` of ``math.inf`` for no noise) can be
    acquired on the same anatomy; noise and bias draws follow the variant's ``name``.
    """
    size = size or DEFAULT_SIZE[domain.modality]
    _check(domain.modality, None, size, slices)
    return _acquire(domain, subject, slices, size, seed, noise_seed, phantom, volume,
                    progress)[0]


def _acquire(dom: Domain, subject: int, slices: int, size: int, seed: int, noise_seed: int,
             phantom: str, volume: Path | None, progress: bool | None
             ) -> tuple[np.ndarray, Geometry, Phantom | None]:
    """Stored pixels, geometry and (CT) phantom of one acquisition of ``dom``."""
    torch.set_num_threads(max(1, min(torch.get_num_threads(), len(_cpus()))))
    acquisition = getattr(dom, "raw_data_of", "") or dom.name  # reconstructions share noise
    gen = torch.Generator().manual_seed(
        zlib.crc32(f"noise/{seed}/{subject}/{acquisition}/{noise_seed}".encode()))
    if isinstance(dom, CTDomain):
        ph = make_phantom(subject, seed, phantom, volume)
        geo = geometry("CT", slices, size, ph)
        return _simulate_ct(ph, geo, dom, gen, progress), geo, ph
    geo = geometry("MR", slices, size)
    return _simulate_mr(subject, seed, geo, dom, gen), geo, None


def _cpus() -> set[int]:
    import os

    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else {0}


def _simulate_ct(ph: Phantom, geo: Geometry, dom: CTDomain, gen: torch.Generator,
                 progress: bool | None) -> np.ndarray:
    # Memory bounds: the phantom is drawn 32 slices at a time at 512 (its per-call cost is
    # mostly fixed), the physics runs on 8 (its k-space buffers are 2n x 2n per slice).
    anatomy_chunk = max(1, 2**23 // geo.size**2)
    physics_chunk = max(1, 2**21 // geo.size**2)
    out = np.empty((len(geo.z), geo.size, geo.size), np.uint16)
    bar = tqdm(total=len(geo.z), desc=f"simulate {dom.name}", unit="slice",
               disable=None if progress is None else not progress)
    for start in range(0, len(geo.z), anatomy_chunk):
        hu = _ct_truth(ph, geo, dom.slice_thickness, start, start + anatomy_chunk)
        for k in range(0, len(hu), physics_chunk):
            img = ct_physics.acquire(hu[k:k + physics_chunk], geo.pixel, dom, gen)
            out[start + k:start + k + len(img)] = (img - CT_RESCALE_INTERCEPT).round().clamp(
                0, 2**12 - 1).numpy()
            bar.update(len(img))
    bar.close()
    return out


def _simulate_mr(subject: int, seed: int, geo: Geometry, dom: MRDomain,
                 gen: torch.Generator) -> np.ndarray:
    fractions = _mr_truth(subject, seed, geo, dom.slice_thickness)
    img = mr_physics.acquire(fractions, dom, _rng("bias", dom.name, seed, subject), gen)
    return img.round().clamp(0, 2**12 - 1).numpy().astype(np.uint16)
