"""Session fixtures: one PKI made with `moatctl pki`, the clients it issues, and one shared
`moatd` serving the fixture model and SmolLM2 behind mutual TLS with CRLs."""

import datetime
import os
import shutil
import warnings

import pytest

import certs
from harness import MODELS, ONNXRUNTIME, ClientCert, Moatd, Pki, binary, server_config
from network_trace import calls_in, egress_in, egress_watch

SHARED_MODELS = {"fixture": "fixture-fused", "smollm2": "smollm2-135m-instruct-exact"}


def pytest_sessionstart(session):
    missing = [str(p) for p in (binary("moatd"), binary("moatctl")) if not p.is_file()]
    if missing:
        raise pytest.UsageError(
            f"missing {', '.join(missing)}: build with `cargo build --bin moatd --bin moatctl`")
    needed = [MODELS / d for d in SHARED_MODELS.values()] + [ONNXRUNTIME]
    absent = [str(p) for p in needed if not p.exists()]
    if absent:
        raise pytest.UsageError(f"missing {', '.join(absent)}: run `bash scripts/setup.sh`")


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def alice(pki) -> ClientCert:
    """A finance analyst with a current certificate from the CA."""
    return pki.issue_client("finance", "alice")


@pytest.fixture(scope="session")
def mallory(pki) -> ClientCert:
    """A certificate from the CA, revoked before the shared server starts."""
    cert = pki.issue_client("finance", "mallory")
    pki.revoke("mallory")
    return cert


@pytest.fixture(scope="session")
def intermediate(pki) -> tuple[certs.Authority, object]:
    """An intermediate CA under the moatctl CA, with its own OU, and its current CRL file."""
    root = certs.load_authority(pki.ca_cert, pki.ca_key)
    ca = certs.make_ca(certs.name(O="moat dev", OU="intermediates", CN="moat dev issuing CA"),
                       issuer=root)
    now = certs.now()
    crl = certs.make_crl(ca, now - datetime.timedelta(minutes=5),
                         now + datetime.timedelta(days=1))
    return ca, certs.write_pem(pki.dir / "intermediate-crl.pem", crl)


@pytest.fixture(scope="session")
def carol(pki, intermediate) -> ClientCert:
    """A legal department member whose certificate the intermediate CA issued; her
    certificate file carries the chain [leaf, intermediate]."""
    ca, _ = intermediate
    cert, key = certs.issue_client(ca, certs.name(O="moat dev", OU="legal", CN="carol"))
    return ClientCert(certs.write_pem(pki.dir / "carol.crt", cert, ca.cert),
                      certs.write_pem(pki.dir / "carol.key", key))


@pytest.fixture(scope="session")
def moatd(tmp_path_factory, pki, mallory, intermediate):
    """The shared server: fixture + SmolLM2, CRLs for the CA and the intermediate. It runs
    under strace for the whole suite, and the suite fails at its end if moatd (or anything
    it loaded) addressed any socket but a Unix one, in any test."""
    _, intermediate_crl = intermediate
    config = server_config(pki, SHARED_MODELS,
                           tls={"crl": [str(pki.crl), str(intermediate_crl)]})
    directory = tmp_path_factory.mktemp("moatd")
    trace = directory / "network.strace"
    watch = egress_watch(trace) if shutil.which("strace") else None
    if watch is None:
        message = "strace is missing (scripts/setup.sh installs it as root): moatd's " \
                  "network calls are not watched"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        warnings.warn(message)
    server = Moatd.start(directory, config, wrapper=watch)
    yield server
    server.stop()
    if watch is not None:
        assert server.process.returncode == 0, server.log
        # The watch saw moatd serve: it accepted the suite's connections.
        accepted = calls_in(trace, ("accept", "accept4"))
        assert accepted > 0, f"strace logged no accepted connection of moatd's in {trace}"
        egress = egress_in(trace)
        assert not egress, "moatd addressed sockets other than Unix ones:\n" + "\n".join(egress)


@pytest.fixture(scope="session")
def api(moatd, pki, alice):
    """A raw HTTP client of the shared server, as alice."""
    with moatd.http(pki.ca_cert, alice) as client:
        yield client


@pytest.fixture(scope="session")
def client(moatd, pki, alice):
    """The openai SDK pointed at the shared server, as alice."""
    sdk = moatd.openai(pki.ca_cert, alice)
    yield sdk
    sdk.close()
