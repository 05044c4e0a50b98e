"""moatd under systemd's service protocol, without systemd: a datagram socket stands in for
systemd's notification socket (NOTIFY_SOCKET), and the test plays the manager, watching
READY, WATCHDOG, RELOADING and STOPPING arrive in order. Also: SIGHUP puts new CRLs and a
new server certificate in force without a restart, and refuses unusable ones. Logs are
journal entries with fields under systemd, or JSON lines when asked. Socket activation:
moatd serves on sockets it is given, from a network namespace with nothing in it."""

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness import (Moatd, Pki, binary, server_config, tls_context, toml_text,
                     wait_until)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "package"))
from activation import listening, placing  # noqa: E402  (shared with the package test)
from test_tls import handshake_then_get

FIXTURE_ONLY = {"fixture": "fixture-fused"}


class Manager:
    """Receives notifications on a Unix datagram socket, as systemd would."""

    def __init__(self, path: Path):
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))
        self.socket.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.socket.recv(4096)
            except socket.timeout:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().split("\n")
                          if "=" in line)
            self.messages.append(fields)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.socket.close()

    def wait_for(self, key: str, value: str | None = None, after: int = 0,
                 timeout: float = 60) -> int:
        """Index of the first message from `after` on that sets `key` (to `value`)."""
        def found():
            for i, message in enumerate(self.messages[after:], start=after):
                if key in message and (value is None or message[key] == value):
                    return i
            return None
        wait_until(lambda: found() is not None, timeout, f"{key}={value or '...'}")
        return found()

    def count(self, key: str, after: int = 0) -> int:
        return sum(1 for m in self.messages[after:] if key in m)


def test_ready_watchdog_reload_and_stop_arrive_in_order(tmp_path, pki):
    manager = Manager(tmp_path / "notify")
    config = server_config(pki, FIXTURE_ONLY)
    # A 2 s watchdog: moatd pings every second while it makes progress.
    server = Moatd.start(tmp_path / "moatd", config, env={
        "NOTIFY_SOCKET": str(manager.path), "WATCHDOG_USEC": "2000000"})
    try:
        ready = manager.wait_for("READY", "1")
        # Model loading asked for more time before readiness, naming the model.
        extensions = [m for m in manager.messages[:ready] if "EXTEND_TIMEOUT_USEC" in m]
        assert extensions and int(extensions[0]["EXTEND_TIMEOUT_USEC"]) > 0, manager.messages
        assert "fixture" in extensions[0]["STATUS"]
        assert manager.messages[ready]["STATUS"] == "serving fixture", manager.messages
        # READY comes only once the listeners answer.
        version, response = handshake_then_get(
            server.port, tls_context(pki.ca_cert, pki.issue_client("finance", "nina")))
        assert response.startswith(b"HTTP/1.1 200")

        wait_until(lambda: manager.count("WATCHDOG", after=ready) >= 3, 10,
                   "three watchdog pings")

        server.process.send_signal(signal.SIGHUP)
        reloading = manager.wait_for("RELOADING", "1", after=ready + 1)
        assert int(manager.messages[reloading]["MONOTONIC_USEC"]) > 0
        again = manager.wait_for("READY", "1", after=reloading)
        assert manager.messages[again]["STATUS"] == (
            "serving fixture; last reload: policy reloaded, TLS reloaded"), manager.messages

        server.process.send_signal(signal.SIGTERM)
        manager.wait_for("STOPPING", "1", after=again)
        assert server.process.wait(timeout=30) == 0, server.log
        assert "audit trail closed with a final checkpoint" in server.log
    finally:
        server.stop()
        manager.close()


def test_no_watchdog_pings_without_a_watchdog(tmp_path, pki):
    manager = Manager(tmp_path / "notify")
    server = Moatd.start(tmp_path / "moatd", server_config(pki, FIXTURE_ONLY),
                         env={"NOTIFY_SOCKET": str(manager.path)})
    try:
        manager.wait_for("READY", "1")
        time.sleep(1.5)
        assert manager.count("WATCHDOG") == 0, manager.messages
        assert "watchdog" not in server.log
    finally:
        server.stop()
        manager.close()


