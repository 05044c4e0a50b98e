"""Bad requests get the right status and an OpenAI-shaped error that says what was wrong;
nothing a client sends makes the server answer 500."""

import json

import pytest

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def post(api, path: str, body: bytes | dict):
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    return api.post(path, content=body, headers={"content-type": "application/json"})


def assert_error(response, status: int, code: str, param: str | None = None,
                 kind: str = "invalid_request_error") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"]
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert (error["type"], error["code"], error["param"]) == (kind, code, param), error
    assert error["message"]
    return error


BAD_REQUESTS = {
    "malformed JSON": (b'{"model": "smollm2", "messages": [', "invalid_json", None),
    "wrong types": ({"model": 5, "messages": "hi"}, "invalid_json", None),
    "missing messages": ({"model": "smollm2"}, "invalid_json", None),
    "empty body": (b"", "invalid_json", None),
    "whitespace body": (b" \n ", "invalid_json", None),
    "JSON null": (b"null", "invalid_json", None),
    "JSON array": (b"[]", "invalid_json", None),
    "deeply nested": (b"[" * 10000 + b"]" * 10000, "invalid_json", None),
    "invalid UTF-8": (b'{"model":"smollm2","messages":[{"role":"user","content":"\xff\xfe"}]}',
                      "invalid_utf8", None),
    "empty messages": ({"model": "smollm2", "messages": []}, "empty_messages", "messages"),
    "n = 2": ({"model": "smollm2", "messages": HI, "n": 2}, "unsupported_parameter", "n"),
    "unsupported role": ({"model": "smollm2", "messages": [{"role": "robot", "content": "x"}]},
                         "invalid_role", "messages"),
    "image content": ({"model": "smollm2", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]},
        "invalid_content", "messages"),
    "absurd max_tokens": ({"model": "smollm2", "messages": HI, "max_tokens": 4097},
                          "invalid_value", "max_tokens"),
    "absurd max_completion_tokens": (
        {"model": "smollm2", "messages": HI, "max_completion_tokens": 10**12},
        "invalid_value", "max_completion_tokens"),
    "zero max_tokens": ({"model": "smollm2", "messages": HI, "max_tokens": 0},
                        "invalid_value", "max_tokens"),
    "negative temperature": ({"model": "smollm2", "messages": HI, "temperature": -1},
                             "invalid_value", "temperature"),
    "temperature above 2": ({"model": "smollm2", "messages": HI, "temperature": 3},
                            "invalid_value", "temperature"),
    "top_p 0": ({"model": "smollm2", "messages": HI, "top_p": 0}, "invalid_value", "top_p"),
    "too many stop strings": ({"model": "smollm2", "messages": HI, "stop": ["a"] * 17},
                              "invalid_value", "stop"),
    "too many messages": ({"model": "smollm2", "messages": HI * 257}, "too_many_messages",
                          "messages"),
    "logprobs": ({"model": "smollm2", "messages": HI, "logprobs": True},
                 "unsupported_parameter", "logprobs"),
    "tools": ({"model": "smollm2", "messages": HI, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {}}}]},
        "unsupported_parameter", "tools"),
    "invalid json_schema": (
        {"model": "smollm2", "messages": HI, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}}},
        "invalid_response_format", "response_format"),
    "unknown response_format": (
        {"model": "smollm2", "messages": HI, "response_format": {"type": "yaml"}},
        "invalid_response_format", "response_format"),
    "stop with a response_format": (
        {"model": "smollm2", "messages": HI, "stop": ["}"],
         "response_format": {"type": "json_object"}},
        "unsupported_parameter", "stop"),
    "control token in a message": (
        {"model": "smollm2", "messages": [{"role": "user", "content": "hi<|im_end|>"}]},
        "control_token_in_message", "messages"),
}


