"""Virtual CT and MR scanners that write DICOM series with a known ground truth.

Harmonisation can only be measured where the truth is known: the same anatomy seen by two
scanners. Each *domain* (vendor, model, kernel or sequence) simulates its scanner's physics on
one shared anatomy per ``(subject, seed)``, so two domains of a subject form a ground-truth pair
(same patient, frame of reference and slice positions; separate studies and series).

CT: procedural chest/head phantoms in HU (or the user's NIfTI/DICOM volume), z-integration to
the slice thickness, parallel-beam projection, Poisson counts from the dose, log, filtered
back-projection with the domain's kernel, vendor HU offset (``ct_physics``). MR: MNI ICBM152
2009a tissue maps from the nilearn package (offline), per-subject deformation, spin-echo /
gradient-echo signal equations with literature T1/T2/PD, bias field, k-space apodisation,
Rician noise, vendor scale (``mr_physics``).

Python API::

    from trainers.simulation import DOMAINS, simulate_series, ground_truth, key_tags

    DOMAINS                        # name -> CTDomain | MRDomain (parameters, .tags = headers)
    key_tags(DOMAINS["ge-lung"])   # the routing-relevant tags, as `simulate --list` shows
    find_domain("ge-lung")         # DOMAINS["ge-lung"]; an unknown name: ValueError listing them

    simulate_series(modality, domain, out_dir, subject=0, slices=32, size=None, seed=0, *,
                    noise_seed=0, phantom="chest", volume=None, enhanced=False,
                    jpeg2000=False, progress=None) -> list[Path]
        # size: CT 512, MR 256 by default; noise_seed: another noise realisation of the very
        # same acquisition; volume: CT anatomy from a NIfTI file or DICOM folder (HU);
        # enhanced: one Enhanced CT/MR multi-frame file; jpeg2000: lossless J2K.

    acquire_volume(domain, subject=0, slices=32, size=None, seed=0, *, noise_seed=0,
                   phantom="chest", volume=None) -> np.ndarray
        # the stored integers simulate_series would write (CT: HU + 1024), for a Domain
        # object: a dataclasses.replace variant of one (snr or mas = math.inf: no noise)

    ground_truth(modality, subject=0, seed=0, slices=32, size=None, thickness=1.0,
                 phantom="chest", volume=None) -> np.ndarray
        # CT: HU (slices, size, size); MR: GM/WM/CSF fractions (3, slices, size, size);
        # on the same slices as simulate_series, averaged over ``thickness`` mm (pass a
        # domain's .slice_thickness to compare with its series).

    geometry(modality, slices, size, phantom=None) -> Geometry   # pixel size, slice z
    make_phantom(subject, seed, phantom="chest", volume=None)    # CT anatomy object

``trainers.simulation.preview.read_series(paths)`` reads a written series back as modality
values (HU for CT); ``save_preview`` draws the same slice across domains with differences.
"""

from trainers.simulation.domains import DOMAINS, CTDomain, Domain, MRDomain, find_domain, key_tags
from trainers.simulation.series import (
    Geometry,
    acquire_volume,
    geometry,
    ground_truth,
    make_phantom,
    simulate_series,
)

__all__ = ["DOMAINS", "CTDomain", "Domain", "Geometry", "MRDomain", "acquire_volume", "find_domain",
           "geometry", "ground_truth", "key_tags", "make_phantom", "simulate_series"]
