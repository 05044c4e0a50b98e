"""The real `moatd` and `moatctl` binaries, run as an operator runs them, and the client
side a department uses: TLS contexts, HTTP clients and the Prometheus text."""

import atexit
import contextlib
import ctypes
import functools
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "local" / "models"
ONNXRUNTIME = REPO / "local" / "onnxruntime"


def binary(name: str) -> Path:
    """A debug binary built by `cargo build --bin moatd --bin moatctl`, honouring
    CARGO_TARGET_DIR as cargo does."""
    target = Path(os.environ.get("CARGO_TARGET_DIR", "target"))
    if not target.is_absolute():
        target = REPO / target
    return target / "debug" / name


@functools.cache
def binary_for_other_users(name: str) -> Path:
    """A copy of `binary(name)` that any user can reach and run, for tests that run it as
    another user: the checkout itself may sit in a directory only its owner can enter (a
    clone under /root or in a `mktemp -d`). Removed when the tests end."""
    directory = Path(tempfile.mkdtemp(prefix=f"moat-{name}-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    directory.chmod(0o755)
    copy = directory / name
    shutil.copyfile(binary(name), copy)
    copy.chmod(0o755)
    # Every directory above it must let others through too.
    for parent in directory.parents:
        if parent.stat().st_mode & 0o001 == 0:
            raise AssertionError(f"{parent} is not searchable by other users; set TMPDIR "
                                 "to a directory that is")
    return copy


_prctl = ctypes.CDLL(None, use_errno=True).prctl
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # A server never outlives the tests: if pytest itself is killed, the kernel stops it.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def moatctl(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess:
    result = subprocess.run([binary("moatctl"), *map(str, args)], capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"moatctl {' '.join(map(str, args))} exited "
                             f"{result.returncode}:\n{result.stderr}")
    return result


@dataclass(frozen=True)
class ClientCert:
    """A client's certificate file (leaf first, then any intermediates) and key file."""

    cert: Path
    key: Path


class Pki:
    """A development PKI made with `moatctl pki` in `directory`."""

    def __init__(self, directory: Path, *init_options: str):
        self.dir = directory
        moatctl("pki", "init", "--dir", directory, *init_options)
        self.issue_server()

    def issue_server(self, *options: str) -> None:
        """A server certificate and key for localhost and 127.0.0.1."""
        moatctl("pki", "issue-server", "--dir", self.dir, "--dns", "localhost",
                "--ip", "127.0.0.1", *options)

    ca_cert = property(lambda self: self.dir / "ca.crt")
    ca_key = property(lambda self: self.dir / "ca.key")
    crl = property(lambda self: self.dir / "crl.pem")
    server_cert = property(lambda self: self.dir / "server.crt")
    server_key = property(lambda self: self.dir / "server.key")

    def issue_client(self, department: str, name: str, *options: str) -> ClientCert:
        moatctl("pki", "issue-client", "--dir", self.dir, "--department", department,
                "--name", name, *options)
        return ClientCert(self.dir / "clients" / f"{name}.crt",
                          self.dir / "clients" / f"{name}.key")

    def revoke(self, name: str) -> None:
        moatctl("pki", "revoke", "--dir", self.dir, "--name", name)


def toml_text(config: dict) -> str:
    """TOML for a config of tables whose values are strings, numbers, booleans, lists of
    those, or sub-tables; dictionaries inside lists become inline tables."""

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (str, Path)):
            return json.dumps(str(v))
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(f"no TOML for {v!r}")

    lines: list[str] = []

    def table(path: str, body: dict) -> None:
        lines.append(f"[{path}]")
        subtables = {k: v for k, v in body.items() if isinstance(v, dict)}
        for k, v in body.items():
            if not isinstance(v, dict):
                lines.append(f"{json.dumps(k)} = {value(v)}")
        for k, v in subtables.items():
            table(f"{path}.{json.dumps(k)}", v)

    for section, body in config.items():
        table(json.dumps(section), body)
    return "\n".join(lines) + "\n"


# Lets every department do everything, so that tests of other features are not refused;
# policy tests write their own policy directories.
PERMIT_ALL = """@id("tests-permit-all")
permit (principal, action, resource);
"""


# The classification scale and the defaults every test estate starts from.
BASE_DATA = """
classification = ["public", "internal", "confidential", "secret"]
[default_department]
classification = "internal"
ceiling = "internal"
[default_model]
ceiling = "internal"
"""

# The shipped content rules and classification defaults, without limits: tests of other
# features send more than a department's default share.
UNLIMITED_DATA = BASE_DATA + """[[content]]
detector = "card_number"
action = "deny"
[[content]]
detector = "iban"
action = "redact"
[[content]]
detector = "email"
action = "redact_in_audit"
[[content]]
detector = "secret_marking"
action = "deny"
"""


def policy_dir(directory: Path, policies: str = PERMIT_ALL, data: str = UNLIMITED_DATA) -> Path:
    """A policy directory in `directory`: the shipped schema, `policies` as its only .cedar
    file, and `data` as moat-policy.toml."""
    directory.mkdir(parents=True, exist_ok=True)
    shipped = REPO / "policies"
    (directory / "schema.cedarschema").write_text((shipped / "schema.cedarschema").read_text())
    (directory / "policies.cedar").write_text(policies)
    (directory / "moat-policy.toml").write_text(data)
    return directory


@dataclass(frozen=True)
class Auditors:
    """Two auditors' age identities (made with `moatctl audit keygen`) and their public
    keys, as an organisation would configure them."""

    identities: tuple[Path, Path]
    recipients: tuple[str, str]


def auditors(directory: Path) -> Auditors:
    """The two auditors of `directory`, created on first use."""
    directory.mkdir(parents=True, exist_ok=True)
    identities = (directory / "auditor-1.key", directory / "auditor-2.key")
    for identity in identities:
        if not identity.exists():
            moatctl("audit", "keygen", "--out", identity)
    recipients = tuple(
        re.search(r"public key: (age1\w+)", identity.read_text()).group(1)
        for identity in identities)
    return Auditors(identities, recipients)


def any_department(ca_cert: Path) -> dict:
    """A `[[tls.client_ca]]` entry for an organisation-wide CA."""
    return {"file": str(ca_cert), "departments": "*"}


def bound_ca(ca_cert: Path, *departments: str) -> dict:
    """A `[[tls.client_ca]]` entry for a CA that vouches for `departments` only."""
    return {"file": str(ca_cert), "departments": list(departments)}


def server_config(pki: Pki, serve: dict[str, str], **sections: dict) -> dict:
    """A serving config for the PKI's server certificate and CA, with its CRL, over the
    models in `serve` (served name -> directory under local/models), auditing into a state
    directory of its own. Each keyword replaces or adds keys in that section."""
    root = pki.dir.parent
    state = Path(tempfile.mkdtemp(prefix="state-", dir=root))
    config = {
        "engine": {"onnxruntime_library": str(ONNXRUNTIME), "queue_capacity": 64,
                   "max_batch": 16},
        "server": {"listen": ["127.0.0.1:0"], "shutdown_grace_secs": 1},
        "tls": {"certificate": str(pki.server_cert), "private_key": str(pki.server_key),
                "client_ca": [any_department(pki.ca_cert)], "crl": [str(pki.crl)]},
        "models": {"directory": str(MODELS), "serve": dict(serve),
                   "store": str(state / "models"),
                   "trusted_keys": str(root / "trusted-keys")},
        # Tests read counts by department.
        "metrics": {"listen": "127.0.0.1:0", "per_department": True},
        "policy": {"directory": str(policy_dir(root / "permit-all-policy"))},
        "audit": {"state_directory": str(state), "node_id": "test-node",
                  "recipients": list(auditors(root / "auditors").recipients)},
        "admin": {"socket": str(state / "admin.sock")},
        # Tests of other features are refused on purpose, over and over, from one address:
        # the refusal budgets have tests of their own (test_floods.py).
        "limits": {"refusals_per_window": 0, "failed_handshakes_per_window": 0},
    }
    for section, keys in sections.items():
        config.setdefault(section, {}).update(keys)
    return config


def signing_key(directory: Path, name: str = "ml-team") -> tuple[Path, Path]:
    """A bundle signing key made with moatctl under `directory`: (secret key, a trusted-keys
    directory holding its public half)."""
    keys, trusted = directory / "keys", directory / "trusted"
    keys.mkdir()
    trusted.mkdir()
    moatctl("keys", "generate", "--out", keys / name)
    shutil.copy(keys / f"{name}.pub", trusted)
    return keys / f"{name}.key", trusted


def signed_bundle(model: Path, bundle_toml: str, out: Path, key: Path) -> Path:
    """`model` packed with `bundle_toml` and signed with `key`, as the ML team ships it."""
    (model / "bundle.toml").write_text(bundle_toml)
    moatctl("bundle", "pack", model, "--out", out)
    moatctl("bundle", "sign", out, "--key", key)
    return out


def store_config(pki: Pki, directory: Path, trusted: Path) -> dict:
    """A serving config with no model directory: what serves comes from bundles imported into
    a store under `directory`, signed by a key in `trusted`."""
    config = server_config(pki, {})
    config["models"] = {"store": str(directory / "store"), "trusted_keys": str(trusted)}
    return config


class Moatd:
    """One `moatd serve` process. Its stderr is read by a thread as it is written, so the
    log never fills a pipe and readiness is seen the moment it is logged."""

    READY = "moatd is ready"

    def __init__(self, config_path: Path, env: dict[str, str] | None = None, *,
                 wrapper: list[str] | None = None, base_env: dict[str, str] | None = None):
        env = dict(os.environ if base_env is None else base_env, MOAT_LOG="info,ort=warn",
                   **(env or {}))
        self.process = subprocess.Popen(
            [*(wrapper or []), binary("moatd"), "serve", "--config", str(config_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=env, preexec_fn=_die_with_parent)
        self.wrapped = bool(wrapper)
        self.lines: list[str] = []
        self.api_url: str | None = None
        self.metrics_url: str | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, directory: Path, config: dict, timeout: float = 180,
              env: dict[str, str] | None = None, *, wrapper: list[str] | None = None,
              base_env: dict[str, str] | None = None) -> "Moatd":
        """Writes `config` to DIRECTORY/moat.toml, starts moatd on it (with `env` added to
        its environment) and waits until it says it is ready; fails with its log if it exits
        or takes longer than `timeout`. `wrapper` is a command that runs moatd (its argv
        is appended, as to `strace ... --`); `base_env` replaces this process's environment
        as the one `env` is added to."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "moat.toml"
        path.write_text(toml_text(config))
        server = cls(path, env, wrapper=wrapper, base_env=base_env)
        try:
            server.wait_ready(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def _read_log(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))
            if m := re.search(r"url=\"?(https://[^\s\"]+)", line):
                self.api_url = self.api_url or m.group(1)
            if m := re.search(r"url=\"?(http://[^\s\"]+)", line):
                self.metrics_url = m.group(1)
            if self.READY in line:
                self._ready.set()
        self._ready.set()  # end of the log: the process is gone

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout: float) -> None:
        if not self._ready.wait(timeout):
            raise AssertionError(f"moatd was not ready within {timeout} s:\n{self.log}")
        if self.process.poll() is not None or self.api_url is None:
            self.process.wait(timeout=10)
            raise AssertionError(
                f"moatd exited with status {self.process.returncode} before it was ready:"
                f"\n{self.log}")

    @property
    def port(self) -> int:
        return int(self.api_url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        """moatd's own pid: the process started, or, under a wrapper (which execs or forks
        it, as strace does), that process's only child."""
        found = self._children() if self.wrapped else [self.process.pid]
        assert len(found) == 1, f"the wrapper of moatd has children {found}"
        return found[0]

    def _children(self) -> list[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            return [int(pid) for pid in path.read_text().split()]
        except FileNotFoundError:
            return []  # the wrapper is gone

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 15 s. Under a wrapper the
        signals go to moatd itself: strace, stopped, would leave what it runs behind."""
        if self.process.poll() is None:
            targets = self._children() if self.wrapped else [self.process.pid]
            for pid in targets:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                for pid in targets:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.process.kill()
                self.process.wait(timeout=10)
        self._reader.join(timeout=10)
        if self.process.stderr:
            self.process.stderr.close()

    # Clients ---------------------------------------------------------------------------

    def http(self, ca: Path, client: ClientCert | None, **kwargs) -> httpx.Client:
        """An HTTP client of the API, authenticated by `client` (or by nothing)."""
        kwargs.setdefault("timeout", 120)
        return httpx.Client(base_url=self.api_url, verify=tls_context(ca, client), **kwargs)

    def openai(self, ca: Path, client: ClientCert, **kwargs) -> openai.OpenAI:
        """The official SDK, authenticated by the client certificate (the API key is unused
        by moat but required by the SDK)."""
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 120)
        return openai.OpenAI(base_url=f"{self.api_url}/v1", api_key="unused",
                             http_client=httpx.Client(verify=tls_context(ca, client)),
                             **kwargs)

    def metrics(self) -> "Metrics":
        response = httpx.get(f"{self.metrics_url}/metrics", timeout=10)
        response.raise_for_status()
        return Metrics.parse(response.text)


@contextlib.contextmanager
def running(directory: Path, config: dict, timeout: float = 180):
    """A moatd serving `config` for the duration of the block."""
    server = Moatd.start(directory, config, timeout)
    try:
        yield server
    finally:
        server.stop()


def tls_context(ca: Path, client: ClientCert | None = None, *,
                maximum_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A client TLS context trusting `ca` for the server, presenting `client` if given."""
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    if maximum_version is not None:
        context.maximum_version = maximum_version
    return context


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict
    value: float


class Metrics:
    """The samples of one scrape of /metrics."""

    _SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
    _LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

    def __init__(self, samples: list[Sample], text: str):
        self.samples = samples
        self.text = text

    @classmethod
    def parse(cls, text: str) -> "Metrics":
        samples = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = cls._SAMPLE.match(line)
            if not m:
                raise AssertionError(f"not a Prometheus sample: {line!r}")
            labels = dict(cls._LABEL.findall(m.group(2) or ""))
            samples.append(Sample(m.group(1), labels, float(m.group(3))))
        return cls(samples, text)

    def select(self, name: str, **labels: str) -> list[Sample]:
        """Samples named `name` whose labels include `labels`."""
        return [s for s in self.samples if s.name == name
                and all(s.labels.get(k) == str(v) for k, v in labels.items())]

    def total(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.select(name, **labels))

    def requests(self, **labels: str) -> float:
        return self.total("moat_requests_total", **labels)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Polls `predicate` until it returns something truthy, failing after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a server-sent event stream, in order."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(line[len("data: "):])
        elif line and not line.startswith(":"):
            raise AssertionError(f"unexpected line in the event stream: {line!r}")
    return events
