"""An answer leaves only once its audit records would survive a power cut, seen from
outside moatd: strace watches every file write and sync while a request whose record is
bigger than sled's blob threshold (a quarter of a 512 KiB log segment) is answered. Every
file written for that request must be synced (fsync or fdatasync, not sync_file_range, which
leaves data in the disk's cache) after its last write and before the first byte of the
answer is sent, and every file created for it must have its directory synced by then too,
or the new file's name may not survive."""

import contextlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness import (MODELS, UNLIMITED_DATA, Moatd, policy_dir, server_config,
                     tls_context)

pytestmark = pytest.mark.skipif(shutil.which("strace") is None,
                                reason="needs strace (scripts/setup.sh installs it)")

EMBEDDING = {"embedder": "fixture-embedding"}
FULL_RETENTION = UNLIMITED_DATA.replace(
    "[default_department]\n", '[default_department]\nretention = "full"\n')
# 256 inputs of 1,100 letters: a prompt of 275 KiB, kept in full. One word each, so the
# fixture encoder's tokenizer reads each as a single unknown token and the request is quick.
INPUTS = 256
INPUT_LETTERS = 1100
BIG_RECORD = 256 * 1024

FILE_WRITES = ("write", "pwrite64", "pwritev", "pwritev2", "writev")
SOCKET_WRITES = ("write", "writev", "sendto", "sendmsg")
SYNCS = ("fsync", "fdatasync")
TRACED = sorted({"openat", "rename", "renameat", "renameat2", "sync_file_range",
                 *FILE_WRITES, *SOCKET_WRITES, *SYNCS})


def traced(trace: Path) -> list[str]:
    """A command prefix running moatd under strace: every thread, wall-clock timestamps
    (-ttt), time spent in each call (-T), descriptors decoded to paths and addresses."""
    return ["strace", "-f", "-ttt", "-T", "-yy", "--seccomp-bpf", "-e",
            "trace=" + ",".join(TRACED), "-o", str(trace), "--"]


@dataclass
class Call:
    """One system call: when it began and ended (seconds since the epoch), its name, the
    path or address of its first descriptor, its result."""

    start: float
    end: float
    name: str
    target: str
    args: str
    result: str


def calls_in(trace: Path) -> list[Call]:
    """The calls of an strace -f -ttt -T -yy log, each call split by another thread
    (`<unfinished ...>`, then `<... NAME resumed>`) put back together."""
    line_re = re.compile(r"(\d+)\s+(\d+\.\d+) (.*)")
    pending: dict[str, tuple[float, str]] = {}
    calls = []
    for line in trace.read_text(errors="replace").splitlines():
        m = line_re.match(line)
        if not m:
            continue
        pid, stamp, rest = m.group(1), float(m.group(2)), m.group(3)
        if rest.endswith("<unfinished ...>"):
            pending[pid] = (stamp, rest[:-len("<unfinished ...>")].rstrip())
            continue
        if resumed := re.match(r"<\.\.\. \w+ resumed>(.*)", rest):
            stamp, head = pending.pop(pid, (stamp, ""))
            rest = head + resumed.group(1)
        call = re.match(r"(\w+)\((.*)\)\s+=\s+(.*?)(?:\s+<(\d+\.\d+)>)?$", rest)
        if not call:
            continue  # a signal, an exit
        name, args, result, took = call.groups()
        target = re.match(r"-?\d+<(.*?)>(?:,|$)", args)
        calls.append(Call(stamp, stamp + float(took or 0), name,
                          target.group(1) if target else "", args, result))
    return calls


def is_file(target: str) -> bool:
    return (target.startswith("/") and not target.startswith(("/dev/", "/proc/", "/sys/"))
            and not target.endswith("(deleted)"))


