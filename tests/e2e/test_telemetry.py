"""ONNX Runtime's own telemetry stays off, seen from outside moatd: run without
ORT_DISABLE_TELEMETRY in its environment (moatd must set it itself), with an empty HOME and
XDG_CACHE_HOME, in a network namespace of its own whose only interface is loopback, and
under strace watching every network call. Official ONNX Runtime builds would write a
device id and an event queue under $HOME/.cache/Microsoft/DeveloperTools/ when they start
and, within about a minute of serving, look up mobile.events.data.microsoft.com to upload
them. Neither may happen: nothing appears under HOME or XDG_CACHE_HOME, and the only
Internet sockets moatd opens are its own listeners on loopback."""

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness import MODELS, ONNXRUNTIME, Moatd, binary, server_config, sse_events
from network_trace import internet_addresses, is_loopback, joined

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "ip", "strace")),
    reason="watching moatd in a network namespace of its own needs root, unshare, ip (iproute2) "
           "and strace (scripts/setup.sh installs them as root)")

SERVED = {"smollm2": "smollm2-135m-instruct-exact", "minilm": "all-minilm-l6-v2"}
# ONNX Runtime's uploader looked up its collector within about a minute of `moatd serve`:
# serve, with requests now and then, for longer than that.
SERVE_SECONDS = 125
REQUEST_EVERY_SECONDS = 30
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


def isolated(trace: Path) -> list[str]:
    """A command prefix: what follows runs in a new network namespace with only loopback up,
    traced by strace (every thread, network calls only) into `trace`."""
    return ["unshare", "--net", "sh", "-c",
            'ip link set lo up && exec strace -f --seccomp-bpf -e trace=%network -o "$0" -- "$@"',
            str(trace)]


