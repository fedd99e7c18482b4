"""The systemd unit is valid and hardened as the README promises."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "dicomnode.service"


def unit_settings() -> dict[str, str]:
    settings = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings[key.strip()] = value.strip()
    return settings


def test_unit_is_hardened():
    s = unit_settings()
    assert s["User"] == "dicomnode"
    assert s["NoNewPrivileges"] == "yes" and s["ProtectSystem"] == "strict"
    assert s["PrivateTmp"] == "yes" and s["Restart"] == "on-failure"
    assert "/var/lib/dicomnode" in s["ReadWritePaths"]
    assert s["ExecStart"].endswith("dicomnode serve")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (.ci/install installs it)")
def test_systemd_analyze_verify(tmp_path):
    exe = shutil.which("dicomnode")
    assert exe, "the dicomnode console script is not installed"
    unit = tmp_path / "dicomnode.service"
    unit.write_text(UNIT.read_text().replace("/opt/dicomnode/bin/dicomnode", exe))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "dicomnode.service" not in out.stderr, out.stderr
