"""Helpers for tests that run the real node as a subprocess and talk to it with real peers."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt, register_uid
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet, uid_to_service_class

DCMTK_DIR = Path("/usr/bin")
# Every server process a test starts (node, Orthanc, Redis): conftest kills the survivors
# after each test, so a failed assertion never leaves one listening into the next test.
STARTED: list[subprocess.Popen[bytes]] = []


def spawn(args: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(args)``, remembered in :data:`STARTED`."""
    proc = subprocess.Popen(list(args), **kwargs)
    STARTED.append(proc)
    return proc


def kill_started(since: int = 0) -> None:
    """Kill (SIGKILL) every process :func:`spawn` started (the ``since``-th and later) that
    is still running."""
    while len(STARTED) > since:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def dcmtk(tool: str) -> str:
    """Path of a dcmtk program: pynetdicom installs look-alike scripts earlier on PATH."""
    path = DCMTK_DIR / tool
    if not path.exists():
        raise FileNotFoundError(f"dcmtk's {tool} not found in {DCMTK_DIR}: apt-get install dcmtk")
    return str(path)


def dcmtk_env() -> dict[str, str]:
    """dcmtk leaves Nagle on by default; small DIMSE messages then wait for delayed ACKs."""
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.1,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; bounded in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def write_config(path: Path, port: int, data_dir: Path, extra_node: str = "",
                 extra: str = "", series_timeout: float = 1.5) -> Path:
    path.write_text(f"""
[node]
ae_title = "HARMONISE"
host = "127.0.0.1"
port = {port}
data_dir = "{data_dir}"
series_timeout = {series_timeout}
sweep_interval = 0.2
disk_reserve_mb = 1
{extra_node}
{extra}
""")
    return path


class NodeProcess:
    """``dicomnode serve`` in a subprocess, logging JSON lines to a file."""

    def __init__(self, config: Path, log: Path, file_size_limit: int | None = None) -> None:
        self.config, self.log = config, log
        self.file_size_limit = file_size_limit  # RLIMIT_FSIZE: its files cannot grow more
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None  # set by whoever knows it (the start_node fixture)

    def start(self) -> NodeProcess:
        before = len(self.events("node_listening")) if self.log.exists() else 0
        self._log = self.log.open("ab")
        limit = self.file_size_limit
        self.proc = spawn(
            [sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(self.config)],
            stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=None if limit is None else
            lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
        wait_for(lambda: self.proc.poll() is not None or
                 len(self.events("node_listening")) > before, 60, what="node to listen")
        assert self.proc.poll() is None, self.log.read_text()
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return log_events(self.log, name)


def log_events(log: Path, name: str | None = None) -> list[dict[str, Any]]:
    """The JSON events (named ``name``) a process wrote to ``log``."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if name is None or event.get("event") == name:
                out.append(event)
    return out


class WorkerProcess:
    """``dicomnode worker`` in a subprocess (``--name NAME@test``), logging to a file."""

    def __init__(self, config: Path, log: Path, name: str, *args: str) -> None:
        self.config, self.log, self.name = config, log, f"{name}@test"
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> WorkerProcess:
        """Start it; :meth:`ready` waits until it takes jobs (start several, then wait)."""
        with self.log.open("ab") as out:
            self.proc = spawn([sys.executable, "-m", "dicomnode.cli", "worker", "--config",
                               str(self.config), "--name", self.name, *self.args],
                              stdout=out, stderr=subprocess.STDOUT)
        return self

    def ready(self) -> WorkerProcess:
        assert self.proc is not None
        wait_for(lambda: self.proc.poll() is not None or self.events("worker_ready"), 90,
                 what=f"worker {self.name}")
        assert self.proc.poll() is None, self.log.read_text()
        return self

    def start(self) -> WorkerProcess:
        return self.launch().ready()

    def kill(self) -> None:
        """``kill -9`` the worker's main process (its pool processes die with it)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return log_events(self.log, name)


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomnode.cli", *args], capture_output=True,
                          text=True, check=check, timeout=120)


def status(config: Path) -> dict[str, dict[str, Any]]:
    out = json.loads(cli("status", "--config", str(config), "--json").stdout)
    return {s["series_uid"]: s for s in out["series"]}


def storescu(port: int, files: Sequence[Path], aet: str = "MODALITY", check: bool = True,
             options: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Send files with dcmtk's storescu (``options`` e.g. ``-xv`` to propose JPEG 2000)."""
    return subprocess.run([dcmtk("storescu"), "-aet", aet, "-aec", "HARMONISE", "--required",
                           *options, "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, check=check, timeout=300,
                          env=dcmtk_env())


def getscu_study(port: int, study_uid: str, out: Path) -> subprocess.CompletedProcess[str]:
    """C-GET one study from the node with dcmtk's getscu into ``out`` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run([dcmtk("getscu"), "-S", "-aec", "HARMONISE", "-k",
                           "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                           "-od", str(out), "127.0.0.1", str(port)], capture_output=True,
                          text=True, timeout=120, env=dcmtk_env())


def scanner_store(port: int, files: Sequence[Path], aet: str = "MODALITY",
                  called: str = "HARMONISE") -> list[int]:
    """C-STORE ``files`` over one association that proposes exactly their SOP classes, as a
    scanner's own software does (private classes included); the status of each."""
    datasets = [dcmread(f) for f in files]
    ae = AE(ae_title=aet)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, f"{called} refused the association"
    try:
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()


def get_series(port: int, study_uid: str, series_uid: str, sop_class: str) -> list[Dataset]:
    """C-GET one series of ``sop_class`` instances with a pynetdicom SCU (taking the
    Storage SCP role for that class, private ones included); the data sets received."""
    got: list[Dataset] = []
    if uid_to_service_class(sop_class) is ServiceClass:  # pynetdicom serves known ones only
        register_uid(sop_class, "Storage_" + sop_class.replace(".", "_"), StorageServiceClass)

    def keep(event: evt.Event) -> int:
        got.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="HARMONISE",
                         ext_neg=[build_role(sop_class, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, keep)])
    assert assoc.is_established, "the node refused the association"
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID, query.SeriesInstanceUID = study_uid, series_uid
    try:
        final = [rsp for rsp, _ in assoc.send_c_get(
            query, StudyRootQueryRetrieveInformationModelGet)][-1]
    finally:
        assoc.release()
    assert final.Status == 0x0000, f"C-GET ended with 0x{final.Status:04X}"
    return got


def dataset_bytes(path: Path) -> bytes:
    """A Part 10 file's data set as encoded, after its file meta information."""
    raw = path.read_bytes()
    meta = dcmread(path, stop_before_pixels=True).file_meta
    return raw[132 + 12 + meta.FileMetaInformationGroupLength:]


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
