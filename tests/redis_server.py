"""Redis (Debian's ``redis-server``) as the cluster's real broker in tests: one per test,
on a free loopback port, with its append-only file in the test's folder (as
docs/scale-out.md sets it up), restartable from that file or from nothing."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import redis

from tests.nodeutil import free_port, spawn, wait_for

REDIS_SERVER = Path("/usr/bin/redis-server")


def have_redis() -> bool:
    return REDIS_SERVER.exists()


class RedisServer:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = spawn([str(REDIS_SERVER), "--port", str(self.port), "--bind", "127.0.0.1",
                           "--dir", str(self.folder), "--appendonly", "yes",
                           "--appendfsync", "always", "--save", "", "--daemonize", "no",
                           "--logfile", str(self.folder / "redis.log")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, 10, what="redis-server to answer")
        return self

    def ping(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Kill it (SIGKILL by default: whatever it had not written to its file is gone)."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(10)

    def wipe(self) -> None:
        """Forget everything, as a Redis without persistence does when it restarts."""
        shutil.rmtree(self.folder)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=2)
