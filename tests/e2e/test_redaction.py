"""A `redact` content rule masks what the model sees and what the client gets, not only
what the audit keeps. SmolLM2, asked which email address a sentence holds, repeats it; with
the rule on prompts the model never sees the address, so it cannot repeat it; with the rule
on answers it sees and repeats it, and the client gets it masked, whole or streamed."""

import json

import pytest

from harness import BASE_DATA, policy_dir, running, server_config, sse_events

SMOLLM2 = {"smollm2": "smollm2-135m-instruct-exact"}
ADDRESS = "bob.smith@example.com"
QUESTION = {"model": "smollm2", "max_tokens": 32, "temperature": 0, "messages": [
    {"role": "user",
     "content": f"What is the email address in this sentence? Contact {ADDRESS} for details."}]}
PERMIT_ALL = """@id("tests-permit-all")
permit (principal, action, resource);
"""


def email_rule(action: str, direction: str) -> str:
    """The test estate with one content rule for email addresses."""
    return BASE_DATA + f"""[[content]]
detector = "email"
action = "{action}"
applies_to = "{direction}"
"""


def answers(tmp_path, pki, alice, action: str, direction: str) -> tuple[str, str]:
    """The answer to QUESTION, whole and streamed, under one email rule."""
    policies = policy_dir(tmp_path / f"{action}-{direction}", PERMIT_ALL,
                          email_rule(action, direction))
    config = server_config(pki, SMOLLM2, policy={"directory": str(policies)})
    with running(tmp_path / f"moatd-{action}-{direction}", config) as server, \
            server.http(pki.ca_cert, alice) as http:
        response = http.post("/v1/chat/completions", json=QUESTION)
        assert response.status_code == 200, response.text
        whole = response.json()["choices"][0]["message"]["content"]
        with http.stream("POST", "/v1/chat/completions",
                         json={**QUESTION, "stream": True}) as streaming:
            assert streaming.status_code == 200
            events = sse_events(streaming)
    assert events[-1] == "[DONE]"
    streamed = "".join(
        (choice["delta"].get("content") or "")
        for event in events[:-1] for choice in json.loads(event).get("choices", []))
    return whole, streamed


@pytest.fixture(scope="module")
def unmasked(tmp_path_factory, pki, alice) -> tuple[str, str]:
    """The control: a rule that only records its finding leaves the model to repeat the
    address."""
    whole, streamed = answers(tmp_path_factory.mktemp("allow"), pki, alice, "allow", "both")
    assert ADDRESS in whole and ADDRESS in streamed, (whole, streamed)
    return whole, streamed


def test_a_prompt_rule_masks_what_the_model_sees(tmp_path, pki, alice, unmasked):
    whole, streamed = answers(tmp_path, pki, alice, "redact", "prompt")
    # The model saw the mask, not the address: it cannot answer with the address.
    assert ADDRESS not in whole and ADDRESS not in streamed, (whole, streamed)
    assert whole != unmasked[0]
    assert whole == streamed


def test_an_answer_rule_masks_what_the_client_gets(tmp_path, pki, alice, unmasked):
    whole, streamed = answers(tmp_path, pki, alice, "redact", "answer")
    for text in (whole, streamed):
        assert ADDRESS not in text, text
        assert "[REDACTED:email]" in text, text
    # The model saw the address and said what it says without the rule, masked.
    assert whole == unmasked[0].replace(ADDRESS, "[REDACTED:email]")
    assert streamed == whole
