"""dicomnode: a DICOM node that harmonises CT and MR images across scanners."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dicomnode")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+src"
