"""Runtime core: routing, series I/O, generators, model folders, inference, derived DICOM."""

from importlib.metadata import PackageNotFoundError, version


def software_version() -> str:
    """The installed dicomnode distribution's version (recorded in models and derived series)."""
    try:
        return version("dicomnode")
    except PackageNotFoundError:  # running from a bare checkout
        return "0+unknown"
