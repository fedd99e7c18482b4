"""Verification SCP: C-ECHO."""

from __future__ import annotations

from typing import Any

from pynetdicom import evt
from pynetdicom.sop_class import Verification

from dicomnode.net.status import SUCCESS
from dicomnode.scp.context import ScpContext


def handle_echo(event: evt.Event, ctx: ScpContext) -> int:
    return SUCCESS


def add_verification_context(ae: Any) -> None:
    ae.add_supported_context(Verification)
