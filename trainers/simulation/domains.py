"""Virtual scanner domains: what each simulated scanner does and the header tags it writes.

A domain is the unit of harmonisation: one vendor, model and protocol. The physics modules read
the acquisition parameters from here; the DICOM writer copies ``tags`` into every instance, so
the routing rules of the node (Manufacturer, ConvolutionKernel, MagneticFieldStrength, ...) see
the same values they would see from the real scanner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CTKernel:
    """FBP reconstruction kernel: apodised ramp, optionally with a high-frequency boost.

    Frequencies are fractions of the reconstruction grid's Nyquist frequency, as a scanner's
    kernel is defined for its 512 matrix; ``--size`` only rescales the simulated grid.
    ``cutoff``: where the Hann apodisation reaches zero; ``boost``: gain of the raised
    high-frequency term (0 = plain apodised ramp, i.e. a smooth kernel), centred at ``boost_at``.
    """

    cutoff: float
    boost: float = 0.0
    boost_at: float = 0.6


@dataclass(frozen=True)
class CTDomain:
    name: str
    kernel: CTKernel
    kvp: float
    mas: float                  # tube current-time product per rotation (exposure)
    slice_thickness: float      # mm, z-integration width of each reconstructed slice
    hu_offset: float            # vendor calibration offset added to every HU value
    tags: dict[str, Any] = field(default_factory=dict)
    modality: str = "CT"
    # Another reconstruction of that domain's raw data: same exposure, slice thickness and
    # calibration, so the same noise projections, filtered with this domain's kernel.
    raw_data_of: str = ""


@dataclass(frozen=True)
class MRDomain:
    name: str
    field_t: float              # 1.5 or 3.0: selects the tissue relaxation table
    sequence: str               # "SE" (spin echo) | "IR-GRE" (MPRAGE-like) | "GRE" (spoiled)
    tr: float                   # ms
    te: float                   # ms
    ti: float                   # ms, 0 when not inversion prepared
    flip: float                 # degrees
    snr: float                  # white-matter SNR of the magnitude image
    kspace_fraction: float      # acquired k-space extent as a fraction of the recon grid
    apodisation: float          # Tukey taper fraction applied to the acquired k-space
    bias: float                 # peak-to-peak amplitude of the receive bias field
    scale: float                # vendor intensity scale of the stored integers
    slice_thickness: float      # mm
    weighting: str              # "T1" | "T2"
    tags: dict[str, Any] = field(default_factory=dict)
    modality: str = "MR"


Domain = CTDomain | MRDomain

_SIEMENS_CT = {"Manufacturer": "SIEMENS", "ManufacturerModelName": "SOMATOM Definition AS+",
               "StationName": "SIMCT01", "SoftwareVersions": "syngo CT VA48A (simulated)"}
_GE_CT = {"Manufacturer": "GE MEDICAL SYSTEMS", "ManufacturerModelName": "Revolution CT",
          "StationName": "SIMCT02", "SoftwareVersions": "revo_ct_22 (simulated)"}
_PHILIPS_CT = {"Manufacturer": "Philips", "ManufacturerModelName": "IQon - Spectral CT",
               "StationName": "SIMCT03", "SoftwareVersions": "5.1.0 (simulated)"}


def _ct(name: str, base: dict[str, Any], kernel_name: str, kernel: CTKernel, kvp: float,
        mas: float, thickness: float, hu_offset: float, protocol: str,
        raw_data_of: str = "") -> CTDomain:
    tags = {**base, "ConvolutionKernel": kernel_name, "KVP": kvp, "ProtocolName": protocol,
            "SeriesDescription": f"{protocol} {thickness:g} {kernel_name}"}
    return CTDomain(name, kernel, kvp, mas, thickness, hu_offset, tags, raw_data_of=raw_data_of)


def _mr(name: str, manufacturer: str, model: str, station: str, field_t: float, sequence: str,
        tr: float, te: float, ti: float, flip: float, snr: float, kspace: float, apod: float,
        bias: float, scale: float, thickness: float, weighting: str, scanning: str,
        variant: str, seq_name: str, protocol: str) -> MRDomain:
    tags = {"Manufacturer": manufacturer, "ManufacturerModelName": model, "StationName": station,
            "SoftwareVersions": "simulated", "MagneticFieldStrength": field_t,
            "RepetitionTime": tr, "EchoTime": te, "FlipAngle": flip,
            "ScanningSequence": scanning, "SequenceVariant": variant, "SequenceName": seq_name,
            "ProtocolName": protocol, "SeriesDescription": protocol.upper().replace("_", " ")}
    if ti:
        tags["InversionTime"] = ti
    return MRDomain(name, field_t, sequence, tr, te, ti, flip, snr, kspace, apod, bias, scale,
                    thickness, weighting, tags)


DOMAINS: dict[str, Domain] = {d.name: d for d in (
    _ct("siemens-b30f", _SIEMENS_CT, "B30f", CTKernel(cutoff=1.0), 120, 200, 3.0, 0.0,
        "Thorax Routine"),
    # the sharp kernel reconstructed from the B30f acquisition: a paired kernel conversion
    # learns the kernel's transfer function, not to denoise another noise realisation
    _ct("siemens-b70f", _SIEMENS_CT, "B70f", CTKernel(cutoff=1.25, boost=1.6, boost_at=0.65),
        120, 200, 3.0, 0.0, "Thorax Routine", raw_data_of="siemens-b30f"),
    _ct("ge-standard", _GE_CT, "STANDARD", CTKernel(cutoff=0.9), 120, 250, 2.5, 4.0,
        "CHEST ROUTINE"),
    _ct("ge-lung", _GE_CT, "LUNG", CTKernel(cutoff=1.3, boost=1.2, boost_at=0.7), 120, 250,
        1.25, 4.0, "CHEST ROUTINE"),
    _mr("ge-1.5t-t1w", "GE MEDICAL SYSTEMS", "SIGNA HDxt", "SIMMR01", 1.5, "SE", 500, 14, 0,
        90, 28, 0.75, 0.3, 0.15, 900, 4.0, "T1", "SE", "SK", "memp", "AX T1 SE",),
    _mr("ge-1.5t-t2w", "GE MEDICAL SYSTEMS", "SIGNA HDxt", "SIMMR01", 1.5, "SE", 4000, 100, 0,
        90, 24, 0.75, 0.3, 0.15, 900, 4.0, "T2", "SE", "SK", "fse-xl", "AX T2 FSE"),
    _mr("siemens-3t-t1w", "SIEMENS", "Prisma", "SIMMR02", 3.0, "IR-GRE", 2300, 2.98, 900, 9,
        40, 1.0, 0.1, 0.35, 2500, 1.0, "T1", "GR\\IR", "SK\\SP\\MP", "*tfl3d1_16ns",
        "t1_mprage_tra_p2"),
    _mr("siemens-3t-t2w", "SIEMENS", "Prisma", "SIMMR02", 3.0, "SE", 5000, 95, 0, 150, 36,
        0.9, 0.15, 0.35, 2500, 3.0, "T2", "SE", "SK\\SP\\OSP", "*tse2d1_15", "t2_tse_tra"),
    _mr("philips-3t-t1w", "Philips Medical Systems", "Ingenia", "SIMMR03", 3.0, "GRE", 25, 4.6,
        0, 30, 32, 0.85, 0.5, 0.3, 1400, 1.0, "T1", "GR", "SP", "T1FFE", "T1W_3D_FFE"),
    # Domains below were added for multi-domain harmonisation; new ones go at the end, as a
    # domain's place in this table numbers its series (simulate_series' SeriesNumber).
    # 100 kVp: more quantum noise and higher contrast of bone and fat (ct_physics.kvp_contrast)
    # than the 120 kVp scanners; a medium kernel between STANDARD and LUNG; 2 mm slices
    _ct("philips-b", _PHILIPS_CT, "B", CTKernel(cutoff=1.1, boost=0.4, boost_at=0.55), 100,
        180, 2.0, -5.0, "Chest Routine"),
    # a 1.5 T spin echo with a longer TR than GE's (less T1 weighting: flatter GM/WM
    # contrast), thicker slices, a coarser k-space extent and the lowest SNR of the T1w set
    _mr("canon-1.5t-t1w", "CANON_MEC", "Vantage Orian", "SIMMR04", 1.5, "SE", 800, 20, 0, 90,
        20, 0.6, 0.2, 0.25, 1800, 5.0, "T1", "SE", "NONE", "SE2D", "T1_SE_AX"),
)}


def find_domain(name: str) -> Domain:
    """The domain called ``name``; an unknown name fails with the list of known ones."""
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; known: {', '.join(DOMAINS)}")
    return DOMAINS[name]


def key_tags(domain: Domain) -> dict[str, Any]:
    """The tags routing rules usually match on, for ``dicomnode simulate --list``."""
    keys = ("Manufacturer", "ManufacturerModelName", "ConvolutionKernel", "KVP",
            "MagneticFieldStrength", "RepetitionTime", "EchoTime", "InversionTime",
            "FlipAngle", "SeriesDescription")
    return {"Modality": domain.modality, **{k: domain.tags[k] for k in keys if k in domain.tags},
            "SliceThickness": domain.slice_thickness}
