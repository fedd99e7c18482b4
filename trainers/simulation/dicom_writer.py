"""DICOM encoding of simulated series: CT/MR Image (one file per slice) or Enhanced CT/MR Image
(one multi-frame file), optionally JPEG 2000 lossless; headers complete enough that
``dciodvfy`` reports no errors, with the domain's vendor tags copied verbatim."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from pipelines import IMPLEMENTATION_CLASS_UID
from trainers.simulation.domains import CTDomain, Domain, MRDomain

SOP_CLASS = {("CT", False): "1.2.840.10008.5.1.4.1.1.2",
             ("MR", False): "1.2.840.10008.5.1.4.1.1.4",
             ("CT", True): "1.2.840.10008.5.1.4.1.1.2.1",
             ("MR", True): "1.2.840.10008.5.1.4.1.1.4.1"}
ORIENTATION = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
BITS_STORED = 12
CT_RESCALE_INTERCEPT = -1024.0  # CT pixels are stored as HU + 1024


@dataclass(frozen=True)
class SeriesContext:
    """Everything one series' headers need besides the pixels."""

    domain: Domain
    subject: int
    seed: int
    pixel: float                    # mm, square pixels
    positions: list[list[float]]    # ImagePositionPatient of each slice, in instance order
    slice_spacing: float
    body_part: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    series_number: int
    date: str
    time: str

    def uid(self, *parts: object) -> str:
        return generate_uid(entropy_srcs=[self.series_uid, *map(str, parts)])


