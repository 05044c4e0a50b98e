"""Denial of service by certificate holders, tested from the attacker's side: a caller that
keeps being refused is turned away cheaply and summarised in the audit, a client that keeps
failing its handshake is closed before TLS, a slow body is cut off, a refused request costs
no grammar compiling, and a flood of refusals does not slow another department down."""

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from audit_trail import records_of
from harness import (Pki, auditors, policy_dir, running, server_config, sse_events,
                     tls_context)

FIXTURE_ONLY = {"fixture": "fixture-fused"}
CHAT = {"model": "fixture", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}

# Only finance may use the models; research holds a certificate and nothing else.
FINANCE_ONLY = """@id("finance-uses-everything")
permit (principal in Moat::Department::"finance", action, resource);
"""


def budget_config(pki: Pki, root: Path, **limits) -> dict:
    """A server with the budgets moatd has by default, unless `limits` says otherwise."""
    policies = policy_dir(root / "policies", FINANCE_ONLY)
    limits = {"refusals_per_window": 60, "failed_handshakes_per_window": 30,
              "refusal_window_secs": 60, **limits}
    return server_config(pki, FIXTURE_ONLY, policy={"directory": str(policies)},
                         limits=limits)


def test_a_caller_refused_too_often_is_turned_away_and_summarised(tmp_path, pki, alice):
    intruder = pki.issue_client("research", "intruder-budget")
    config = budget_config(pki, tmp_path, refusals_per_window=5, refusal_window_secs=60)
    with running(tmp_path / "moatd", config) as server:
        statuses = []
        with server.http(pki.ca_cert, intruder) as http:
            for i in range(40):
                response = (http.get("/nope") if i % 2 else
                            http.post("/v1/chat/completions", json=CHAT))
                statuses.append(response.status_code)
            turned_away = response
        assert statuses[:5] == [403, 404, 403, 404, 403], statuses
        assert statuses[5:] == [429] * 35, statuses
        assert turned_away.json()["error"]["code"] == "refusal_budget_exceeded"
        assert 1 <= int(turned_away.headers["retry-after"]) <= 60
        # Another department is not affected.
        with server.http(pki.ca_cert, alice) as http:
            assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
    records = records_of(config, auditors(pki.dir.parent / "auditors"), tmp_path)
    research = [r for r in records if r["kind"] == "request" and r["department"] == "research"]
    one_by_one = [r for r in research if r["action"] != "refusals"]
    summaries = [r for r in research if r["action"] == "refusals"]
    assert len(one_by_one) == 5, one_by_one
    assert len(summaries) == 1, summaries
    detail = json.loads(summaries[0]["detail"])
    assert detail["turned_away"] == 35
    assert detail["reasons"] == {"refusal_budget_exceeded": 35}
    assert summaries[0]["subject"] == "intruder-budget"


def test_an_address_failing_handshakes_is_closed_before_tls(tmp_path, pki, alice):
    stranger = Pki(tmp_path / "stranger-pki")
    outsider = stranger.issue_client("finance", "outsider")
    config = budget_config(pki, tmp_path, failed_handshakes_per_window=3,
                           refusal_window_secs=60)
    with running(tmp_path / "moatd", config) as server:
        for _ in range(3):
            try:
                with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
                    with tls_context(pki.ca_cert, outsider).wrap_socket(
                            raw, server_hostname="127.0.0.1") as tls:
                        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                        tls.recv(1)
            except (ssl.SSLError, ConnectionError):
                pass
        time.sleep(0.2)
        # Now even a valid certificate from that address is closed before the handshake.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            try:
                with tls_context(pki.ca_cert, alice).wrap_socket(
                        raw, server_hostname="127.0.0.1") as tls:
                    tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    closed = tls.recv(1) == b""
            except (ssl.SSLError, ConnectionError, OSError):
                closed = True
        assert closed, "a spent address still reached the TLS handshake"


def test_a_body_that_never_arrives_is_cut_off(tmp_path, pki, alice):
    config = budget_config(pki, tmp_path, body_read_timeout_ms=500)
    with running(tmp_path / "moatd", config) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
            with tls_context(pki.ca_cert, alice).wrap_socket(
                    raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                            b"content-type: application/json\r\ncontent-length: 1000\r\n\r\n"
                            b'{"model": ')
                started = time.monotonic()
                response = b""
                while b"\r\n\r\n" not in response:
                    chunk = tls.recv(4096)
                    if not chunk:
                        break
                    response += chunk
                waited = time.monotonic() - started
        assert response.startswith(b"HTTP/1.1 408"), response[:200]
        assert waited < 5, waited


