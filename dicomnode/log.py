"""Structured JSON logging (structlog) for every part of the node.

Events carry UIDs, AE titles and counts; never PatientName or PatientID. The
``redact`` processor enforces that even when a caller passes one by mistake.

Everything goes through one stdlib handler with a structlog ``ProcessorFormatter``, so
every line on stderr is one JSON object: our events, the libraries' stdlib loggers
(pynetdicom, apscheduler, pydicom), Python warnings, exceptions that end a thread and
those Python can only ignore (a finaliser's) alike. Exceptions are logged
as their traceback frames and type, never their message: parser and codec messages
quote element bytes, and with them a patient's name. Libraries never log below
WARNING, whatever our level: pynetdicom's INFO/DEBUG output dumps identifiers and PDUs.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from typing import Any

import structlog
from pydicom import config as pydicom_config
from pynetdicom import _config as pynetdicom_config

_FORBIDDEN = {"PatientName", "PatientID", "patient_name", "patient_id", "PatientBirthDate"}
LOGGER = "dicomnode"  # the stdlib logger every structlog event goes through

# Libraries' loggers: never below WARNING; some expected conditions not even that.
_LIBRARY_LEVELS = {
    "pynetdicom": logging.WARNING,
    "apscheduler": logging.WARNING,
    # "skipped: maximum number of running instances reached": a long pass (max_instances=1)
    "apscheduler.executors": logging.ERROR,
    # warn_and_log: logged here and issued as a warning (captured below): once is enough
    "pydicom": logging.ERROR,
}

_handler: logging.Handler | None = None


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in _FORBIDDEN & event.keys():
        event[key] = "<redacted>"
    return event


def _exception(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """Render ``exc_info`` as traceback frames plus the exception type, no message."""
    exc_info = event.pop("exc_info", None)
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if exc_info and exc_info[0] is not None:
        kind = exc_info[0]
        event["exception"] = "".join(traceback.format_tb(exc_info[2])) + \
            f"{kind.__module__}.{kind.__qualname__}"
    return event


def _foreign(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """A record from another library's stdlib logger: say whose. An exception logged as
    the message (pynetdicom: ``LOGGER.exception(exc)``) becomes its type; of a Python
    warning keep the first line (the source line quoted after it adds nothing)."""
    record: logging.LogRecord = event["_record"]
    event["logger"] = record.name
    if isinstance(record.msg, BaseException):
        event["event"] = type(record.msg).__name__
    elif record.name == "py.warnings":
        event["event"] = str(event["event"]).strip().splitlines()[0]
    return event


class _CurrentStderr:
    """Whatever ``sys.stderr`` is at write time (it may be swapped after configuration)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(level: str = "info", stream: Any = None) -> None:
    """Send JSON lines to ``stream`` (the current stderr by default) at ``level`` and above."""
    global _handler
    numeric = logging.getLevelNamesMapping()[level.upper()]
    shared = [structlog.contextvars.merge_contextvars, structlog.stdlib.add_log_level,
              structlog.processors.TimeStamper(fmt="iso", utc=True), _redact]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: logging.getLogger(LOGGER),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream or _CurrentStderr())
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, _foreign],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _exception,
                    structlog.processors.JSONRenderer()]))
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    _handler = handler
    logging.getLogger(LOGGER).setLevel(numeric)
    for name, library_level in _LIBRARY_LEVELS.items():
        logging.getLogger(name).setLevel(library_level)
    logging.captureWarnings(True)
    # no identifier or PDU dumps from pynetdicom, whatever a logger's level is set to
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    threading.excepthook = _thread_crashed
    sys.unraisablehook = _unraisable
    # pydicom's read-time validation warns with the offending value quoted (a patient's
    # name in a malformed IS); instances are kept as received, so nothing is validated
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


def _thread_crashed(args: threading.ExceptHookArgs) -> None:
    """An exception no one caught ended a thread (pynetdicom's reactor aborting an
    association, say): one JSON event, not Python's plain-text traceback on stderr."""
    if args.exc_type is SystemExit:
        return
    structlog.get_logger(component="thread").error(
        "thread_crashed", thread=getattr(args.thread, "name", None),
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _unraisable(args: Any) -> None:
    """An exception Python could not raise (a file's finaliser failing to flush on a full
    disk, say): one JSON event instead of "Exception ignored in ..." on stderr."""
    structlog.get_logger(component="python").error(
        "exception_ignored", where=getattr(args.object, "__qualname__", None) or
        type(args.object).__name__, exc_info=(args.exc_type, args.exc_value,
                                              args.exc_traceback))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(component=name)
