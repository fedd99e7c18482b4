"""Runtime core: routing, series I/O, generators, model folders, inference, derived DICOM."""

import os
from functools import cache
from importlib.metadata import PackageNotFoundError, version

# torch's CPU kernels (oneDNN, MKL, ATen) run on OpenMP threads that by default spin between
# parallel regions, burning cores the node shares with its own receiving and writing, with
# each region's other thread and with any neighbour: on a loaded 2-core machine a 256² U-Net
# slice took 1.4 s with them spinning and 56 ms with them sleeping (bench/pipeline.py,
# docs/benchmarks.md). OpenMP reads this once, when torch loads: pipelines comes first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@cache
def software_version() -> str:
    """The installed dicomnode distribution's version (recorded in models and derived series);
    read once per process (a metadata lookup costs milliseconds, per instance written)."""
    try:
        return version("dicomnode")
    except PackageNotFoundError:  # running from a bare checkout
        return "0+unknown"


# Who wrote a file or opened an association (PS3.7 D.3.3.2, PS3.10 7.1): a UID of our own,
# derived from a UUID (the 2.25 arc needs no registration), fixed for every release.
IMPLEMENTATION_CLASS_UID = "2.25.245294531864428668542977014530667453094"


def implementation_version_name() -> str:
    """``DICOMNODE_<version>``, cut to the 16 characters an SH value holds."""
    return f"DICOMNODE_{software_version()}"[:16]
