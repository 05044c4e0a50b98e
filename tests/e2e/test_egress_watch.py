"""The watch the shared moatd runs under (conftest.py) catches egress: a program under the
same strace command that sends a datagram to an Internet address from one thread and
connects to one from another is reported for both, and its Unix socket traffic is not."""

import shutil
import subprocess
import sys

import pytest

from network_trace import calls_in, egress_in, egress_watch

# Under CI=true the suite's no_quiet_skips plugin turns this skip into a failure.
if shutil.which("strace") is None:
    pytest.skip("needs strace (scripts/setup.sh installs it as root)", allow_module_level=True)

EGRESS = r"""
import socket, sys, threading, os

unix = sys.argv[1]
listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
listener.bind(unix)
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"local", unix)

def phone_home():
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.connect(("127.0.0.1", 9))
    except OSError:
        pass

thread = threading.Thread(target=phone_home)
thread.start()
thread.join()
socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).sendto(b"out", ("::1", 9))
"""


def test_the_watch_reports_internet_addresses_from_every_thread_and_not_unix_ones(tmp_path):
    trace = tmp_path / "egress.strace"
    result = subprocess.run(
        [*egress_watch(trace), sys.executable, "-c", EGRESS, str(tmp_path / "local.sock")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    egress = egress_in(trace)
    assert len(egress) == 2, trace.read_text()
    connect, = [line for line in egress if "connect(" in line]
    assert 'sin_addr=inet_addr("127.0.0.1")' in connect and "htons(9)" in connect
    sendto, = [line for line in egress if "sendto(" in line]
    assert "sa_family=AF_INET6" in sendto
    # The Unix datagram was seen, and not counted.
    assert calls_in(trace) >= 3, trace.read_text()
    assert "AF_UNIX" in trace.read_text()
