"""The audit trail, end to end: every request is recorded before its answer leaves, the
records decrypt only with the auditors' keys, the chain verifies after crashes, tampering is
located, and a store that cannot be written refuses answers (503) until it can again."""

import contextlib
import hashlib
import os
import re
import signal
import shutil
import stat
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from audit_trail import (check_every_answer_recorded, crash_drill, cut_after_checkpoint,
                         decrypt, export, export_items, export_live, records_of, refit_end,
                         run_moatctl, store_of, verify, verify_status, write_items)
from harness import (UNLIMITED_DATA, auditors, binary, binary_for_other_users, policy_dir,
                     running, server_config, sse_events, toml_text, wait_until)

FIXTURE = {"fixture": "fixture-fused"}

# Finance keeps prompts and answers in full (encrypted); everyone else their SHA-256.
RETENTION_DATA = UNLIMITED_DATA.replace(
    '[default_model]', '[departments.finance]\nretention = "full"\n[default_model]')


def chat(content: str, **extra) -> dict:
    return {"model": "fixture", "temperature": 0, "max_tokens": 6,
            "messages": [{"role": "user", "content": content}], **extra}


def files_under(directory) -> list:
    return [p for p in directory.rglob("*") if p.is_file()]


def test_every_request_is_recorded_encrypted_to_the_auditors_and_verifies(
        tmp_path, pki, alice):
    canary = f"CANARY-{uuid.uuid4()}"
    bob = pki.issue_client("legal", "bob-audit")
    config = server_config(pki, FIXTURE, policy={
        "directory": str(policy_dir(tmp_path / "policy", data=RETENTION_DATA))})
    seen: dict[str, tuple[int, str]] = {}

    def sent(response: httpx.Response, expected: int, label: str) -> None:
        assert response.status_code == expected, response.text
        seen[response.headers["x-request-id"]] = (expected, label)

    with running(tmp_path / "moatd", config) as server:
        with server.http(pki.ca_cert, alice) as api:
            sent(api.post("/v1/chat/completions", json=chat(f"Say hi. {canary}")), 200, "chat")
            with api.stream("POST", "/v1/chat/completions",
                            json=chat("Count.", stream=True)) as stream:
                assert sse_events(stream)[-1] == "[DONE]"
                sent(stream, 200, "stream")
            sent(api.post("/v1/chat/completions", json=chat("card 4111 1111 1111 1111")),
                 403, "card")
            sent(api.post("/v1/chat/completions", json=chat("mail me at a.b@example.com")),
                 200, "email")
            sent(api.post("/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"}), 400, "malformed")
            sent(api.post("/v1/chat/completions", json={**chat("x"), "model": "nope"}),
                 404, "unknown model")
            sent(api.get("/v1/models"), 200, "list")
        with server.http(pki.ca_cert, bob) as api:
            sent(api.post("/v1/chat/completions", json=chat("legal question")), 200, "legal")
        server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "policy reloaded" in server.log, 10, "the policy reload")
        # The reload's record is durable before the next request's.
        with server.http(pki.ca_cert, alice) as api:
            sent(api.get("/v1/models"), 200, "after reload")

    team = auditors(pki.dir.parent / "auditors")
    out = export(store_of(config), tmp_path / "trail.jsonl")
    report = verify(out)
    # moatd signed everything at shutdown.
    assert re.search(r"unsigned tail:\s+0 record", report), report
    records = decrypt(out, team.identities[0])
    # The second auditor reads the same trail.
    assert decrypt(out, team.identities[1]) == records

    kinds = [(r["kind"], r["action"]) for r in records]
    assert kinds[0] == ("admin", "node.start") and kinds[-1] == ("admin", "node.stop")
    assert ("admin", "policy.reload") in kinds
    reload = next(r for r in records if r["action"] == "policy.reload")
    assert reload["decision"] == "allow" and reload["subject"] == "SIGHUP"
    # The same SIGHUP read the TLS files again.
    tls = next(r for r in records if r["action"] == "tls.reload")
    assert tls["decision"] == "allow" and tls["subject"] == "SIGHUP"

    final = {r["request_id"]: r for r in records if r["kind"] == "request"}
    admissions = {r["request_id"]: r for r in records if r["kind"] == "admission"}
    assert set(final) == set(seen), "one final record per request"
    for request_id, (status, label) in seen.items():
        record = final[request_id]
        assert record["status"] == status, (label, record)
        assert record["node_id"] == "test-node"
        assert record["source_address"] == "127.0.0.1"
        # Inference ran only for requests whose admission was stored before it.
        ran = label in ("chat", "stream", "email", "legal")
        assert (request_id in admissions) == ran, label
        if ran:
            assert admissions[request_id]["sequence"] < record["sequence"]
            assert record["completion_tokens"] > 0 and record["decision"] == "allow"

    by_label = {label: final[rid] for rid, (_, label) in seen.items()}
    chat_admission = admissions[next(r for r, (_, l) in seen.items() if l == "chat")]
    assert chat_admission["department"] == "finance" and chat_admission["subject"] == "alice"
    assert chat_admission["prompt"] == {"kept": "full", "text": f"Say hi. {canary}"}
    assert by_label["chat"]["answer"]["kept"] == "full"
    card = by_label["card"]
    assert (card["decision"], card["reason"]) == ("deny", "content.card_number")
    # What a deny rule refused is masked even in the encrypted record.
    assert card["prompt"]["text"] == "card [REDACTED:card_number]"
    assert {"detector": "card_number", "count": 1} in card["findings"]
    email_admission = admissions[next(r for r, (_, l) in seen.items() if l == "email")]
    assert email_admission["prompt"]["text"] == "mail me at [REDACTED:email]"
    assert by_label["malformed"]["reason"] == "invalid_json"
    assert by_label["unknown model"]["reason"] == "model_not_found"
    assert by_label["list"]["action"] == "list_models"
    assert by_label["chat"]["action"] == "chat" and by_label["chat"]["model"] == "fixture"
    legal_admission = admissions[next(r for r, (_, l) in seen.items() if l == "legal")]
    assert legal_admission["prompt"] == {
        "kept": "sha256", "sha256": hashlib.sha256(b"legal question").hexdigest()}

    # The appliance holds ciphertext only, and no identity that could open it.
    state = store_of(config).parent
    for path in files_under(state):
        data = path.read_bytes()
        assert canary.encode() not in data, f"plaintext canary in {path}"
        assert b"AGE-SECRET-KEY" not in data, f"an age identity in {path}"
    key = state / "audit-signing.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600

    # The spreadsheet form of the same trail.
    csv = subprocess.run([binary("moatctl"), "audit", "decrypt", "--identity",
                          team.identities[0], "--format", "csv", out], capture_output=True)
    assert csv.returncode == 0, csv.stderr
    assert csv.stdout.startswith("\ufeff".encode()) and b"\r\n" in csv.stdout
    assert csv.stdout.count(b"\r\n") == len(records) + 1


