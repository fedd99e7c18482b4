"""dicomnode: a DICOM node that harmonises CT and MR images across scanners."""

from pipelines import software_version

__version__ = software_version()