def test_sighup_puts_a_new_crl_and_server_certificate_in_force(tmp_path):
    pki = Pki(tmp_path / "pki")
    alice = pki.issue_client("finance", "alice")
    config = server_config(pki, FIXTURE_ONLY, tls={"crl": [str(pki.crl)]})
    server = Moatd.start(tmp_path / "moatd", config)
    try:
        context = tls_context(pki.ca_cert, alice)
        first_certificate = served_certificate(server.port, context)

        pki.revoke("alice")
        # The new CRL is on disk but not yet in force.
        assert handshake_then_get(server.port, context)[1].startswith(b"HTTP/1.1 200")

        # An unusable CRL is refused at reload; the one in force stays.
        good_crl = pki.crl.read_bytes()
        pki.crl.write_text("not a CRL")
        server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "TLS reload REFUSED" in server.log, 30, "the refused reload")
        assert handshake_then_get(server.port, context)[1].startswith(b"HTTP/1.1 200")

        # The real new CRL and a new server certificate: both in force after SIGHUP.
        pki.crl.write_bytes(good_crl)
        pki.issue_server("--force")
        server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "certificates, CAs and CRLs reloaded" in server.log, 30,
                   "the reload")
        with pytest.raises(ssl.SSLError) as refused:
            handshake_then_get(server.port, context)
        assert "CERTIFICATE_REVOKED" in str(refused.value).upper()
        bob = pki.issue_client("finance", "bob")
        second_certificate = served_certificate(server.port, tls_context(pki.ca_cert, bob))
        assert second_certificate != first_certificate
        assert second_certificate == ssl.PEM_cert_to_DER_cert(pki.server_cert.read_text())
        assert server.process.poll() is None
    finally:
        server.stop()