def test_a_tampered_export_is_refused_naming_the_record(tmp_path, pki, alice):
    config = server_config(pki, FIXTURE)
    with running(tmp_path / "moatd", config) as server:
        with server.http(pki.ca_cert, alice) as api:
            for n in range(3):
                assert api.post("/v1/chat/completions", json=chat(f"q{n}")).status_code == 200
    out = export(store_of(config), tmp_path / "trail.jsonl")
    lines = out.read_text().splitlines(keepends=True)
    # Line 1 is the header, line 2 the start record: alter the third line's body.
    target = lines[2]
    at = target.index('"ciphertext":"') + len('"ciphertext":"') + 40
    flipped = target[:at] + ("A" if target[at] != "A" else "B") + target[at + 1:]
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text("".join(lines[:2] + [flipped] + lines[3:]))
    result = run_moatctl("audit", "verify", damaged)
    assert result.returncode == 13, result.stderr  # broken_link
    assert "record 1" in result.stderr and "broken_link" in result.stderr
    deleted = tmp_path / "deleted.jsonl"
    deleted.write_text("".join(lines[:2] + lines[3:]))
    result = run_moatctl("audit", "verify", deleted)
    assert result.returncode == 11, result.stderr  # gap
    assert "record 1" in result.stderr


def test_a_cut_or_edited_export_of_moatd_fails_its_signed_frame(tmp_path, pki, alice):
    """moatd signs each export's header and end: dropping what follows a checkpoint and
    editing the end and times to match, or editing the header, does not verify (18)."""
    config = server_config(pki, FIXTURE, audit={"checkpoint_every_records": 3})
    with running(tmp_path / "moatd", config) as server:
        with server.http(pki.ca_cert, alice) as api:
            for n in range(6):
                assert api.post("/v1/chat/completions", json=chat(f"q{n}")).status_code == 200
        whole = export_live(config["admin"]["socket"], tmp_path / "whole.jsonl")
    items = export_items(whole)
    pin = ("--node-key", items[0]["node_key"])
    assert verify_status(whole, *pin).returncode == 0
    checkpoints = [item["checkpoint"]["sequence"] for item in items if "checkpoint" in item]
    assert len(checkpoints) >= 3, checkpoints

    def refused(name: str, edited: list[dict]) -> str:
        result = verify_status(write_items(tmp_path / name, edited), *pin)
        assert result.returncode == 18, (name, result.stdout, result.stderr)
        assert "bad_frame" in result.stderr
        return result.stderr

    for sequence in checkpoints[:-1]:
        refused(f"cut-{sequence}.jsonl", cut_after_checkpoint(items, sequence))
    header, body, end = items[0], items[1:-1], items[-1]["end"]
    stored = [item["record"]["unix_ms"] for item in body if "record" in item]
    for field, value in [("since_unix_ms", stored[2]), ("until_unix_ms", stored[-2]),
                         ("created_unix_ms", header["created_unix_ms"] + 3_600_000)]:
        refused(f"edited-{field}.jsonl", [{**header, field: value}, *body, items[-1]])
    # The first records dropped and the anchor moved to the genuine checkpoint before the
    # rest: the chain verifies from there, the frame does not.
    first = checkpoints[0]
    at = next(n for n, item in enumerate(body)
              if item.get("checkpoint", {}).get("sequence") == first)
    rest = body[at + 1:]
    counts = {"records": sum("record" in item for item in rest),
              "checkpoints": sum("checkpoint" in item for item in rest)}
    moved = [{**header, "anchor": body[at]["checkpoint"]}, *rest, {"end": {**end, **counts}}]
    refused("moved-anchor.jsonl", moved)


