"""The console in a real browser: Debian's chromium driven by Selenium (chromium-driver),
headless, against a running node. A series sent by storescu appears and moves to
harmonised, its page shows the route explanation, the viewer shows its slices, a
confirmed resend reaches the peer again and is audited; off the loopback a browser
without credentials is refused. Screenshots of each page go to ``runs/artefacts/console``
(``$DICOMNODE_ARTEFACTS/console``): docs/console/ holds a copy."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from dicomnode.credentials import entry
from tests import ROOT
from tests.dicom_factory import write_series
from tests.integration.test_outbox import start_storescp
from tests.nodeutil import free_port, storescu, wait_for
from tests.tls_certs import Pki
from tests.webutil import audit_entries, web_node

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTEFACTS = Path(os.environ.get("DICOMNODE_ARTEFACTS", ROOT / "runs" / "artefacts")) / "console"


@pytest.fixture
def browser(tmp_path):
    """Headless chromium, its own fresh profile, nothing fetched from the network."""
    for path in (CHROMIUM, DRIVER):
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} not found: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.accept_insecure_certs = True  # the test PKI's CA is not the browser's
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def shot(driver: webdriver.Chrome, name: str) -> None:
    """A full-height screenshot of the current page."""
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(max(height, 600), 2400))
    driver.save_screenshot(str(ARTEFACTS / f"{name}.png"))
    driver.set_window_size(1400, 1000)


def text(driver: webdriver.Chrome) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def test_a_series_seen_steered_and_audited_in_the_browser(tmp_path, start_node, browser):
    pacs_port = free_port()
    _, received = start_storescp(tmp_path / "pacs", pacs_port)
    (tmp_path / "models").mkdir()
    shipped = ROOT / "models" / "ct-kernel-sharp-to-smooth"  # a card with report images
    (tmp_path / "models" / shipped.name).symlink_to(shipped)
    node, base = web_node(start_node, tmp_path, send_to='["PACS"]',
                          peers=f'[[peers]]\nae_title = "PACS"\nhost = "127.0.0.1"\n'
                                f'port = {pacs_port}\n')
    files = write_series(tmp_path / "sharp", slices=6, size=64, kernel="B70f", seed=31,
                         description="Thorax 3 B70f")
    uid = str(dcmread(files[0]).SeriesInstanceUID)
    storescu(node.port, files)

    browser.get(f"{base}/series?kind=original")
    assert uid in text(browser)

    def harmonised() -> bool:
        browser.get(f"{base}/series?kind=original&state=harmonised")
        return uid in text(browser)
    wait_for(harmonised, 90, interval=1, what="the series listed as harmonised")
    wait_for(lambda: len(list(received.iterdir())) == 6, 60, what="the first send")
    browser.get(f"{base}/series")
    shot(browser, "series-list")

    browser.find_element(By.LINK_TEXT, uid).click()
    page = text(browser)
    assert "Route decision" in page and "route ct-sharp (model ct-test)" in page
    assert "ct-sharp: matched: Modality='CT' matches CT; ConvolutionKernel='B70f' matches B7*" \
        in browser.find_element(By.ID, "explain").text
    assert "PACS" in page and "6 sent" in page
    shot(browser, "series")

    browser.find_element(By.LINK_TEXT, "Side-by-side viewer").click()
    assert "Slice 4 of 6" in text(browser)
    wait_for(lambda: browser.execute_script(
        "return [...document.images].filter(i => i.complete && i.naturalWidth === 64).length")
        == 3, 30, what="the three pictures of the slice")
    browser.find_element(By.LINK_TEXT, "next →").click()
    assert "Slice 5 of 6" in text(browser)
    shot(browser, "viewer")

    browser.get(f"{base}/series/{uid}")
    browser.find_element(By.LINK_TEXT, "Resend").click()
    assert "Send the harmonised series to its peers again?" in text(browser)
    shot(browser, "resend-confirm")
    browser.find_element(By.ID, "confirm").click()
    assert "Done: 6 instance send(s) queued" in text(browser)
    wait_for(lambda: len(list(received.iterdir())) == 12, 60, what="the resend at the peer")
    [audited] = [e for e in audit_entries(tmp_path / "var") if e["action"] == "resend"]
    assert audited["series_uid"] == uid and audited["user"] == "local"
    assert audited["outcome"] == "6 instance send(s) queued"
    browser.get(f"{base}/audit")
    assert "6 instance send(s) queued" in text(browser)
    shot(browser, "audit")

    browser.get(f"{base}/models")
    assert "ct-kernel-sharp-to-smooth" in text(browser) and "Routes using it: ct-sharp" in text(
        browser)
    browser.find_element(By.TAG_NAME, "summary").click()
    time.sleep(0.5)
    shot(browser, "models")
    browser.get(f"{base}/?live=0")
    assert "last hour" in text(browser) and "PACS" in text(browser)
    shot(browser, "overview")
    assert node.stop() == 0


def test_off_the_loopback_a_browser_without_credentials_is_refused(tmp_path, start_node,
                                                                   browser):
    key, cert = Pki(tmp_path / "pki").issue("node")
    node, base = web_node(start_node, tmp_path,
                          web=f'host = "0.0.0.0"\nusers = ["{entry("alice", "s3cret-enough")}"]',
                          peers=f'[tls]\ncertificate = "{cert}"\nprivate_key = "{key}"\n')
    browser.get(base + "/healthz")  # the probes need no credentials: a page of this origin
    assert text(browser) == "ok"
    # a navigation would open the browser's login prompt (with no one to answer it); a
    # request of the page that sends no credentials shows what the console answers
    status, body, challenge = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch("/series", {credentials: "omit"}).then(async r => done([r.status, await r.text(),
                                               r.headers.get("WWW-Authenticate")]));""")
    assert (status, body.strip()) == (401, "authentication required")
    assert challenge.startswith("Basic")
    assert "/series" in [e["path"] for e in node.events("web_auth_refused")]
    assert node.stop() == 0