def served_certificate(port: int, context: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert(binary_form=True)


def reap(process: subprocess.Popen) -> None:
    """Kills `process` if it still runs, and closes its log pipe if it has one."""
    if process.poll() is None:
        process.kill()
        process.wait()
    if process.stderr:
        process.stderr.close()


def start_plain(tmp_path, pki, stderr, **env: str) -> subprocess.Popen:
    """moatd serving the fixture model, its log going where `stderr` says, in the form the
    environment asks for (the harness reads text logs only)."""
    directory = tmp_path / "moatd"
    directory.mkdir()
    config = directory / "moat.toml"
    config.write_text(toml_text(server_config(pki, FIXTURE_ONLY)))
    return subprocess.Popen(
        [binary("moatd"), "serve", "--config", str(config)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
        env=dict(os.environ, MOAT_LOG="info,ort=warn", **env))


def parse_journal_entry(data: bytes) -> dict[str, str]:
    """One datagram of journald's native protocol: `KEY=value` lines, or `KEY`, a newline,
    a 64-bit little-endian length and the raw value for values with newlines."""
    fields, i = {}, 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            i = end + 1
        else:
            key = line
            size = int.from_bytes(data[end + 1:end + 9], "little")
            value = data[end + 9:end + 9 + size]
            i = end + 9 + size + 1
        fields[key.decode()] = value.decode()
    return fields


def test_under_systemd_logs_are_journal_entries_with_fields(tmp_path, pki):
    """With stderr connected to the journal (JOURNAL_STREAM names it), moatd writes
    structured entries to journald's socket: MESSAGE, PRIORITY, and each field as MOAT_*."""
    journal_path = Path("/run/systemd/journal/socket")
    if journal_path.exists():
        pytest.skip("a journald runs here; this test stands in for one")
    if os.geteuid() != 0:
        pytest.skip("standing in for journald needs root (/run/systemd/journal)")
    made = [p for p in (journal_path.parent.parent, journal_path.parent) if not p.exists()]
    for directory in made:
        directory.mkdir()
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(journal_path))
    read_end, write_end = os.pipe()
    stream = os.fstat(write_end)
    process = start_plain(tmp_path, pki, write_end,
                          JOURNAL_STREAM=f"{stream.st_dev}:{stream.st_ino}")
    os.close(write_end)
    entries = []

    def receive():
        # As journald does, read everything: a full socket would hold up moatd's logging.
        while True:
            try:
                data = journal.recv(1 << 20)
            except OSError:
                return
            # The logging layer checks that the socket is there with an empty datagram.
            if data:
                entries.append(parse_journal_entry(data))

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    try:
        wait_until(lambda: any(e.get("MESSAGE") == "moatd is ready" for e in entries), 60,
                   "moatd is ready, in the journal")
        listening = next(e for e in entries if e.get("MESSAGE") == "API listening")
        assert listening["MOAT_URL"].startswith("https://127.0.0.1:"), listening
        assert listening["PRIORITY"] == "6"  # info
        assert listening["SYSLOG_IDENTIFIER"] == "moatd"
        assert listening["TARGET"].startswith("moat_daemon")
        unsigned = next(e for e in entries if "unsigned model directory" in e["MESSAGE"])
        assert unsigned["PRIORITY"] == "4"  # warning
        assert unsigned["MOAT_MODEL"] == "fixture"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        # Nothing went to stderr: every line was a journal entry.
        with os.fdopen(read_end, "rb") as stderr:
            read_end = None
            assert stderr.read() == b""
    finally:
        reap(process)
        if read_end is not None:
            os.close(read_end)
        journal.shutdown(socket.SHUT_RDWR)
        journal.close()
        receiver.join(timeout=5)
        journal_path.unlink()
        for directory in reversed(made):
            directory.rmdir()


def test_json_logs_are_one_object_per_line(tmp_path, pki):
    process = start_plain(tmp_path, pki, subprocess.PIPE, MOAT_LOG_FORMAT="json")
    try:
        lines = []
        for line in process.stderr:
            lines.append(json.loads(line))
            if lines[-1]["fields"].get("message") == "moatd is ready":
                break
        process.send_signal(signal.SIGTERM)
        rest = process.stderr.read()
        assert process.wait(timeout=30) == 0
        lines += [json.loads(line) for line in rest.splitlines()]
        listening = next(l for l in lines if l["fields"].get("message") == "API listening")
        assert listening["level"] == "INFO"
        assert listening["fields"]["url"].startswith("https://127.0.0.1:")
        assert lines[-1]["fields"]["message"] == "audit trail closed with a final checkpoint"
    finally:
        reap(process)


def activated(tmp_path, pki, passed: list[socket.socket], config: dict) -> subprocess.Popen:
    """moatd started as systemd starts it from moat.socket: the listening sockets `passed`
    as descriptors 3, 4, ... (LISTEN_FDS, LISTEN_PID), and moatd in a new network namespace
    of its own, empty, as PrivateNetwork= gives it."""
    directory = tmp_path / "moatd"
    directory.mkdir(parents=True)
    path = directory / "moat.toml"
    path.write_text(toml_text(config))
    return subprocess.Popen(
        ["unshare", "--net", "sh", "-c",
         f'LISTEN_PID=$$ LISTEN_FDS={len(passed)} exec "$0" serve --config "$1"',
         str(binary("moatd")), str(path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        pass_fds=tuple(range(3, 3 + len(passed))), preexec_fn=placing(passed),
        env=dict(os.environ, MOAT_LOG="info,ort=warn"))


needs_namespaces = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a network namespace of moatd's own needs root and unshare")


@needs_namespaces
def test_socket_activation_serves_without_a_network_of_its_own(tmp_path, pki):
    api, metrics = listening(), listening()
    api_port, metrics_port = api.getsockname()[1], metrics.getsockname()[1]
    config = server_config(pki, FIXTURE_ONLY, server={"listen": [f"127.0.0.1:{api_port}"]},
                           metrics={"listen": f"127.0.0.1:{metrics_port}"})
    process = activated(tmp_path, pki, [api, metrics], config)
    try:
        log = []
        for line in process.stderr:
            log.append(line)
            if "moatd is ready" in line:
                break
        assert process.poll() is None, "".join(log)
        assert sum("listening on the socket systemd passed" in l for l in log) == 2, log
        # Its network is not the host's: a namespace with nothing in it but a loopback
        # that is down.
        assert (os.readlink(f"/proc/{process.pid}/ns/net")
                != os.readlink("/proc/self/ns/net"))
        interfaces = Path(f"/proc/{process.pid}/net/dev").read_text().splitlines()[2:]
        assert [i.split(":")[0].strip() for i in interfaces] == ["lo"]
        # Yet it serves, on the sockets it was given.
        alice = pki.issue_client("finance", "activated-alice")
        version, response = handshake_then_get(api_port, tls_context(pki.ca_cert, alice))
        assert response.startswith(b"HTTP/1.1 200"), response
        with socket.create_connection(("127.0.0.1", metrics_port), timeout=10) as plain:
            plain.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert plain.recv(64).startswith(b"HTTP/1.1 200")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        reap(process)
        api.close()
        metrics.close()


@needs_namespaces
def test_passed_sockets_and_the_configuration_must_agree(tmp_path, pki):
    """A listener systemd did not pass cannot be opened in moatd's empty namespace, and a
    passed socket nobody listens on would swallow connections: both refuse the start."""
    api, metrics = listening(), listening()
    api_port, metrics_port = api.getsockname()[1], metrics.getsockname()[1]
    try:
        unknown = server_config(pki, FIXTURE_ONLY,
                                server={"listen": [f"127.0.0.1:{api_port}", "127.0.0.1:1"]},
                                metrics={"listen": f"127.0.0.1:{metrics_port}"})
        process = activated(tmp_path / "unknown", pki, [api, metrics], unknown)
        stderr = process.communicate(timeout=60)[1]
        assert process.returncode == 64, stderr
        assert "add ListenStream=127.0.0.1:1 to moat.socket" in stderr, stderr

        unclaimed = server_config(pki, FIXTURE_ONLY, server={"listen": [f"127.0.0.1:{api_port}"]},
                                  metrics={"enabled": False})
        process = activated(tmp_path / "unclaimed", pki, [api, metrics], unclaimed)
        stderr = process.communicate(timeout=60)[1]
        assert process.returncode == 64, stderr
        assert f"moat.toml does not listen on: [127.0.0.1:{metrics_port}]" in stderr, stderr
    finally:
        api.close()
        metrics.close()
