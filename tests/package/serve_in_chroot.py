#!/usr/bin/env python3
"""Runs the installed moatd in a chroot the way its systemd units would, and checks it.

    python3 tests/package/serve_in_chroot.py --chroot DIR --ca CA --cert CRT --key KEY

As moat.socket and moat.service would: this script opens the two listening sockets (API and
metrics, on free loopback ports it writes into /etc/moat/moat.toml, as an admin keeps the
two in step) and passes them to moatd (LISTEN_FDS), which runs in a new, empty network
namespace (PrivateNetwork=), as the service user `moat`, with NOTIFY_SOCKET pointing at a
datagram socket this script reads. Checks, in order: READY=1 arrives; moatd took both
passed sockets and its network namespace holds nothing but `lo`; the API answers a client
certificate's health check over mutual TLS;
`moatctl audit verify --live`, run as root in the chroot, verifies the node's trail over
its audit socket; SIGTERM brings STOPPING=1 and exit status 0. Prints one JSON line:
{"node_key", "records"} (the node key from the start log, the records the live check saw).
Uses the standard library only: it runs on the host, outside the chroot.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from activation import listening, placing

CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}


def in_chroot(root: Path, *command: str, env: dict[str, str] | None = None, **kwargs):
    return subprocess.Popen(["chroot", str(root), *command],
                            env={**CLEAN_ENV, **(env or {})}, **kwargs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chroot", type=Path, required=True)
    ap.add_argument("--ca", type=Path, required=True, help="the CA of moatd's certificate")
    ap.add_argument("--cert", type=Path, required=True, help="a department client certificate")
    ap.add_argument("--key", type=Path, required=True, help="its key")
    args = ap.parse_args()
    root = args.chroot

    notify_dir = Path(tempfile.mkdtemp(dir=root / "tmp"))
    notify_dir.chmod(0o755)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_dir / "notify"))
    (notify_dir / "notify").chmod(0o666)
    notify.settimeout(120)
    inside = "/" + str((notify_dir / "notify").relative_to(root))

    passed = [listening(), listening()]
    api_port, metrics_port = (p.getsockname()[1] for p in passed)
    config = root / "etc/moat/moat.toml"
    text = re.sub(r'(?m)^listen = \[.*\]$', f'listen = ["127.0.0.1:{api_port}"]',
                  config.read_text())
    text = re.sub(r'(?m)^listen = "[^"]*"', f'listen = "127.0.0.1:{metrics_port}"', text)
    config.write_text(text)

    lines: list[str] = []
    server = subprocess.Popen(
        ["unshare", "--net", "chroot", str(root),
         "setpriv", "--reuid=moat", "--regid=moat", "--init-groups", "/bin/sh", "-c",
         'LISTEN_PID=$$ LISTEN_FDS=2 exec /usr/bin/moatd serve --config /etc/moat/moat.toml'],
        env={**CLEAN_ENV, "NOTIFY_SOCKET": inside, "MOAT_LOG": "info,ort=warn"},
        pass_fds=(3, 4), preexec_fn=placing(passed),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for listener in passed:
        listener.close()
    reader = threading.Thread(target=lambda: lines.extend(l.rstrip() for l in server.stderr),
                              daemon=True)
    reader.start()

    def fail(message: str) -> int:
        if server.poll() is None:
            server.kill()
        server.wait()
        reader.join(timeout=5)
        print(f"FAILED: {message}\n--- moatd's log:\n" + "\n".join(lines), file=sys.stderr)
        return 1

    def receive(key: str) -> dict[str, str]:
        while True:
            try:
                data = notify.recv(4096).decode()
            except socket.timeout:
                raise TimeoutError(f"no {key} from moatd within 120 s") from None
            fields = dict(l.split("=", 1) for l in data.split("\n") if "=" in l)
            if key in fields:
                return fields

    try:
        ready = receive("READY")
    except TimeoutError as e:
        return fail(str(e))
    # The log is read by another thread: wait until it has the line moatd wrote just before
    # it notified systemd.
    deadline = time.monotonic() + 30
    while not any("moatd is ready" in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    log = "\n".join(lines)
    url = re.search(r"API listening url=https://([\d.]+):(\d+)", log)
    node_key = re.search(r"audit trail open .*key=([0-9a-f]{64})", log)
    if not url or not node_key:
        return fail("READY=1 came before the API listener and the audit trail were logged")
    if log.count("listening on the socket systemd passed") != 2:
        return fail("moatd did not serve on the two sockets it was passed")
    interfaces = Path(f"/proc/{server.pid}/net/dev").read_text().splitlines()[2:]
    if [i.split(":")[0].strip() for i in interfaces] != ["lo"]:
        return fail(f"moatd's network namespace is not empty: {interfaces}")

    context = ssl.create_default_context(cafile=str(args.ca))
    context.load_cert_chain(str(args.cert), str(args.key))
    with socket.create_connection((url.group(1), int(url.group(2))), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname=url.group(1)) as tls:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: moat\r\nConnection: close\r\n\r\n")
            response = b""
            while chunk := tls.recv(65536):
                response += chunk
    if not response.startswith(b"HTTP/1.1 200"):
        return fail(f"the health check over mutual TLS got {response[:80]!r}")

    live = in_chroot(root, "/usr/bin/moatctl", "audit", "verify", "--live",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = live.communicate(timeout=120)
    records = re.search(r"records:\s+(\d+)", out)
    if live.returncode != 0 or "verifies" not in out or not records:
        return fail(f"moatctl audit verify --live exited {live.returncode}:\n{out}{err}")

    server.send_signal(signal.SIGTERM)
    try:
        receive("STOPPING")
        status = server.wait(timeout=60)
    except (TimeoutError, subprocess.TimeoutExpired) as e:
        return fail(f"stopping: {e}")
    reader.join(timeout=5)
    notify.close()
    for path in notify_dir.iterdir():
        path.unlink()
    notify_dir.rmdir()
    if status != 0 or "audit trail closed with a final checkpoint" not in "\n".join(lines):
        return fail(f"moatd exited {status} without its final checkpoint")
    print(json.dumps({"node_key": node_key.group(1), "records": int(records.group(1)),
                      "status": ready.get("STATUS", "")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
