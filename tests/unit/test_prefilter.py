"""The SQL prefilter of queries (dicomnode.store.prefilter): its candidates are a superset
of what matching accepts, so every level's answer is the one of matching every series."""

from __future__ import annotations

import random
import re

import pytest

from dicomnode.store import bulk
from dicomnode.store.index import _SPACES, Index, InstanceRecord
from dicomnode.store.lookup import matches, series_records
from dicomnode.store.prefilter import condition
from dicomnode.store.query import Key, Query, aggregate, match

# stored values: plain, and every kind the indexes do not order as matching compares them
TEXT = ["ABC", "abc", "ABC ", " ABC", "\u3000ABC", "AB", "ABD", "A\\B", "B\\ABC", "A*C",
        "Smith^John", "smith^john^^", "SMITH", "\u017fmith", "\u212aelvin", "kelvin",
        "\u0130stanbul", "istanbul", "\u0131i", "M\u00fcller", "M\u00dcLLER", "Z\U0010ffff",
        "CT", "MR", "ct", "P1", "P12", "P123", 123, 1.5, ["CT", "MR"], "", None, "?", "[a]"]
DATES = ["20240101", "20240102", "20240131", "20240201", "2024.01.02", "2024-01-02",
         "20240102 ", " 20240102", "20240101\\20240301", 20240102, "2024", "", None]
TEXT_PATTERNS = ["ABC", "abc", "AB*", "A?C", "*BC", "A*", "ab*", "a\\ABC", "ABC\\B",
                 "smith^john", "SMITH*", "smith", "s*", "S*", "k*", "KELVIN", "i*", "I*",
                 "istanbul", "\u0130*", "m\u00fcller", "M\u00fc*", "Z\U0010ffff", "Z*", "CT",
                 "C?", "P1*", "P12", "123", "1.5", "MR", "[a]", "?", "A*C", "\\", "^"]
DATE_PATTERNS = ["20240102", "20240101-20240131", "-20240101", "20240102-", "2024.01.02",
                 "20240101-20240101", "20240201-20240101", "-", "2024", "20240102\\20240201",
                 "20240131-\\-20240101", "2024.01.01-2024.01.31"]
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
KEYWORDS = {"StudyDate": ("DA", DATES, DATE_PATTERNS),
            "AccessionNumber": ("SH", TEXT, TEXT_PATTERNS),
            "PatientID": ("LO", TEXT, TEXT_PATTERNS),
            "PatientName": ("PN", TEXT, TEXT_PATTERNS),
            "Modality": ("CS", TEXT, TEXT_PATTERNS)}


def test_the_leading_spaces_are_pythons():
    assert set(_SPACES) == {c for c in range(0x110000) if chr(c).isspace()}


def test_case_insensitive_matching_folds_only_the_characters_the_index_folds():
    """Python's case-insensitive matching and lower() equate four non-ASCII characters
    with an ASCII letter; the person-name expression folds exactly those."""
    folded = set()
    for code in range(0x80, 0x110000):
        char = chr(code)
        if 0xD800 <= code < 0xE000:
            continue
        if any(c.isascii() for c in char.lower()) or any(
                re.fullmatch(re.escape(a), char, re.IGNORECASE) for a in "iksIKS"):
            folded.add(code)
    assert folded == {304, 305, 383, 8490}


def _fill(index: Index, rng: random.Random, series: int) -> None:
    rows = []
    for n in range(series):
        study = f"1.2.3.{n // 3}"
        uid = f"1.2.4.{n}"
        for i in range(rng.choice((1, 2))):
            attrs: dict = {"StudyInstanceUID": study, "SeriesInstanceUID": uid,
                           "SOPInstanceUID": f"{uid}.{i}", "SOPClassUID": CT_IMAGE}
            for keyword, (_, values, _) in KEYWORDS.items():
                value = rng.choice(values)
                if value is not None:
                    attrs[keyword] = value
            record = InstanceRecord(f"{uid}.{i}", attrs["SOPClassUID"], uid, study,
                                    "1.2.840.10008.1.2.1", None, rng.choice((1, 2, None)),
                                    attrs)
            rows.append(bulk.BulkInstance(record, 1000.0 + n + i / 10, "harmonised"))
    bulk.insert(index, rows)


