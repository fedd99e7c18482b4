"""The systemd unit is valid and hardened as the README promises."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from dicomnode.config import load_config
from tests import ROOT

UNIT = ROOT / "systemd" / "dicomnode.service"


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


def test_unit_allows_the_gpu_and_nothing_else():
    text = UNIT.read_text()
    s = unit_settings()
    assert "PrivateDevices" not in s  # it would hide /dev/nvidia*
    assert s["DevicePolicy"] == "closed"
    allowed = [line.split("=", 1)[1] for line in text.splitlines()
               if line.startswith("DeviceAllow=")]
    assert allowed == ["char-nvidia-frontend rw", "char-nvidia-uvm rw", "char-nvidia-caps r"]


def test_the_units_config_is_the_shipped_one_with_absolute_paths_in_its_state_dir():
    root = UNIT.parent.parent
    service, shipped = load_config(UNIT.parent / "node.toml"), load_config(root / "conf"
                                                                           / "node.toml")
    assert unit_settings()["StateDirectory"] == "dicomnode"
    assert service.node.data_dir == Path("/var/lib/dicomnode")
    assert service.node.models_dir == Path("/var/lib/dicomnode/models")
    assert "Environment=DICOMNODE_CONFIG=/etc/dicomnode/node.toml" in UNIT.read_text()
    assert "systemd/node.toml /etc/dicomnode/node.toml" in UNIT.read_text()  # install step
    paths = {"data_dir": None, "models_dir": None}
    assert replace(service.node, **paths) == replace(shipped.node, **paths)
    assert (service.peers, service.routes, service.inference, service.outbox,
            service.archive, service.web) == (shipped.peers, shipped.routes, shipped.inference,
                                              shipped.outbox, shipped.archive, shipped.web)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (.ci/install installs it)")
def test_the_cluster_worker_template_is_valid_and_as_hardened(tmp_path):
    """systemd/dicomnode-worker@.service (docs/scale-out.md), one instance per GPU."""
    exe = shutil.which("dicomnode")
    assert exe, "the dicomnode console script is not installed"
    template = (UNIT.parent / "dicomnode-worker@.service").read_text()
    unit = tmp_path / "dicomnode-worker@0.service"
    unit.write_text(template.replace("/opt/dicomnode/bin/dicomnode", exe))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "dicomnode-worker@" not in out.stderr, out.stderr
    node = {k: v for k, v in unit_settings().items() if k.startswith(("Protect", "Restrict",
                                                                      "NoNew", "Device"))}
    for key, value in node.items():
        assert f"{key}={value}" in template, key
    assert "worker --device cuda:%i" in template
