"""Policies, from the client's side: default deny, Cedar permits and forbids, classification
ceilings, content rules on prompts and answers, department limits, and reload with SIGHUP
(an invalid policy is refused and the old one stays in force)."""

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from tokenizers import Tokenizer

from harness import MODELS, REPO, policy_dir, running, server_config, wait_until

FIXTURE = {"fixture": "fixture-fused"}
SHIPPED = REPO / "policies"

FINANCE_ONLY = """
@id("finance-chats")
permit (principal in Moat::Department::"finance", action, resource);

@id("no-long-completions")
forbid (principal, action == Moat::Action::"complete", resource)
when { context.max_tokens > 50 };
"""

DATA = """
classification = ["public", "internal", "confidential", "secret"]
[default_department]
classification = "internal"
ceiling = "internal"
[departments.finance]
classification = "internal"
ceiling = "confidential"
[default_model]
ceiling = "internal"
[models.fixture]
ceiling = "confidential"
[[content]]
detector = "card_number"
action = "deny"
[[content]]
detector = "regex"
name = "capital_city"
pattern = "Paris"
action = "deny"
applies_to = "answer"
"""


def chat(content: str, model: str = "fixture", **extra) -> dict:
    return {"model": model, "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "user", "content": content}], **extra}


def refusal(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    # The reason code, never the policy's text.
    assert "principal" not in error["message"] and "@id" not in error["message"]
    return error


@pytest.fixture(scope="module")
def legal(pki):
    return pki.issue_client("legal", "lena")


@pytest.fixture(scope="module")
def finance_server(tmp_path_factory, pki):
    directory = tmp_path_factory.mktemp("moatd-policy")
    policies = policy_dir(directory / "policies", FINANCE_ONLY, DATA)
    config = server_config(pki, {**FIXTURE, "smollm2": "smollm2-135m-instruct-exact"},
                           policy={"directory": str(policies)})
    with running(directory / "server", config) as server:
        yield server


def test_the_shipped_policy_lists_models_and_permits_nothing_else(tmp_path, pki, alice):
    directory = tmp_path / "shipped"
    directory.mkdir()
    for name in ("schema.cedarschema", "policies.cedar", "moat-policy.toml"):
        (directory / name).write_text((SHIPPED / name).read_text())
    config = server_config(pki, FIXTURE, policy={"directory": str(directory)})
    with running(tmp_path / "server", config) as server, \
            server.http(pki.ca_cert, alice) as http:
        assert http.get("/v1/models").status_code == 200
        refusal(http.post("/v1/chat/completions", json=chat("hi")), 403, "deny.no_permit")
        refusal(http.post("/v1/completions", json={"model": "fixture", "prompt": "hi"}),
                403, "deny.no_permit")
        assert server.metrics().total("moat_policy_decisions_total",
                                      reason="deny.no_permit", department="finance") == 2


def test_a_permit_lets_its_department_in_and_nobody_else(finance_server, pki, alice, legal):
    with finance_server.http(pki.ca_cert, alice) as finance, \
            finance_server.http(pki.ca_cert, legal) as other:
        assert finance.post("/v1/chat/completions", json=chat("hi")).status_code == 200
        refusal(other.post("/v1/chat/completions", json=chat("hi")), 403, "deny.no_permit")
        refusal(other.get("/v1/models"), 403, "deny.no_permit")


def test_a_forbid_wins_over_a_permit(finance_server, pki, alice):
    with finance_server.http(pki.ca_cert, alice) as http:
        long = {"model": "fixture", "prompt": "hi", "max_tokens": 51}
        refusal(http.post("/v1/completions", json=long), 403, "deny.forbidden")
        # The same request within the forbid's bound, and a chat of that length, are
        # permitted by finance's permit.
        assert http.post("/v1/completions",
                         json={**long, "max_tokens": 50}).status_code == 200
        assert http.post("/v1/chat/completions",
                         json=chat("hi", max_tokens=51)).status_code == 200


def test_classification_above_a_ceiling_is_refused(finance_server, pki, alice):
    with finance_server.http(pki.ca_cert, alice) as http:
        def ask(label, model="fixture"):
            return http.post("/v1/chat/completions", json=chat("hi", model),
                             headers={"X-Moat-Classification": label})
        assert ask("confidential").status_code == 200  # finance and fixture go that high
        refusal(ask("secret"), 403, "deny.classification")  # above both ceilings
        # smollm2 has the default model ceiling, internal.
        refusal(ask("confidential", "smollm2"), 403, "deny.classification")
        refusal(ask("cosmic"), 403, "deny.unknown_classification")


def test_a_card_number_in_the_prompt_is_refused(finance_server, pki, alice):
    with finance_server.http(pki.ca_cert, alice) as http:
        prompt = "Please charge card 4111 1111 1111 1111 for the order."
        refusal(http.post("/v1/chat/completions", json=chat(prompt)), 403, "content.card_number")
        # A number that fails the Luhn check is not a card number.
        ok = http.post("/v1/chat/completions", json=chat("Order 4111 1111 1111 1112 shipped."))
        assert ok.status_code == 200, ok.text
        # A prompt of token ids is decoded and checked like text: the same card number as
        # ids is refused, and the number that fails the check is not.
        tokenizer = Tokenizer.from_file(str(MODELS / "smollm2-135m-instruct-exact" /
                                            "tokenizer.json"))
        card = tokenizer.encode(prompt, add_special_tokens=False).ids
        assert "4111" not in json.dumps(card)
        refusal(http.post("/v1/completions", json={"model": "smollm2", "prompt": card,
                                                   "max_tokens": 1}),
                403, "content.card_number")
        not_a_card = tokenizer.encode("Order 4111 1111 1111 1112 shipped.",
                                      add_special_tokens=False).ids
        ok = http.post("/v1/completions", json={"model": "smollm2", "prompt": not_a_card,
                                                "max_tokens": 1})
        assert ok.status_code == 200, ok.text


def test_an_answer_tripping_a_deny_rule_is_withheld(finance_server, pki, alice):
    question = chat("What is the capital of France?", "smollm2", max_tokens=16)
    with finance_server.http(pki.ca_cert, alice) as http:
        refusal(http.post("/v1/chat/completions", json=question), 403, "content.capital_city")
        with http.stream("POST", "/v1/chat/completions", json={**question, "stream": True}) as s:
            assert s.status_code == 200
            events = [json.loads(line[6:]) for line in s.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        text = "".join(e["choices"][0]["delta"].get("content") or ""
                       for e in events if e.get("choices"))
        assert "Paris" not in text
        assert events[-1]["error"]["code"] == "content.capital_city"


def test_department_limits_answer_429_with_retry_after(tmp_path, pki, alice):
    data = DATA + """
[departments.finance.limits]
requests_per_minute = 2
max_input_tokens = 100
"""
    policies = policy_dir(tmp_path / "policies", FINANCE_ONLY, data)
    config = server_config(pki, FIXTURE, policy={"directory": str(policies)})
    with running(tmp_path / "server", config) as server, \
            server.http(pki.ca_cert, alice) as http:
        long = "word " * 40  # over 100 tokens with the chat template, within the context
        too_long = http.post("/v1/chat/completions", json=chat(long))
        error = refusal(too_long, 429, "limit.input_tokens")
        assert "retry-after" not in too_long.headers  # waiting will not help
        assert "100" in error["message"]
        assert http.post("/v1/chat/completions", json=chat("hi")).status_code == 200
        assert http.post("/v1/chat/completions", json=chat("hi")).status_code == 200
        third = http.post("/v1/chat/completions", json=chat("hi"))
        refusal(third, 429, "limit.requests_per_minute")
        assert int(third.headers["retry-after"]) >= 1


def test_tokens_per_minute_charges_what_was_produced_and_refunds_the_rest(tmp_path, pki,
                                                                          alice):
    smollm2 = {"smollm2": "smollm2-135m-instruct-exact"}
    question = chat("What is 2 + 2?", "smollm2", max_tokens=32)
    # What the question costs, measured on a server without limits.
    policies = policy_dir(tmp_path / "unlimited", FINANCE_ONLY, DATA)
    with running(tmp_path / "measure", server_config(
            pki, smollm2, policy={"directory": str(policies)})) as server, \
            server.http(pki.ca_cert, alice) as http:
        measured = http.post("/v1/chat/completions", json=question)
        assert measured.status_code == 200, measured.text
        usage = measured.json()["usage"]
    prompt, answer = usage["prompt_tokens"], usage["completion_tokens"]
    unused = 32 - answer
    assert unused >= 16, usage  # the answer ends well before max_tokens
    # Room for one answered question and one more reservation, and little else: the second
    # question fits only if the first was charged what it produced, not the 32 it reserved.
    budget = (prompt + answer) + (prompt + 32) + 2
    data = DATA + f"""
[departments.finance.limits]
tokens_per_minute = {budget}
max_output_tokens = 32
"""
    policies = policy_dir(tmp_path / "limited", FINANCE_ONLY, data)
    config = server_config(pki, smollm2, policy={"directory": str(policies)})
    with running(tmp_path / "server", config) as server, \
            server.http(pki.ca_cert, alice) as http:
        greedy = http.post("/v1/chat/completions", json={**question, "max_tokens": 33})
        error = refusal(greedy, 429, "limit.output_tokens")
        assert "retry-after" not in greedy.headers  # waiting will not help
        assert "32" in error["message"]
        first = http.post("/v1/chat/completions", json=question)
        assert first.status_code == 200, first.text
        assert first.json()["usage"]["completion_tokens"] == answer
        second = http.post("/v1/chat/completions", json=question)
        assert second.status_code == 200, second.text
        # Two answers charged, and a third reservation does not fit (the bucket refills
        # budget/60 tokens a second: far less than a question in these few seconds).
        third = http.post("/v1/chat/completions", json=question)
        refusal(third, 429, "limit.tokens_per_minute")
        assert int(third.headers["retry-after"]) >= 1


def test_concurrent_requests_hold_a_place_until_their_answer_ends(tmp_path, pki, alice):
    data = DATA + """
[departments.finance.limits]
concurrent_requests = 1
"""
    policies = policy_dir(tmp_path / "policies", FINANCE_ONLY, data)
    config = server_config(pki, {"smollm2": "smollm2-135m-instruct-exact"},
                           policy={"directory": str(policies)})
    story = chat("Tell me a long story about a lighthouse.", "smollm2", max_tokens=2000,
                 stream=True)
    with running(tmp_path / "server", config) as server, \
            server.http(pki.ca_cert, alice) as http:
        with http.stream("POST", "/v1/chat/completions", json=story) as streaming:
            assert streaming.status_code == 200
            lines = streaming.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            # The story is being told: finance's one place is taken.
            busy = http.post("/v1/chat/completions", json=chat("hi", "smollm2", max_tokens=1))
            refusal(busy, 429, "limit.concurrent_requests")
            assert int(busy.headers["retry-after"]) >= 1
        # The client hung up: the place comes back once moatd sees it.
        wait_until(lambda: http.post("/v1/chat/completions", json=chat(
                       "hi", "smollm2", max_tokens=1)).status_code == 200,
                   timeout=30, what="finance's place back after the stream was dropped",
                   interval=1)


def test_sighup_reloads_a_valid_policy_and_refuses_an_invalid_one(tmp_path, pki, alice, legal):
    policies = policy_dir(tmp_path / "policies", FINANCE_ONLY, DATA)
    config = server_config(pki, {**FIXTURE, "smollm2": "smollm2-135m-instruct-exact"},
                           policy={"directory": str(policies)})
    story = {"model": "smollm2", "temperature": 0, "max_tokens": 48, "stream": True,
             "prompt": "Once upon a time, there was a little"}
    with running(tmp_path / "server", config) as server, \
            server.http(pki.ca_cert, alice) as finance, \
            server.http(pki.ca_cert, legal) as other:
        refusal(other.post("/v1/chat/completions", json=chat("hi")), 403, "deny.no_permit")

        def stream_story(_):
            with server.http(pki.ca_cert, alice) as http:
                with http.stream("POST", "/v1/completions", json=story) as response:
                    lines = [line for line in response.iter_lines() if line]
                    return response.status_code, lines[-2:]

        # Streams in flight while the policy changes twice all finish normally.
        with ThreadPoolExecutor(max_workers=4) as pool:
            streams = [pool.submit(stream_story, i) for i in range(4)]
            wait_until(lambda: server.metrics().total("moat_active_sequences",
                                                      model="smollm2") >= 1,
                       30, "streams to be running")
            (policies / "policies.cedar").write_text(FINANCE_ONLY + """
@id("legal-chats-too")
permit (principal in Moat::Department::"legal", action, resource);
""")
            server.process.send_signal(signal.SIGHUP)
            wait_until(lambda: "policy reloaded" in server.log, 10, "the reload")
            assert other.post("/v1/chat/completions", json=chat("hi")).status_code == 200

            # An invalid policy (an attribute the schema does not have) is refused; the
            # one in force stays.
            (policies / "policies.cedar").write_text(
                'permit (principal, action, resource) when { resource.colour == "red" };')
            server.process.send_signal(signal.SIGHUP)
            wait_until(lambda: "policy reload REFUSED" in server.log, 10, "the refusal")
            assert other.post("/v1/chat/completions", json=chat("hi")).status_code == 200
            for stream in streams:
                status, tail = stream.result(timeout=120)
                assert status == 200
                assert tail[-1] == "data: [DONE]", tail
        assert server.process.poll() is None


def test_an_invalid_policy_stops_the_start_with_every_problem(tmp_path, pki):
    policies = policy_dir(tmp_path / "policies",
                          "permit (principal, action, resource) when { context.nope };",
                          'classification = ["public"]\n[default_model]\nceiling = "secret"\n')
    config = server_config(pki, FIXTURE, policy={"directory": str(policies)})
    start = time.monotonic()
    with pytest.raises(AssertionError) as failure:
        with running(tmp_path / "server", config, timeout=60):
            pass
    message = str(failure.value)
    assert "status 64" in message
    assert "policies.cedar:1:" in message
    assert "default_model.ceiling" in message
    assert time.monotonic() - start < 60


def test_sources_outside_the_listeners_networks_are_closed_before_tls(tmp_path, pki, alice):
    import socket
    import ssl

    from harness import tls_context

    config = server_config(pki, FIXTURE, server={"allowed_networks": ["10.0.0.0/8"]})
    with running(tmp_path / "closed", config) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            # Closed on accept: not even the server's TLS hello comes back.
            raw.settimeout(10)
            assert raw.recv(1) == b""
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
                with tls_context(pki.ca_cert, alice).wrap_socket(
                        raw, server_hostname="127.0.0.1") as tls:
                    tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    tls.recv(1)
        wait_until(lambda: "not in the listener's networks" in server.log, 10, "the log line")
    config = server_config(pki, FIXTURE, server={
        "allowed_networks": ["10.0.0.0/8"],
        "listener_networks": {"127.0.0.1:0": ["127.0.0.0/8"]}})
    with running(tmp_path / "open", config) as server, \
            server.http(pki.ca_cert, alice) as http:
        assert http.get("/healthz").status_code == 200
