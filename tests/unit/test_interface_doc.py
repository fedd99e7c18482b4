"""docs/interface.md, the users' reference, keeps up with the code: every command has its
section and every config key its row."""

from __future__ import annotations

from dataclasses import fields

from dicomnode.cli import COMMANDS
from dicomnode.config import (
    ArchiveSettings,
    ClusterSettings,
    NodeSettings,
    OutboxSettings,
    WebSettings,
)
from dicomnode.tls import TlsSettings
from pipelines.settings import InferenceSettings
from tests import ROOT

DOC = (ROOT / "docs" / "interface.md").read_text()


def test_every_command_has_its_section():
    missing = [c for c in COMMANDS if f"### `dicomnode {c}" not in DOC]
    assert not missing


def test_every_config_key_has_its_row():
    tables = {"node": NodeSettings, "inference": InferenceSettings, "outbox": OutboxSettings,
              "archive": ArchiveSettings, "tls": TlsSettings, "web": WebSettings,
              "cluster": ClusterSettings}
    missing = [f"[{t}] {f.name}" for t, cls in tables.items() for f in fields(cls)
               if f"| `{f.name}` |" not in DOC]
    assert not missing
