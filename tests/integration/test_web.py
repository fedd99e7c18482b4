"""The console, /metrics and the probes of a running node, over real HTTP: what a series
sent by storescu shows, the counters the receive, association, job and send paths
update, forms that act only when the console made them (audited either way), and the
refusals: another site's name (DNS rebinding), no credentials off the loopback."""

from __future__ import annotations

import io
import re

import requests
from PIL import Image
from pydicom import dcmread

from dicomnode.credentials import entry
from tests.dicom_factory import write_series
from tests.nodeutil import status, storescu, wait_for
from tests.tls_certs import Pki
from tests.webutil import audit_entries, get, metric, web_node


def test_console_metrics_probes_and_forms(tmp_path, start_node):
    node, base = web_node(start_node, tmp_path)
    files = write_series(tmp_path / "sharp", slices=6, size=32, kernel="B70f", seed=11)
    uid = str(dcmread(files[0]).SeriesInstanceUID)
    storescu(node.port, files)
    wait_for(lambda: status(node.config).get(uid, {}).get("state") == "harmonised", 90,
             what="the series to be harmonised")
    assert get(base + "/healthz").text == "ok\n"
    assert get(base + "/readyz").text == "ready\n"
    assert uid in get(base + "/series?state=harmonised&modality=ct").text
    assert uid not in get(base + "/series?state=failed").text
    page = get(base + f"/series/{uid}").text
    assert "route ct-sharp (model ct-test)" in page
    assert "ConvolutionKernel=&#39;B70f&#39; matches B7*" in page
    assert "ct-test 1.0" in page  # model and version

    text = get(base + "/metrics").text
    sizes = sum(f.stat().st_size for f in files)
    assert metric(text, "dicomnode_instances_received_total", via="dimse") == 6
    assert metric(text, "dicomnode_received_bytes_total", via="dimse") >= sizes - 6 * 400
    assert metric(text, "dicomnode_store_results_total", via="dimse", status="0x0000") == 6
    assert metric(text, "dicomnode_associations_total", peer="other", result="accepted") == 1
    assert metric(text, "dicomnode_associations_total", peer="other", result="released") == 1
    assert metric(text, "dicomnode_series", state="harmonised") == 1
    assert metric(text, "dicomnode_series", state="archived") == 1  # the derived series
    assert metric(text, "dicomnode_queue_depth") == 0
    assert metric(text, "dicomnode_job_duration_seconds_count") == 1
    assert metric(text, "dicomnode_inference_seconds_count", model="ct-test") == 1
    assert metric(text, "dicomnode_harmonised_instances_total", model="ct-test") == 6
    assert metric(text, "dicomnode_disk_free_bytes") > metric(text, "dicomnode_disk_reserve_bytes")

    picture = Image.open(io.BytesIO(get(base + f"/series/{uid}/viewer/2/difference.png").content))
    assert picture.size == (32, 32)

    data_dir = tmp_path / "var"
    url = base + f"/series/{uid}/reprocess"
    forged = requests.post(url, data={"token": "0" * 64}, timeout=60)
    assert forged.status_code == 403
    token = re.search(r'name="token" value="([0-9a-f]+)"', get(url).text).group(1)
    elsewhere = requests.post(url, data={"token": token}, timeout=60,
                              headers={"Origin": "http://evil.example"})
    assert elsewhere.status_code == 403
    done = requests.post(url, data={"token": token}, timeout=60, allow_redirects=False)
    assert done.status_code == 303 and done.headers["location"].startswith(f"/series/{uid}")
    entries = audit_entries(data_dir)
    assert [e["outcome"].split(":")[0] for e in entries] == ["refused", "refused",
                                                             "queued for harmonisation"]
    assert {e["action"] for e in entries} == {"reprocess"}
    assert all(e["user"] == "local" and e["client"].startswith("127.0.0.1:") for e in entries)
    wait_for(lambda: status(node.config)[uid]["state"] == "harmonised", 90,
             what="the re-harmonised series")
    # a page elsewhere whose name resolves here (DNS rebinding) cannot use the open console
    assert get(base + "/", headers={"Host": "evil.example"}).status_code == 400
    assert node.stop() == 0


def test_off_the_loopback_every_request_but_the_probes_authenticates(tmp_path, start_node):
    """host 0.0.0.0 (not loopback: users and TLS required), reached at 127.0.0.1: the
    rule follows the configured host, so no traffic leaves this machine."""
    pki = Pki(tmp_path / "pki")
    key, cert = pki.issue("node")
    node, base = web_node(start_node, tmp_path,
                          web=f'host = "0.0.0.0"\nusers = ["{entry("alice", "s3cret-enough")}"]',
                          node="accept_any_loopback = false",
                          peers=f'[tls]\ncertificate = "{cert}"\nprivate_key = "{key}"\n')
    assert base.startswith("https://")
    ca = str(pki.ca)
    refused = get(base + "/", verify=ca)
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith("Basic")
    assert get(base + "/metrics", verify=ca).status_code == 401
    assert get(base + "/", verify=ca, auth=("alice", "wrong")).status_code == 401
    assert get(base + "/healthz", verify=ca).status_code == 200
    assert get(base + "/", verify=ca, auth=("alice", "s3cret-enough")).status_code == 200
    bearer = {"Authorization": "Bearer s3cret-enough"}
    assert get(base + "/metrics", verify=ca, headers=bearer).status_code == 200
    # authenticated, but not from a [[peers]] address (and accept_any_loopback is off)
    qido = get(base + "/dicomweb/studies", verify=ca, headers=bearer)
    assert qido.status_code == 403 and "not the address of a configured peer" in qido.text
    refusals = node.events("web_auth_refused")
    assert len(refusals) == 3 and "s3cret" not in node.log.read_text()
    assert node.stop() == 0