def _reference(index: Index, query: Query) -> list[dict]:
    """Every series read and matched, as before the prefilter."""
    return [r for r in aggregate(series_records(index, query), query.level) if match(query, r)]


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    index = Index(tmp_path_factory.mktemp("prefilter") / "index.sqlite")
    _fill(index, random.Random(34), 240)
    yield index
    index.close()


@pytest.fixture(scope="module")
def every_value(tmp_path_factory):
    """One series per keyword and stored value, of one instance with that value alone."""
    index = Index(tmp_path_factory.mktemp("values") / "index.sqlite")
    rows = []
    for keyword, (_, values, _) in KEYWORDS.items():
        for n, value in enumerate(values):
            uid = f"1.2.5.{keyword}.{n}"
            attrs = {} if value is None else {keyword: value}
            record = InstanceRecord(f"{uid}.1", "1.2.840.10008.5.1.4.1.1.2", uid, "1.2.6",
                                    "1.2.840.10008.1.2.1", None, 1, attrs)
            rows.append(bulk.BulkInstance(record, 1000.0 + len(rows), "harmonised"))
    bulk.insert(index, rows)
    yield index
    index.close()


@pytest.mark.parametrize("keyword", sorted(KEYWORDS))
def test_candidates_are_a_superset_of_the_matches(every_value, keyword):
    vr, _, patterns = KEYWORDS[keyword]
    narrowed = 0
    for pattern in patterns:
        key = Key(keyword, vr, pattern)
        query = Query("SERIES", (key,))
        accepted = {r["SeriesInstanceUID"] for r in series_records(every_value, query)
                    if match(query, r)}
        found = condition(key)
        if found is None:
            continue
        sql, args = found.series()
        candidates = {r[0] for r in every_value.db.execute(sql, args)
                      if r[0].startswith(f"1.2.5.{keyword}.")}
        assert accepted <= candidates, (keyword, pattern, accepted - candidates)
        narrowed += len(candidates) < len(KEYWORDS[keyword][1])
    assert narrowed >= len(patterns) // 2  # and it does narrow


def test_study_keys_on_series_narrow_studies_by_modality(filled):
    key = Key("ModalitiesInStudy", "CS", "CT")
    assert condition(key) is not None


@pytest.mark.parametrize("level", ["SERIES", "STUDY", "PATIENT", "IMAGE"])
def test_answers_are_those_of_matching_every_series(filled, level):
    rng = random.Random(level)
    for _ in range(60):
        keys = []
        for keyword in rng.sample(sorted(KEYWORDS), rng.choice((1, 1, 2))):
            vr, _, patterns = KEYWORDS[keyword]
            keys.append(Key(keyword, vr, rng.choice(patterns)))
        if level == "STUDY" and rng.random() < 0.3:
            keys.append(Key("ModalitiesInStudy", "CS", rng.choice(TEXT_PATTERNS)))
        keys.append(Key("NumberOfStudyRelatedSeries", "IS", ""))
        query = Query(level, tuple(keys))
        if level == "IMAGE":
            expected = None  # image level: the same with and without a limit
        else:
            expected = _reference(filled, query)
        got = list(matches(filled, query))
        if expected is not None:
            assert got == expected, keys


def test_studies_in_the_order_of_their_first_series(filled):
    query = Query("STUDY", ())
    assert list(matches(filled, query))[:10] == _reference(filled, query)[:10]


@pytest.mark.parametrize("level", ["SERIES", "STUDY", "PATIENT", "IMAGE"])
def test_skipped_records_are_the_first_matches(filled, level):
    for keys in ((), (Key("PatientID", "LO", "P1*"),)):
        query = Query(level, keys)
        every = list(matches(filled, query))
        for skip in (0, 1, 7, len(every), len(every) + 3):
            assert list(matches(filled, query, skip)) == every[skip:], (keys, skip)
