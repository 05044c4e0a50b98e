"""Audit retention against a clock set forward, from outside moatd: with
`retention_days = 30`, records of today must survive moatd starting on a clock 400 days
ahead (an admin's `date -s`, a wrong NTP server), which libfaketime shows moatd alone.
moatd judges what is old by its chain's newest signed checkpoint, logs the clock that is
more than a day ahead of it, and prunes nothing."""

from pathlib import Path

import pytest

from audit_trail import records_of
from harness import Moatd, auditors, server_config

LIBFAKETIME = next(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"), None)

pytestmark = pytest.mark.skipif(
    LIBFAKETIME is None,
    reason="needs libfaketime (apt-get install faketime; scripts/setup.sh installs it)")

FIXTURE = {"fixture": "fixture-fused"}
DAY_MS = 86_400_000


def chat(api, content: str) -> str:
    response = api.post("/v1/chat/completions", json={
        "model": "fixture", "temperature": 0, "max_tokens": 4,
        "messages": [{"role": "user", "content": content}]})
    assert response.status_code == 200, response.text
    return response.headers["x-request-id"]


def a_year_on() -> dict[str, str]:
    """moatd's environment with its wall clock 400 days ahead; its monotonic clock, which
    setting the time does not move, left alone."""
    return {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": "+400d",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_DONT_RESET": "1"}


def test_a_clock_set_forward_prunes_no_record_inside_its_retention(tmp_path, pki, alice):
    config = server_config(pki, FIXTURE, audit={"retention_days": 30})
    server = Moatd.start(tmp_path / "today", config)
    try:
        with server.http(pki.ca_cert, alice) as api:
            answered = {chat(api, f"kept {n}") for n in range(3)}
    finally:
        server.stop()  # signs the final checkpoint, today

    forward = Moatd.start(tmp_path / "a-year-on", config, env=a_year_on())
    forward.stop()

    records = records_of(config, auditors(pki.dir.parent / "auditors"), tmp_path)
    kept = {r["request_id"] for r in records if r["kind"] == "request"}
    assert answered <= kept, f"pruned though inside their retention: {answered - kept}"
    assert "ahead of the newest signed checkpoint" in forward.log, forward.log
    assert "pruned audit records" not in forward.log, forward.log
    # moatd did run on the moved clock: its own start record says so.
    today = max(r["unix_ms"] for r in records if r["request_id"] in answered)
    assert any(r["kind"] == "admin" and r["unix_ms"] > today + 399 * DAY_MS
               for r in records), [(r["kind"], r["action"], r["unix_ms"]) for r in records]
