"""Starting and stopping: a clean stop lets in-flight requests finish and exits 0; a start
that cannot bind or finds no model says why with the documented status."""

import signal
import socket
import subprocess
import threading

import httpx
import pytest

from harness import MODELS, Moatd, binary, running, server_config, toml_text, wait_until

SMOLLM2 = {"smollm2": "smollm2-135m-instruct-exact"}


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT],
                         ids=["SIGTERM", "SIGINT"])
def test_stop_signal_lets_the_in_flight_request_finish_and_exits_0(
        tmp_path, pki, alice, stop_signal):
    """The documented stop: no new connections, in-flight requests get
    server.shutdown_grace_secs to finish, exit status 0."""
    config = server_config(pki, SMOLLM2, server={"shutdown_grace_secs": 30})
    server = Moatd.start(tmp_path / "moatd", config)
    try:
        result = {}
        with server.http(pki.ca_cert, alice) as http:
            def ask():
                try:
                    result["response"] = http.post("/v1/completions", json={
                        "model": "smollm2", "prompt": "Once upon a time, there was a little",
                        "temperature": 0, "max_tokens": 40})
                except httpx.HTTPError as e:
                    result["error"] = e

            asking = threading.Thread(target=ask)
            asking.start()
            wait_until(lambda: server.metrics().total("moat_active_sequences") == 1, 30,
                       "the request to start generating")
            server.process.send_signal(stop_signal)
            asking.join(timeout=60)
        assert "error" not in result, f"the in-flight request was cut: {result['error']!r}"
        response = result["response"]
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 40
        assert response.json()["choices"][0]["text"].startswith(" girl named Emma")
        assert server.process.wait(timeout=30) == 0, server.log
    finally:
        server.stop()


def test_port_in_use_exits_1_naming_the_address(tmp_path, pki):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        config = server_config(pki, {"fixture": "fixture-fused"}, server={"listen": [address]})
        path = tmp_path / "moat.toml"
        path.write_text(toml_text(config))
        result = subprocess.run([binary("moatd"), "serve", "--config", str(path)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert address in result.stderr
    assert "moatd is ready" not in result.stderr


def test_no_model_to_serve_is_a_config_error(tmp_path, pki):
    empty = tmp_path / "models"
    empty.mkdir()
    config = server_config(pki, {}, models={"directory": str(empty)})
    del config["models"]["serve"]
    path = tmp_path / "moat.toml"
    path.write_text(toml_text(config))
    result = subprocess.run([binary("moatd"), "serve", "--config", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 64, result.stderr
    assert str(empty) in result.stderr


def test_every_model_directory_is_served_when_none_is_named(tmp_path, pki, alice):
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny").symlink_to(MODELS / "fixture-fused")
    config = server_config(pki, {}, models={"directory": str(models)})
    del config["models"]["serve"]
    with running(tmp_path / "moatd", config) as server, \
            server.http(pki.ca_cert, alice) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny"]
