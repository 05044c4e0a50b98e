"""What the policy and the audit see of content rules, from the attacker's side: a prompt
whose match a `redact` rule masks must still count as a finding, and an answer withheld by
a content rule must leave its evidence (reason, findings, the masked answer) in the record."""

from pathlib import Path

from audit_trail import records_of
from harness import auditors, policy_dir, running, server_config, sse_events

SMOLLM2 = {"smollm2": "smollm2-135m-instruct-exact"}
FRANCE = {"model": "smollm2", "max_tokens": 12, "temperature": 0,
          "messages": [{"role": "user", "content": "What is the capital of France?"}]}

PERMIT_UNLESS_IBAN = """@id("tests-permit-all")
permit (principal, action, resource);

@id("no-ibans-at-all")
forbid (principal, action, resource) when { context.findings.contains("iban") };
"""

FULL_RETENTION = """
classification = ["public", "internal", "confidential", "secret"]
[default_department]
classification = "internal"
ceiling = "internal"
retention = "full"
[default_model]
ceiling = "internal"
[[content]]
detector = "iban"
action = "redact"
[[content]]
detector = "regex"
name = "capital_city"
pattern = "Paris"
action = "deny"
applies_to = "answer"
"""


def final_records(records: list[dict]) -> dict[str, dict]:
    return {r["request_id"]: r for r in records if r["kind"] == "request"}


def serve(tmp_path: Path, pki, policies: str):
    directory = policy_dir(tmp_path / "policies", policies, FULL_RETENTION)
    config = server_config(pki, SMOLLM2, policy={"directory": str(directory)})
    return config, running(tmp_path / "moatd", config)


def test_a_redacted_finding_reaches_the_policy_and_the_audit(tmp_path, pki, alice):
    """The IBAN rule only masks; a policy forbids any request with an IBAN in it. Before the
    fix the prompt was scanned after masking, so the forbid never saw the IBAN."""
    config, server_running = serve(tmp_path, pki, PERMIT_UNLESS_IBAN)
    iban = {**FRANCE, "max_tokens": 1, "messages": [
        {"role": "user", "content": "Pay it to GB82 WEST 1234 5698 7654 32 today."}]}
    with server_running as server, server.http(pki.ca_cert, alice) as http:
        response = http.post("/v1/chat/completions", json=iban)
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "deny.forbidden"
        refused_id = response.headers["x-request-id"]
    records = final_records(records_of(config, auditors(pki.dir.parent / "auditors"),
                                       tmp_path))
    refused = records[refused_id]
    assert (refused["decision"], refused["reason"]) == ("deny", "deny.forbidden")
    assert {"detector": "iban", "count": 1} in refused["findings"]
    # The audit keeps the prompt masked, never the IBAN itself.
    assert "GB82" not in refused["prompt"]["text"]
    assert "[REDACTED:iban]" in refused["prompt"]["text"]


def test_a_withheld_answer_keeps_its_evidence(tmp_path, pki, alice):
    """SmolLM2 answers "The capital of France is Paris."; a deny rule on answers withholds
    it, streamed or not. The record says why, what was found, and keeps the answer masked."""
    config, server_running = serve(tmp_path, pki, PERMIT_UNLESS_IBAN)
    with server_running as server, server.http(pki.ca_cert, alice) as http:
        whole = http.post("/v1/chat/completions", json=FRANCE)
        assert whole.status_code == 403, whole.text
        assert whole.json()["error"]["code"] == "content.capital_city"
        whole_id = whole.headers["x-request-id"]
        with http.stream("POST", "/v1/chat/completions",
                         json={**FRANCE, "stream": True}) as streamed:
            assert streamed.status_code == 200
            events = sse_events(streamed)
            stream_id = streamed.headers["x-request-id"]
        sent = "".join(events)
        assert "Paris" not in sent
        assert "content.capital_city" in sent
    records = final_records(records_of(config, auditors(pki.dir.parent / "auditors"),
                                       tmp_path))
    for request_id, status in ((whole_id, 403), (stream_id, 403)):
        record = records[request_id]
        assert record["status"] == status, record
        assert (record["decision"], record["reason"]) == ("deny", "content.capital_city")
        assert {"detector": "capital_city", "count": 1} in record["findings"], record
        answer = record["answer"]
        assert answer["kept"] == "full", record
        assert "[REDACTED:capital_city]" in answer["text"], answer
        assert "Paris" not in answer["text"]
        assert answer["text"].startswith("The capital of France is"), answer
        assert record["completion_tokens"] > 0

