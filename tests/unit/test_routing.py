"""Routing rules: every pattern kind, first match wins, inconsistent series are flagged."""

from __future__ import annotations

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import CTImageStorage

from dicomnode.cli import main
from pipelines.routing import RoutingError, parse_routes, route_series
from pipelines.series import read_headers
from tests.dicom_factory import write_enhanced_ct, write_series
from trainers.simulation import simulate_series


def ds(**tags):
    """A header with ``tags``, of a CT image unless a SOPClassUID is given."""
    d = Dataset()
    d.SOPClassUID = CTImageStorage
    for k, v in tags.items():
        setattr(d, k, v)
    return d


def rule(name="r", **match):
    return {"name": name, "model": "m", "match": match}


def matches(pattern, **tags) -> bool:
    keyword = next(iter(tags))
    routes = parse_routes([rule(**{keyword: pattern})])
    return route_series([ds(**tags)], routes).route is not None


@pytest.mark.parametrize("keyword, pattern, value, expected", [
    ("ConvolutionKernel", "B7*", "b70f", True),
    ("ConvolutionKernel", "B7?", "B70f", False),
    ("ConvolutionKernel", ["B6*", "LUNG"], "lung", True),
    ("ConvolutionKernel", ["B6*", "LUNG"], "B30f", False),
    ("MagneticFieldStrength", ">=2.5", "3", True),
    ("MagneticFieldStrength", ">=2.5", "1.5", False),
    ("RepetitionTime", "<1000", "980.5", True),
    ("MagneticFieldStrength", "1.4..1.6", "1.5", True),
    ("MagneticFieldStrength", "1.4..1.6", "1.61", False),
    ("MagneticFieldStrength", 1.5, "1.5", True),
    ("MagneticFieldStrength", "3", "3.0", True),   # DS: a quoted number is a number
    ("MagneticFieldStrength", "3", "3.5", False),
    ("MagneticFieldStrength", " 1.50 ", "1.5", True),
    ("EchoTrainLength", "1", "01", True),           # IS
    ("PixelPaddingValue", "-2000", "-2000.0", True),  # US or SS
    ("StationName", "3", "3.0", False),             # text: still a glob
    ("MagneticFieldStrength", "3*", "3.0", True),   # a glob still works
    ("SeriesDescription", "re:t1", "Ax T1 FSE", True),
    ("SeriesDescription", "re:^t1$", "Ax T1 FSE", False),
    ("SeriesDescription", ">=2.5", "not a number", False),
])
def test_pattern_kinds(keyword, pattern, value, expected):
    assert matches(pattern, **{keyword: value}) is expected


def test_multivalued_element_matches_joined_or_single_value():
    assert matches("AXIAL", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])
    assert matches("ORIGINAL\\PRIMARY*", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])
    assert not matches("DERIVED", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])


def test_absent_tag_never_matches():
    assert matches("*", ConvolutionKernel="B70f")
    routes = parse_routes([rule(ConvolutionKernel="*")])
    decision = route_series([ds(Modality="CT")], routes)
    assert decision.route is None
    assert "ConvolutionKernel=<absent> does not match *" in decision.explain()[0]


def test_first_match_wins_and_explain_says_why_earlier_rules_failed():
    routes = parse_routes([rule("a", Modality="MR"), rule("b", Modality="CT"),
                           rule("c", Modality="CT")])
    decision = route_series([ds(Modality="CT")], routes)
    assert decision.route.name == "b"
    assert decision.explain() == ["  a: no: Modality='CT' does not match MR",
                                  "  b: matched: Modality='CT' matches CT"]
    assert decision.summary() == "route b (model m)"


def test_inconsistent_series_is_flagged_not_guessed():
    routes = parse_routes([rule("sharp", Modality="CT", ConvolutionKernel="B7*"),
                           rule("any-ct", Modality="CT")])
    series = [ds(Modality="CT", ConvolutionKernel="B70f"), ds(Modality="CT",
                                                              ConvolutionKernel="B30f")]
    decision = route_series(series, routes)
    assert decision.route is None and decision.inconsistent
    assert "rule 'sharp' undecidable: ConvolutionKernel differs across images" in \
        decision.summary()
    assert decision.explain()[0] == "  ! ConvolutionKernel differs across images: B30f, B70f"


def test_disagreement_that_decides_nothing_does_not_block_routing():
    routes = parse_routes([rule("mr", Modality="MR", ConvolutionKernel="B7*"),
                           rule("ct", Modality="CT", ConvolutionKernel="B*")])
    series = [ds(Modality="CT", ConvolutionKernel="B70f"), ds(Modality="CT",
                                                              ConvolutionKernel="B30f")]
    decision = route_series(series, routes)
    assert decision.route.name == "ct" and not decision.inconsistent


