"""Fixtures shared by the unit and integration tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from dicomnode.store.index import Index
from tests.nodeutil import STARTED, NodeProcess, free_port, kill_started, write_config


@pytest.fixture(autouse=True, scope="session")
def _no_process_outlives_the_session() -> Iterator[None]:
    yield
    kill_started()


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[None]:
    """After each test: no node, Orthanc or Redis it started still runs (those of module
    fixtures, started before it, are theirs to stop), and structlog no longer writes to
    pytest's captured stderr (a command run in process points it there, and that stream
    closes with the test)."""
    before = len(STARTED)
    yield
    kill_started(since=before)
    structlog.reset_defaults()


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    """An empty index in the test's folder."""
    idx = Index(tmp_path / "index.sqlite")
    yield idx
    idx.close()


@pytest.fixture
def start_node(tmp_path: Path) -> Callable[..., NodeProcess]:
    """Start ``dicomnode serve`` on a free port with the test settings of
    :func:`tests.nodeutil.write_config` (``extra_node`` / ``extra`` TOML added), data in
    ``tmp_path/var`` and its JSON log in ``tmp_path/node.log``; ``.port`` is where it
    listens. Whatever a test leaves running is killed after it."""

    def start(extra_node: str = "", extra: str = "", **settings: float) -> NodeProcess:
        port = free_port()
        config = write_config(tmp_path / "node.toml", port, tmp_path / "var",
                              extra_node=extra_node, extra=extra, **settings)
        node = NodeProcess(config, tmp_path / "node.log").start()
        node.port = port
        return node

    return start
