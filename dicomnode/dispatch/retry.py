"""The retry policy for deliveries to peers (outbox sends, storage commitment reports).

A failed attempt is retried after ``retry_initial * 2**(attempts-1)`` seconds, capped at
``retry_max_interval``; one first queued more than ``max_age_hours`` ago (or failing for
a reason that cannot go away) is given up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dicomnode.config import OutboxSettings


@dataclass(frozen=True)
class Retry:
    """What one failed attempt leads to: given up, or another attempt after ``delay`` s."""

    given_up: bool
    delay: float
    at: float  # when the next attempt is due


def backoff(attempts: int, initial: float, maximum: float) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1-based)."""
    return min(maximum, initial * 2 ** max(0, min(attempts - 1, 60)))


def after_failure(settings: OutboxSettings, attempts: int, created: float, now: float,
                  permanent: bool = False) -> Retry:
    """The outcome of the ``attempts``-th failed attempt of a delivery first queued at
    ``created``: given up when ``permanent`` or older than ``max_age_hours``."""
    given_up = permanent or now - created >= settings.max_age_hours * 3600
    delay = backoff(attempts, settings.retry_initial, settings.retry_max_interval)
    return Retry(given_up, delay, now + delay)


def log_failure(log: Any, retry: Retry, given_up_event: str, retry_event: str,
                delays: list[float] | None = None, **fields: Any) -> None:
    """One event for a failed attempt (or several, ``delays`` each): an error when given
    up, else a warning with the time to the next attempt."""
    if retry.given_up:
        log.error(given_up_event, **fields)
    else:
        log.warning(retry_event, retry_in_s=round(min(delays or [retry.delay]), 3), **fields)
