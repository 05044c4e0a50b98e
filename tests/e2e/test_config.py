"""`moatd serve` refuses a configuration it cannot serve with status 64, naming every
problem at once, before it loads a model or opens a port."""

import subprocess
from pathlib import Path

import pytest

from harness import binary, server_config, toml_text

EXIT_CONFIG = 64


def serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([binary("moatd"), "serve", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_every_bad_field_is_reported_at_once(tmp_path, pki):
    config = server_config(
        pki, {"fixture": "fixture-fused", "missing": "no-such-model"},
        server={"listen": []},
        tls={"certificate": "absent/server.crt", "private_key": "absent/server.key",
             "client_ca": []},
        metrics={"listen": "0.0.0.0:0"},
        limits={"max_tokens": 0, "max_body_bytes": 10})
    path = tmp_path / "moat.toml"
    path.write_text(toml_text(config))

    result = serve("--config", str(path))

    assert result.returncode == EXIT_CONFIG, result.stderr
    for problem in ["server.listen", "tls.certificate", "tls.private_key", "tls.client_ca",
                    "models.serve.missing", "metrics.listen", "limits.max_tokens",
                    "limits.max_body_bytes"]:
        assert problem in result.stderr, f"{problem} not reported:\n{result.stderr}"
    # Relative paths are resolved against the config file's directory.
    assert str(tmp_path / "absent" / "server.crt") in result.stderr
    assert "API listening" not in result.stderr


def test_serve_without_a_config_file_reads_the_production_path():
    """Without --config, serve reads /etc/moat/moat.toml (absent on a test machine): a
    configuration error that names the path and the option."""
    if Path("/etc/moat/moat.toml").exists():
        pytest.skip("this machine has a production configuration")
    result = serve()
    assert result.returncode == EXIT_CONFIG
    assert "/etc/moat/moat.toml" in result.stderr
    assert "--config" in result.stderr


def test_missing_config_file_is_a_config_error(tmp_path):
    result = serve("--config", str(tmp_path / "nowhere.toml"))
    assert result.returncode == EXIT_CONFIG
    assert "nowhere.toml" in result.stderr


def test_unknown_setting_is_a_config_error(tmp_path, pki):
    config = server_config(pki, {"fixture": "fixture-fused"}, server={"listn": ["x"]})
    path = tmp_path / "moat.toml"
    path.write_text(toml_text(config))
    result = serve("--config", str(path))
    assert result.returncode == EXIT_CONFIG
    assert "listn" in result.stderr


def test_malformed_toml_is_a_config_error(tmp_path):
    path = tmp_path / "moat.toml"
    path.write_text("[server\nlisten = ")
    result = serve("--config", str(path))
    assert result.returncode == EXIT_CONFIG
    assert str(path) in result.stderr


def test_unusable_certificate_files_are_a_config_error(tmp_path, pki):
    """Files that exist but hold no certificate or CRL stop the start before any model is
    loaded."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a PEM file\n")
    for tls in [{"certificate": str(garbage)}, {"crl": [str(garbage)]},
                {"client_ca": [{"file": str(garbage), "departments": "*"}]}]:
        config = server_config(pki, {"fixture": "fixture-fused"}, tls=tls)
        path = tmp_path / "moat.toml"
        path.write_text(toml_text(config))
        result = serve("--config", str(path))
        assert result.returncode == EXIT_CONFIG, (tls, result.stderr)
        assert str(garbage) in result.stderr, (tls, result.stderr)
        assert "model loaded" not in result.stderr, tls
