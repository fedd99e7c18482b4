"""The running node: SCP server, completion sweeper and workers, started and stopped as one."""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from pynetdicom.transport import AddressInformation

from dicomnode import archive, commitment, outbox
from dicomnode.config import Config
from dicomnode.errors import UserError
from dicomnode.index import Index
from dicomnode.log import get_logger
from dicomnode.receive import RejectedInstance, parse_header
from dicomnode.scp import (
    ScpContext,
    build_ae,
    event_handlers,
    receive_into,
    start_server,
)
from dicomnode.storage import leftover_temp_files
from dicomnode.worker import Worker
from pipelines.files import atomic_write, fsync_dir

log = get_logger("service")

LOCK_FILE = "dicomnode.lock"
# Written by a stop that drained every association, job and scheduled task: the spool,
# archive and index then agree, and the next start need not walk them (see reconcile)
CLEAN_STOP = "clean-stop"


def lock_data_dir(data_dir: Path) -> int:
    """Hold an exclusive lock on ``data_dir`` for the life of this process (its fd).

    Start-up recovery deletes temporary files and requeues running work: done by a
    second node on the same folder it would corrupt a live node's state. The kernel
    drops the lock when the process ends, ``kill -9`` included.
    """
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise UserError(f"cannot use data_dir {data_dir}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"another dicomnode is using {data_dir}") from None
    return fd


def _cannot_listen(host: str, port: int, exc: OSError) -> UserError:
    return UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}")


def check_listen(host: str, port: int) -> None:
    """Bind (and release) the listening address the way pynetdicom will, so a node that
    cannot listen stops before recovery has changed anything."""
    try:
        address = AddressInformation(host, port)
        with socket.socket(address.address_family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address.as_tuple)
    except OSError as exc:
        raise _cannot_listen(host, port, exc) from None


def take_clean_stop(data_dir: Path) -> bool:
    """Whether the last node on ``data_dir`` stopped cleanly. The mark is removed, durably,
    before anything else happens: should this run crash, its start-up walks the spool."""
    try:
        (data_dir / CLEAN_STOP).unlink()
    except FileNotFoundError:
        return False
    fsync_dir(data_dir)
    return True


def mark_clean_stop(data_dir: Path) -> None:
    atomic_write(data_dir / CLEAN_STOP, lambda fh: fh.write(b"stopped cleanly\n"))


def reconcile(index: Index, config: Config, walk: bool = True) -> dict[str, int]:
    """Bring the spool, the archive and the index back in step after a crash.

    A temporary file in the spool, or a data set left in the incoming folder, was never
    acknowledged, one in the archive was never indexed (its job is rerun and writes it
    again): remove them. An unindexed whole file whose SOP Instance UID is indexed under
    another name is a replacement that was never indexed (so never acknowledged) or the
    copy a committed replacement superseded: the index is right, remove it. A whole
    spool file whose UID is not indexed at all was renamed into place just before the
    crash, also unacknowledged, but its bytes are whole, so index it rather than throw
    it away (the peer will resend it and the duplicate policy makes that harmless).

    After a clean stop (``walk=False``) none of that can be there, and walking millions of
    files would only delay listening: just the incoming folder is emptied.
    """
    data_dir, spool = config.node.data_dir, config.spool_dir
    removed = superseded = adopted = 0
    incoming = sorted(config.incoming_dir.iterdir()) if config.incoming_dir.exists() else []
    walked = (spool, config.archive_dir) if walk else ()
    for tmp in [*(t for root in walked for t in leftover_temp_files(root)),
                *(p for p in incoming if p.is_file())]:
        tmp.unlink(missing_ok=True)
        removed += 1
    known = index.known_paths() if walk else set()
    for root in walked:
        for path in (root.rglob("*.dcm") if root.exists() else ()):
            rel = str(path.relative_to(data_dir))
            if rel in known:
                continue
            data = path.read_bytes()
            try:
                record = parse_header(data)
            except RejectedInstance as exc:
                log.warning("spool_file_unreadable", path=rel, reason=str(exc))
                continue
            if index.instance(record.sop_instance_uid) is not None:
                path.unlink()
                superseded += 1
            elif root == spool:
                index.add_instance(record, rel, len(data), hashlib.sha256(data).hexdigest())
                adopted += 1
    return {"temp_removed": removed, "superseded_removed": superseded,
            "files_adopted": adopted}


class Node:
    """The node's moving parts; ``start`` returns once it accepts associations."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._lock = lock_data_dir(config.node.data_dir)
        self.index = Index(config.index_path)
        self.ae = build_ae(config)
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self._server = None
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def start(self) -> None:
        cfg = self.config
        check_listen(cfg.node.host, cfg.node.port)
        clean = take_clean_stop(cfg.node.data_dir)
        recovered = self.index.recover(cfg.node.max_job_attempts)
        reconciled = reconcile(self.index, cfg, walk=not clean)
        log.info("node_recovered", after_clean_stop=clean, **recovered, **reconciled)
        self.scheduler.add_job(self.sweep, "interval", seconds=cfg.node.sweep_interval,
                               id="series-completion", max_instances=1, coalesce=True)
        outbox.schedule(self.scheduler, cfg, self.index)  # return path: sends and purge
        archive.schedule(self.scheduler, cfg, self.index)
        commitment.schedule(self.scheduler, cfg, self.index)  # storage commitment reports
        self.scheduler.start()
        self.add_worker("harmonise", Worker(cfg, self.index).step)
        ctx = ScpContext(cfg, self.index)
        receive_into(cfg.incoming_dir)
        try:
            self._server = start_server(self.ae, (cfg.node.host, cfg.node.port),
                                        event_handlers(ctx), cfg.tls)
        except OSError as exc:  # taken since check_listen: only this start is affected
            raise _cannot_listen(cfg.node.host, cfg.node.port, exc) from None
        log.info("node_listening", ae_title=cfg.node.ae_title, host=cfg.node.host,
                 port=cfg.node.port, tls=cfg.tls.listening, data_dir=str(cfg.node.data_dir))

    def sweep(self) -> None:
        """Mark series that went quiet as complete and queue their jobs."""
        for series_uid, count in self.index.complete_quiet_series(self.config.node.series_timeout):
            log.info("series_complete", series_uid=series_uid, instances=count)

    def add_worker(self, name: str, step: Callable[[], bool], idle: float = 0.5) -> None:
        """Run ``step`` repeatedly in a thread; it returns False when there was nothing to do."""
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    busy = step()
                except Exception:  # a broken step must never take the node down
                    log.exception("worker_error", worker=name)
                    busy = False
                if not busy:
                    self._stop.wait(idle)
        thread = threading.Thread(target=loop, name=name, daemon=True)
        self._workers.append(thread)
        thread.start()

    def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let in-flight associations and jobs finish (up to ``grace`` s)."""
        if self._server is not None:
            self._server.shutdown()
        deadline = time.monotonic() + grace
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.1)
        drained = not self.ae.active_associations
        self.ae.shutdown()
        self._stop.set()
        for thread in self._workers:  # an idle one sees the stop within its 0.5 s nap
            thread.join(max(1.0, deadline - time.monotonic()))
        drained = drained and not any(thread.is_alive() for thread in self._workers)
        self.scheduler.shutdown(wait=True)
        self.sweep()  # series that went quiet while stopping are persisted as complete
        self.index.close()
        if drained:  # else an aborted transfer or job may have left files: walk next start
            mark_clean_stop(self.config.node.data_dir)
        os.close(self._lock)
        log.info("node_stopped", clean=drained)
