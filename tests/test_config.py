"""Configuration: defaults as in DESIGN.md, a bad key or value is an error naming it."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from txmlive.config import Config, ConfigError, config_from_dict, load_config, render_config


def test_defaults_match_design():
    c = Config()
    assert c.endpoints.frames == "tcp://127.0.0.1:5555"
    assert c.endpoints.results == "tcp://127.0.0.1:5556"
    assert c.endpoints.preview == "tcp://127.0.0.1:5557"
    assert (c.epics.beamline_prefix, c.epics.beamline_ca_port) == ("TXMSIM:", 5064)
    assert (c.epics.pv_prefix, c.epics.pv_ca_port) == ("TXM:LIVE:", 5066)


def test_rendered_default_parses_back_to_the_defaults():
    text = render_config()
    assert text.count("\n# ") > 10  # every key carries its comment
    assert config_from_dict(tomllib.loads(text)) == Config()


def test_overlay(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[averaging]\nframes = 4\n[ingest]\nqueue_policy = "drop-oldest"\n'
                    "max_payload_mb = 8\n")
    c = load_config(path)
    assert c.averaging.frames == 4 and c.ingest.queue_policy == "drop-oldest"
    assert c.ingest.max_payload_mb == 8.0 and c.correction == Config().correction


@pytest.mark.parametrize("text, words", [
    ("[nonsense]\na = 1\n", "unknown section [nonsense]"),
    ("[averaging]\nframez = 2\n", "[averaging] unknown key 'framez'"),
    ('[averaging]\nframes = "two"\n', "[averaging] frames: expected int"),
    ("[averaging]\nframes = 0\n", "[averaging] frames: 0 is below the minimum 1"),
    ('[ingest]\nqueue_policy = "maybe"\n', "[ingest] queue_policy: 'maybe' is not one of"),
    ("[correction]\nenabled = 1\n", "[correction] enabled: expected bool"),
    ("averaging = 3\n", "[averaging] must be a table"),
    ("[averaging\n", "not valid TOML"),
])
def test_bad_config_names_the_key(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert words in str(info.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/txmlive.toml")


def test_cli_config_default_and_bad_config(tmp_path):
    out = subprocess.run([sys.executable, "-m", "txmlive.cli", "config", "--default"],
                         capture_output=True, text=True, check=True).stdout
    assert config_from_dict(tomllib.loads(out)) == Config()
    bad = tmp_path / "bad.toml"
    bad.write_text("[ingest]\nrcvhwm = -1\n")
    proc = subprocess.run([sys.executable, "-m", "txmlive.cli", "config", "--config", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "[ingest] rcvhwm" in proc.stderr


def test_metrics_section_lists(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text("[metrics]\nroi = [0, 0, 256, 256]\nband_per_um = [2, 8]\n")
    c = load_config(path)
    assert c.metrics.roi == [0, 0, 256, 256] and c.metrics.band_per_um == [2.0, 8.0]
    path.write_text('[metrics]\nroi = [0, "a"]\n')
    with pytest.raises(ConfigError, match=r"\[metrics\] roi: expected a list of int"):
        load_config(path)


def test_motor_role_map(tmp_path):
    path = tmp_path / "bl18b.toml"
    path.write_text('[epics]\nbeamline_prefix = "BL18B:"\n[motors]\nzp_z_um = "OPT:ZP:Z"\n')
    c = load_config(path)
    assert c.motors["zp_z_um"] == "OPT:ZP:Z" and c.motors["energy_ev"] == "ENERGY"
    path.write_text('[motors]\nzp_w_um = "X"\n')
    with pytest.raises(ConfigError, match="unknown motor role 'zp_w_um'"):
        load_config(path)
