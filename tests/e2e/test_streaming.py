"""Server-sent event streams: the same answer as the whole response, OpenAI's chunk shape,
the usage chunk on request, and the closing `data: [DONE]`."""

import json

from harness import sse_events

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_sdk_stream_joins_to_the_whole_answer(client):
    whole = client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0,
                                           max_tokens=32)
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=FRANCE, temperature=0, max_tokens=32, stream=True,
        stream_options={"include_usage": True}))

    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == whole.choices[0].message.content == "The capital of France is Paris."
    finishes = [c.choices[0].finish_reason for c in content_chunks]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])

    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage_chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert usage_chunk.usage.total_tokens == whole.usage.total_tokens
    assert {c.id for c in chunks} == {chunks[0].id}
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_raw_event_stream(api):
    body = {"model": "smollm2", "messages": FRANCE, "temperature": 0, "max_tokens": 32,
            "stream": True, "stream_options": {"include_usage": True}}
    with api.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"]
        events = sse_events(response)

    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    first = chunks[0]["choices"][0]
    assert first["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["model"] == "smollm2" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or ""
                   for c in chunks if c["choices"])
    assert text == "The capital of France is Paris."
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] > 0


def test_no_usage_chunk_unless_asked(api):
    body = {"model": "smollm2", "messages": FRANCE, "temperature": 0, "max_tokens": 4,
            "stream": True}
    with api.stream("POST", "/v1/chat/completions", json=body) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c or c["usage"] is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_completion_stream_matches_whole(client):
    prompt = "Once upon a time, there was a little"
    whole = client.completions.create(model="smollm2", prompt=prompt, temperature=0,
                                      max_tokens=12)
    chunks = list(client.completions.create(model="smollm2", prompt=prompt, temperature=0,
                                            max_tokens=12, stream=True))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stream_with_a_stop_string_holds_back_the_stop(client):
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=FRANCE, temperature=0, max_tokens=32, stop=[" Paris"],
        stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The capital of France is"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_string_inside_a_token(client):
    """"aris" ends inside the token " Paris": the answer keeps the part before it, streamed
    or not."""
    whole = client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0,
                                           max_tokens=32, stop="aris")
    chunks = list(client.chat.completions.create(model="smollm2", messages=FRANCE,
                                                 temperature=0, max_tokens=32, stop="aris",
                                                 stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content == streamed == "The capital of France is P"


def test_stream_of_arbitrary_bytes_matches_whole(client):
    """The random-weight fixture emits byte tokens that form no valid UTF-8; the streamed
    pieces still join to exactly the whole answer."""
    whole = client.completions.create(model="fixture", prompt="hello", temperature=0,
                                      max_tokens=100)
    chunks = list(client.completions.create(model="fixture", prompt="hello", temperature=0,
                                            max_tokens=100, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def test_refused_stream_is_a_plain_json_error(api):
    body = {"model": "fixture", "stream": True,
            "messages": [{"role": "user", "content": "word " * 400}]}
    response = api.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == "context_length_exceeded"
