"""DICOM over TLS with real peers: dcmtk's storescu/echoscu (BCP 195 profile) to the node,
Orthanc with TLS both ways (it stores a study and asks for storage commitment; the node
reports back over TLS); plain DICOM, an unknown CA and a silent connection are refused
without holding anyone up; bad [tls] settings stop the start with their key and file."""

from __future__ import annotations

import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomnode.config import ConfigError, load_config
from tests.dicom_factory import write_series
from tests.nodeutil import (
    NodeProcess,
    cli,
    dcmtk,
    dcmtk_env,
    free_port,
    status,
    wait_for,
    write_config,
)
from tests.orthanc import Orthanc, have_orthanc
from tests.tls_certs import Pki


def tls_config(tmp: Path, port: int, pki: Pki, extra: str = "") -> Path:
    key, cert = pki.issue("node")
    return write_config(tmp / "node.toml", port, tmp / "var", extra=f"""
[tls]
certificate = "{cert}"
private_key = "{key}"
ca = "{pki.ca}"
{extra}""")


def dcmtk_tls(tool: str, port: int, pki: Pki, client: str | None, *files: Path,
              ca: Path | None = None) -> subprocess.CompletedProcess[str]:
    """A dcmtk tool over TLS with ``client``'s certificate (``None``: plain TCP)."""
    tls: list[str] = []
    if client is not None:
        key, cert = pki.issue(client)
        tls = ["+tls", str(key), str(cert), "+cf", str(ca or pki.ca)]
    return subprocess.run([dcmtk(tool), "-aet", "MODALITY", "-aec", "HARMONISE", *tls,
                           "127.0.0.1", str(port), *map(str, files)], capture_output=True,
                          text=True, timeout=60, env=dcmtk_env())


def test_storescu_over_tls_and_everything_else_refused(tmp_path):
    pki, stranger = Pki(tmp_path / "pki"), Pki(tmp_path / "other", "another CA")
    port = free_port()
    node = NodeProcess(tls_config(tmp_path, port, pki), tmp_path / "node.log").start()
    files = write_series(tmp_path / "ct", slices=3, size=32)
    try:
        assert node.events("node_listening")[-1]["tls"] is True
        # a peer that connects and never says hello holds up no one
        with socket.create_connection(("127.0.0.1", port)):
            sent = dcmtk_tls("storescu", port, pki, "modality", *files)
        plain = dcmtk_tls("echoscu", port, pki, None)
        untrusted = dcmtk_tls("echoscu", port, stranger, "intruder", ca=pki.ca)
        wait_for(lambda: len(node.events("tls_handshake_failed")) >= 2, 10,
                 what="both refusals logged")
    finally:
        code = node.stop()
    assert code == 0 and all(line.startswith("{") for line in
                             node.log.read_text().splitlines()), node.log.read_text()[-2000:]
    assert sent.returncode == 0, sent.stdout + sent.stderr
    [series] = status(tmp_path / "node.toml").values()
    assert series["instances"] == 3
    assert plain.returncode != 0 and untrusted.returncode != 0
    refusals = node.events("tls_handshake_failed")
    assert {e["host"] for e in refusals} == {"127.0.0.1"}
    assert not [e for e in node.events("instance_stored")
                if e["sop_instance_uid"] not in {str(dcmread(f).SOPInstanceUID) for f in files}]


@pytest.mark.skipif(not have_orthanc(), reason="Orthanc not installed")
def test_orthanc_over_tls_both_ways_with_storage_commitment(tmp_path):
    pki = Pki(tmp_path / "pki")
    port, orthanc_port = free_port(), free_port()
    config = tls_config(tmp_path, port, pki, f"""
[outbox]
poll_interval = 0.2
[[peers]]
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {orthanc_port}
tls = true
""")
    key, cert = pki.issue("orthanc")
    orthanc = Orthanc(tmp_path / "orthanc", dicom_port=orthanc_port, extra={
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(cert),
        "DicomTlsPrivateKey": str(key), "DicomTlsTrustedCertificates": str(pki.ca),
        "DicomTlsRemoteCertificateRequired": True,
        "DicomModalities": {"HARMONISE": {"AET": "HARMONISE", "Host": "127.0.0.1",
                                          "Port": port, "UseDicomTls": True}}})
    files = write_series(tmp_path / "ct", slices=3, size=32)
    orthanc.start()
    node = NodeProcess(config, tmp_path / "node.log").start()
    try:
        for f in files:
            upload(orthanc, f)
        echo = cli("echo", "--config", str(config), check=False)
        [study] = orthanc.get("/studies")
        job = orthanc.post("/modalities/HARMONISE/store",
                           {"Resources": [study], "StorageCommitment": True}, timeout=120)
        transaction = job["StorageCommitmentTransactionUID"]
        report = wait_for(lambda: (r := orthanc.get(f"/storage-commitment/{transaction}"))
                          ["Status"] != "Pending" and r, 30, what="the report over TLS")
        # Orthanc retrieves the study back: C-MOVE to the node, sub-operations over TLS
        study_uid = str(dcmread(files[0]).StudyInstanceUID)
        orthanc.post("/modalities/HARMONISE/move", {
            "Level": "Study", "Resources": [{"StudyInstanceUID": study_uid}],
            "TargetAet": "ORTHANC"}, timeout=120)
    finally:
        node.stop()
        orthanc.stop()
    assert echo.stdout.startswith(f"ORTHANC at 127.0.0.1:{orthanc_port} (TLS): ok"), echo
    assert job["FailedInstancesCount"] == 0 and job["InstancesCount"] == 3
    assert report["Status"] == "Success" and len(report["Success"]) == 3
    assert orthanc.store_requests("HARMONISE") == 3
    assert not node.events("tls_handshake_failed")


def upload(orthanc: Orthanc, path: Path) -> None:
    """Put a file into Orthanc through its REST API (its DICOM port now speaks TLS)."""
    req = urllib.request.Request(orthanc.url + "/instances", data=path.read_bytes(),
                                 method="POST", headers={"Content-Type": "application/dicom"})
    with urllib.request.urlopen(req, timeout=30) as rsp:
        assert rsp.status == 200


def test_bad_tls_settings_stop_the_start_naming_key_and_file(tmp_path):
    pki = Pki(tmp_path / "pki")
    key, cert = pki.issue("node")
    other_key, _ = pki.issue("other")
    cases = {
        f'certificate = "{cert}"': "certificate and private_key must be set together",
        f'certificate = "{cert}"\nprivate_key = "{other_key}"': f"certificate {cert}",
        f'certificate = "{cert}"\nprivate_key = "{key}"\nca = "{tmp_path}/none.pem"':
            f"ca {tmp_path}/none.pem",
        'verify = true': "unknown key 'verify' in [tls]",
    }
    for body, message in cases.items():
        path = write_config(tmp_path / "node.toml", free_port(), tmp_path / "var",
                            extra=f"[tls]\n{body}\n")
        with pytest.raises(ConfigError, match="node.toml: ") as err:
            load_config(path)
        assert message in str(err.value), (body, str(err.value))
    peer = write_config(tmp_path / "node.toml", free_port(), tmp_path / "var",
                        extra='[[peers]]\nae_title = "PACS"\nhost = "h"\ntls = "yes"\n')
    with pytest.raises(ConfigError, match="tls must be true or false"):
        load_config(peer)
