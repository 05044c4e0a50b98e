"""Signed model bundles, end to end: packed and signed with moatctl, imported into the
running moatd over its admin socket, activated after their golden prompts, swapped under
load without a failed request, canaried at an exact share, rolled back at once, and every
forged, altered, unsigned, older or hostile bundle refused with the serving model untouched;
a signed graph reaches no file outside its bundle and no operator moat does not serve."""

import io
import json
import shutil
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import onnx
import pytest

from audit_trail import records_of, run_moatctl
from harness import (MODELS, ONNXRUNTIME, auditors, binary, moatctl, running,
                     server_config)

SOURCE = MODELS / "fixture-fused"
PROMPT = "Hello"


@pytest.fixture(scope="module")
def golden_answer() -> str:
    """The fixture model's greedy answer to PROMPT, as `moatd generate` gives it."""
    result = subprocess.run(
        [binary("moatd"), "generate", "--model", SOURCE, "--chat", PROMPT,
         "--max-tokens", "8", "--onnxruntime-library", ONNXRUNTIME],
        capture_output=True, text=True, timeout=120, check=True)
    return result.stdout.removesuffix("\n")


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("keys")
    moatctl("keys", "generate", "--out", directory / "ml-team", "--comment", "ML team")
    moatctl("keys", "generate", "--out", directory / "rogue")
    trusted = directory / "trusted"
    trusted.mkdir()
    shutil.copy(directory / "ml-team.pub", trusted)
    return {"ml": directory / "ml-team.key", "rogue": directory / "rogue.key",
            "trusted": trusted}


def bundle(directory: Path, version: str, expect: str, key: Path | None,
           files: dict[str, bytes] | None = None) -> Path:
    """The fixture model packed as fixture@VERSION (signed with `key` unless None), with
    `files` (name -> bytes) added or put in place of the fixture's."""
    source = directory / f"src-{version}"
    source.mkdir(parents=True, exist_ok=True)
    for name in ("model.onnx", "tokenizer.json", "moat-model.json"):
        shutil.copy(SOURCE / name, source)
    for name, body in (files or {}).items():
        (source / name).write_bytes(body)
    (source / "bundle.toml").write_text(
        f'name = "fixture"\nversion = "{version}"\ntask = "chat"\n'
        f'classification_ceiling = "internal"\n\n[sampling]\ntemperature = 0.0\n\n'
        f'[[golden]]\nprompt = {json.dumps(PROMPT)}\nexpect = {json.dumps(expect)}\n'
        f'max_tokens = 8\n')
    out = directory / f"fixture-{version}.tar"
    moatctl("bundle", "pack", source, "--out", out)
    if key is not None:
        moatctl("bundle", "sign", out, "--key", key)
    return out


def rewrite(original: Path, out: Path, change) -> Path:
    """A copy of a bundle tar with `change(name, bytes) -> [(TarInfo, bytes|None)]`
    applied to each member."""
    with tarfile.open(original) as source, tarfile.open(out, "w") as target:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            for info, body in change(member.name, data):
                target.addfile(info, io.BytesIO(body) if body is not None else None)
    return out


