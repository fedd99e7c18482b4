"""The running node: SCP server, completion sweeper and workers, started and stopped as one."""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from pynetdicom.transport import AddressInformation

from dicomnode.config import Config, ConfigError, load_config
from dicomnode.dispatch import commitment, outbox
from dicomnode.errors import UserError
from dicomnode.log import get_logger
from dicomnode.net import compat
from dicomnode.net.server import start_server
from dicomnode.process.worker import Worker
from dicomnode.scp.context import ScpContext
from dicomnode.scp.events import build_ae, event_handlers
from dicomnode.store import archive
from dicomnode.store.files import ensure_dir
from dicomnode.store.index import Index
from dicomnode.store.recovery import mark_clean_stop, reconcile, take_clean_stop
from dicomnode.web.app import build_app
from dicomnode.web.server import WebServer

log = get_logger("service")

LOCK_FILE = "dicomnode.lock"


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
        self._web = WebServer(config) if config.web and config.web.enabled else None
        self.worker = Worker(config, self.index)  # runs jobs here, or concludes the cluster's

    def start(self) -> None:
        cfg = self.config
        check_listen(cfg.node.host, cfg.node.port)
        if self._web is not None:  # the console's port too, before recovery changes anything
            self._web.bind()
        clean = take_clean_stop(cfg.node.data_dir)
        recovered = self.index.recover(cfg.node.max_job_attempts,
                                       keep_dispatched=cfg.cluster is not None)
        reconciled = reconcile(self.index, cfg, walk=not clean)
        log.info("node_recovered", after_clean_stop=clean, **recovered, **reconciled)
        self.scheduler.add_job(self.sweep, "interval", seconds=cfg.node.sweep_interval,
                               id="series-completion", max_instances=1, coalesce=True)
        outbox.schedule(self.scheduler, cfg, self.index)  # return path: sends and purge
        archive.schedule(self.scheduler, cfg, self.index)
        commitment.schedule(self.scheduler, cfg, self.index)  # storage commitment reports
        self.scheduler.start()
        if cfg.cluster is None:
            self.add_worker("harmonise", self.worker.step)
        else:  # jobs go to Celery workers through Redis (docs/scale-out.md)
            from dicomnode.cluster.dispatcher import Dispatcher
            self.add_worker("cluster", Dispatcher(self.worker).step, cfg.cluster.poll_interval)
        ctx = ScpContext(cfg, self.index)
        ensure_dir(cfg.incoming_dir)
        compat.receive_with(ctx.incoming.open)
        compat.wake_on_work()
        try:
            self._server = start_server(self.ae, (cfg.node.host, cfg.node.port),
                                        event_handlers(ctx), cfg.tls, cfg.node)
        except OSError as exc:  # taken since check_listen: only this start is affected
            raise _cannot_listen(cfg.node.host, cfg.node.port, exc) from None
        if self._web is not None:
            self._web.start(build_app(cfg, self.index, self.listening), grace=30.0)
        log.info("node_listening", ae_title=cfg.node.ae_title, host=cfg.node.host,
                 port=cfg.node.port, tls=cfg.tls.listening, data_dir=str(cfg.node.data_dir))

    def listening(self) -> bool:
        """Whether the DICOM listener accepts associations (``/readyz``)."""
        return self._server is not None and self._server.socket.fileno() != -1
    def reload(self) -> None:
        """SIGHUP: read the config file again; its routes (their models) and inference
        settings apply from the next job on. Other changes need a restart."""
        try:
            new = load_config(self.config.path)
        except ConfigError as exc:
            log.error("config_reload_failed", reason=str(exc))
            return
        self.worker.config = replace(self.worker.config, routes=new.routes,
                                     inference=new.inference)
        log.info("config_reloaded", config=str(self.config.path),
                 routes={r.name: r.model for r in new.routes})

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
        if self._web is not None:  # requests in flight (a STOW-RS) finish first
            self._web.stop()
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
        self.index.checkpoint()  # the receipts' commits too: the walk is skipped next start
        self.index.close()
        if drained:  # else an aborted transfer or job may have left files: walk next start
            mark_clean_stop(self.config.node.data_dir)
        os.close(self._lock)
        log.info("node_stopped", clean=drained)
