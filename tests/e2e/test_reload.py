"""`moatctl policy reload` finds moatd by its pid file, never by process name, seen as an
attacker on the host would set it up: a decoy process named moatd (a copy of `sleep`,
which SIGHUP would end) started before moatd must never get the signal, whether moatd is
not running yet, is running, or has stopped and left a pid file behind; the real moatd,
which holds its pid file, reloads."""

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from harness import binary, running, server_config, wait_until

FIXTURE = {"fixture": "fixture-fused"}


def reload(pid_file: Path) -> subprocess.CompletedProcess:
    """`moatctl policy reload` with the pid file named as an operator's environment
    names it (MOAT_PID_FILE), so that the command line is the same for every moatctl."""
    return subprocess.run([binary("moatctl"), "policy", "reload"], capture_output=True,
                          text=True, timeout=60,
                          env=dict(os.environ, MOAT_PID_FILE=str(pid_file)))


@pytest.fixture
def decoy(tmp_path):
    """A copy of sleep named moatd, as any local user could start, already running."""
    directory = tmp_path / "decoy"
    directory.mkdir()
    program = directory / "moatd"
    shutil.copy(shutil.which("sleep"), program)
    # SIGHUP ends it even where the tests run with it ignored (nohup): a signal shows.
    process = subprocess.Popen([program, "600"],
                               preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    yield process
    process.kill()
    process.wait(timeout=10)


def alive(process: subprocess.Popen) -> bool:
    try:
        process.wait(timeout=0.3)
    except subprocess.TimeoutExpired:
        return True
    return False


def test_reload_signals_the_moatd_holding_its_pid_file_and_never_a_decoy(tmp_path, pki,
                                                                         decoy):
    config = server_config(pki, FIXTURE)
    # moatd writes it beside its admin socket unless [admin] pid_file says otherwise.
    pid_file = Path(config["admin"]["socket"]).with_name("moatd.pid")

    # No moatd yet: nothing is signalled, the decoy least of all.
    before = reload(pid_file)
    assert alive(decoy), f"the decoy named moatd got the signal: {before}"
    assert before.returncode == 1, before
    assert "no pid file" in before.stderr, before.stderr

    with running(tmp_path / "moatd", config) as server:
        assert pid_file.read_text() == f"{server.process.pid}\n"
        result = reload(pid_file)
        assert result.returncode == 0, result
        assert f"(pid {server.process.pid}," in result.stdout, result.stdout
        wait_until(lambda: "policy reloaded" in server.log, 10, "the policy reload")
        assert alive(decoy), "the decoy named moatd got the signal"
    assert not pid_file.exists(), "moatd left its pid file behind"

    # moatd gone, a pid file left naming the decoy's pid (as after a crash and pid reuse):
    # nobody holds it, so nobody is signalled.
    pid_file.write_text(f"{decoy.pid}\n")
    after = reload(pid_file)
    assert alive(decoy), f"the decoy named moatd got the signal: {after}"
    assert after.returncode == 1, after
    assert "no process holds the pid file" in after.stderr, after.stderr
