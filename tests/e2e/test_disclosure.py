"""What the node tells those who should not know, from the attacker's side: a local user
reading the metrics listener, and a certificate holder the policy does not let list models."""

import httpx

from harness import policy_dir, running, server_config

FIXTURE_ONLY = {"fixture": "fixture-fused"}
CHAT = {"model": "fixture", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
FINANCE_ONLY = """@id("finance-uses-everything")
permit (principal in Moat::Department::"finance", action, resource);
"""


def test_the_metrics_listener_names_no_department_by_default(tmp_path, pki, alice):
    config = server_config(pki, FIXTURE_ONLY, metrics={"per_department": False})
    with running(tmp_path / "moatd", config) as server:
        with server.http(pki.ca_cert, alice) as http:
            assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
            assert http.post("/v1/chat/completions",
                             json={**CHAT, "model": "nope"}).status_code == 404
        text = httpx.get(f"{server.metrics_url}/metrics", timeout=10).text
        assert "finance" not in text
        assert 'department="(all)"' in text
        assert server.metrics().requests(status="200") == 1


def test_readiness_names_models_only_to_callers_who_may_list_them(tmp_path, pki, alice):
    outsider = pki.issue_client("research", "curious")
    policies = policy_dir(tmp_path / "policies", FINANCE_ONLY)
    config = server_config(pki, FIXTURE_ONLY, policy={"directory": str(policies)})
    with running(tmp_path / "moatd", config) as server:
        with server.http(pki.ca_cert, outsider) as http:
            response = http.get("/readyz")
            assert response.status_code == 200
            assert response.json() == {"status": "ready"}
        with server.http(pki.ca_cert, alice) as http:
            assert http.get("/readyz").json() == {"status": "ready",
                                                  "models": {"fixture": "ready"}}
        local = httpx.get(f"{server.metrics_url}/readyz", timeout=10)
        assert local.json() == {"status": "ready"}
