"""The node's Prometheus metrics, defined once and updated where things happen (one call
each in ``scp/``, ``dispatch/``, ``process/`` and the DICOMweb store); ``/metrics``
(:mod:`dicomnode.web.health`) exposes them with what the index knows at scrape time
(series by state, queue depth, disk free).

Labels stay bounded: a peer is a configured AE title (any other caller counts as
``other``), a destination a configured peer, a model a model folder name, a status a
DIMSE status code. No UID or patient attribute is ever a label.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

OTHER_PEER = "other"
_SECONDS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)

INSTANCES_RECEIVED = Counter("dicomnode_instances_received",
                             "Instances stored (C-STORE or STOW-RS)", ["via"])
BYTES_RECEIVED = Counter("dicomnode_received_bytes", "Bytes of instances stored", ["via"])
STORE_RESULTS = Counter("dicomnode_store_results",
                        "C-STORE / STOW-RS results by DIMSE status", ["via", "status"])
ASSOCIATIONS = Counter("dicomnode_associations",
                       "Associations asked for by peers, by how they went", ["peer", "result"])
JOB_SECONDS = Histogram("dicomnode_job_duration_seconds",
                        "Harmonisation jobs, claim to finish", buckets=_SECONDS)
INFERENCE_SECONDS = Histogram("dicomnode_inference_seconds",
                              "Inference time per harmonised series", ["model"],
                              buckets=_SECONDS)
HARMONISED_INSTANCES = Counter("dicomnode_harmonised_instances",
                               "Instances of the series harmonised", ["model"])
HARMONISE_SECONDS = Counter("dicomnode_harmonise_seconds",
                            "Load, inference and write time of harmonised series", ["model"])
SENDS = Counter("dicomnode_outbox_sends", "Instances delivered to a peer", ["destination"])
SEND_FAILURES = Counter("dicomnode_outbox_failures", "Failed instance send attempts",
                        ["destination"])
LAST_CONTACT = Gauge("dicomnode_peer_last_contact_timestamp_seconds",
                     "When a peer last associated with us (in) or took an instance (out)",
                     ["peer", "direction"])


def counts_store_status(via: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a store handler: every status it returns is counted under ``via``."""
    def wrap(handler: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(handler)
        def counted(*args: Any, **kwargs: Any) -> int:
            status = handler(*args, **kwargs)
            STORE_RESULTS.labels(via, f"0x{int(status):04X}").inc()
            return status
        return counted
    return wrap


def received(via: str, size: int) -> None:
    """One instance stored (its bytes on disk, indexed)."""
    INSTANCES_RECEIVED.labels(via).inc()
    BYTES_RECEIVED.labels(via).inc(size)


def association(calling_ae: str, known: bool, result: str) -> None:
    """An association of ``calling_ae`` (a configured peer when ``known``) was accepted,
    rejected, released or aborted."""
    peer = calling_ae.strip() if known else OTHER_PEER
    ASSOCIATIONS.labels(peer, result).inc()
    if result == "accepted":
        LAST_CONTACT.labels(peer, "in").set(time.time())


def harmonised(model: str, seconds: Mapping[str, float], instances: int) -> None:
    """A series harmonised by ``model``: its stage timings (load, inference, write)."""
    INFERENCE_SECONDS.labels(model).observe(seconds.get("inference", 0.0))
    HARMONISED_INSTANCES.labels(model).inc(instances)
    HARMONISE_SECONDS.labels(model).inc(sum(seconds.values()))


def sent(destination: str) -> None:
    SENDS.labels(destination).inc()
    LAST_CONTACT.labels(destination, "out").set(time.time())


def send_failed(destination: str, attempts: int = 1) -> None:
    SEND_FAILURES.labels(destination).inc(attempts)


def values(metric: Any) -> dict[tuple[str, ...], float]:
    """Each labelled child's value (a counter's total, a gauge's value) by its label
    values: for pages that show what /metrics shows."""
    return {tuple(s.labels.values()): s.value for family in metric.collect()
            for s in family.samples if not s.name.endswith("_created")}
