"""The structural walk behind the node's one acceptance rule (pipelines.structure): every
cut, bad length and wrong syntax refused, every scanner quirk taken, values as pydicom
reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from pipelines.structure import (
    StructureError,
    header_dataset,
    header_values,
    index_value,
    walk,
    walk_file,
)
from tests.bad_data import broken, implicit_copy, quirks, split, truncations, wrong_syntax
from tests.dicom_factory import write_series

SOP_CLASS, ROWS, MODALITY = 0x00080016, 0x00280010, 0x00080060


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("structure")
    [explicit] = write_series(tmp, slices=1, size=8)
    return (*split(explicit), split(implicit_copy(explicit, tmp / "implicit.dcm"))[1])


def test_a_cut_is_taken_only_between_elements(base):
    meta, dataset, _ = base
    cases = list(truncations(meta, dataset))
    assert len(cases) > 100
    for name, data, _ in cases:
        whole = name.startswith("cut-after")
        try:
            walk(data)
        except StructureError:
            assert not whole, name
        else:
            assert whole, name


@pytest.mark.parametrize("index", range(13))
def test_broken_structure_is_refused_with_the_tag_and_lengths(base, index):
    meta, dataset, _ = base
    name, data = list(broken(meta, dataset))[index]
    if name == "empty-data-set":
        layout = walk(data)  # no element at all: whole, refused later for its missing UIDs
        assert not layout.elements
        return
    with pytest.raises(StructureError) as refused:
        walk(data)
    assert "Test^Phantom" not in str(refused.value)


def test_bytes_of_the_other_vr_encoding_are_refused_on_a_negotiated_context(base):
    meta, dataset, implicit_dataset = base
    for case in wrong_syntax(meta, dataset, implicit_dataset):
        with pytest.raises(StructureError):
            walk(case.data, case.syntax)


def test_scanner_quirks_are_taken_and_read_by_their_dictionary_vr(base):
    meta, dataset, _ = base
    reference = header_dataset(walk(meta + dataset, want={SOP_CLASS, ROWS, MODALITY}))
    for name, data in quirks(meta, dataset):
        ds = header_dataset(walk(data, want={SOP_CLASS, ROWS, MODALITY}))
        for tag in (SOP_CLASS, ROWS, MODALITY):
            assert ds[tag].value == reference[tag].value, (name, tag)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_bigendian.dcm",
                                  "image_dfl.dcm", "JPEG2000.dcm", "SC_rgb_jpeg.dcm",
                                  "ExplVR_BigEndNoMeta.dcm", "MR_small_RLE.dcm"])
def test_real_files_walk_and_read_as_pydicom_reads_them(name):
    path = get_testdata_file(name)
    ds = header_dataset(walk_file(path, want={SOP_CLASS, ROWS, MODALITY, 0x00100010}))
    reference = dcmread(path, force=True)
    assert ds.keys()
    for tag in ds.keys():
        assert ds[tag].value == reference[tag].value


@pytest.mark.parametrize("name", ["rtplan_truncated.dcm", "MR_truncated.dcm"])
def test_truncated_real_files_are_refused(name):
    with pytest.raises(StructureError):
        walk_file(get_testdata_file(name))


def _pydicom_values(layout) -> dict:
    ds = header_dataset(layout)
    out = {}
    for tag in ds.keys():
        try:
            out[tag] = index_value(ds[tag].value)
        except Exception as exc:
            out[tag] = type(exc)
    return out


def test_values_read_directly_are_those_pydicom_reads(base, tmp_path):
    """Every element of real files (many VRs, character sets, endiannesses) and of the
    generated ones, asked for whole: the direct decoding of header_values agrees with
    pydicom's, value for value."""
    from pydicom.data.data_manager import DATA_ROOT
    meta, dataset, _ = base
    buffers = [meta + dataset, *(data for _, data in quirks(meta, dataset))]
    # the files pydicom installs (get_testdata_files would also try to download more)
    buffers += [p.read_bytes() for p in sorted(Path(DATA_ROOT, "test_files").glob("*.dcm"))]
    compared = 0
    for data in buffers:
        try:
            layout = walk(data, want=None)
        except StructureError:
            continue
        direct = header_values(layout)
        expected = _pydicom_values(layout)
        for tag, value in expected.items():
            got = direct[tag]
            got = type(got) if isinstance(got, Exception) else got
            # as the index keeps them: JSON
            assert json.dumps(got, default=str) == json.dumps(value, default=str), (tag, got,
                                                                                  value)
            compared += 1
    assert compared > 2000