@dataclass
class Writes:
    """What the calls of a time window did to files."""

    last_write: dict[str, float] = field(default_factory=dict)
    bytes_written: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    created: dict[str, float] = field(default_factory=dict)
    synced: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def between(cls, calls: list[Call], since: float, until: float) -> "Writes":
        writes = cls()
        for call in calls:
            if call.start < since or call.start >= until:
                continue
            if call.name in FILE_WRITES and is_file(call.target) and call.result.isdigit():
                writes.last_write[call.target] = call.start
                writes.bytes_written[call.target] += int(call.result)
            elif call.name in SYNCS and is_file(call.target) and call.result == "0":
                writes.synced[call.target].append(call.end)
            elif call.name == "openat" and "O_CREAT" in call.args:
                created = re.match(r"\d+<(.*)>$", call.result)
                if created and is_file(created.group(1)):
                    writes.created[created.group(1)] = call.start
        return writes

    def unsynced(self, answered: float) -> list[str]:
        """Files written and not synced after their last write and before `answered`."""
        return sorted(path for path, written in self.last_write.items()
                      if not any(written < done < answered for done in self.synced[path]))

    def unnamed(self, answered: float) -> list[str]:
        """Files created whose directory was not synced after and before `answered`."""
        return sorted(path for path, made in self.created.items()
                      if not any(made < done < answered
                                 for done in self.synced[str(Path(path).parent)]))


def big_request() -> bytes:
    rng = random.Random(7)
    # Letters that spell none of the content rules' markings.
    letters = "abdeghkmpquwxyz"
    inputs = ["".join(rng.choice(letters) for _ in range(INPUT_LETTERS))
              for _ in range(INPUTS)]
    return json.dumps({"model": "embedder", "input": inputs}).encode()


def test_a_big_record_is_on_disk_before_its_answer_leaves(tmp_path, pki, alice):
    if not (MODELS / EMBEDDING["embedder"]).is_dir():
        pytest.fail("missing the fixture encoder: run `bash scripts/setup.sh`")
    trace = tmp_path / "moatd.strace"
    config = server_config(pki, EMBEDDING, policy={
        "directory": str(policy_dir(tmp_path / "policy", data=FULL_RETENTION))})
    server = Moatd.start(tmp_path / "moatd", config, wrapper=traced(trace))
    moatd = server.pid
    body = big_request()
    try:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", server.port, timeout=120,
            context=tls_context(pki.ca_cert, alice))
        connection.connect()
        client_port = connection.sock.getsockname()[1]
        # A first request on the same connection, answered in full: moatd has sent all it
        # sends unasked (TLS session tickets), so what it writes on this connection after
        # `asked` is the big request's answer.
        connection.request("GET", "/v1/models")
        warm_up = connection.getresponse()
        assert warm_up.status == 200, warm_up.read()
        warm_up.read()
        asked = time.time()
        connection.request("POST", "/v1/embeddings", body=body,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = response.read()
        assert response.status == 200, answer[:500]
        assert len(json.loads(answer)["data"]) == INPUTS
        connection.close()
        # Stop moatd itself, so that strace sees it to the end, and strace ends with it.
        os.kill(moatd, signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0, server.log
    finally:
        # strace leaves the command it runs behind when it is stopped itself.
        with contextlib.suppress(ProcessLookupError):
            os.kill(moatd, signal.SIGKILL)
        server.stop()

    calls = calls_in(trace)
    ours = re.compile(rf"->[^\]]*:{client_port}\]$")
    sent = [c.start for c in calls
            if c.name in SOCKET_WRITES and ours.search(c.target) and c.start > asked]
    assert sent, f"no write to the client's connection (port {client_port}) in the trace"
    answered = min(sent)
    writes = Writes.between(calls, asked, answered)
    store = Path(config["audit"]["state_directory"]) / "audit"
    blobs = {path: size for path, size in writes.bytes_written.items()
             if Path(path).parent == store / "blobs"}
    print(f"files written for the request: {dict(writes.bytes_written)}; created: "
          f"{sorted(writes.created)}; synced: {sorted(writes.synced)}")
    # The case this test is about: the record went to a blob file of its own.
    assert any(size >= BIG_RECORD for size in blobs.values()), (
        f"no blob file of {BIG_RECORD} bytes or more was written: {dict(writes.bytes_written)}")
    assert writes.unsynced(answered) == [], (
        "written for the request and not synced before the answer left")
    assert writes.unnamed(answered) == [], (
        "created for the request, and the directory naming it not synced before the answer "
        "left")