@pytest.mark.parametrize("body, code, param", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_chat_request_is_400(api, body, code, param):
    assert_error(post(api, CHAT, body), 400, code, param)


def test_prompt_longer_than_the_context_is_400_with_the_counts(api):
    # The fixture model's context is 256 tokens.
    long = {"model": "fixture", "max_tokens": 4,
            "messages": [{"role": "user", "content": "word " * 400}]}
    error = assert_error(post(api, CHAT, long), 400, "context_length_exceeded", "max_tokens")
    assert "256" in error["message"]
    prompt_tokens = int(error["message"].split("(")[1].split(" ")[0])
    assert prompt_tokens > 256
    assert str(prompt_tokens + 4) in error["message"]


def test_bad_completion_requests_are_400(api):
    base = {"model": "smollm2", "max_tokens": 2}
    for extra, code, param in [
        ({"prompt": ["a", "b"]}, "unsupported_parameter", "prompt"),
        ({"prompt": "a", "echo": True}, "unsupported_parameter", "echo"),
        ({"prompt": "a", "best_of": 3}, "unsupported_parameter", "best_of"),
        ({"prompt": "a", "max_tokens": 5000}, "invalid_value", "max_tokens"),
        ({"prompt": "a", "stop": [""]}, "invalid_value", "stop"),
        ({"prompt": [10**9]}, "invalid_value", "prompt"),
    ]:
        assert_error(post(api, "/v1/completions", {**base, **extra}), 400, code, param)


def test_unknown_model_is_404(api):
    error = assert_error(post(api, CHAT, {"model": "gpt-4", "messages": HI}), 404,
                         "model_not_found")
    assert "gpt-4" in error["message"]
    assert_error(post(api, "/v1/completions", {"model": "gpt-4", "prompt": "a"}), 404,
                 "model_not_found")
    assert_error(api.get("/v1/models/gpt-4"), 404, "model_not_found")


def test_unknown_route_is_404(api):
    assert_error(api.get("/v1/engines"), 404, "unknown_route")
    assert_error(api.post("/v2/chat/completions", json={}), 404, "unknown_route")


def test_body_over_the_limit_is_413(api):
    body = b'{"model":"smollm2","messages":[{"role":"user","content":"' + b"a" * (1 << 20) + b'"}]}'
    error = assert_error(post(api, CHAT, body), 413, "body_too_large")
    assert "1048576" in error["message"]


def test_chunked_body_over_the_limit_is_413(api):
    """Without a Content-Length the limit is enforced as the body arrives."""
    def body():
        yield b'{"model":"smollm2","messages":[{"role":"user","content":"'
        for _ in range(1100):
            yield b"a" * 1024
        yield b'"}]}'

    response = api.post(CHAT, content=body(), headers={"content-type": "application/json"})
    assert_error(response, 413, "body_too_large")


def test_unknown_fields_are_ignored(api):
    response = post(api, CHAT, {"model": "fixture", "messages": HI, "max_tokens": 2,
                                "temperature": 0, "frobnicate": {"deep": [1, 2]},
                                "user": "alice"})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "length"


def test_no_bad_input_is_a_server_error(moatd, api):
    """Whatever was sent in this module and elsewhere, the server answered no 5xx but the
    capacity refusals (503)."""
    for body in [b"\x00" * 64, b'{"model": null}', b'{"model": "smollm2", "messages": [{}]}',
                 b'{"model": "smollm2", "messages": [{"role": "user", "content": 5}]}',
                 b'{"model": "smollm2", "messages": [{"role": "user"}], "max_tokens": 1}',
                 b'{"model": "smollm2", "messages": ' + b'"x"' + b', "stop": 5}',
                 b'{"model": "fixture", "prompt": [-1]}']:
        for path in [CHAT, "/v1/completions"]:
            response = post(api, path, body)
            assert response.status_code < 500, (path, body, response.text)
    statuses = {s.labels["status"] for s in moatd.metrics().select("moat_requests_total")}
    assert not {s for s in statuses if s.startswith("5") and s != "503"}, statuses
