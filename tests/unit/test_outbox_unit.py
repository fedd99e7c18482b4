"""Outbox queue logic without a network: queueing, idempotence, recovery, backoff, contexts."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import JPEG2000Lossless

from dicomnode.config import load_config
from dicomnode.dispatch import outbox
from dicomnode.dispatch.retry import backoff
from dicomnode.net.syntax import store_contexts
from dicomnode.store.index import Index
from dicomnode.store.sends import SendState
from tests.dicom_factory import write_series
from tests.nodeutil import free_port, write_config
from tests.orthanc import seed_series


@pytest.fixture
def node(tmp_path: Path):
    closed = free_port()  # nothing listens there
    config = write_config(tmp_path / "node.toml", free_port(), tmp_path / "var",
                          extra=f'[outbox]\nretry_initial = 0.5\nretry_max_interval = 4\n'
                          f'[[peers]]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {closed}\n')
    files = write_series(tmp_path / "s", slices=3, size=16)
    uid = seed_series(config, files)
    cfg = load_config(config)
    index = Index(cfg.index_path)
    yield cfg, index, uid, files
    index.close()


def states(index: Index) -> list[tuple[str, str, int]]:
    return [(r["destination"], r["state"], r["attempts"]) for r in index.db.execute(
        "SELECT * FROM outbox ORDER BY destination, id")]


def test_enqueue_is_idempotent_and_requeues_changed_content(node):
    cfg, index, uid, files = node
    assert outbox.enqueue_series(index, uid, ["PACS", "PACS", " OTHER "]) == 6
    assert outbox.enqueue_series(index, uid, ["PACS"]) == 0  # same job again: nothing new
    assert outbox.enqueue_series(index, uid, []) == 0
    index.db.execute("UPDATE outbox SET state = 'sent' WHERE destination = 'PACS'")
    assert outbox.enqueue_series(index, uid, ["PACS"]) == 0  # confirmed: never resent
    # a re-harmonised instance with other bytes under the same UID is new content
    sop = index.db.execute("SELECT sop_instance_uid FROM instances LIMIT 1").fetchone()[0]
    index.db.execute("UPDATE instances SET sha256 = 'changed' WHERE sop_instance_uid = ?", (sop,))
    assert outbox.enqueue_series(index, uid, ["PACS"]) == 1
    assert sorted(s for d, s, _ in states(index) if d == "PACS") == ["pending", "sent", "sent"]


def test_failed_attempts_back_off_then_fail_after_max_age(node):
    cfg, index, uid, files = node
    outbox.enqueue_series(index, uid, ["PACS"])
    box = outbox.Outbox(cfg, index)
    assert box.dispatch() == 3
    row = index.db.execute("SELECT * FROM outbox LIMIT 1").fetchone()
    assert row["state"] == "pending" and row["attempts"] == 1
    assert row["next_attempt"] - row["updated"] == pytest.approx(0.5)
    assert "association with PACS" in row["error"]
    assert box.dispatch() == 0  # not due yet
    due = index.db.execute("SELECT MAX(next_attempt) FROM outbox").fetchone()[0]
    assert box.dispatch(now=due + 0.01) == 3
    # queued longer than max_age_hours: the next failed attempt gives up
    index.db.execute("UPDATE outbox SET created = created - 73 * 3600, next_attempt = 0")
    box.dispatch()
    assert {s for _, s, _ in states(index)} == {"failed"}
    assert index.series(uid)["state"] == "failed"
    assert index.series(uid)["error"].startswith("send to PACS: association with PACS")
    assert outbox.resend(index, states=(SendState.FAILED,)) == 3
    assert {(s, a) for _, s, a in states(index)} == {("pending", 0)}
    assert index.series(uid)["state"] == "archived" and index.series(uid)["error"] is None


def test_unknown_destination_is_retried_not_lost(node):
    cfg, index, uid, files = node
    outbox.enqueue_series(index, uid, ["GONE"])
    outbox.Outbox(cfg, index).dispatch()
    row = index.db.execute("SELECT * FROM outbox LIMIT 1").fetchone()
    assert row["state"] == "pending" and "not in [[peers]]" in row["error"]


def test_recover_makes_sending_uncertain_and_an_outage_keeps_it_so(node):
    cfg, index, uid, files = node
    outbox.enqueue_series(index, uid, ["PACS"])
    index.db.execute("UPDATE outbox SET state = 'sending' WHERE id = 1")
    index.db.execute("UPDATE outbox SET state = 'sent' WHERE id = 2")
    assert outbox.recover(index) == 1
    assert [s for _, s, _ in states(index)] == ["uncertain", "sent", "pending"]
    # the peer is down: nothing can be checked, so the row stays uncertain, with backoff
    outbox.Outbox(cfg, index).dispatch()
    row = index.db.execute("SELECT * FROM outbox WHERE id = 1").fetchone()
    assert (row["state"], row["attempts"]) == ("uncertain", 1)
    assert "association with PACS" in row["error"] and row["next_attempt"] > row["updated"]
    assert index.series(uid)["state"] != "sent"


def test_backoff_doubles_and_caps():
    assert [backoff(n, 5, 600) for n in (1, 2, 3, 4, 8, 100)] == [5, 10, 20, 40, 600,
                                                                        600]


def test_store_contexts_offer_stored_syntax_and_uncompressed():
    cxs = store_contexts([("1.2.840.10008.5.1.4.1.1.2", JPEG2000Lossless),
                                 ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"),
                                 ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1")])
    assert [(c.abstract_syntax, c.transfer_syntax) for c in cxs] == [
        ("1.2.840.10008.5.1.4.1.1.2", [JPEG2000Lossless]),
        ("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]),
        ("1.2.840.10008.5.1.4.1.1.4", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])]


def test_rerun_of_a_sent_series_reports_it_sent_again(node):
    cfg, index, uid, files = node
    outbox.enqueue_series(index, uid, ["PACS"])
    index.db.execute("UPDATE outbox SET state = 'sent'")
    index.set_series_state(uid, "archived")  # what the worker does on a re-run
    assert outbox.enqueue_series(index, uid, ["PACS"]) == 0
    assert index.series(uid)["state"] == "sent"
