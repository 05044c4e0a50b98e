"""Many clients at once: concurrent streams give each the answer it would get alone, a
client that goes away frees its sequence, and a full queue refuses with 503 + Retry-After
instead of waiting without bound."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from harness import running, server_config, tls_context, wait_until

PROMPTS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "What is two plus two?",
    # Over 700 tokens: fed in chunks, between the decode steps of the others.
    "The history of the city is long and varied. " * 70 + "Summarise this in one line.",
]
STORY = "Once upon a time, there was a little"


def chat_body(prompt: str, max_tokens: int, **extra) -> dict:
    return {"model": "smollm2", "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "messages": [{"role": "user", "content": prompt}], **extra}


def stream_text(http: httpx.Client, body: dict) -> tuple[str, float, float]:
    """The joined deltas of one streamed chat, with when its first and last text came."""
    parts, first = [], None
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    first = first or time.monotonic()
                    parts.append(choice["delta"]["content"])
    return "".join(parts), first, time.monotonic()


def test_concurrent_streams_each_get_their_own_answer(api):
    alone = {p: stream_text(api, chat_body(p, 20))[0] for p in PROMPTS}
    assert len(set(alone.values())) == len(PROMPTS)

    requests = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda p: stream_text(api, chat_body(p, 20)), requests))

    for prompt, (text, _, _) in zip(requests, results):
        assert text == alone[prompt], prompt
    # They really ran together: some moment saw most of them mid-answer.
    moments = [first for _, first, _ in results]
    overlap = max(sum(1 for _, a, b in results if a <= t <= b) for t in moments)
    assert overlap >= 8, overlap


def test_client_disconnect_frees_the_sequence(moatd, pki, alice):
    """Greedy SmolLM2 tells this story for thousands of tokens (minutes here); once the client
    hangs up, its sequence must leave the engine within seconds."""
    body = {"model": "smollm2", "prompt": STORY, "temperature": 0, "max_tokens": 3000,
            "stream": True}
    with moatd.http(pki.ca_cert, alice) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            # Held in a variable: abandoning the iterator would already close the stream.
            lines = response.iter_lines()
            chunks = 0
            while chunks < 3:
                chunks += next(lines).startswith("data: ")
            assert moatd.metrics().total("moat_active_sequences", model="smollm2") == 1
    # The response and its connection are closed now, mid-answer.
    wait_until(lambda: moatd.metrics().total("moat_active_sequences", model="smollm2") == 0,
               timeout=10, what="the disconnected stream's sequence to be freed")
    # The engine goes on serving.
    with moatd.http(pki.ca_cert, alice) as http:
        text, _, _ = stream_text(http, chat_body(PROMPTS[0], 16))
    assert text == "The capital of France is Paris."


def test_full_queue_is_refused_with_retry_after(tmp_path, pki, alice):
    """One sequence at a time and one waiting: with both taken, every further request is
    refused at once with 503 and Retry-After, and the waiting one is served in its turn."""
    config = server_config(pki, {"smollm2": "smollm2-135m-instruct-exact"},
                           engine={"queue_capacity": 1, "max_batch": 1})
    long_story = {"model": "smollm2", "prompt": STORY, "temperature": 0, "max_tokens": 3000,
                  "stream": True}
    with running(tmp_path / "moatd", config) as server, \
            server.http(pki.ca_cert, alice) as running_client, \
            server.http(pki.ca_cert, alice) as waiting_client, \
            server.http(pki.ca_cert, alice) as others:

        def depth():
            metrics = server.metrics()
            return (metrics.total("moat_active_sequences", model="smollm2"),
                    metrics.total("moat_queue_depth", model="smollm2"))

        with running_client.stream("POST", "/v1/completions", json=long_story) as running_:
            assert running_.status_code == 200
            wait_until(lambda: depth() == (1, 0), 30, "the first request to run")
            with waiting_client.stream("POST", "/v1/completions",
                                       json=long_story) as waiting:
                assert waiting.status_code == 200
                wait_until(lambda: depth() == (1, 1), 30, "the second request to queue")

                barrier = threading.Barrier(8)

                def refused(_):
                    body = {"model": "smollm2", "prompt": STORY, "max_tokens": 8}
                    barrier.wait(timeout=30)
                    return others.post("/v1/completions", json=body)

                with ThreadPoolExecutor(max_workers=8) as pool:
                    responses = list(pool.map(refused, range(8)))
                for response in responses:
                    assert response.status_code == 503, response.text
                    assert response.headers["retry-after"] == "1"
                    error = response.json()["error"]
                    assert (error["type"], error["code"]) == ("overloaded_error", "queue_full")
                    assert "smollm2" in error["message"]
                # The running request hangs up: the waiting one gets its turn.
                running_.close()
                wait_until(lambda: depth() == (1, 0), 10, "the queued request to start")
                for line in waiting.iter_lines():
                    if line.startswith("data: "):
                        assert "choices" in json.loads(line[len("data: "):])
                        break
        wait_until(lambda: depth() == (0, 0), 10, "both sequences to be freed")
        assert server.metrics().requests(endpoint="completions", status="503") == 8
        assert server.metrics().requests(endpoint="completions", status="200") == 2


def test_client_disconnect_cancels_a_whole_answer(moatd, pki, alice):
    """Without streaming too: a client that hangs up while its answer is generated frees the
    sequence within seconds, and the request is counted as abandoned (499)."""
    body = json.dumps({"model": "smollm2", "prompt": STORY, "temperature": 0,
                       "max_tokens": 3000}).encode()
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Content-Type: application/json\r\nContent-Length: "
               + str(len(body)).encode() + b"\r\n\r\n" + body)
    before = moatd.metrics().requests(endpoint="completions", status="499")
    context = tls_context(pki.ca_cert, alice)
    with socket.create_connection(("127.0.0.1", moatd.port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(request)
            wait_until(lambda: moatd.metrics().total("moat_active_sequences", model="smollm2") == 1,
                       timeout=30, what="the answer to be generating")
    # Hung up mid-answer, before any byte of the response.
    wait_until(lambda: moatd.metrics().total("moat_active_sequences", model="smollm2") == 0,
               timeout=10, what="the abandoned answer's sequence to be freed")
    wait_until(lambda: moatd.metrics().requests(endpoint="completions", status="499") == before + 1,
               timeout=10, what="the abandoned request to be counted")