def test_verify_after_catches_an_older_export_and_a_rewritten_history(tmp_path, pki, alice):
    """An auditor keeps each export and verifies the next one --after it: handing over the
    older one as the newer fails (19); so does a history root rewrote with the node's own
    key by rolling the store back and letting moatd chain and sign anew (20)."""
    config = server_config(pki, FIXTURE)
    socket, store = config["admin"]["socket"], store_of(config)

    def serve(label: str, requests: int) -> Path:
        with running(tmp_path / "moatd", config) as server:
            with server.http(pki.ca_cert, alice) as api:
                for n in range(requests):
                    response = api.post("/v1/chat/completions", json=chat(f"{label} {n}"))
                    assert response.status_code == 200
            return export_live(socket, tmp_path / f"{label}.jsonl")

    serve("first", 2)
    backup = tmp_path / "audit-backup"
    shutil.copytree(store, backup)
    held = serve("held", 3)
    newer = serve("newer", 2)
    pin = ("--node-key", export_items(held)[0]["node_key"])
    head = export_items(held)[-1]["end"]["head"]

    extends = verify_status(newer, *pin, "--after", held)
    assert extends.returncode == 0, extends.stderr
    assert f"extends:          the head held, record {head['sequence']}" in extends.stdout
    older = verify_status(held, *pin, "--after", newer)
    assert older.returncode == 19, older.stderr
    assert "older: the export's chain head is record" in older.stderr

    # Root puts the old store back; moatd (same key) goes on from there past the held head.
    shutil.rmtree(store)
    shutil.copytree(backup, store)
    forked = serve("forked", 12)
    alone = verify_status(forked, *pin)
    assert alone.returncode == 0, alone.stderr  # signed by the node: it verifies on its own
    for after in (("--after", held), ("--after-head", f"{head['sequence']}:{head['hash']}")):
        caught = verify_status(forked, *pin, *after)
        assert caught.returncode == 20, caught.stderr
        forked_at = f"forked: at record {head['sequence']} the export's chain has hash"
        assert forked_at in caught.stderr, caught.stderr


def test_kill_9_under_load_loses_no_answered_request(tmp_path, pki, alice):
    """20 crashes at random moments under load: every answer a client saw has its record,
    the store opens each time, and the chain across all runs verifies."""
    config = server_config(pki, FIXTURE, audit={"checkpoint_every_records": 50})
    answered = crash_drill(tmp_path / "moatd", config, pki.ca_cert, alice, runs=20, seed=20)
    assert len(answered) > 100, "the load must have been answered"
    records = records_of(config, auditors(pki.dir.parent / "auditors"), tmp_path)
    check_every_answer_recorded(records, answered)
    starts = [r for r in records if r["action"] == "node.start"]
    assert len(starts) == 20