def _common(ds: Dataset, ctx: SeriesContext) -> None:
    """Patient, study, series, frame of reference and equipment modules."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = f"SYNTHETIC^PHANTOM^S{ctx.seed}-{ctx.subject:04d}"
    ds.PatientID = f"SIM-{ctx.seed}-{ctx.subject:04d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Synthetic data: no real patient"
    ds.StudyInstanceUID = ctx.study_uid
    ds.StudyDate, ds.StudyTime = ctx.date, ctx.time
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"{ctx.subject:04d}"
    ds.AccessionNumber = ""
    ds.StudyDescription = f"Simulated {ctx.body_part.lower() or 'volume'}"
    ds.Modality = ctx.domain.modality
    ds.SeriesInstanceUID = ctx.series_uid
    ds.SeriesNumber = ctx.series_number
    ds.SeriesDate, ds.SeriesTime = ctx.date, ctx.time
    ds.PatientPosition = "HFS"
    if ctx.body_part:
        ds.BodyPartExamined = ctx.body_part
    ds.FrameOfReferenceUID = ctx.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    for key, value in ctx.domain.tags.items():
        setattr(ds, key, value)
    ds.DeviceSerialNumber = "SIM-" + ctx.domain.name[:12]
    ds.InstitutionName = "dicomnode virtual scanner"
    ds.SliceThickness = ctx.domain.slice_thickness
    ds.PixelSpacing = [round(ctx.pixel, 6)] * 2
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.ContentDate, ds.ContentTime = ctx.date, ctx.time
    ds.AcquisitionDate, ds.AcquisitionTime = ctx.date, ctx.time
    ds.AcquisitionNumber = 1


def _pixels(ds: Dataset, frames: np.ndarray) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = frames.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, BITS_STORED, BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(frames, dtype="<u2").tobytes()


def _window(domain: Domain, frames: np.ndarray) -> tuple[float, float]:
    if isinstance(domain, CTDomain):
        return (-600.0, 1600.0) if domain.kernel.boost else (40.0, 400.0)
    hi = float(np.percentile(frames, 99.5)) or 1.0
    return round(hi / 2, 1), round(hi, 1)


def _ct_acquisition(ds: Dataset, d: CTDomain, fov: float) -> None:
    ds.ScanOptions = "HELICAL MODE"
    ds.DataCollectionDiameter = 500.0
    ds.ReconstructionDiameter = round(fov, 3)
    ds.DistanceSourceToDetector = 1085.6
    ds.DistanceSourceToPatient = 595.0
    ds.GantryDetectorTilt = 0.0
    ds.TableHeight = 150.0
    ds.RotationDirection = "CW"
    ds.ExposureTime = 500
    ds.XRayTubeCurrent = int(round(d.mas / 0.5))
    ds.Exposure = int(round(d.mas))
    ds.FilterType = "BODY"
    ds.GeneratorPower = int(round(d.kvp * d.mas / 0.5 / 1000))
    ds.FocalSpots = [1.2]
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = CT_RESCALE_INTERCEPT, 1.0, "HU"


def _echo_train_length(d: MRDomain) -> int:
    """Turbo/fast spin echo for T2 weighting, one echo per excitation otherwise."""
    return 1 if d.sequence != "SE" or d.weighting == "T1" else 16


def _mr_acquisition(ds: Dataset, d: MRDomain) -> None:
    ds.MRAcquisitionType = "3D" if d.sequence != "SE" else "2D"
    ds.ScanOptions = ""
    ds.EchoTrainLength = _echo_train_length(d)
    ds.NumberOfAverages = 1.0
    ds.ImagingFrequency = round(42.577478 * d.field_t, 6)
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = 1
    ds.SpacingBetweenSlices = None
    ds.PercentSampling = round(100.0 * d.kspace_fraction, 1)
    ds.PercentPhaseFieldOfView = 100.0
    ds.PixelBandwidth = 200.0
    ds.InPlanePhaseEncodingDirection = "ROW"
    ds.ReceiveCoilName = "HEAD 32"
    ds.TransmitCoilName = "BODY"


def write_single_frames(values: np.ndarray, ctx: SeriesContext, out_dir: Path,
                        jpeg2000: bool) -> list[Path]:
    """One CT/MR Image instance per slice of stored ``values`` (S, n, n, uint16)."""
    domain = ctx.domain
    centre, width = _window(domain, values)
    paths = []
    for i, frame in enumerate(values):
        ds = Dataset()
        _common(ds, ctx)
        ds.SOPClassUID = SOP_CLASS[(domain.modality, False)]
        ds.SOPInstanceUID = ctx.uid("instance", i)
        ds.InstanceNumber = i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if domain.modality == "CT" else \
            ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ImagePositionPatient = [round(v, 4) for v in ctx.positions[i]]
        ds.ImageOrientationPatient = ORIENTATION
        ds.SliceLocation = round(ctx.positions[i][2], 4)
        ds.WindowCenter, ds.WindowWidth = centre, width
        if isinstance(domain, CTDomain):
            _ct_acquisition(ds, domain, ctx.pixel * frame.shape[-1])
        else:
            _mr_acquisition(ds, domain)
            ds.SpacingBetweenSlices = ctx.slice_spacing
        _pixels(ds, frame)
        paths.append(_save(ds, out_dir / f"{domain.modality}{i + 1:04d}.dcm", jpeg2000))
    return paths


def _save(ds: Dataset, path: Path, jpeg2000: bool) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = "DICOMNODE_SIM"
    ds.file_meta = meta
    if jpeg2000:
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(path, enforce_file_format=True)
    return path


def _item(**attrs: object) -> Dataset:
    ds = Dataset()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def _ct_shared(d: CTDomain, fov: float, pixel: float) -> dict[str, Sequence]:
    """Enhanced CT functional groups that hold for every frame."""
    return {
        "CTAcquisitionTypeSequence": Sequence([_item(
            AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO")]),
        "CTAcquisitionDetailsSequence": Sequence([_item(
            DataCollectionDiameter=500.0, GantryDetectorTilt=0.0, TableHeight=150.0,
            RotationDirection="CW", RevolutionTime=0.5, SingleCollimationWidth=0.6,
            TotalCollimationWidth=38.4)]),
        "CTTableDynamicsSequence": Sequence([_item(
            TableSpeed=46.1, TableFeedPerRotation=23.04, SpiralPitchFactor=0.6)]),
        "CTGeometrySequence": Sequence([_item(
            DistanceSourceToDetector=1085.6, DistanceSourceToDataCollectionCenter=595.0)]),
        "CTReconstructionSequence": Sequence([_item(
            ReconstructionAlgorithm="FILTER_BACK_PROJ", ConvolutionKernel=d.tags[
                "ConvolutionKernel"], ConvolutionKernelGroup="LUNG" if d.kernel.boost
            else "SOFT_TISSUE", ReconstructionDiameter=round(fov, 3),
            ReconstructionPixelSpacing=[round(pixel, 6)] * 2, ReconstructionAngle=360.0,
            ImageFilter="NONE")]),
        "CTExposureSequence": Sequence([_item(
            ExposureTimeInms=500.0, XRayTubeCurrentInmA=d.mas / 0.5, ExposureInmAs=d.mas,
            ExposureModulationType="NONE", CTDIvol=round(d.mas * 0.068, 2),
            CTDIPhantomTypeCodeSequence=Sequence([
                _code("113691", "DCM", "IEC Body Dosimetry Phantom")]))]),
        "CTXRayDetailsSequence": Sequence([_item(
            KVP=d.kvp, FocalSpots=[1.2], FilterType="BODY", FilterMaterial="ALUMINUM")]),
        "PixelValueTransformationSequence": Sequence([_item(
            RescaleIntercept=CT_RESCALE_INTERCEPT, RescaleSlope=1.0, RescaleType="HU")]),
        "CTImageFrameTypeSequence": Sequence([_item(
            FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"], PixelPresentation="MONOCHROME",
            VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE")]),
    }


def _mr_shared(d: MRDomain) -> dict[str, Sequence]:
    """Enhanced MR functional groups that hold for every frame."""
    contrast = "T1" if d.weighting == "T1" else "T2"
    return {
        "MRImageFrameTypeSequence": Sequence([_item(
            FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"], PixelPresentation="MONOCHROME",
            VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE",
            ComplexImageComponent="MAGNITUDE", AcquisitionContrast=contrast)]),
        "MRTimingAndRelatedParametersSequence": Sequence([_item(
            RepetitionTime=d.tr, FlipAngle=d.flip, EchoTrainLength=_echo_train_length(d),
            RFEchoTrainLength=_echo_train_length(d),
            GradientEchoTrainLength=1 if d.sequence != "SE" else 0,
            SpecificAbsorptionRateSequence=Sequence([_item(
                SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY",
                SpecificAbsorptionRateValue=0.4)]),
            GradientOutputType="DB_DT", GradientOutput=20.0,
            OperatingModeSequence=Sequence([_item(
                OperatingModeType="STATIC FIELD", OperatingMode="IEC_NORMAL")]))]),
        "MRFOVGeometrySequence": Sequence([_item(
            InPlanePhaseEncodingDirection="ROW", MRAcquisitionFrequencyEncodingSteps=256,
            MRAcquisitionPhaseEncodingStepsInPlane=int(256 * d.kspace_fraction),
            PercentSampling=100.0, PercentPhaseFieldOfView=100.0)]),
        "MREchoSequence": Sequence([_item(EffectiveEchoTime=d.te)]),
        "MRModifierSequence": Sequence([_item(
            InversionRecovery="YES" if d.ti else "NO", **({"InversionTimes": [d.ti]}
                                                           if d.ti else {}),
            FlowCompensation="NONE", T2Preparation="NO", SpatialPresaturation="NONE",
            PartialFourier="NO", ParallelAcquisition="NO",
            SpectrallySelectedExcitation="NONE")]),
        "MRImagingModifierSequence": Sequence([_item(
            MagnetizationTransfer="NONE", BloodSignalNulling="NO", Tagging="NONE",
            TransmitterFrequency=round(42.577478 * d.field_t, 6), PixelBandwidth=200.0)]),
        "MRReceiveCoilSequence": Sequence([_item(
            ReceiveCoilName="HEAD 32", ReceiveCoilManufacturerName="",
            ReceiveCoilType="VOLUME", QuadratureReceiveCoil="NO")]),
        "MRTransmitCoilSequence": Sequence([_item(
            TransmitCoilName="BODY", TransmitCoilManufacturerName="",
            TransmitCoilType="BODY")]),
        "PixelValueTransformationSequence": Sequence([_item(
            RescaleIntercept=0.0, RescaleSlope=1.0, RescaleType="US")]),
        "MRAveragesSequence": Sequence([_item(NumberOfAverages=1.0)]),
    }


def _mr_instance(ds: Dataset, d: MRDomain) -> None:
    """Enhanced MR image, pulse sequence and MR instance attributes."""
    ds.AcquisitionContrast = "T1" if d.weighting == "T1" else "T2"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "TUKEY"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.PulseSequenceName = d.tags["SequenceName"].lstrip("*")
    ds.MRAcquisitionType = "3D" if d.sequence != "SE" else "2D"
    ds.EchoPulseSequence = "SPIN" if d.sequence == "SE" else "GRADIENT"
    ds.MultiPlanarExcitation = "NO"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.SegmentedKSpaceTraversal = "SINGLE"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    if d.sequence == "SE":
        ds.MultipleSpinEcho = "NO"
    else:
        ds.CoverageOfKSpace = "FULL"
    ds.NumberOfKSpaceTrajectories = 1


def write_enhanced(values: np.ndarray, ctx: SeriesContext, out_dir: Path,
                   jpeg2000: bool) -> list[Path]:
    """One Enhanced CT/MR Image instance holding every slice as a frame."""
    domain = ctx.domain
    ds = Dataset()
    _common(ds, ctx)
    for key in ("SliceThickness", "PixelSpacing", "AcquisitionDate", "AcquisitionTime"):
        delattr(ds, key)
    ds.SOPClassUID = SOP_CLASS[(domain.modality, True)]
    ds.SOPInstanceUID = ctx.uid("enhanced")
    ds.InstanceNumber = 1
    ds.ContentQualification = "PRODUCT"
    ds.AcquisitionDateTime = ctx.date + ctx.time
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.AcquisitionDuration = 10.0
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.PresentationLUTShape = "IDENTITY"
    ds.RecognizableVisualFeatures = "NO"
    ds.AcquisitionContextSequence = Sequence()
    ds.NumberOfFrames = len(values)
    dim_uid = ctx.uid("dimension")
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=dim_uid)])
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = Sequence([
        _item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=0x00200032,
              FunctionalGroupPointer=0x00209113, DimensionDescriptionLabel="Slice position")])
    centre, width = _window(domain, values)
    shared = _item(
        PixelMeasuresSequence=Sequence([_item(
            PixelSpacing=[round(ctx.pixel, 6)] * 2, SliceThickness=domain.slice_thickness,
            SpacingBetweenSlices=ctx.slice_spacing)]),
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=ORIENTATION)]),
        FrameAnatomySequence=Sequence([_item(
            AnatomicRegionSequence=Sequence([
                _code("51185008", "SCT", "Thorax") if ctx.body_part == "CHEST"
                else _code("69536005", "SCT", "Head")]),
            FrameLaterality="U")]),
        FrameVOILUTSequence=Sequence([_item(WindowCenter=centre, WindowWidth=width)]),
    )
    if isinstance(domain, CTDomain):
        shared.IrradiationEventIdentificationSequence = Sequence([_item(
            IrradiationEventUID=ctx.uid("irradiation"))])
        for key, value in _ct_shared(domain, ctx.pixel * values.shape[-1], ctx.pixel).items():
            setattr(shared, key, value)
        for key in ("KVP", "ConvolutionKernel"):
            delattr(ds, key)
    else:
        for key, value in _mr_shared(domain).items():
            setattr(shared, key, value)
        _mr_instance(ds, domain)
        for key in ("RepetitionTime", "EchoTime", "InversionTime", "FlipAngle",
                    "ScanningSequence", "SequenceVariant", "SequenceName"):
            if key in ds:
                delattr(ds, key)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for i, pos in enumerate(ctx.positions):
        item = _item(
            FrameContentSequence=Sequence([_item(
                FrameAcquisitionNumber=1, FrameReferenceDateTime=ds.AcquisitionDateTime,
                FrameAcquisitionDateTime=ds.AcquisitionDateTime, FrameAcquisitionDuration=500.0,
                DimensionIndexValues=[i + 1], InStackPositionNumber=i + 1, StackID="1")]),
            PlanePositionSequence=Sequence([_item(
                ImagePositionPatient=[round(v, 4) for v in pos])]))
        if isinstance(domain, CTDomain):
            item.CTPositionSequence = Sequence([_item(
                TablePosition=round(-pos[2], 4),
                ReconstructionTargetCenterPatient=[0.0, 0.0, round(pos[2], 4)],
                DataCollectionCenterPatient=[0.0, 0.0, round(pos[2], 4)])])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    _pixels(ds, values)
    return [_save(ds, out_dir / f"{domain.modality}-enhanced.dcm", jpeg2000)]
