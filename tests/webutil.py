"""Helpers for tests of the node's web side: a node with ``[web]`` and a route to a tiny
model, and reading its pages and metrics over real HTTP."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.model_factory import make_plain_model
from tests.nodeutil import NodeProcess, free_port

ROUTE = """
[[routes]]
name = "ct-sharp"
model = "ct-test"
send_to = {send_to}
[routes.match]
Modality = "CT"
ConvolutionKernel = "B7*"
"""


def web_node(start_node: Callable[..., NodeProcess], tmp_path: Path, *, web: str = "",
             node: str = "", send_to: str = "[]", peers: str = "") -> tuple[NodeProcess, str]:
    """A node whose route ``ct-sharp`` (CT, kernel B7*) runs a tiny model, with ``[web]`` on
    a free port (``web``: more keys); the node and its console's base URL."""
    models = tmp_path / "models"
    if not (models / "ct-test").exists():
        make_plain_model(models, "ct-test")
    port = free_port()
    started = start_node(extra_node=f'models_dir = "{models}"\n{node}',
                         extra=ROUTE.format(send_to=send_to) + peers
                         + f"\n[web]\nport = {port}\n{web}\n")
    if "0.0.0.0" in web:  # the test PKI's certificates name localhost
        return started, f"https://localhost:{port}"
    return started, f"http://127.0.0.1:{port}"


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the Prometheus ``text`` (None when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def audit_entries(data_dir: Path) -> list[dict[str, Any]]:
    path = data_dir / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def get(url: str, **kwargs: Any) -> requests.Response:
    return requests.get(url, timeout=60, **kwargs)
