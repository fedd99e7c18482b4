"""Series state from its outbox rows: every row sent -> ``sent``; rows failed and none left
to try -> ``failed`` with the error; a source series follows its derived series."""

from __future__ import annotations

from collections.abc import Iterable

from dicomnode.log import get_logger
from dicomnode.store import sends
from dicomnode.store.index import Index, SeriesState
from dicomnode.store.sends import SendState

log = get_logger("outbox")

SEND_ERROR_PREFIX = "send to "


def send_error(destination: str, error: str) -> str:
    """A series' error for a send that failed, as ``dicomnode status`` shows it."""
    return f"{SEND_ERROR_PREFIX}{destination}: {error}"


def rollup(index: Index, series_uids: Iterable[str]) -> None:
    """Series state from its rows: all sent -> sent; failed and nothing left -> failed."""
    for uid in series_uids:
        counts = sends.state_counts(index, uid)
        if not counts or any(counts.get(s) for s in (SendState.PENDING, SendState.SENDING,
                                                     SendState.UNCERTAIN)):
            continue
        series = index.series(uid)
        if series is None:
            continue
        if counts.get(SendState.FAILED):
            last = sends.last_failure(index, uid)
            error, state = send_error(last["destination"], last["error"]), SeriesState.FAILED
        else:
            error, state = None, SeriesState.SENT
        if index.set_series_state(uid, state, only_if=[SeriesState.ARCHIVED, SeriesState.SENT,
                                                      SeriesState.FAILED], error=error):
            log.info(f"series_{state}", series_uid=uid, instances=sum(counts.values()),
                     error=error)
        if series["source_series_uid"]:
            _source_state(index, series["source_series_uid"], state, error)


def reopen(index: Index, series_uids: Iterable[str]) -> None:
    """A series with sends to do again is ``archived`` (derived) / ``harmonised`` (source)."""
    for uid in series_uids:
        index.set_series_state(uid, SeriesState.ARCHIVED,
                               only_if=[SeriesState.SENT, SeriesState.FAILED], error=None)
        src = index.series(uid)
        if src is not None and src["source_series_uid"]:
            _source_state(index, src["source_series_uid"], SeriesState.HARMONISED, None)


def _source_state(index: Index, uid: str, state: str, error: str | None) -> None:
    row = index.series(uid)
    if row is None:
        return
    # a source that failed for another reason (e.g. its harmonisation) keeps that reason
    if row["state"] == SeriesState.FAILED and \
            not (row["error"] or "").startswith(SEND_ERROR_PREFIX):
        return
    index.set_series_state(uid, state, only_if=[SeriesState.HARMONISED, SeriesState.SENT,
                                                SeriesState.FAILED], error=error)
