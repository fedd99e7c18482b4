"""The companion Structured Report: which algorithm made a derived series, machine-readable.

One TID 1500 Measurement Report per derived series, written by highdicom as Comprehensive 3D SR,
holding one measurement group (TID 1501) with the model's Algorithm Identification (TID 4019:
name, version, weights sha256, route and parameters) and references to every derived image.
A PACS or an audit tool can then find the algorithm without reading private tags. UIDs follow
the derived series' scheme, so re-running replaces the same SR.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
from pydicom import dcmread
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pipelines.derived import MANUFACTURER, Provenance, WriteError, write_atomic


def sr_uids(derived_series_uid: str) -> tuple[str, str]:
    """(series, instance) UIDs of the SR for a derived series: same input, same UIDs."""
    return (generate_uid(entropy_srcs=["dicomnode-sr-series", derived_series_uid]),
            generate_uid(entropy_srcs=["dicomnode-sr-instance", derived_series_uid]))


def algorithm_identification(provenance: Provenance) -> hd.sr.AlgorithmIdentification:
    """TID 4019 for the model: its name and version; weights, route and settings as parameters."""
    parameters = [f"weights sha256 {provenance.weights_sha256}"]
    if provenance.route:
        parameters.append(f"route {provenance.route}")
    parameters.append(json.dumps(provenance.parameters, sort_keys=True))
    return hd.sr.AlgorithmIdentification(name=provenance.model_name,
                                         version=provenance.model_version,
                                         parameters=parameters, manufacturer=MANUFACTURER)


def write_algorithm_sr(derived: Sequence[Path], provenance: Provenance, out_dir: Path) -> Path:
    """Write ``out_dir/<SR series UID>/<SR SOP instance UID>.dcm`` for one derived series."""
    if not derived:
        raise WriteError("no derived images to report on")
    images = [dcmread(p, stop_before_pixels=True) for p in derived]
    first = images[0]
    series_uid, instance_uid = sr_uids(str(first.SeriesInstanceUID))
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["dicomnode-device", provenance.model_name,
                                           provenance.weights_sha256]),
            name=provenance.model_name[:64], manufacturer_name=MANUFACTURER,
            model_name=provenance.model_name[:64]))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=["dicomnode-sr-tracking", str(first.SeriesInstanceUID)]),
            identifier=f"Harmonised series {first.SeriesInstanceUID}"[:64]),
        algorithm_id=algorithm_identification(provenance),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(
            ds, list(range(1, int(ds.NumberOfFrames) + 1)) if "NumberOfFrames" in ds else None)
            for ds in images])
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.ImagingProcedure, imaging_measurements=[group])
    try:
        sr = hd.sr.Comprehensive3DSR(
            evidence=images, content=report, series_instance_uid=series_uid,
            series_number=int(first.get("SeriesNumber") or 0) + 1000,  # derived's + 1000
            sop_instance_uid=instance_uid, instance_number=1, manufacturer=MANUFACTURER,
            is_complete=True, is_final=True,
            series_description=f"{provenance.model_name} algorithm report"[:64])
    except (ValueError, TypeError) as exc:
        raise WriteError(f"cannot build the algorithm SR: {exc}") from exc
    folder = Path(out_dir) / series_uid
    path = folder / f"{instance_uid}.dcm"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(sr, path)
    except OSError as exc:
        raise WriteError(f"cannot write the algorithm SR to {folder}: {exc}") from exc
    return path