@pytest.mark.parametrize("raw, message", [
    ([rule(Kernel="B7*")], "unknown key 'Kernel' (not a DICOM keyword)"),
    ([rule(SeriesDescription="re:(")], "bad regular expression"),
    ([rule(MagneticFieldStrength="3..1")], "low end above its high end"),
    ([rule(Modality=[])], "empty pattern list"),
    ([rule(Modality=True)], "pattern must be a string or number"),
    ([rule("x"), rule("x")], "route name used twice"),
    ([{"name": "x", "model": "m", "sendto": []}], "unknown key 'sendto'"),
    ([{"name": "x"}], "'model' must be a non-empty string"),
])
def test_bad_rules_are_named(raw, message):
    with pytest.raises(RoutingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_routes(raw, source="node.toml")


def test_route_explain_command(tmp_path, capsys):
    write_series(tmp_path / "in" / "ct", kernel="B70f")
    write_series(tmp_path / "in" / "ge", kernel="STANDARD", manufacturer="GE", seed=2)
    config = tmp_path / "node.toml"
    config.write_text('[node]\nunmatched = "ignore"\n'
                      '[[routes]]\nname = "sharp"\nmodel = "m"\n[routes.match]\n'
                      'Modality = "CT"\nConvolutionKernel = ["B6*", "B7*"]\n')
    assert main(["route", "--explain", str(tmp_path / "in"), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "'Thorax B70f'  (8 instances): route sharp (model m)" in out
    assert "'Thorax STANDARD'  (8 instances): no route matches (unmatched = ignore)" in out
    assert "  sharp: no: Modality='CT' matches CT; ConvolutionKernel='STANDARD' does not" \
           " match B6* | B7*" in out
    assert main(["route", "--explain", str(tmp_path / "none"), "--config", str(config)]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def provenance_only_in_equipment():
    """A harmonised instance after a PACS stripped private tags: only the 109102 item is left."""
    d = ds(Modality="CT", ConvolutionKernel="B70f")
    purpose = ds(CodeValue="109102", CodingSchemeDesignator="DCM",
                 CodeMeaning="Processing Equipment")
    software = ds(Manufacturer="dicomnode", ManufacturerModelName="m",
                  SoftwareVersions=["dicomnode 1.0", "m 2.0"])
    software.PurposeOfReferenceCodeSequence = [purpose]
    d.ContributingEquipmentSequence = [software]
    return d


def test_dicomnodes_own_output_is_never_routed():
    routes = parse_routes([rule(Modality="CT")])
    decision = route_series([ds(Modality="CT"), provenance_only_in_equipment()], routes)
    assert decision.route is None and not decision.flagged
    assert decision.summary() == "already harmonised by dicomnode (m 2.0)"
    assert decision.explain() == ["  ! already harmonised by dicomnode (m 2.0): no rule is tried"]
    other = provenance_only_in_equipment()
    other.ContributingEquipmentSequence[0].Manufacturer = "OTHER"  # someone else's processing
    assert route_series([other], routes).route is not None


@pytest.fixture(scope="module")
def enhanced(tmp_path_factory):
    """One Enhanced CT and one Enhanced MR instance from the simulator."""
    root = tmp_path_factory.mktemp("enhanced")
    return {m: simulate_series(m, d, root / m, slices=2, size=32, enhanced=True)
            for m, d in (("CT", "siemens-b70f"), ("MR", "ge-1.5t-t1w"))}


def test_enhanced_instances_route_on_their_shared_functional_groups(enhanced):
    ct = parse_routes([rule("ct", Modality="CT", ConvolutionKernel="B7*", KVP=120)])
    decision = route_series(read_headers(enhanced["CT"]), ct)
    assert decision.route is not None, decision.explain()
    assert "ConvolutionKernel='B70f' matches B7*" in decision.explain()[0]
    mr = parse_routes([rule("mr", RepetitionTime="<1000", EchoTime="10..20", FlipAngle=90,
                            MagneticFieldStrength=1.5)])
    decision = route_series(read_headers(enhanced["MR"]), mr)
    assert decision.route is not None, decision.explain()


def per_frame_kernels(tmp_path, kernels):
    """Factory Enhanced CT whose frames each carry their own CT Reconstruction group."""
    path = write_enhanced_ct(tmp_path / f"{'-'.join(kernels)}.dcm", slices=len(kernels))
    data = dcmread(path)
    for item, kernel in zip(data.PerFrameFunctionalGroupsSequence, kernels, strict=True):
        item.CTReconstructionSequence = [ds(ConvolutionKernel=kernel)]
    data.save_as(path)
    return [data]


def test_enhanced_per_frame_values_route_when_they_agree_and_flag_when_not(tmp_path):
    routes = parse_routes([rule("sharp", ConvolutionKernel="B7*"), rule("any")])
    assert route_series(per_frame_kernels(tmp_path, ["B70f"] * 3), routes).route.name == "sharp"
    decision = route_series(per_frame_kernels(tmp_path, ["B70f", "B30f", "B70f"]), routes)
    assert decision.route is None
    assert "ConvolutionKernel differs across images" in decision.flagged
    assert decision.explain()[0] == "  ! ConvolutionKernel differs across images: B30f, B70f"