def environment_without_the_switch(home: Path, cache: Path) -> dict[str, str]:
    """This process's environment with nothing of ONNX Runtime's in it (no
    ORT_DISABLE_TELEMETRY: moatd must set it itself) and the empty HOME and cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORT_")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(cache))
    return env


def files_in(*directories: Path) -> list[str]:
    return sorted(str(p) for d in directories for p in d.rglob("*"))


@dataclass
class InternetSocket:
    """An AF_INET or AF_INET6 socket moatd made, and what it did with it."""

    opened: str
    bound: list[str] = field(default_factory=list)
    listening: bool = False


@dataclass
class NetworkCalls:
    """What an `strace -f -e trace=%network` log shows a process doing."""

    families: Counter = field(default_factory=Counter)
    internet_sockets: list[InternetSocket] = field(default_factory=list)
    accepted: int = 0
    # connect/sendto/sendmsg/sendmmsg to port 53 or beyond loopback, as logged.
    outbound: list[str] = field(default_factory=list)
    unix_peers: Counter = field(default_factory=Counter)

    @classmethod
    def parse(cls, trace: Path) -> "NetworkCalls":
        calls = cls()
        # File descriptors are the process's, shared by its threads; an fd number returned
        # again by socket() or accept() means the earlier socket was closed.
        open_sockets: dict[int, InternetSocket | None] = {}
        for line in joined(trace.read_text(errors="replace").splitlines()):
            call = re.match(r"\d+\s+(\w+)\((.*)", line)
            if not call:
                continue  # a signal, an exit
            name, args = call.groups()
            # A call that failed, or never returned, made no descriptor.
            returned = re.search(r"\)\s+=\s+(\d+)$", line)
            result = int(returned.group(1)) if returned else None
            fd = re.match(r"(\d+)", args)
            fd = int(fd.group(1)) if fd else None
            if name in ("socket", "socketpair"):
                family = args.split(",", 1)[0]
                calls.families[family] += 1
                if name == "socket" and result is not None:
                    if family in ("AF_INET", "AF_INET6"):
                        inet = InternetSocket(line)
                        calls.internet_sockets.append(inet)
                        open_sockets[result] = inet
                    else:
                        open_sockets[result] = None
                elif pair := re.search(r"\[(\d+), (\d+)\]", args):
                    for end in pair.groups():
                        open_sockets[int(end)] = None
            elif name in ("accept", "accept4") and result is not None:
                calls.accepted += "AF_INET" in args
                open_sockets[result] = None
            elif name == "bind" and open_sockets.get(fd):
                open_sockets[fd].bound.append(address_of(args) or args)
            elif name == "listen" and line.endswith("= 0") and open_sockets.get(fd):
                open_sockets[fd].listening = True
            if name in ("connect", "sendto", "sendmsg", "sendmmsg"):
                if peer := re.search(r'sa_family=AF_UNIX, sun_path=(@?"[^"]*")', args):
                    calls.unix_peers[peer.group(1)] += 1
                for family, port, address in internet_addresses(args):
                    if port == 53 or not is_loopback(address):
                        calls.outbound.append(line)
        return calls

    def unexpected_sockets(self) -> list[str]:
        """Internet sockets that did not become listeners bound to loopback."""
        return [s.opened for s in self.internet_sockets
                if not (s.listening and s.bound
                        and all(is_loopback(a.rsplit(":", 1)[0].strip("[]")) for a in s.bound))]

    def listeners(self) -> list[str]:
        return [a for s in self.internet_sockets if s.listening for a in s.bound]

    def summary(self) -> str:
        return (f"socket families {dict(self.families)}; Internet listeners {self.listeners()}; "
                f"Internet connections accepted {self.accepted}; Unix peers "
                f"{dict(self.unix_peers)}; calls to port 53 or beyond loopback {self.outbound}")


def address_of(args: str) -> str | None:
    found = internet_addresses(args)
    return f"{found[0][2]}:{found[0][1]}" if found else None


def in_network_of(pid: int) -> ThreadPoolExecutor:
    """One worker thread that lives in the network namespace of process `pid` (setns moves
    only the calling thread): clients run there reach what listens in that namespace."""

    def enter() -> None:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        try:
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"setns: {os.strerror(errno)}")
        finally:
            os.close(fd)

    return ThreadPoolExecutor(max_workers=1, initializer=enter)


@pytest.fixture
def empty_home(tmp_path) -> tuple[Path, Path]:
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    cache.mkdir()
    return home, cache


def test_generate_writes_nothing_home_and_opens_no_internet_socket(tmp_path, empty_home):
    home, cache = empty_home
    trace = tmp_path / "generate.strace"
    result = subprocess.run(
        [*isolated(trace), binary("moatd"), "generate",
         "--model", MODELS / SERVED["smollm2"], "--onnxruntime-library", ONNXRUNTIME,
         "--chat", "What is the capital of France?", "--max-tokens", "8"],
        capture_output=True, text=True, timeout=300,
        env=environment_without_the_switch(home, cache))
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    calls = NetworkCalls.parse(trace)
    print(f"moatd generate: {calls.summary()}")
    written = files_in(home, cache)
    assert not written, f"moatd generate wrote under the empty HOME and cache: {written}"
    assert calls.internet_sockets == [], calls.summary()
    assert calls.outbound == [], calls.summary()


def test_serving_writes_nothing_home_and_reaches_nothing_beyond_its_listeners(
        tmp_path, empty_home, pki, alice):
    absent = [d for d in SERVED.values() if not (MODELS / d).is_dir()]
    if absent:
        pytest.fail(f"missing model directories {absent}: run `bash scripts/setup.sh`")
    home, cache = empty_home
    trace = tmp_path / "serve.strace"
    server = Moatd.start(tmp_path / "moatd", server_config(pki, SERVED), wrapper=isolated(trace),
                         base_env=environment_without_the_switch(home, cache))
    served_since = time.monotonic()
    moatd = server.pid
    clients = in_network_of(server.process.pid)
    try:
        def requests() -> None:
            assert (os.readlink("/proc/thread-self/ns/net")
                    == os.readlink(f"/proc/{server.process.pid}/ns/net"))
            with server.http(pki.ca_cert, alice) as api:
                chat = api.post("/v1/chat/completions", json={
                    "model": "smollm2", "messages": FRANCE, "temperature": 0,
                    "max_tokens": 12})
                assert chat.status_code == 200, chat.text
                assert "Paris" in chat.json()["choices"][0]["message"]["content"]
                with api.stream("POST", "/v1/chat/completions", json={
                        "model": "smollm2", "messages": FRANCE, "temperature": 0,
                        "max_tokens": 12, "stream": True}) as streamed:
                    assert streamed.status_code == 200
                    assert sse_events(streamed)[-1] == "[DONE]"
                embedded = api.post("/v1/embeddings", json={
                    "model": "minilm", "input": ["The cat sits on the mat.", "hi"]})
                assert embedded.status_code == 200, embedded.text
                assert len(embedded.json()["data"][0]["embedding"]) == 384

        # Serving for SERVE_SECONDS is the point of the test (the uploader runs on its own
        # clock), so the pause between rounds of requests is a wait, not synchronisation.
        rounds = 0
        while True:
            clients.submit(requests).result(timeout=300)
            rounds += 1
            left = SERVE_SECONDS - (time.monotonic() - served_since)
            if left <= 0:
                break
            time.sleep(min(REQUEST_EVERY_SECONDS, left))
        # Stop moatd itself, so that strace sees it to the end, and strace ends with it.
        os.kill(moatd, signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0, server.log
    finally:
        clients.shutdown()
        # strace leaves the command it runs behind when it is stopped itself.
        with contextlib.suppress(ProcessLookupError):
            os.kill(moatd, signal.SIGKILL)
        server.stop()
    assert rounds >= 4
    calls = NetworkCalls.parse(trace)
    print(f"moatd serve: {calls.summary()}")
    written = files_in(home, cache)
    assert not written, f"moatd serve wrote under the empty HOME and cache: {written}"
    # The trace saw moatd's own network use: its API and metrics listeners, and the clients.
    assert len(calls.listeners()) >= 2, calls.summary()
    assert calls.accepted >= rounds, calls.summary()
    assert calls.unexpected_sockets() == [], calls.summary()
    assert calls.outbound == [], calls.summary()