def test_json_endpoints_take_only_json(moatd, pki, alice):
    with moatd.http(pki.ca_cert, alice) as http:
        for headers in ({"content-type": "text/plain"}, {}):
            response = http.post("/v1/chat/completions", content=json.dumps(CHAT).encode(),
                                 headers=headers)
            assert response.status_code == 415, response.text
            assert response.json()["error"]["code"] == "unsupported_media_type"
        response = http.post("/v1/chat/completions", json=CHAT,
                             headers={"content-type": "application/json; charset=utf-8"})
        assert response.status_code == 200


def test_a_refused_request_costs_no_grammar_compiling(tmp_path, pki):
    """research may not use the model: its request is refused before its response format is
    compiled (which an attacker could make as costly as the limits allow)."""
    intruder = pki.issue_client("research", "intruder-schema")
    config = budget_config(pki, tmp_path)
    # A schema that cannot be compiled: a compiler that ran would answer 400.
    unbuildable = {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}
    with running(tmp_path / "moatd", config) as server, \
            server.http(pki.ca_cert, intruder) as http:
        response = http.post("/v1/chat/completions",
                             json={**CHAT, "response_format": unbuildable})
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "deny.no_permit"


FLOODER = textwrap.dedent("""
    import json, os, ssl, sys, threading, time
    import httpx
    os.nice(19)  # the attacker is another machine: it must not take this one's CPU
    url, ca, cert, key, seconds = sys.argv[1:6]
    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(cert, key)
    deadline = time.monotonic() + float(seconds)
    counts = {}
    lock = threading.Lock()
    def hammer(i):
        with httpx.Client(base_url=url, verify=context, timeout=30) as http:
            while time.monotonic() < deadline:
                if i % 2:
                    r = http.get("/nope")
                else:
                    r = http.post("/v1/chat/completions", json={
                        "model": "fixture", "max_tokens": 1,
                        "messages": [{"role": "user", "content": "x"}]})
                with lock:
                    counts[r.status_code] = counts.get(r.status_code, 0) + 1
    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(64)]
    for t in threads: t.start()
    for t in threads: t.join()
    print(json.dumps(counts))
""")


def streamed_latencies(server, ca, client, count: int) -> list[float]:
    latencies = []
    body = {**CHAT, "max_tokens": 8, "stream": True}
    with server.http(ca, client) as http:
        for _ in range(count):
            started = time.monotonic()
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200, response.read()
                events = sse_events(response)
            assert events[-1] == "[DONE]"
            latencies.append(time.monotonic() - started)
    return sorted(latencies)


def p99(values: list[float]) -> float:
    return values[min(len(values) - 1, int(len(values) * 0.99))]


def store_bytes(config: dict) -> int:
    store = Path(config["audit"]["state_directory"]) / "audit"
    return sum(f.stat().st_size for f in store.rglob("*") if f.is_file())


def test_a_refusal_flood_does_not_slow_another_department(tmp_path, pki, alice):
    """64 connections of a permit-less certificate hammer an unknown path and a model it may
    not use for 30 s while finance streams: finance's p99 stays within 2x of idle, nothing
    gets 503, and the flood grows the audit store by less than 1 MB (beyond what the same
    number of finance's streams adds when idle)."""
    intruder = pki.issue_client("research", "intruder-flood")
    config = budget_config(pki, tmp_path)
    with running(tmp_path / "moatd", config) as server:
        streamed_latencies(server, pki.ca_cert, alice, 5)  # warm up
        start = store_bytes(config)
        idle = streamed_latencies(server, pki.ca_cert, alice, 200)
        before = store_bytes(config)
        idle_grown = before - start
        flood = subprocess.Popen(
            [sys.executable, "-c", FLOODER, server.api_url, str(pki.ca_cert),
             str(intruder.cert), str(intruder.key), "30"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=""))
        try:
            time.sleep(3)  # the flood is under way
            # As many streams as idle, while the flood lasts.
            loaded = []
            while flood.poll() is None and len(loaded) < len(idle):
                loaded.extend(streamed_latencies(server, pki.ca_cert, alice, 10))
            out, err = flood.communicate(timeout=120)
        finally:
            if flood.poll() is None:
                flood.send_signal(signal.SIGKILL)
        counts = {int(k): v for k, v in json.loads(out.strip()).items()}
        grown = store_bytes(config) - before
    assert flood.returncode == 0, err
    assert counts.get(429, 0) > 1000, counts
    assert 503 not in counts, counts
    loaded.sort()
    assert len(loaded) >= 100
    assert p99(loaded) <= 2 * p99(idle), (p99(idle), p99(loaded), counts)
    # Finance's own streams cost the same in both phases; what the flood adds is the rest.
    assert grown - idle_grown < 1_000_000, (grown, idle_grown, counts)
