"""The cluster with its real parts: Debian's redis-server on a loopback port, the node and
``dicomnode worker`` processes, dcmtk's storescu as the modality and storescp as the PACS.
No mock broker, no eager mode: jobs travel through Redis to worker processes, which are
killed with SIGKILL, and Redis is killed and restarted under them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.dicom_factory import write_series
from tests.integration.test_node_harmonise import ROUTES
from tests.integration.test_outbox import peers
from tests.model_factory import make_plain_model
from tests.nodeutil import (
    NodeProcess,
    WorkerProcess,
    cli,
    dcmtk,
    dcmtk_env,
    free_port,
    status,
    storescu,
    wait_for,
    write_config,
)
from tests.redis_server import RedisServer, have_redis

pytestmark = pytest.mark.skipif(not have_redis(), reason="redis-server not installed"
                                " (apt-get install redis-server)")

FINAL = ("harmonised", "sent")


def cluster_config(tmp: Path, broker: str, pacs_port: int, *, time_limit: float = 20
                   ) -> Path:
    """A node whose jobs go to the cluster: B7* series to ct-test (sent to the PACS), B9*
    to a model whose weights were tampered with (fails on every worker)."""
    models = tmp / "models"
    if not models.exists():
        make_plain_model(models, "ct-test", blocks=6)
        broken = make_plain_model(models, "ct-broken")
        (broken / "weights.pt").write_bytes((broken / "weights.pt").read_bytes() + b"x")
    routes = ROUTES.replace('model = "ct-test"\n', 'model = "ct-test"\nsend_to = ["PACS"]\n')
    return write_config(tmp / "node.toml", free_port(), tmp / "var", series_timeout=1.0,
                        extra_node=f'models_dir = "{models}"', extra=f"""
[cluster]
broker = "{broker}"
task_time_limit = {time_limit}
train_time_limit = {time_limit}
visibility_timeout = {time_limit + 1}
poll_interval = 0.2
{peers(PACS=pacs_port)}{routes}""")


class Site:
    """Redis, a storescp PACS and a cluster node in ``tmp``; workers on demand."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.redis = RedisServer(tmp / "redis").start()
        self.pacs_port = free_port()
        self.received = tmp / "pacs"
        self.received.mkdir()
        self.pacs = subprocess.Popen(
            [dcmtk("storescp"), "-aet", "PACS", "+uf", "-od", str(self.received),
             str(self.pacs_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=dcmtk_env())
        self.config = cluster_config(tmp, self.redis.url, self.pacs_port)
        self.node = NodeProcess(self.config, tmp / "node.log").start()
        self.node.port = int(self.config.read_text().split("port = ")[1].split()[0])

    def workers(self, *names: str) -> list[WorkerProcess]:
        """Workers started together (each takes seconds to import torch and Celery)."""
        started = [WorkerProcess(self.config, self.tmp / f"worker-{name}.log", name).launch()
                   for name in names]
        return [w.ready() for w in started]

    def series(self, name: str, seed: int, slices: int = 16, kernel: str = "B70f"
               ) -> tuple[str, list[Path]]:
        files = write_series(self.tmp / name, slices=slices, size=64, kernel=kernel, seed=seed)
        return str(dcmread(files[0]).SeriesInstanceUID), files

    def wait_for(self, uids: list[str], states: tuple[str, ...] = FINAL,
                 timeout: float = 90) -> dict[str, dict]:
        return wait_for(lambda: (rows := status(self.config)) and all(
            rows.get(u, {}).get("state") in states for u in uids) and rows, timeout,
            interval=0.3, what=f"series {states}")

    def close(self) -> None:
        self.pacs.kill()
        self.pacs.wait(10)


@pytest.fixture
def site(tmp_path: Path):
    s = Site(tmp_path)
    yield s
    s.close()


def dispatched(node: NodeProcess, uid: str) -> bool:
    return any(e.get("series_uid") == uid for e in node.events("job_dispatched"))


def started(worker: WorkerProcess, uid: str) -> bool:
    return any(e["series_uid"] == uid for e in worker.events("job_started"))


def test_two_workers_share_jobs_and_a_killed_workers_job_is_finished_once(site: Site):
    a, b = site.workers("a", "b")
    (uid1, s1), (uid2, s2) = site.series("s1", 1), site.series("s2", 2)
    sends = [subprocess.Popen([dcmtk("storescu"), "-aet", "CT1", "-aec", "HARMONISE",
                               "127.0.0.1", str(site.node.port), *map(str, files)],
                              env=dcmtk_env()) for files in (s1, s2)]  # two associations
    assert [p.wait(60) for p in sends] == [0, 0]
    rows = site.wait_for([uid1, uid2])
    assert {rows[uid1]["worker"], rows[uid2]["worker"]} == {a.name, b.name}
    assert rows[uid1]["model_version"].startswith("ct-test 1.0 ")

    # kill -9 of the worker running a job: the other one finishes it, once
    uid3, s3 = site.series("s3", 3, slices=40)
    storescu(site.node.port, s3)
    victim = wait_for(lambda: next((w for w in (a, b) if started(w, uid3)), None), 60,
                      interval=0.05, what="a worker to start the job")
    victim.kill()
    survivor = b if victim is a else a
    rows = site.wait_for([uid3], timeout=90)
    assert rows[uid3]["worker"] == survivor.name
    assert not [e for e in victim.events("job_finished") if e["series_uid"] == uid3], \
        "the kill came after the job had finished"
    derived = [r for r in rows.values() if r["kind"] == "derived"]
    assert sorted(r["instances"] for r in derived) == [16, 16, 40]
    assert [r["source_series_uid"] for r in derived].count(uid3) == 1
    pacs = wait_for(lambda: (got := sorted(site.received.rglob("*"))) and len(got) >= 72 and got,
                    60, what="the PACS to receive every derived instance")
    sops = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in pacs]
    assert len(sops) == len(set(sops)) == 72  # each derived instance sent exactly once

    # both workers down, a job arrives, then one worker comes up and runs it
    survivor.kill()
    uid4, s4 = site.series("s4", 4)
    storescu(site.node.port, s4)
    wait_for(lambda: dispatched(site.node, uid4), 30, what="the job to be dispatched")
    assert status(site.config)[uid4]["state"] == "processing"
    [c] = site.workers("c")
    assert site.wait_for([uid4])[uid4]["worker"] == c.name


def test_broker_restarts_lose_no_job_and_failures_end_with_reason_and_worker(site: Site):
    uid1, s1 = site.series("s1", 1)
    storescu(site.node.port, s1)  # no worker yet: the job waits in Redis
    wait_for(lambda: dispatched(site.node, uid1), 30, what="the job to be dispatched")
    site.redis.stop()  # kill -9; restarted from its append-only file: the job is there
    site.redis.start()
    assert site.redis.client().llen("harmonise") == 1
    site.redis.stop()  # and restarted with nothing: the node publishes the job again
    site.redis.wipe()
    site.redis.start()
    wait_for(lambda: site.node.events("job_reenqueued"), 30, what="the node to re-enqueue")
    assert site.redis.client().llen("harmonise") == 1
    [w] = site.workers("w")
    rows = site.wait_for([uid1])
    assert rows[uid1]["worker"] == w.name
    assert len(site.node.events("job_dispatched")) == 2  # published, then once more

    # a job failing on every attempt ends failed with its reason, attempts and worker
    bad, files = site.series("bad", 5, kernel="B90f")
    storescu(site.node.port, files)
    row = site.wait_for([bad], ("failed",))[bad]
    assert "sha256" in row["error"] and row["error"].endswith("(attempt 3 of 3)")
    assert row["worker"] == w.name
    assert len([e for e in w.events("job_started") if e["series_uid"] == bad]) == 3
    text = cli("status", "--config", str(site.config)).stdout
    assert f"worker={w.name}" in next(line for line in text.splitlines() if bad in line)

    # hot reload: a new version in the route's model folder, then (SIGHUP) another model
    models = site.tmp / "models"
    make_plain_model(site.tmp / "new", "ct-test", blocks=6, version="1.1")
    os.replace(models / "ct-test", site.tmp / "old")
    os.replace(site.tmp / "new" / "ct-test", models / "ct-test")
    uid2, s2 = site.series("s2", 2)
    storescu(site.node.port, s2)
    assert site.wait_for([uid2])[uid2]["model_version"].startswith("ct-test 1.1 ")
    make_plain_model(models, "ct-next", version="2.0")
    site.config.write_text(site.config.read_text().replace('model = "ct-test"',
                                                           'model = "ct-next"'))
    site.node.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: site.node.events("config_reloaded"), 10, what="the node to reload")
    uid3, s3 = site.series("s3", 3)
    storescu(site.node.port, s3)
    assert site.wait_for([uid3])[uid3]["model_version"].startswith("ct-next 2.0 ")
    assert site.node.stop() == 0


