"""MR anatomy and acquisition: MNI ICBM152 2009a tissue maps, relaxation, bias, k-space, noise.

Anatomy is the GM/WM probability maps shipped inside the ``nilearn`` package (read from disk,
never downloaded) with CSF as the rest of the template's brain mask, warped per subject by a
small random affine plus a smooth random displacement field. Signal comes from the sequence
equations with literature relaxation times; the receive bias field, Rician noise and k-space
extent/apodisation make one scanner's image differ from another's of the same anatomy.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainers.simulation.domains import MRDomain

TISSUES = ("GM", "WM", "CSF")

# (T1 ms, T2 ms, proton density) per tissue.
# 1.5 T: BrainWeb (Kwan, Evans, Pike, IEEE TMI 18:1085, 1999; Cocosco et al. 1997).
# 3 T: GM/WM from Wansapura et al., JMRI 9:531, 1999; CSF T1 from Lu et al., JMRI 22:13, 2005,
# CSF T2 at the long end of the reported range (~1.5-2 s). PD is field independent.
RELAXATION: dict[float, dict[str, tuple[float, float, float]]] = {
    1.5: {"GM": (833.0, 83.0, 0.86), "WM": (500.0, 70.0, 0.77), "CSF": (2569.0, 329.0, 1.0)},
    3.0: {"GM": (1331.0, 110.0, 0.86), "WM": (832.0, 80.0, 0.77), "CSF": (4163.0, 1500.0, 1.0)},
}


def signal(domain: MRDomain, tissue: str) -> float:
    """Steady-state magnitude of one tissue for the domain's sequence and parameters."""
    t1, t2, pd = RELAXATION[domain.field_t][tissue]
    e1, e2 = math.exp(-domain.tr / t1), math.exp(-domain.te / t2)
    alpha = math.radians(domain.flip)
    if domain.sequence == "SE":
        return pd * (1.0 - e1) * e2
    if domain.sequence == "IR-GRE":   # MPRAGE-like inversion recovery, magnitude
        return pd * abs(1.0 - 2.0 * math.exp(-domain.ti / t1) + e1) * math.sin(alpha) * e2
    if domain.sequence == "GRE":      # spoiled gradient echo (FLASH / FFE)
        return pd * math.sin(alpha) * (1.0 - e1) / (1.0 - math.cos(alpha) * e1) * e2
    raise ValueError(f"unknown sequence {domain.sequence}")


def _nilearn_data() -> Path:
    import nilearn

    return Path(nilearn.__file__).parent / "datasets" / "data"


@lru_cache(maxsize=1)
def tissue_atlas() -> tuple[torch.Tensor, np.ndarray]:
    """GM, WM, CSF fractions (1, 3, z, y, x) and the voxel-to-RAS affine of the template."""
    import nibabel as nib

    base = _nilearn_data()
    name = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
    gm = nib.load(base / name.format("gm"))
    wm = np.asarray(nib.load(base / name.format("wm")).dataobj, np.float32) / 255.0
    gmv = np.asarray(gm.dataobj, np.float32) / 255.0
    t1 = np.asarray(nib.load(base / name.format("t1")).dataobj, np.float32)
    brain = (t1 / t1.max() > 0.2).astype(np.float32)   # nilearn's load_mni152_brain_mask
    csf = np.clip(brain - gmv - wm, 0.0, 1.0)
    maps = np.stack([gmv, wm, csf]).transpose(0, 3, 2, 1)       # (3, k, j, i) = z, y, x
    return torch.from_numpy(np.ascontiguousarray(maps))[None], gm.affine


def tissue_maps(rng: np.random.Generator, x: torch.Tensor, y: torch.Tensor,
                z: torch.Tensor) -> torch.Tensor:
    """Tissue fractions (3, Z, Y, X) of one subject's brain on an LPS grid centred on it."""
    atlas, affine = tissue_atlas()
    rot = np.radians(rng.uniform(-4, 4, 3))
    scale = rng.uniform(0.92, 1.08, 3)
    shift = rng.uniform(-3, 3, 3)
    cx, cy, cz = np.cos(rot)
    sx, sy, sz = np.sin(rot)
    r = (np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
         @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
         @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])) / scale
    warp = torch.from_numpy(rng.standard_normal((1, 3, 5, 5, 5)).astype(np.float32)) * 2.5
    zz, yy, xx = torch.meshgrid(z, y, x, indexing="ij")
    ras = torch.stack([-xx, -yy, zz], -1).double()           # LPS -> RAS
    centre = np.array([0.0, -18.0, 15.0])                    # middle of the MNI brain (RAS mm)
    ras = ras @ torch.from_numpy(r).T + torch.from_numpy(centre + shift)
    smooth = F.grid_sample(warp, (ras / 100.0).float()[None], mode="bilinear",
                           padding_mode="border", align_corners=True)[0]
    ras = ras + smooth.permute(1, 2, 3, 0).double()
    ijk = (ras - torch.from_numpy(affine[:3, 3])) @ torch.from_numpy(
        np.linalg.inv(affine[:3, :3])).T
    dims = torch.tensor(atlas.shape[2:][::-1], dtype=torch.float64)  # x, y, z sizes
    norm = (ijk / (dims - 1) * 2 - 1).float()
    return F.grid_sample(atlas, norm[None], mode="bilinear", padding_mode="zeros",
                         align_corners=True)[0]


def bias_field(rng: np.random.Generator, amplitude: float, shape: tuple[int, int, int]
               ) -> torch.Tensor:
    """Smooth multiplicative receive-coil sensitivity, mean about 1."""
    coarse = torch.from_numpy(rng.uniform(-0.5, 0.5, (1, 1, 3, 3, 3)).astype(np.float32))
    field = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0, 0]
    return torch.exp(amplitude * field)


def acquire(fractions: torch.Tensor, domain: MRDomain, rng: np.random.Generator,
            generator: torch.Generator) -> torch.Tensor:
    """Magnitude images (S, n, n) in the vendor's integer scale from z-integrated fractions."""
    values = torch.tensor([signal(domain, t) for t in TISSUES]).view(3, 1, 1, 1)
    s_max = float(values.max())
    img = (fractions * values).sum(0) / s_max
    img = img * bias_field(rng, domain.bias, tuple(img.shape))
    n = img.shape[-1]
    f = torch.fft.fftfreq(n).abs() * 2.0                       # fraction of Nyquist
    edge = domain.kspace_fraction
    taper = ((edge - f) / max(domain.apodisation * edge, 1e-6)).clamp(0, 1)
    w1 = torch.where(f <= edge, 0.5 - 0.5 * torch.cos(math.pi * taper), torch.zeros_like(f))
    window = w1[:, None] * w1[None, :]
    white_matter = float(values[TISSUES.index("WM")]) / s_max
    sigma = white_matter / domain.snr / float(window.pow(2).mean().sqrt())
    noise = torch.complex(torch.randn(img.shape, generator=generator),
                          torch.randn(img.shape, generator=generator)) * sigma
    k = torch.fft.fft2(img.to(torch.complex64) + noise) * window
    return torch.fft.ifft2(k).abs() * domain.scale
