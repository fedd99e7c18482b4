"""``dicomnode echo``: the node's own AE checks its peers with C-ECHO, as a PACS admin would
before wondering why harmonised series do not arrive."""

from __future__ import annotations

import subprocess

from tests.nodeutil import cli, dcmtk, free_port, wait_for, write_config


def test_echo_reports_each_peer_and_fails_when_one_does_not_answer(tmp_path):
    up, down = free_port(), free_port()
    config = write_config(tmp_path / "node.toml", free_port(), tmp_path / "var", extra=f"""
[[peers]]
ae_title = "STORESCP"
host = "127.0.0.1"
port = {up}
[[peers]]
ae_title = "DOWN"
host = "127.0.0.1"
port = {down}
[[peers]]
ae_title = "SENDONLY"
host = "127.0.0.1"
""")
    scp = subprocess.Popen([dcmtk("storescp"), "-aet", "STORESCP", "--fork", str(up)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ok = wait_for(lambda: (r := cli("echo", "STORESCP", "--config", str(config),
                                         check=False)).returncode == 0 and r, 10,
                      what="storescp to answer C-ECHO")
        everyone = cli("echo", "--config", str(config), check=False)
        unknown = cli("echo", "PACS", "--config", str(config), check=False)
        no_port = cli("echo", "SENDONLY", "--config", str(config), check=False)
    finally:
        scp.terminate()
        scp.wait(10)
    assert ok.stdout.startswith(f"STORESCP at 127.0.0.1:{up}: ok (")
    assert everyone.returncode == 1
    lines = everyone.stdout.splitlines()
    assert lines[0].startswith("STORESCP at") and lines[0].endswith(" ms)")
    assert lines[1] == (f"DOWN at 127.0.0.1:{down}: FAILED: association with DOWN at"
                        f" 127.0.0.1:{down} failed")
    assert len(lines) == 2  # SENDONLY has no port: not tried
    assert unknown.returncode == 2 and "PACS is not a [[peers]] entry" in unknown.stderr
    assert no_port.returncode == 2 and "SENDONLY has no port" in no_port.stderr
