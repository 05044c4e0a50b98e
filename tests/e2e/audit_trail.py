"""The auditor's side of the audit trail, with the real `moatctl audit`: export a stopped
node's store or a running one's, verify the export, decrypt it; edit an export as an
attacker would; and the crash drill: load on moatd, kill -9 at a random moment, then prove
every answer a client saw has its record."""

import json
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from harness import Auditors, ClientCert, Moatd, binary, moatctl


def store_of(config: dict) -> Path:
    return Path(config["audit"]["state_directory"]) / "audit"


def run_moatctl(*args) -> subprocess.CompletedProcess:
    """moatctl, whatever its exit status."""
    return subprocess.run([binary("moatctl"), *map(str, args)], capture_output=True,
                          text=True, timeout=120)


# Long crash drills make exports of tens of thousands of records.
SLOW = 600


def export(store: Path, out: Path, *options: str) -> Path:
    moatctl("audit", "export", "--store", store, "--out", out, *options, timeout=SLOW)
    return out


def verify(export_file: Path) -> str:
    """`moatctl audit verify`'s report of an intact export."""
    result = moatctl("audit", "verify", export_file, timeout=SLOW)
    return result.stdout + result.stderr


def export_live(socket: str | Path, out: Path) -> Path:
    """The running moatd's whole trail, exported through its admin socket: moatd signs it."""
    moatctl("audit", "export", "--socket", socket, "--out", out, timeout=SLOW)
    return out


def verify_status(export_file: Path, *options: str | Path) -> subprocess.CompletedProcess:
    """`moatctl audit verify`, whatever its exit status."""
    return run_moatctl("audit", "verify", export_file, *options)


def export_items(export_file: Path) -> list[dict]:
    """The lines of an export: header, records and checkpoints, end."""
    return [json.loads(line) for line in export_file.read_text().splitlines()]


def write_items(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item, separators=(",", ":")) + "\n" for item in items))
    return path


def refit_end(items: list[dict], end: dict) -> list[dict]:
    """`items` (header, records and checkpoints) closed by `end` with its counts, last
    record and head edited to match them, as someone without the node key would."""
    records = [item["record"] for item in items if "record" in item]
    last = {"sequence": records[-1]["sequence"], "hash": records[-1]["hash"]}
    fitted = {**end, "records": len(records), "last": last, "head": last,
              "checkpoints": sum(1 for item in items if "checkpoint" in item)}
    return [*items, {"end": fitted}]


def cut_after_checkpoint(items: list[dict], sequence: int) -> list[dict]:
    """The attack on an export: everything after the checkpoint at record `sequence`
    dropped, the end line made to match what is left, the creation time moved to just
    after its last record."""
    at = next(n for n, item in enumerate(items)
              if item.get("checkpoint", {}).get("sequence") == sequence)
    kept = [dict(item) for item in items[:at + 1]]
    last_stored = max(item["record"]["unix_ms"] for item in kept if "record" in item)
    kept[0]["created_unix_ms"] = last_stored + 1000
    return refit_end(kept, items[-1]["end"])


def decrypt(export_file: Path, identity: Path) -> list[dict]:
    """The records of an export, as an auditor reads them (JSON lines)."""
    out = export_file.with_suffix(".decrypted.jsonl")
    out.unlink(missing_ok=True)
    moatctl("audit", "decrypt", "--identity", identity, "--format", "jsonl", "--out", out,
            export_file, timeout=SLOW)
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def records_of(config: dict, auditors: Auditors, directory: Path) -> list[dict]:
    """Every record of a stopped node: exported, verified and decrypted."""
    out = export(store_of(config), directory / f"export-{time.monotonic_ns()}.jsonl")
    verify(out)
    return decrypt(out, auditors.identities[0])


@dataclass
class Load:
    """Clients sending short chats as fast as moatd answers them; what they saw answered."""

    server: Moatd
    ca: Path
    client: ClientCert
    threads: int = 4
    answered: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _run(self, seed: int) -> None:
        body = {"model": "fixture", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": f"load {seed}"}]}
        try:
            with self.server.http(self.ca, self.client, timeout=10) as client:
                while not self._stop.is_set():
                    response = client.post("/v1/chat/completions", json=body)
                    # Answered: the whole body arrived and is an answer.
                    if response.status_code == 200 and response.json()["choices"]:
                        self.answered.add(response.headers["x-request-id"])
        except (httpx.HTTPError, ValueError, KeyError):
            return  # the server died mid-request: that request was not answered

    def __enter__(self) -> "Load":
        self._workers = [threading.Thread(target=self._run, args=(n,), daemon=True)
                         for n in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=30)


def crash_drill(config_dir: Path, config: dict, ca: Path, client: ClientCert, runs: int,
                seed: int = 0) -> set[str]:
    """`runs` times: start moatd on the same store, load it, kill -9 it at a random moment.
    Returns the request ids clients saw answered."""
    rng = random.Random(seed)
    answered: set[str] = set()
    for _ in range(runs):
        server = Moatd.start(config_dir, config)
        with Load(server, ca, client) as load:
            time.sleep(rng.uniform(0.2, 1.5))
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(timeout=10)
        server.stop()
        answered |= load.answered
    return answered


def check_every_answer_recorded(records: list[dict], answered: set[str]) -> None:
    final = {r["request_id"]: r for r in records if r["kind"] == "request"}
    missing = sorted(answered - final.keys())
    assert not missing, f"{len(missing)} answered requests without a record: {missing[:5]}"
    for request_id in answered:
        assert final[request_id]["status"] == 200, final[request_id]
