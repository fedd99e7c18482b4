"""Structured JSON logging (structlog) for every part of the node.

Events carry UIDs, AE titles and counts; never PatientName or PatientID. The
``redact`` processor enforces that even when a caller passes one by mistake.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from pydicom import config as pydicom_config

_FORBIDDEN = {"PatientName", "PatientID", "patient_name", "patient_id", "PatientBirthDate"}


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in _FORBIDDEN & event.keys():
        event[key] = "<redacted>"
    return event


class _CurrentStderr:
    """Whatever ``sys.stderr`` is at write time (it may be swapped after configuration)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(level: str = "info", stream: Any = None) -> None:
    """Send JSON lines to ``stream`` (the current stderr by default) at ``level`` and above."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(stream or _CurrentStderr()),
        cache_logger_on_first_use=False,
    )
    # pynetdicom and apscheduler log through stdlib logging; keep their noise at warning.
    logging.basicConfig(level=logging.WARNING, stream=stream or _CurrentStderr(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # pydicom's read-time validation warns with the offending value quoted (a patient's
    # name in a malformed IS); instances are kept as received, so nothing is validated
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(component=name)
