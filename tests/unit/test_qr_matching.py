"""C-FIND matching rules (PS3.4 C.2.2.2) and aggregation, as pure functions."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from dicomnode.store.query import (
    Key,
    Query,
    QueryError,
    aggregate,
    match,
    match_value,
    parse_identifier,
    response,
    retrieve_selection,
)


@pytest.mark.parametrize("vr, pattern, value, expected", [
    ("LO", "PHANTOM01", "PHANTOM01", True),
    ("LO", "PHANTOM0", "PHANTOM01", False),
    ("LO", "PHAN*", "PHANTOM01", True),
    ("LO", "PHANTOM0?", "PHANTOM01", True),
    ("LO", "phan*", "PHANTOM01", False),          # case-sensitive outside PN
    ("PN", "test^phantom", "Test^Phantom", True),  # PN: case-insensitive
    ("PN", "TEST*", "Test^Phantom", True),
    ("PN", "Other*", "Test^Phantom", False),
    ("CS", "DERIVED", "DERIVED\\SECONDARY\\AXIAL", True),  # any value of a multi-valued
    ("CS", "AXIAL", "DERIVED\\SECONDARY\\AXIAL", True),
    ("CS", "OTHER", "DERIVED\\SECONDARY\\AXIAL", False),
    ("UI", "1.2.3\\1.2.4", "1.2.4", True),         # UID list
    ("UI", "1.2.3\\1.2.4", "1.2.5", False),
    ("UI", "1.2.*", "1.2.3", False),               # no wildcards for UIDs
    ("DA", "20240101-20240131", "20240115", True),
    ("DA", "20240101-20240131", "20240201", False),
    ("DA", "-20231231", "20230615", True),
    ("DA", "20240102-", "20240102", True),
    ("DA", "20240102", "20240102", True),
    ("DA", "2024.01.02", "20240102", True),        # old ACR-NEMA form
    ("TM", "1000-1100", "101500", True),
    ("TM", "1000-1015", "101559.5", True),         # an end without seconds takes the minute
    ("TM", "1016-", "101500", False),
    ("TM", "10:15:00", "101500", True),
    ("TM", "-0800", "", False),                    # an empty value matches no range
    ("DA", "-20240101", "", False),
    ("DT", "20240101-20240102", "20240101120000", True),
    ("IS", "3", 3, True),
    ("DS", "3.0", "3", True),
    ("LO", "X", None, False),                      # absent never matches a value
    ("LO", "*[harmonised: ct-test]", "Thorax B70f [harmonised: ct-test]", True),  # [ is literal
    ("LO", "*[harmonised: ct-test]", "Thorax B70f h", False),
    ("LO", "[ab]*", "a", False),                   # no character classes
    ("LO", "*.?", "a.b", True),                    # regex characters match themselves
    ("LO", "*.?", "ab", False),
    ("LT", "first*", "first line\nsecond line", True),  # * spans line breaks
    ("PN", "*(x)*", "A (X) B", True),
])
def test_match_value(vr, pattern, value, expected):
    assert match_value(vr, pattern, value) is expected


def ident(**kw) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def test_parse_identifier_levels_and_roots():
    q = parse_identifier(ident(QueryRetrieveLevel="SERIES", StudyInstanceUID="1.2",
                               Modality="", SeriesDescription="*x*"))
    assert q.level == "SERIES"
    assert {k.keyword for k in q.filters()} == {"StudyInstanceUID", "SeriesDescription"}
    assert q.unique_values("StudyInstanceUID") == ["1.2"]
    with pytest.raises(QueryError):
        parse_identifier(ident(QueryRetrieveLevel="PATIENT"), "STUDY")
    with pytest.raises(QueryError):
        parse_identifier(ident(QueryRetrieveLevel="NOPE"))
    assert parse_identifier(ident(QueryRetrieveLevel="PATIENT"), "PATIENT").level == "PATIENT"


def test_a_retrieve_selects_by_its_unique_keys_only():
    q = retrieve_selection(parse_identifier(ident(
        QueryRetrieveLevel="SERIES", StudyInstanceUID="1.2", SeriesInstanceUID="1.2.3\\1.2.4",
        Modality="MR", PatientName="A*", SOPInstanceUID="9.9")))
    assert {k.keyword: k.value for k in q.keys} == {"StudyInstanceUID": "1.2",
                                                   "SeriesInstanceUID": "1.2.3\\1.2.4"}
    # a study named by its accession number, as some modalities do
    q = retrieve_selection(parse_identifier(ident(
        QueryRetrieveLevel="STUDY", AccessionNumber="ACC1", StudyInstanceUID="")))
    assert [(k.keyword, k.value) for k in q.keys] == [("AccessionNumber", "ACC1")]
    # relational: the keys above the level may be left out
    assert retrieve_selection(parse_identifier(ident(
        QueryRetrieveLevel="IMAGE", SOPInstanceUID="1.2.3.4"))).unique_values(
        "SOPInstanceUID") == ["1.2.3.4"]


@pytest.mark.parametrize("level, keys", [
    ("STUDY", {"StudyInstanceUID": ""}),           # would select every study
    ("STUDY", {"PatientID": "P1"}),                # the level's own key is missing
    ("STUDY", {"AccessionNumber": "ACC*"}),
    ("SERIES", {"StudyInstanceUID": "1.2", "SeriesInstanceUID": ""}),
    ("PATIENT", {"PatientID": "P*"}),              # no wildcards in a retrieve
    ("IMAGE", {"SeriesInstanceUID": "1.2.3", "SOPInstanceUID": "*"}),
])
def test_a_retrieve_without_its_unique_key_is_refused(level, keys):
    with pytest.raises(QueryError, match="retrieve needs") as err:
        retrieve_selection(parse_identifier(ident(QueryRetrieveLevel=level, **keys), "PATIENT"))
    assert err.value.status == 0xA900


def test_keys_below_the_level_do_not_filter():
    q = Query("STUDY", (Key("SOPInstanceUID", "UI", "9.9"),))
    assert match(q, {"StudyInstanceUID": "1"})


SERIES = [
    {"PatientID": "P1", "PatientName": "A^B", "StudyInstanceUID": "1.1", "StudyDate": "20240102",
     "SeriesInstanceUID": "1.1.1", "Modality": "CT", "NumberOfSeriesRelatedInstances": 4},
    {"PatientID": "P1", "PatientName": "A^B", "StudyInstanceUID": "1.1", "StudyDate": "20240102",
     "SeriesInstanceUID": "1.1.2", "Modality": "SR", "NumberOfSeriesRelatedInstances": 1},
    {"PatientID": "P1", "PatientName": "A^B", "StudyInstanceUID": "1.2", "StudyDate": "20230101",
     "SeriesInstanceUID": "1.2.1", "Modality": "MR", "NumberOfSeriesRelatedInstances": 3},
]


def test_aggregate_study_and_patient_counts():
    studies = {s["StudyInstanceUID"]: s for s in aggregate(SERIES, "STUDY")}
    assert studies["1.1"]["ModalitiesInStudy"] == "CT\\SR"
    assert studies["1.1"]["NumberOfStudyRelatedSeries"] == 2
    assert studies["1.1"]["NumberOfStudyRelatedInstances"] == 5
    assert "SeriesInstanceUID" not in studies["1.1"]
    [patient] = aggregate(SERIES, "PATIENT")
    assert (patient["NumberOfPatientRelatedStudies"], patient["NumberOfPatientRelatedSeries"],
            patient["NumberOfPatientRelatedInstances"]) == (2, 3, 8)
    q = Query("STUDY", (Key("ModalitiesInStudy", "CS", "MR\\PT"),))
    assert [s["StudyInstanceUID"] for s in aggregate(SERIES, "STUDY") if match(q, s)] == ["1.2"]


def test_response_has_every_requested_key_typed():
    q = parse_identifier(ident(QueryRetrieveLevel="SERIES", SeriesInstanceUID="",
                               SeriesNumber="", Modality="", NumberOfSeriesRelatedInstances="",
                               BodyPartExamined="", ImageType="", InstanceAvailability="",
                               TimezoneOffsetFromUTC="", RetrieveAETitle=""))
    rec = {"SeriesInstanceUID": "1.1.1", "SeriesNumber": 3, "Modality": "CT",
           "NumberOfSeriesRelatedInstances": 4, "ImageType": "DERIVED\\SECONDARY"}
    ds = response(q, rec, "HARMONISE")
    assert ds.QueryRetrieveLevel == "SERIES" and ds.RetrieveAETitle == "HARMONISE"
    assert ds.SeriesNumber == 3 and ds.NumberOfSeriesRelatedInstances == 4
    assert ds.BodyPartExamined in ("", None)  # requested, unknown: present and empty
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    # answered, never matched
    assert ds.InstanceAvailability == "ONLINE" and ds.TimezoneOffsetFromUTC in ("", None)
    assert match(parse_identifier(ident(QueryRetrieveLevel="STUDY", StudyInstanceUID="",
                                        InstanceAvailability="NEARLINE")), {})
    utf8 = response(q, {**rec, "Modality": "CT"}, None)
    assert "SpecificCharacterSet" not in utf8
    q = parse_identifier(ident(QueryRetrieveLevel="PATIENT", PatientName=""), "PATIENT")
    assert response(q, {"PatientID": "1", "PatientName": "Müller^Jörg"}).SpecificCharacterSet \
        == "ISO_IR 192"
