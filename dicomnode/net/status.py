"""DIMSE status codes the node answers or reads (PS3.4, PS3.7 Annex C), in one place.

Handlers return these; a response's status is read with :func:`response_status` and
judged with :func:`succeeded`.
"""

from __future__ import annotations

from typing import Any

from pynetdicom.status import code_to_category

SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00

# C-STORE (PS3.4 B.2.3), C-FIND/C-MOVE/C-GET (C.4)
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900   # data set / identifier does not match the SOP class (or request)
CANNOT_UNDERSTAND = 0xC000  # also C-FIND's "unable to process"
UNABLE_TO_PROCESS = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122  # C-STORE, C-FIND, C-MOVE, C-GET alike

# N-ACTION (storage commitment) statuses and Failure Reasons (PS3.4 Annex J)
PROCESSING_FAILURE = 0x0110
NO_SUCH_SOP_INSTANCE = 0x0112  # also the Failure Reason "no such object instance"
INVALID_ARGUMENT_VALUE = 0x0115
CLASS_INSTANCE_CONFLICT = 0x0119
NO_SUCH_ACTION = 0x0123
RESOURCE_LIMITATION = 0x0213

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason
REJECTED_PERMANENT, REJECTED_TRANSIENT = 0x01, 0x02
SERVICE_USER, SERVICE_PROVIDER_PRESENTATION = 0x01, 0x03
CALLING_AE_NOT_RECOGNISED = 0x03
CALLED_AE_NOT_RECOGNISED = 0x07
LOCAL_LIMIT_EXCEEDED = 0x02  # with SERVICE_PROVIDER_PRESENTATION


def response_status(response: Any) -> int | None:
    """The Status of a DIMSE response data set, or None when there was no answer
    (pynetdicom returns an empty data set on a timeout or abort)."""
    return int(response.Status) if response is not None and "Status" in response else None


def category(code: int | None) -> str | None:
    """pynetdicom's category of a status ("Success", "Warning", "Pending", "Failure",
    "Cancel"), or None for no answer."""
    return None if code is None else code_to_category(code)


def succeeded(code: int | None) -> bool:
    """Whether a final response took the request: Success or Warning."""
    return category(code) in ("Success", "Warning")


def describe(code: int | None) -> str:
    """A status for logs and errors: ``status 0xA700 (Failure)`` or ``no response``."""
    return "no response (timeout or abort)" if code is None else \
        f"status 0x{code:04X} ({category(code)})"
