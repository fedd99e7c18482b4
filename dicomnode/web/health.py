"""``/metrics`` (Prometheus text format), ``/healthz`` (the process serves) and ``/readyz``
(the index answers and the DICOM listener is up: 503 otherwise, for systemd and
Kubernetes probes).

/metrics is :mod:`dicomnode.metrics`' counters and histograms (with the process and
Python collectors), plus gauges read from the index at scrape time.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from dicomnode.store import browse
from dicomnode.web.context import WebContext, context_of


class IndexCollector:
    """Gauges from the index and the disk, read at each scrape."""

    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        index = self.ctx.index
        series = GaugeMetricFamily("dicomnode_series", "Series in the index by state",
                                   labels=["state"])
        for state, count in browse.state_counts(index).items():
            series.add_metric([state], count)
        yield series
        yield GaugeMetricFamily("dicomnode_queue_depth", "Harmonisation jobs waiting",
                                value=browse.queue_depth(index))
        yield GaugeMetricFamily("dicomnode_jobs_running", "Harmonisation jobs running",
                                value=len(browse.running_jobs(index)))
        waiting = GaugeMetricFamily("dicomnode_outbox_waiting",
                                    "Instance sends not yet confirmed, by destination and state",
                                    labels=["destination", "state"])
        for peer in self.ctx.config.peers:
            for state, count in browse.peer_sends(index, peer.ae_title)["waiting"].items():
                waiting.add_metric([peer.ae_title, state], count)
        yield waiting
        disk = self.ctx.disk()
        yield GaugeMetricFamily("dicomnode_disk_free_bytes", "Free bytes where data_dir is",
                                value=disk["free"])
        yield GaugeMetricFamily("dicomnode_disk_reserve_bytes",
                                "Free space the node keeps (disk_reserve_mb)",
                                value=disk["reserve"])


def metrics(request: Request) -> Response:
    scrape = CollectorRegistry()
    scrape.register(IndexCollector(context_of(request)))
    return Response(generate_latest(REGISTRY) + generate_latest(scrape),
                    media_type=CONTENT_TYPE_LATEST)


def healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n")


def readyz(request: Request) -> Response:
    ctx = context_of(request)
    problems = []
    try:
        ctx.index.db.execute("SELECT 1 FROM series LIMIT 1").fetchall()
    except sqlite3.Error as exc:
        problems.append(f"index: {exc}")
    if not ctx.listening():
        problems.append("DICOM listener: not accepting associations")
    if problems:
        return PlainTextResponse("\n".join(problems) + "\n", 503)
    return PlainTextResponse("ready\n")


ROUTES = [Route("/metrics", metrics), Route("/healthz", healthz), Route("/readyz", readyz)]
