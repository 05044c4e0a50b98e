"""Who a certificate may claim to be, tested from the attacker's side: a department's own CA
issuing a certificate for another department, a certificate revoked while its connection
stays open, and names made to look like other names."""

import signal
import subprocess

import certs
from harness import (ClientCert, Pki, any_department, binary, bound_ca, policy_dir, running,
                     server_config, toml_text, wait_until)

FIXTURE_ONLY = {"fixture": "fixture-fused"}
EXIT_CONFIG = 64
CHAT = {"model": "fixture", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}


def test_a_department_ca_cannot_speak_for_another_department(tmp_path, pki, alice):
    """Research runs its own CA. It issues a certificate naming finance: the handshake
    succeeds (the CA is trusted), but the request is refused with 401 before the policy is
    asked, counted and logged; nothing is served as finance."""
    research = Pki(tmp_path / "research-pki", "--org", "Research Lab")
    forged = research.issue_client("finance", "mallory")
    minted = research.issue_client("brand-new-department", "mallory2")
    rosa = research.issue_client("research", "rosa")
    config = server_config(
        pki, FIXTURE_ONLY,
        tls={"client_ca": [bound_ca(pki.ca_cert, "finance"),
                           bound_ca(research.ca_cert, "research")],
             "crl": [str(pki.crl), str(research.crl)]})
    with running(tmp_path / "moatd", config) as server:
        for impostor in (forged, minted):
            with server.http(pki.ca_cert, impostor) as http:
                for request in (lambda: http.post("/v1/chat/completions", json=CHAT),
                                lambda: http.get("/v1/models")):
                    response = request()
                    assert response.status_code == 401, response.text
                    error = response.json()["error"]
                    assert error["code"] == "department_not_allowed_for_ca", error
                    assert error["type"] == "authentication_error"
        # Each department's own CA still speaks for its own department.
        with server.http(pki.ca_cert, rosa) as http:
            assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
        with server.http(pki.ca_cert, alice) as http:
            assert http.post("/v1/chat/completions", json=CHAT).status_code == 200

        metrics = server.metrics()
        assert metrics.total("moat_client_certificates_refused_total",
                             reason="department_not_allowed_for_ca") == 4
        # The policy never saw the impostors: finance's only decision is alice's.
        assert metrics.total("moat_policy_decisions_total", department="finance") == 1
        assert metrics.total("moat_policy_decisions_total",
                             department="brand-new-department") == 0
        assert metrics.requests(department="finance", status="200") == 1
        assert "department_not_allowed_for_ca" in server.log


def test_the_old_list_of_client_cas_is_refused_with_the_new_form(tmp_path, pki):
    config = server_config(pki, FIXTURE_ONLY)
    config["tls"]["client_ca"] = [str(pki.ca_cert)]
    path = tmp_path / "moat.toml"
    path.write_text(toml_text(config))
    result = subprocess.run([binary("moatd"), "serve", "--config", str(path)],
                            capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "[[tls.client_ca]]" in result.stderr, result.stderr
    assert f'file = "{pki.ca_cert}"' in result.stderr, result.stderr
    assert "departments" in result.stderr
    assert "API listening" not in result.stderr


def test_a_revoked_certificate_is_cut_at_its_next_request(tmp_path):
    """A client keeps its connection open; the admin revokes its certificate and reloads.
    Its next request on the same connection is refused (a new connection would fail at the
    handshake instead, so the 401 proves the kept-alive connection was re-checked)."""
    pki = Pki(tmp_path / "pki")
    alice = pki.issue_client("finance", "alice")
    with running(tmp_path / "moatd", server_config(pki, FIXTURE_ONLY)) as server:
        with server.http(pki.ca_cert, alice) as http:
            assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
            pki.revoke("alice")
            server.process.send_signal(signal.SIGHUP)
            wait_until(lambda: "certificates, CAs and CRLs reloaded" in server.log, 30,
                       "the reload")
            response = http.post("/v1/chat/completions", json=CHAT)
            assert response.status_code == 401, response.text
            assert response.json()["error"]["code"] == "certificate_refused"
            assert "revoked" in response.json()["error"]["message"]
        metrics = server.metrics()
        assert metrics.requests(department="finance", status="200") == 1


def test_names_with_invisible_or_bidi_characters_are_refused(tmp_path, moatd, pki):
    """A certificate whose department differs from "finance" only by a zero-width space, or
    whose name is reordered on screen by a bidi control, names nobody."""
    root = certs.load_authority(pki.ca_cert, pki.ca_key)
    for index, (department, subject) in enumerate([("fi\u200bnance", "alice"),
                                                   ("finance", "ecila\u202e"),
                                                   ("\u2066finance\u2069", "bob")]):
        cert, key = certs.issue_client(root, certs.name(("OU", department), ("CN", subject)))
        client = ClientCert(certs.write_pem(tmp_path / f"{index}.crt", cert),
                            certs.write_pem(tmp_path / f"{index}.key", key))
        with moatd.http(pki.ca_cert, client) as http:
            response = http.get("/v1/models")
        assert response.status_code == 401, (department, subject, response.text)
        assert "invisible or direction-changing" in response.json()["error"]["message"]
    assert any_department(pki.ca_cert)["departments"] == "*"


ALICE_OF_FINANCE = """@id("finance-alice-chats")
permit (principal == Moat::Subject::"finance/alice", action == Moat::Action::"chat",
        resource);
"""


def test_a_permit_for_one_departments_subject_never_matches_anothers(tmp_path, pki):
    """Legal also has an alice. A permit written for finance's alice must not let her in."""
    finance_alice = pki.issue_client("finance", "alice-policy-test")
    root = certs.load_authority(pki.ca_cert, pki.ca_key)
    clients = {}
    for department in ("finance", "legal"):
        cert, key = certs.issue_client(root, certs.name(("OU", department), ("CN", "alice")))
        clients[department] = ClientCert(
            certs.write_pem(tmp_path / f"{department}-alice.crt", cert),
            certs.write_pem(tmp_path / f"{department}-alice.key", key))
    policies = policy_dir(tmp_path / "policies", ALICE_OF_FINANCE)
    config = server_config(pki, FIXTURE_ONLY, policy={"directory": str(policies)})
    with running(tmp_path / "moatd", config) as server:
        with server.http(pki.ca_cert, clients["legal"]) as http:
            response = http.post("/v1/chat/completions", json=CHAT)
            assert response.status_code == 403, response.text
            assert response.json()["error"]["code"] == "deny.no_permit"
        with server.http(pki.ca_cert, clients["finance"]) as http:
            assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
        # Another subject of finance is not alice either.
        with server.http(pki.ca_cert, finance_alice) as http:
            assert http.post("/v1/chat/completions", json=CHAT).status_code == 403


def test_a_department_name_holding_the_separator_is_refused(tmp_path, moatd, pki):
    """"finance/alice" as a department with any subject would read as finance's alice."""
    root = certs.load_authority(pki.ca_cert, pki.ca_key)
    cert, key = certs.issue_client(root, certs.name(("OU", "finance/alice"), ("CN", "x")))
    client = ClientCert(certs.write_pem(tmp_path / "slash.crt", cert),
                        certs.write_pem(tmp_path / "slash.key", key))
    with moatd.http(pki.ca_cert, client) as http:
        response = http.get("/v1/models")
    assert response.status_code == 401, response.text
    assert "separates department and subject" in response.json()["error"]["message"]
