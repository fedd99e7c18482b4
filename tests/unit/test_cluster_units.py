"""The cluster's parts that need no broker: its config table, what travels as JSON, and the
index's bookkeeping of dispatched and training jobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.cluster.messages import (
    decode_outcome,
    encode_outcome,
    site_options_from_json,
    site_options_to_json,
    task_id,
)
from dicomnode.config import ConfigError, load_config
from dicomnode.store.index import Index, InstanceRecord, JobState, SeriesState
from pipelines.harmonise import ModelRef, SeriesOutcome
from trainers.options import SiteOptions


def config_with(tmp_path: Path, table: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\ndata_dir = "var"\n{table}')
    return path


def test_without_the_table_the_embedded_worker_runs_jobs(tmp_path):
    assert load_config(config_with(tmp_path, "")).cluster is None


def test_the_table_is_typed_and_checked(tmp_path):
    cluster = load_config(config_with(tmp_path, '[cluster]\nbroker = "redis://h:6380/1"\n'
                                                "task_time_limit = 60\n")).cluster
    assert cluster is not None and cluster.broker == "redis://h:6380/1"
    assert (cluster.queue, cluster.train_queue) == ("harmonise", "train")
    assert cluster.task_time_limit == 60.0 and cluster.visibility_timeout == 3600.0
    bad = {'[cluster]\nqueue = "q"\n': "[cluster] broker must be a redis://",
           '[cluster]\nbroker = "amqp://h"\n': "[cluster] broker must be a redis://",
           '[cluster]\nbroker = "redis://h"\ntrain_queue = "harmonise"\n':
               "[cluster] train_queue must differ from queue",
           '[cluster]\nbroker = "redis://h"\nvisibility_timeout = 100\ntrain_time_limit = 100\n':
               "[cluster] visibility_timeout (100) must be longer than",
           '[cluster]\nbroker = "redis://h"\ntask_time_limit = "1h"\n':
               "[cluster] task_time_limit must be a number",
           '[cluster]\nbroker = "redis://h"\nqueues = ["a"]\n': "unknown key 'queues' in [cluster]"}
    for table, message in bad.items():
        with pytest.raises(ConfigError) as err:
            load_config(config_with(tmp_path, table))
        assert str(tmp_path / "node.toml") in str(err.value) and message in str(err.value)


def test_an_outcome_travels_with_paths_relative_to_data_dir(tmp_path):
    here, there = tmp_path / "node", tmp_path / "mnt" / "node"
    outcome = SeriesOutcome("harmonised", "1.2", "harmonised 2 images", "r",
                            ModelRef("m", "1.1", "ab" * 32),
                            outputs=(there / "staging/a.dcm", there / "staging/b.dcm"))
    back = decode_outcome(encode_outcome(outcome, there), here)
    assert back.outputs == (here / "staging/a.dcm", here / "staging/b.dcm")
    assert (back.status, back.route, back.model, back.report) == ("harmonised", "r",
                                                                  outcome.model, None)


def test_site_options_travel_as_json():
    options = SiteOptions(route="r", workdir=Path("/w"), steps=7, param={"features": 4})
    back = site_options_from_json(site_options_to_json(options))
    assert back == options and isinstance(back.workdir, Path)


def receive(index: Index, series: str, sop: str) -> None:
    index.add_instance(InstanceRecord(sop, "1.2.840.10008.5.1.4.1.1.2", series, "9",
                                      "1.2.840.10008.1.2.1", "CT", 1, {}), f"{sop}.dcm", 1, "x")


def test_dispatched_jobs_survive_recovery_only_with_a_cluster(index: Index):
    receive(index, "s1", "i1")
    index.complete_quiet_series(0.0, now=1e10)
    job = index.claim_job(JobState.DISPATCHED)
    assert job is not None and index.series("s1")["state"] == SeriesState.PROCESSING
    assert [j.id for j in index.dispatched_jobs()] == [job.id]
    assert task_id(job) == f"dicomnode-{job.id}-{job.created:.6f}"
    index.recover(3, keep_dispatched=True)
    assert index.job(job.id)["state"] == JobState.DISPATCHED
    assert index.series("s1")["state"] == SeriesState.PROCESSING
    index.recover(3)  # no [cluster] any more: the node runs it itself
    assert index.job(job.id)["state"] == JobState.QUEUED
    assert index.series("s1")["state"] == SeriesState.QUEUED
    job = index.claim_job()
    index.finish_job(job, ok=True, worker="gpu0@h", model="m 1.0 abc")
    last = index.last_jobs()["s1"]
    assert (last["worker"], last["model"]) == ("gpu0@h", "m 1.0 abc")


def test_training_jobs_queue_apart_from_series(index: Index):
    job_id = index.queue_training({"route": "r"})
    assert index.claim_job(JobState.DISPATCHED) is None  # not a series' job
    job = index.claim_training()
    assert job is not None and job.id == job_id and job.kind == "train"
    assert index.job(job_id)["args"] == '{"route": "r"}'
    assert index.claim_training() is None
