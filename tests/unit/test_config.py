"""Config loading: the shipped file is valid; mistakes are one clear line naming key and file."""

from __future__ import annotations

import pytest

from dicomnode.config import ConfigError, load_config
from tests import ROOT
from tests.nodeutil import cli


def test_shipped_config_loads_and_resolves_paths_from_checkout():
    config = load_config(ROOT / "conf" / "node.toml")
    assert config.node.ae_title == "HARMONISE" and config.node.port == 11112
    assert config.node.data_dir == ROOT / "var"
    assert config.node.models_dir == ROOT / "models"
    assert [r.name for r in config.routes] == [
        "ct-sharp-to-smooth", "ct-ge-to-siemens", "mr-t1w-ge15-to-siemens3-coarse",
        "mr-t1w-ge15-to-siemens3"]
    assert config.peer("PACS").port == 4242


def test_env_variable_overrides_default_path(tmp_path, monkeypatch):
    path = tmp_path / "node.toml"
    path.write_text('[node]\nae_title = "OTHER"\n')
    monkeypatch.setenv("DICOMNODE_CONFIG", str(path))
    config = load_config()
    assert config.node.ae_title == "OTHER"
    assert config.node.data_dir == tmp_path / "var"


def test_outside_the_checkout_the_shipped_config_is_the_default(tmp_path, monkeypatch):
    monkeypatch.delenv("DICOMNODE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert load_config().node.data_dir == ROOT / "var"
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "node.toml").write_text('[node]\nae_title = "LOCAL"\n')
    config = load_config()  # the working folder's conf/node.toml comes first
    assert config.node.ae_title == "LOCAL" and config.node.data_dir == tmp_path / "var"


@pytest.mark.parametrize("text, words", [
    ('[node]\nae_titel = "X"\n', ["unknown key 'ae_titel'", "[node]"]),
    ('[nodes]\n', ["unknown key 'nodes'"]),
    ('[node]\nport = "eleven"\n', ["[node] port", "integer"]),
    ('[node]\nport = 70000\n', ["port"]),
    ('[node]\nseries_timeout = -1\n', ["series_timeout", "positive"]),
    ('[node]\nmax_job_attempts = 0\n', ["[node] max_job_attempts", "at least 1"]),
    ('[node]\nsweep_interval = nan\n', ["[node] sweep_interval", "finite"]),
    ('[node]\nmax_associations = 0\n', ["[node] max_associations", "at least 1"]),
    ('[node]\nmax_pdu_size = 1\n', ["[node] max_pdu_size", "0 (unlimited) or at least 4096"]),
    ('[node]\nmax_pdu_size = -5\n', ["[node] max_pdu_size", "at least 0"]),
    ('[inference]\nbatch_size = 0\n', ["[inference] batch_size", "at least 1"]),
    ('[archive]\npurge_interval_hours = -inf\n', ["[archive] purge_interval_hours", "finite"]),
    ('[outbox]\nretry_max_interval = inf\n', ["[outbox] retry_max_interval", "finite"]),
    ('[node]\nunmatched = "drop"\n', ["unmatched", "archive"]),
    ('[node]\nae_title = "A_TITLE_THAT_IS_TOO_LONG"\n', ["AE title"]),
    ('[[peers]]\nae_title = "PACS"\n', ["host"]),
    ('[[routes]]\nname = "r"\nmodel = "m"\n[routes.match]\nConvolutionKernal = "B7*"\n',
     ["unknown key 'ConvolutionKernal'"]),
    ('[[routes]]\nname = "r"\nmodel = "m"\nsend_to = ["NOWHERE"]\n', ["NOWHERE", "peers"]),
    ('[[routes]]\nname = "r"\nmodel = "m"\ncolour = 1\n', ["unknown key 'colour'"]),
    ('[node\n', ["not valid TOML"]),
])
def test_bad_config_is_one_clear_error(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_unlimited_pdu_and_minimums_are_accepted(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text("[node]\nmax_pdu_size = 0\nmax_associations = 1\n"
                    "[inference]\nbatch_size = 1\n")
    config = load_config(path)
    assert (config.node.max_pdu_size, config.node.max_associations) == (0, 1)
    assert config.inference.batch_size == 1


def test_cli_reports_config_error_as_one_line_exit_2(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[node]\nprot = 1\n')
    out = cli("status", "--config", str(path), check=False)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "unknown key 'prot'" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_config_file(tmp_path):
    out = cli("serve", "--config", str(tmp_path / "nope.toml"), check=False)
    assert out.returncode == 2 and "config file not found" in out.stderr
