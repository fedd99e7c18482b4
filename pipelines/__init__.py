"""Runtime core: routing, series I/O, generators, model folders, inference, derived DICOM."""
