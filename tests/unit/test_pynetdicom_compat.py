"""The pynetdicom internals ``dicomnode.net.compat`` relies on are still there and still do
what the node needs: a pynetdicom release that changes them fails here, not in production."""

from __future__ import annotations

import inspect
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager

import pynetdicom
import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, Association, _config, dimse_messages, evt
from pynetdicom import association as association_module
from pynetdicom import dul as dul_module
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import CTImageStorage, Verification

from dicomnode.net import compat
from tests import ROOT
from tests.nodeutil import free_port


def test_the_installed_pynetdicom_is_in_the_tested_range_which_pyproject_pins():
    pinned = next(Requirement(r) for r in tomllib.loads(
        (ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if r.startswith("pynetdicom"))
    assert pinned.specifier == SpecifierSet(compat.TESTED_VERSIONS)
    assert pynetdicom.__version__ in pinned.specifier


@contextmanager
def scp(handlers: list, sop_class: str = Verification,
        syntax: str = ExplicitVRLittleEndian) -> Iterator[int]:
    """A pynetdicom SCP for ``sop_class`` on a free loopback port, for the block."""
    ae = AE(ae_title="SCP")
    ae.add_supported_context(sop_class, syntax)
    server = ae.start_server(("127.0.0.1", port := free_port()), block=False,
                             evt_handlers=handlers)
    try:
        yield port
    finally:
        server.shutdown()


def associate(port: int, sop_class: str = Verification, **kwargs) -> Association:
    ae = AE(ae_title="CALLER")
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title="SCP", **kwargs)


def test_the_reactors_nap_where_the_node_wakes_them(monkeypatch):
    assert "time.sleep(self._run_loop_delay)" in inspect.getsource(DULServiceProvider.run_reactor)
    assert "time.sleep(0.001)" in inspect.getsource(Association._run_reactor)
    assert DULServiceProvider.__init__.__code__.co_consts.count(0.001) >= 1  # its default nap
    send_msg = inspect.getsource(DIMSEServiceProvider.send_msg)  # sent: about to queue
    assert send_msg.index("EVT_DIMSE_SENT") < send_msg.index("send_pdu")
    for module in (dul_module, association_module):  # restored after the test
        monkeypatch.setattr(module, "time", module.time)
    compat.wake_on_work()
    assert dul_module.time is association_module.time
    assert dul_module.time.monotonic is time.monotonic  # the rest is the real time module
    woken = []

    def echo(event: evt.Event) -> int:
        woken.append(compat._WAKES[event.assoc].received > 0)  # the decoded message woke it
        return 0x0000

    with scp([(evt.EVT_C_ECHO, echo), *compat.wake_handlers()]) as port:
        for _ in range(2):  # associations work as before, a few messages each
            assoc = associate(port)
            assert all(assoc.send_c_echo().Status == 0 for _ in range(20))
            assoc.release()
    assert woken == [True] * 40


@pytest.mark.parametrize("received,sent,now,responding", [
    (10.0, 9.0, 10.5, True),     # a message decoded, no response yet
    (10.0, 10.5, 10.501, True),  # the response handed over 1 ms ago: it is being sent
    (10.0, 10.5, 10.6, False),   # sent long ago: the DUL waits on its socket
])
def test_the_dul_looks_for_a_response_only_while_one_is_prepared(received, sent, now,
                                                                 responding):
    wake = compat._Wake()
    wake.received, wake.sent = received, sent
    assert wake.responding(now) is responding


def test_chunked_c_store_data_sets_are_written_where_the_node_opens_them(tmp_path, monkeypatch):
    # restored after the test: the receive folder is process-wide in pynetdicom
    monkeypatch.setattr(dimse_messages, "NamedTemporaryFile", dimse_messages.NamedTemporaryFile)
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", _config.STORE_RECV_CHUNKED_DATASET)
    opened = []

    def open_file(**kwargs):
        opened.append(compat.receiving_association())
        return tempfile.NamedTemporaryFile(dir=tmp_path, prefix=compat.INCOMING_PREFIX,
                                           **kwargs)

    compat.receive_with(open_file)
    paths = []

    def store(event: evt.Event) -> int:
        paths.append((event.dataset_path, event.assoc))
        return 0x0000

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with scp([(evt.EVT_C_STORE, store)], CTImageStorage) as port:
        assoc = associate(port, CTImageStorage)
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
    [(path, assoc)] = paths
    assert path.parent == tmp_path and path.name.startswith(compat.INCOMING_PREFIX)
    assert opened == [assoc]  # the file was opened knowing its association


def test_a_registered_server_is_stopped_by_ae_shutdown():
    ae = AE(ae_title="SCP")
    ae.add_supported_context(Verification)
    server = ae.make_server(("127.0.0.1", free_port()))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    compat.register_server(ae, server)
    assert server in ae._servers
    ae.shutdown()
    assert server not in ae._servers
    with pytest.raises(OSError):
        server.socket.getsockname()


def test_a_request_is_judged_by_its_primitive_and_rejected_with_the_reason_given():
    seen = []

    def requested(event: evt.Event) -> None:
        request = compat.association_request(event.assoc)
        contexts = request.presentation_context_definition_list
        seen.append((request.calling_ae_title.strip(), request.called_ae_title.strip(),
                     [str(cx.abstract_syntax) for cx in contexts],
                     compat.tcp_socket(event.assoc) is not None))
        compat.reject(event.assoc, 0x01, 0x01, 0x03)

    with scp([(evt.EVT_REQUESTED, requested)]) as port:
        assoc = associate(port)
    assert seen == [("CALLER", "SCP", [Verification], True)]
    assert assoc.is_rejected and not assoc.is_established
    rejection = assoc.acceptor.primitive
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (1, 1, 3)