def test_train_site_runs_on_a_train_worker(tmp_path: Path):
    """``train site --cluster``: the node dispatches it to the train queue, logs the
    worker's progress, and the new version lands in models_dir."""
    from tests.unit.test_train_cli import TINY, simulate

    redis = RedisServer(tmp_path / "redis").start()
    config = cluster_config(tmp_path, redis.url, free_port(), time_limit=300)
    config.write_text(config.read_text().replace(
        'ConvolutionKernel = "B7*"\n', 'ConvolutionKernel = "B7*"\n[routes.target]\n'
        'Modality = "CT"\nConvolutionKernel = "B3*"\n').replace('"ct-test"', '"site"'))
    spool = tmp_path / "var" / "spool"
    simulate(spool / "a", "CT", "siemens-b70f", range(3))
    simulate(spool / "b", "CT", "siemens-b30f", range(3))
    node = NodeProcess(config, tmp_path / "node.log").start()
    WorkerProcess(config, tmp_path / "worker.log", "t", "--queue", "train").start()
    out = subprocess.run([sys.executable, "-m", "dicomnode.cli", "train", "site", "--route",
                          "ct-sharp", "--cluster", "--config", str(config), "--workdir",
                          str(tmp_path / "run"), "--architecture", "plain", "--param",
                          "features=4", "--param", "blocks=2", "--no-compare", *TINY],
                         capture_output=True,
                         text=True, timeout=400, check=True)
    folder = Path(out.stdout.strip())
    assert folder == tmp_path / "models" / "site-v1.1"
    assert (folder / "model.json").exists()
    lines = [e["line"] for e in node.events("train_progress")]
    assert any("3 source and 3 target series" in line for line in lines)
    assert "wrote site-v1.1, not compared" in lines[-1]  # the last line, too
    [trained] = node.events("model_trained")
    assert trained["folder"] == "site-v1.1" and trained["worker"] == "t@test"
    assert node.stop() == 0
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
