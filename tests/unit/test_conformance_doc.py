"""docs/conformance.md states what the code does: its identity and its C-FIND keys."""

from __future__ import annotations

import re

from dicomnode.store.query import LEVEL_KEYS
from pipelines import IMPLEMENTATION_CLASS_UID
from tests import ROOT

DOC = ROOT / "docs" / "conformance.md"


def _expand(cell: str) -> set[str]:
    """``NumberOfStudyRelated{Series,Instances}`` -> both keywords."""
    keys = set()
    for part in re.split(r",\s*(?![^{]*})", cell):
        if m := re.fullmatch(r"(\w+)\{([\w,]+)\}", part.strip()):
            keys |= {m[1] + suffix for suffix in m[2].split(",")}
        elif part.strip():
            keys.add(part.strip())
    return keys


def test_the_statement_names_our_implementation_class_uid():
    assert f"`{IMPLEMENTATION_CLASS_UID}`" in DOC.read_text()


def test_the_statements_c_find_keys_are_the_ones_answered():
    rows = re.findall(r"^\s*\| (PATIENT|STUDY|SERIES|IMAGE) \| (.+) \|$", DOC.read_text(), re.M)
    assert {level: _expand(cell) for level, cell in rows} == {
        level: set(keys) for level, keys in LEVEL_KEYS.items()}
