"""[web] settings: off without the table, loopback by default, and off the loopback only
with users (salted hashes, never secrets) and TLS."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dicomnode import credentials
from dicomnode.config import ConfigError, load_config
from tests.nodeutil import cli
from tests.tls_certs import Pki

USER = credentials.entry("alice", "correct horse battery", iterations=10_000)


def config(tmp_path, web: str, tls: str = ""):
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\nport = 11112\ndata_dir = "{tmp_path}/var"\n{tls}\n{web}\n')
    return load_config(path)


def test_no_table_no_server_and_the_defaults_are_loopback_and_open(tmp_path):
    assert config(tmp_path, "").web is None
    web = config(tmp_path, "[web]").web
    assert (web.enabled, web.host, web.port, web.users) == (True, "127.0.0.1", 8080, ())
    assert not web.authenticates
    assert config(tmp_path, "[web]\nenabled = false").web.enabled is False


@pytest.mark.parametrize("web, message", [
    ('[web]\nhost = "0.0.0.0"', "is not a loopback address: it needs users"),
    (f'[web]\nhost = "0.0.0.0"\nusers = ["{USER}"]', "needs [tls] certificate"),
    ('[web]\nusers = ["alice"]', "must be NAME:HASH"),
    ('[web]\nusers = ["alice:sha1$1$00$00"]', "the hash must be pbkdf2_sha256"),
    (f'[web]\nusers = ["{USER}", "{USER}"]', "a name is listed twice"),
    ("[web]\nport = 11112", "is the DICOM port"),
    ("[web]\nport = 0", "port must be 1-65535"),
    ('[web]\nhosts = "x"', "unknown key 'hosts' in [web]"),
])
def test_a_web_setting_that_cannot_work_is_one_clear_error(tmp_path, web, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("$", r"\$")):
        config(tmp_path, web)


def test_off_the_loopback_with_users_and_tls(tmp_path):
    key, cert = Pki(tmp_path / "pki").issue("node")
    tls = f'[tls]\ncertificate = "{cert}"\nprivate_key = "{key}"'
    web = config(tmp_path, f'[web]\nhost = "0.0.0.0"\nusers = ["{USER}"]', tls).web
    assert web.authenticates and web.users[0].name == "alice"
    assert web.users[0].verify("correct horse battery")
    assert not web.users[0].verify("correct horse batter")


def test_web_user_prints_an_entry_that_verifies_and_never_the_secret_on_stdout():
    made = cli("web", "user", "bob")
    secret = made.stderr.strip().rsplit(" ", 1)[-1]
    entry = made.stdout.strip().strip('"')
    assert secret not in made.stdout
    assert credentials.parse(entry).verify(secret)
    typed = subprocess.run([sys.executable, "-m", "dicomnode.cli", "web", "user", "carol",
                            "--password-stdin"], input="a long enough secret\n",
                           capture_output=True, text=True, timeout=60)
    assert credentials.parse(typed.stdout.strip().strip('"')).verify("a long enough secret")
    short = subprocess.run([sys.executable, "-m", "dicomnode.cli", "web", "user", "dave",
                            "--password-stdin"], input="short\n", capture_output=True,
                           text=True, timeout=60)
    assert short.returncode == 2 and "shorter than 12" in short.stderr
