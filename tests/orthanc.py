"""Orthanc (the Debian package) as a real PACS peer for tests: one private instance per test.

Each instance gets its own storage folder, free DICOM and HTTP ports and a generated JSON
configuration without plugins; the REST API is used on loopback only
(``RemoteAccessAllowed = false``). Orthanc 1.10 has no option to bind its DICOM port to
one address, so its listener is on all interfaces, on a random free port, for the test's
lifetime only.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.nodeutil import free_port, spawn, wait_for

ORTHANC = Path("/usr/sbin/Orthanc")


def have_orthanc() -> bool:
    return ORTHANC.exists() or shutil.which("Orthanc") is not None


class Orthanc:
    """``Orthanc`` in a subprocess; ``modalities`` maps AE title -> (host, port); ``extra``
    sets further options (TLS, say)."""

    def __init__(self, folder: Path, aet: str = "ORTHANC",
                 modalities: dict[str, tuple[str, int]] | None = None,
                 dicom_port: int | None = None, extra: dict[str, Any] | None = None,
                 verbose: bool = True) -> None:
        self.folder, self.aet, self.verbose = folder, aet, verbose
        self.modalities = dict(modalities or {})
        self.extra = dict(extra or {})  # configuration options over the defaults below
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = folder / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def write_config(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": f"test-{self.aet}",
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "HttpThreadsCount": 4,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowMove": True,
            "DicomThreadsCount": 2,
            "DicomScuTimeout": 10,
            "DicomAssociationCloseDelay": 0,
            "DicomModalities": {aet: [aet, host, port]
                                for aet, (host, port) in self.modalities.items()},
            "ConcurrentJobs": 1,
            "StableAge": 1,
            "JobsHistorySize": 10,
            "SaveJobs": False,
            "OverwriteInstances": True,
            "UnknownSopClassAccepted": True,  # a Siemens site's PACS holds private classes
        }
        config.update(self.extra)
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self) -> Orthanc:
        config = self.write_config()
        self._log = self.log.open("ab")
        # --verbose logs one "Incoming Store request" line per C-STORE: counts receptions
        # (a benchmark leaves it out: Orthanc as installed logs less)
        self.proc = spawn([str(ORTHANC), *(["--verbose"] if self.verbose else []), str(config)],
                          stdout=self._log,
                          stderr=subprocess.STDOUT, cwd=self.folder)
        wait_for(lambda: self.proc.poll() is not None or self._alive(), 30,
                 what="Orthanc to start")
        assert self.proc.poll() is None, self.log.read_text(errors="replace")[-3000:]
        return self

    def _alive(self) -> bool:
        try:
            self.get("/system")
            return True
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None:
            self._log.close()
            self.proc = None

    # --- REST ---------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            raw = rsp.read()
        ctype = rsp.headers.get("Content-Type", "")
        return json.loads(raw) if raw and "json" in ctype else raw

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None, timeout: float = 60) -> Any:
        return self.request("POST", path, body if body is not None else {}, timeout)

    def instances(self) -> list[dict[str, Any]]:
        """Every stored instance's main tags (``/instances?expand``)."""
        return self.get("/instances?expand")

    def sop_uids(self) -> list[str]:
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in self.instances()]

    def tags(self, orthanc_id: str) -> dict[str, Any]:
        """Full tags of an instance, keyed by keyword (``/instances/{id}/tags?simplify``)."""
        return self.get(f"/instances/{orthanc_id}/tags?simplify")


    def store_requests(self, calling_aet: str | None = None) -> int:
        """C-STORE requests Orthanc received (duplicates included), from its log."""
        lines = self.log.read_text(errors="replace").splitlines()
        return sum(1 for line in lines if "Incoming Store request" in line
                   and (calling_aet is None or f"AET {calling_aet} " in line))

    def overwrites(self) -> int:
        """Instances Orthanc received a second time."""
        return self.log.read_text(errors="replace").count("Overwriting instance")

    def wait_instances(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        return wait_for(lambda: (found := self.instances()) and len(found) >= count and found,
                        timeout, interval=0.3, what=f"{count} instances in Orthanc")


# --- node-side helpers for the return-path tests ---------------------------------------

def seed_series(config_path: Path, files: list[Path], *, kind: str = "derived",
                send_to: tuple[str, ...] = (), source_series_uid: str | None = None) -> str:
    """Store ``files`` in a (stopped) node's data folder as the worker would, queue sends.

    ``kind='derived'`` files go to the archive as a harmonised series (state 'archived');
    returns the series UID.
    """
    from dicomnode.config import load_config
    from dicomnode.dispatch.outbox import enqueue_series
    from dicomnode.store.index import Index
    from dicomnode.store.ingest import parse_header, receive_instance

    cfg = load_config(config_path)
    index = Index(cfg.index_path)
    try:
        uid = ""
        for f in files:
            data = f.read_bytes()
            record = parse_header(data)
            receive_instance(data, record, index=index, data_dir=cfg.node.data_dir,
                             root=cfg.archive_dir if kind == "derived" else cfg.spool_dir,
                             reserve_bytes=0, duplicate_policy="replace", kind=kind)
            uid = record.series_uid
        if source_series_uid:
            index.set_series_state(uid, "archived", source_series_uid=source_series_uid)
        if send_to:
            enqueue_series(index, uid, list(send_to))
    finally:
        index.close()
    return uid