@contextlib.contextmanager
def small_filesystem(directory, megabytes: int):
    """A tmpfs of its own at `directory`, or a skip where this machine cannot mount."""
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs",
                              str(directory)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def fill(directory) -> object:
    """Fills the filesystem of `directory` to the last byte; returns the filler's path."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)
    return filler


def test_a_full_or_read_only_store_refuses_answers_at_once_and_recovers(tmp_path, pki, alice):
    state = tmp_path / "state"
    with small_filesystem(state, 64):
        config = server_config(pki, FIXTURE, audit={"state_directory": str(state)})
        with running(tmp_path / "moatd", config) as server, \
                server.http(pki.ca_cert, alice) as api:
            assert api.post("/v1/chat/completions", json=chat("before")).status_code == 200

            def refused(label: str) -> None:
                started = time.monotonic()
                response = api.post("/v1/chat/completions", json=chat(label))
                took = time.monotonic() - started
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "audit_unavailable"
                assert took < 1.0, f"503 after {took:.2f} s"

            def until_refused(label: str) -> None:
                # sled may still have room in pages it already holds: records that fit
                # there are durable and answered; the first that does not is refused.
                for n in range(500):
                    response = api.post("/v1/chat/completions", json=chat(f"{label} {n}"))
                    if response.status_code != 200:
                        break
                refused(label)

            filler = fill(state)
            until_refused("full")
            for n in range(3):
                refused(f"full {n}")
            os.unlink(filler)
            response = api.post("/v1/chat/completions", json=chat("room again"))
            assert response.status_code == 200, response.text

            # Full again, then read-only: moatd closed the store at the write error, so
            # the filesystem can be remounted read-only under it (a kernel does this to a
            # failing disk); it cannot open the store for writing until it is writable.
            filler = fill(state)
            until_refused("full again")
            remount = ["mount", "-o", "remount,{}", str(state)]
            subprocess.run([a.format("ro") for a in remount], check=True)
            try:
                refused("read-only")
                refused("still read-only")
            finally:
                subprocess.run([a.format("rw") for a in remount], check=True)
            os.unlink(filler)
            response = api.post("/v1/chat/completions", json=chat("writable again"))
            assert response.status_code == 200, server.log[-3000:]
            assert "audit records could not be made durable" in server.log

        records = records_of(config, auditors(pki.dir.parent / "auditors"), tmp_path)
        answered = {r["request_id"] for r in records if r["kind"] == "request"}
        assert len(answered) >= 3


def test_moatd_refuses_to_serve_without_an_auditor(tmp_path, pki):
    config = server_config(pki, FIXTURE, audit={"recipients": []})
    path = tmp_path / "moat.toml"
    path.write_text(toml_text(config))
    result = subprocess.run([binary("moatd"), "serve", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 64, result.stderr
    assert "audit.recipients" in result.stderr


def test_a_single_auditor_is_warned_about(tmp_path, pki, alice):
    team = auditors(pki.dir.parent / "auditors")
    config = server_config(pki, FIXTURE, audit={"recipients": [team.recipients[0]]})
    with running(tmp_path / "moatd", config) as server:
        assert "single auditor key" in server.log


def as_nobody() -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


def test_the_running_node_exports_and_verifies_over_its_admin_socket(tmp_path, pki, alice):
    # A directory anyone may enter, so that only the socket's own mode and moatd's check
    # of the peer stand between a local user and the trail.
    public = Path(tempfile.mkdtemp(prefix="moat-admin-", dir="/tmp"))
    public.chmod(0o755)
    socket = str(public / "admin.sock")
    config = server_config(pki, FIXTURE, admin={"socket": socket})
    team = auditors(pki.dir.parent / "auditors")
    with running(tmp_path / "moatd", config) as server:
        with server.http(pki.ca_cert, alice) as api:
            ids = [api.post("/v1/chat/completions", json=chat(f"live {n}"))
                   .headers["x-request-id"] for n in range(3)]
        assert stat.S_IMODE(os.stat(socket).st_mode) == 0o660
        out = tmp_path / "live.jsonl"
        result = run_moatctl("audit", "export", "--socket", socket, "--out", out)
        assert result.returncode == 0, result.stderr
        # Signed up to the export: nothing unsigned although moatd keeps running.
        assert re.search(r"unsigned tail:\s+0 record", verify(out))
        final = {r["request_id"] for r in decrypt(out, team.identities[0])
                 if r["kind"] == "request"}
        assert set(ids) <= final
        live = run_moatctl("audit", "verify", "--live", "--socket", socket)
        assert live.returncode == 0, live.stderr
        assert "verifies" in live.stdout

        # Someone who is not an admin, on a socket left open by mistake: refused, recorded.
        os.chmod(socket, 0o666)
        refused = subprocess.run(
            [binary_for_other_users("moatctl"), "audit", "export", "--socket", socket, "--out",
             "/tmp/never-written.jsonl"],
            capture_output=True, text=True, timeout=60, preexec_fn=as_nobody)
        assert refused.returncode == 1
        assert "permission denied" in refused.stderr, refused.stderr
        assert not os.path.exists("/tmp/never-written.jsonl")
        # With the socket's mode as moatd set it, the kernel refuses the connection.
        os.chmod(socket, 0o660)
        locked = subprocess.run(
            [binary_for_other_users("moatctl"), "audit", "verify", "--live", "--socket", socket],
            capture_output=True, text=True, timeout=60, preexec_fn=as_nobody)
        assert locked.returncode == 1 and "Permission denied" in locked.stderr
    assert not os.path.exists(socket), "moatd removes its socket when it stops"
    public.rmdir()
    records = records_of(config, team, tmp_path)
    exports = [r for r in records if r["action"] == "audit.export"]
    assert [r["decision"] for r in exports] == ["allow", "allow", "deny"]
    assert exports[0]["subject"].startswith("uid=0 ")
    assert exports[2]["subject"].startswith("uid=65534 ")


def test_the_audit_socket_serves_auditors_the_export_and_nothing_else(tmp_path, pki, alice):
    """Members of the audit group (here nogroup, so that the test's unprivileged user is
    one) export the trail over the audit socket; they cannot use the admin socket, and the
    audit socket refuses every other command, even to root."""
    if os.geteuid() != 0:
        pytest.skip("switching to an unprivileged user needs root")
    public = Path(tempfile.mkdtemp(prefix="moat-admin-", dir="/tmp"))
    public.chmod(0o755)
    admin_socket, audit_socket = public / "admin.sock", public / "audit.sock"
    config = server_config(pki, FIXTURE, admin={"socket": str(admin_socket),
                                                 "audit_group": "nogroup"})
    team = auditors(pki.dir.parent / "auditors")
    with running(tmp_path / "moatd", config) as server:
        with server.http(pki.ca_cert, alice) as api:
            asked = api.post("/v1/chat/completions", json=chat("for the auditors"))
            assert asked.status_code == 200
        info = os.stat(audit_socket)
        assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == 65534

        # Somewhere the auditor may write.
        drop = Path(tempfile.mkdtemp(prefix="moat-auditor-", dir="/tmp"))
        drop.chmod(0o777)
        out = drop / "by-an-auditor.jsonl"
        exported = subprocess.run(
            [binary_for_other_users("moatctl"), "audit", "export", "--socket", audit_socket,
             "--out", out],
            capture_output=True, text=True, timeout=60, preexec_fn=as_nobody)
        assert exported.returncode == 0, exported.stderr
        ids = {r["request_id"] for r in decrypt(out, team.identities[0])}
        assert asked.headers["x-request-id"] in ids

        # The admin socket stays closed to the auditor (the kernel refuses it).
        locked = subprocess.run(
            [binary_for_other_users("moatctl"), "model", "list", "--socket", admin_socket],
            capture_output=True, text=True, timeout=60, preexec_fn=as_nobody)
        assert locked.returncode != 0 and "Permission denied" in locked.stderr
        # The audit socket refuses model commands, to the auditor and to root alike.
        for preexec in (as_nobody, None):
            refused = subprocess.run(
                [binary_for_other_users("moatctl"), "model", "list", "--socket", audit_socket],
                capture_output=True, text=True, timeout=60, preexec_fn=preexec)
            assert refused.returncode != 0
            assert "not served on the audit socket" in refused.stderr, refused.stderr
    assert not audit_socket.exists(), "moatd removes its sockets when it stops"
    shutil.rmtree(drop)
    public.rmdir()
    records = records_of(config, team, tmp_path)
    listed = [(r["action"], r["decision"], r["subject"].split()[0]) for r in records
              if r["action"] in ("audit.export", "model.list")]
    assert listed == [("audit.export", "allow", "uid=65534"),
                      ("model.list", "deny", "uid=65534"),
                      ("model.list", "deny", "uid=0")]