def regular(name: str, body: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(body)
    return info, body


def config_for(pki, keys, tmp_path: Path) -> dict:
    config = server_config(pki, {})
    config["models"] = {"store": str(tmp_path / "store"), "trusted_keys": str(keys["trusted"])}
    return config


def admin(server_config: dict, *args, check=True) -> subprocess.CompletedProcess:
    socket = server_config["admin"]["socket"]
    command = [*args, "--socket", socket]
    return moatctl(*command, timeout=300) if check else run_moatctl(*command)


def ask(client, **extra):
    return client.post("/v1/chat/completions", json={
        "model": "fixture", "max_tokens": 2,
        "messages": [{"role": "user", "content": PROMPT}], **extra})


def version_of(response) -> str:
    assert response.status_code == 200, response.text
    return response.headers["x-moat-model-version"]


def test_bundles_are_verified_before_anything_is_registered(pki, alice, keys, tmp_path,
                                                            golden_answer):
    good = bundle(tmp_path, "1.0.0", golden_answer, keys["ml"])
    config = config_for(pki, keys, tmp_path)
    with running(tmp_path / "node", config) as server:
        # No model yet: not ready, and the name is unknown.
        with server.http(pki.ca_cert, alice) as client:
            assert client.get("/readyz").status_code == 503
            assert ask(client).status_code == 404
        imported = admin(config, "model", "import", good)
        assert "imported fixture@1.0.0" in imported.stdout
        admin(config, "model", "activate", "fixture@1.0.0")
        with server.http(pki.ca_cert, alice) as client:
            assert version_of(ask(client)) == "fixture@1.0.0"
            assert client.get("/readyz").status_code == 200

        newer = bundle(tmp_path, "1.1.0", golden_answer, keys["ml"])
        refused = {
            "tampered file": (rewrite(newer, tmp_path / "tampered.tar", lambda name, data: [
                regular(name, data[:-1] + bytes([data[-1] ^ 1]) if name == "model.onnx"
                        else data)]), "was altered"),
            "wrong key": (bundle(tmp_path / "rogue", "1.1.0", golden_answer, keys["rogue"]),
                          "not among the 1 trusted key"),
            "missing signature": (bundle(tmp_path / "unsigned", "1.1.0", golden_answer, None),
                                  "not signed"),
            "lower version": (bundle(tmp_path / "old", "0.9.0", golden_answer, keys["ml"]),
                              "not newer than 1.0.0"),
            "missing file": (rewrite(newer, tmp_path / "missing.tar", lambda name, data: (
                [] if name == "tokenizer.json" else [regular(name, data)])),
                "missing from the bundle"),
            "path traversal": (rewrite(newer, tmp_path / "traversal.tar", lambda name, data: (
                [regular(name, data)] + ([regular("../../escape", b"x")]
                                         if name == "manifest.sig" else []))),
                "plain file names"),
            "symlink": (rewrite(newer, tmp_path / "symlink.tar", lambda name, data: (
                [regular(name, data)] if name != "tokenizer.json" else
                [(lambda i: (setattr(i, "type", tarfile.SYMTYPE),
                             setattr(i, "linkname", "/etc/shadow"), (i, None))[-1])(
                    tarfile.TarInfo("tokenizer.json"))])), "symbolic link"),
        }
        for case, (path, message) in refused.items():
            result = admin(config, "model", "import", path, check=False)
            assert result.returncode != 0, f"{case}: imported"
            assert message in result.stderr, f"{case}: {result.stderr}"
        assert not (tmp_path / "escape").exists()
        listed = json.loads(admin(config, "model", "list", "--json").stdout)
        [model] = listed["models"]
        assert [v["version"] for v in model["versions"]] == ["1.0.0"]

        # A version whose golden prompt fails is imported but never serves.
        wrong = bundle(tmp_path / "wrong", "1.2.0", "not what the model says", keys["ml"])
        admin(config, "model", "import", wrong)
        result = admin(config, "model", "activate", "fixture@1.2.0", check=False)
        assert result.returncode != 0 and "golden prompt 0" in result.stderr, result.stderr
        result = admin(config, "model", "remove", "fixture@1.0.0", check=False)
        assert "is active" in result.stderr
        with server.http(pki.ca_cert, alice) as client:
            assert version_of(ask(client)) == "fixture@1.0.0"
        status = json.loads(admin(config, "status", "--json").stdout)
        assert status["models"]["fixture"]["active"] == "1.0.0"

    records = records_of(config, auditors(pki.dir.parent / "auditors"), tmp_path)
    admin_records = [(r["action"], r["decision"], r["model"]) for r in records
                     if r["kind"] == "admin" and r["action"].startswith("model.")]
    assert ("model.import", "allow", "fixture@1.0.0") in admin_records
    assert ("model.activate", "allow", "fixture@1.0.0") in admin_records
    assert ("model.activate", "deny", "fixture@1.2.0") in admin_records
    assert sum(1 for a, d, _ in admin_records if a == "model.import" and d == "deny") == 7
    served = [r for r in records if r["kind"] == "request" and r["status"] == 200]
    assert served and all(r["model"] == "fixture@1.0.0" for r in served)


def test_swap_under_load_canary_rollback_and_restart(pki, alice, keys, tmp_path,
                                                      golden_answer):
    v1 = bundle(tmp_path, "1.0.0", golden_answer, keys["ml"])
    v2 = bundle(tmp_path, "2.0.0", golden_answer, keys["ml"])
    config = config_for(pki, keys, tmp_path)
    with running(tmp_path / "node", config) as server:
        admin(config, "model", "import", v1)
        admin(config, "model", "import", v2)
        admin(config, "model", "activate", "fixture@1.0.0")

        # Eight clients stream answers without pause while 2.0.0 takes over.
        stop = threading.Event()
        failures: list[str] = []
        seen: set[str] = set()
        answered = [0]

        def stream_forever():
            with server.http(pki.ca_cert, alice) as client:
                while not stop.is_set():
                    with client.stream("POST", "/v1/chat/completions", json={
                            "model": "fixture", "max_tokens": 12, "stream": True,
                            "messages": [{"role": "user", "content": PROMPT}]}) as response:
                        body = response.read().decode()
                        if response.status_code != 200 or "data: [DONE]" not in body:
                            failures.append(f"{response.status_code}: {body[:200]}")
                        else:
                            seen.add(response.headers["x-moat-model-version"])
                            answered[0] += 1

        threads = [threading.Thread(target=stream_forever) for _ in range(8)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.0)
            admin(config, "model", "activate", "fixture@2.0.0")
            time.sleep(1.0)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        assert not failures, failures[:3]
        assert seen == {"fixture@1.0.0", "fixture@2.0.0"}, seen
        assert answered[0] >= 16

        # Rollback: the previous version is still loaded, so it is back at once.
        started = time.monotonic()
        admin(config, "model", "rollback", "fixture")
        elapsed = time.monotonic() - started
        print(f"rollback with moatctl took {elapsed * 1000:.0f} ms")
        assert elapsed < 1.0, f"rollback took {elapsed:.2f} s"
        with server.http(pki.ca_cert, alice) as client:
            assert version_of(ask(client)) == "fixture@1.0.0"

        # A canary takes its share of 1,000 requests, within ±5 points.
        admin(config, "model", "canary", "fixture@2.0.0", "--percent", "20")
        counts = {"fixture@1.0.0": 0, "fixture@2.0.0": 0}
        lock = threading.Lock()

        def send(n):
            with server.http(pki.ca_cert, alice) as client:
                for _ in range(n):
                    version = version_of(ask(client, max_tokens=1))
                    with lock:
                        counts[version] += 1

        senders = [threading.Thread(target=send, args=(125,)) for _ in range(8)]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join(timeout=600)
        assert sum(counts.values()) == 1000
        share = counts["fixture@2.0.0"] / 10
        assert 15 <= share <= 25, counts
        admin(config, "model", "promote", "fixture")
        with server.http(pki.ca_cert, alice) as client:
            assert version_of(ask(client)) == "fixture@2.0.0"

    # The registry survives a restart: 2.0.0 is active again, 1.0.0 its previous.
    with running(tmp_path / "node", config) as server:
        with server.http(pki.ca_cert, alice) as client:
            assert version_of(ask(client)) == "fixture@2.0.0"
        listed = json.loads(admin(config, "model", "list", "--json").stdout)
        versions = {v["version"]: v for v in listed["models"][0]["versions"]}
        assert versions["2.0.0"]["active"] and versions["1.0.0"]["previous"]
        admin(config, "model", "rollback", "fixture")
        with server.http(pki.ca_cert, alice) as client:
            assert version_of(ask(client)) == "fixture@1.0.0"
        admin(config, "model", "remove", "fixture@2.0.0")
        result = admin(config, "model", "import", v2, check=False)
        assert "not newer than 2.0.0" in result.stderr, result.stderr


def test_memory_budget_downgrade_and_inspect(pki, alice, keys, tmp_path, golden_answer):
    v1 = bundle(tmp_path, "1.0.0", golden_answer, keys["ml"])
    old = bundle(tmp_path / "old", "0.9.0", golden_answer, keys["ml"])
    tampered = rewrite(v1, tmp_path / "tampered.tar", lambda name, data: [
        regular(name, data + b"!" if name == "tokenizer.json" else data)])

    # The ML team's view of a bundle: every file checked, the signature by a trusted key.
    good = moatctl("bundle", "inspect", v1, "--trusted-keys", keys["trusted"]).stdout
    assert "fixture@1.0.0 (chat)" in good and "valid, by ml-team.pub" in good
    bad = run_moatctl("bundle", "inspect", tampered, "--trusted-keys", keys["trusted"])
    assert bad.returncode == 1 and "ALTERED" in bad.stdout, bad.stdout

    # The fixture's estimate (files twice over, one full-context KV cache) is a little over
    # half a MiB: one version fits a 1 MiB budget, two do not.
    v2 = bundle(tmp_path / "v2", "2.0.0", golden_answer, keys["ml"])
    config = config_for(pki, keys, tmp_path)
    config["models"]["memory_budget_mib"] = 1
    with running(tmp_path / "node", config) as server:
        admin(config, "model", "import", v1)
        admin(config, "model", "import", v2)
        admin(config, "model", "activate", "fixture@1.0.0")
        refused = admin(config, "model", "activate", "fixture@2.0.0", check=False)
        assert "memory budget" in refused.stderr, refused.stderr
        assert json.loads(admin(config, "status", "--json").stdout)["models"]["fixture"][
            "active"] == "1.0.0"
        with server.http(pki.ca_cert, alice) as client:
            assert version_of(ask(client)) == "fixture@1.0.0"
        # An older version goes in only when the admin says so.
        assert "not newer" in admin(config, "model", "import", old, check=False).stderr
        admin(config, "model", "import", old, "--allow-downgrade")
        listed = json.loads(admin(config, "model", "list", "--json").stdout)
        [model] = listed["models"]
        assert [v["version"] for v in model["versions"]] == ["0.9.0", "1.0.0", "2.0.0"]
        assert model["highest"] == "2.0.0"
        # A bundle may also be a directory of the same files.
        directory = tmp_path / "fixture-3.0.0"
        with tarfile.open(bundle(tmp_path / "v3", "3.0.0", golden_answer, keys["ml"])) as tar:
            tar.extractall(directory, filter="data")
        assert "valid, by ml-team.pub" in moatctl(
            "bundle", "inspect", directory, "--trusted-keys", keys["trusted"]).stdout
        assert "imported fixture@3.0.0" in admin(config, "model", "import", directory).stdout
        # A canary must be another version than the active one.
        same = admin(config, "model", "canary", "fixture@1.0.0", "--percent", "5", check=False)
        assert "already active" in same.stderr, same.stderr


def graph_reading(location: str) -> tuple[bytes, bytes]:
    """The fixture's graph with its largest initializer's bytes moved out to `location`
    (external data, as exporters write for large models), and those bytes."""
    model = onnx.load(SOURCE / "model.onnx")
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    data = tensor.raw_data
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return model.SerializeToString(), data


def test_a_signed_graph_reads_nothing_outside_its_bundle(pki, alice, keys, tmp_path,
                                                         golden_answer):
    config = config_for(pki, keys, tmp_path)
    # The store inside the state directory, as packaged: four levels below the node's key.
    state = Path(config["audit"]["state_directory"])
    config["models"]["store"] = str(state / "models")
    node_key = state / "audit-signing.key"
    graph, data = graph_reading("model.onnx.data")
    weights_beside = bundle(tmp_path / "beside", "1.0.0", golden_answer, keys["ml"],
                            {"model.onnx": graph, "model.onnx.data": data})
    hostile = {location: bundle(tmp_path / f"hostile-{n}", "1.1.0", golden_answer, keys["ml"],
                                {"model.onnx": graph_reading(location)[0]})
               for n, location in enumerate(["../../audit-signing.key",
                                             "../../../../audit-signing.key",
                                             str(node_key)])}
    custom = onnx.load(SOURCE / "model.onnx")
    custom.opset_import.append(onnx.helper.make_opsetid("ai.custom.ops", 1))
    custom_op = bundle(tmp_path / "custom", "1.1.0", golden_answer, keys["ml"],
                       {"model.onnx": custom.SerializeToString()})

    with running(tmp_path / "node", config) as server:
        assert node_key.is_file()
        # Weights in a file the signed manifest lists: imported, activated, served.
        admin(config, "model", "import", weights_beside)
        admin(config, "model", "activate", "fixture@1.0.0")
        with server.http(pki.ca_cert, alice) as client:
            assert version_of(ask(client)) == "fixture@1.0.0"
        # Signed by the trusted key, and still refused at import, naming the location.
        for location, path in hostile.items():
            result = admin(config, "model", "import", path, check=False)
            assert result.returncode != 0, f"{location}: imported"
            assert f'"{location}"' in result.stderr, result.stderr
            assert "outside" in result.stderr, result.stderr
        result = admin(config, "model", "import", custom_op, check=False)
        assert result.returncode != 0 and "ai.custom.ops" in result.stderr, result.stderr
        assert "custom operator library" in result.stderr, result.stderr
        listed = json.loads(admin(config, "model", "list", "--json").stdout)
        assert [v["version"] for v in listed["models"][0]["versions"]] == ["1.0.0"]
        # A version to stand in for one a build without this check imported.
        admin(config, "model", "import", bundle(tmp_path / "plain", "1.1.0", golden_answer,
                                                keys["ml"]))

    # The store is edited while moatd is down: 1.1.0's files become a hostile bundle's,
    # signed by the trusted key. Loading checks the graph again, before ONNX Runtime.
    version_dir = state / "models" / "bundles" / "fixture" / "1.1.0"
    location = "../../../../audit-signing.key"
    for old in version_dir.iterdir():
        old.unlink()
    with tarfile.open(hostile[location]) as tar:
        tar.extractall(version_dir, filter="data")
    with running(tmp_path / "node", config) as server:
        result = admin(config, "model", "activate", "fixture@1.1.0", check=False)
        assert result.returncode != 0, "activated"
        assert f'"{location}"' in result.stderr and "outside" in result.stderr, result.stderr
        assert "did not load" not in result.stderr, "refused by ONNX Runtime, not before it"
        with server.http(pki.ca_cert, alice) as client:
            assert version_of(ask(client)) == "fixture@1.0.0"

    records = records_of(config, auditors(pki.dir.parent / "auditors"), tmp_path)
    denied = [(r["action"], r["model"]) for r in records
              if r["kind"] == "admin" and r["decision"] == "deny"]
    assert denied.count(("model.import", "")) == 4, denied
    assert ("model.activate", "fixture@1.1.0") in denied, denied
