"""What an operator watches: request ids, Prometheus metrics by department and model, and
the health and readiness probes on both listeners."""

import httpx

from harness import wait_until

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_every_response_has_a_unique_request_id(api):
    responses = [
        api.get("/v1/models"),
        api.get("/healthz"),
        api.get("/v1/nowhere"),
        api.post("/v1/chat/completions", json={"model": "nope", "messages": FRANCE}),
        api.post("/v1/chat/completions", json={"model": "fixture", "messages": FRANCE,
                                               "max_tokens": 2}),
    ]
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(ids), ids
    assert len(set(ids)) == len(ids)
    # The completion id carries the request id, so a client's report can be traced.
    assert responses[-1].json()["id"] == f"chatcmpl-{ids[-1]}"


def test_request_id_names_the_requests_log_line(moatd, api):
    response = api.post("/v1/chat/completions", json={"model": "nope", "messages": FRANCE})
    request_id = response.headers["x-request-id"]
    wait_until(lambda: any(request_id in line for line in moatd.lines), 10,
               f"a log line with the request id {request_id}")


def test_metrics_count_requests_tokens_and_latency_by_department_and_model(moatd, client):
    before = moatd.metrics()
    answer = client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0,
                                            max_tokens=32)
    list(client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0,
                                        max_tokens=4, stream=True))
    after = moatd.metrics()

    labels = {"endpoint": "chat", "status": "200", "department": "finance",
              "model": "smollm2"}
    assert after.requests(**labels) == before.requests(**labels) + 2
    caller = {"department": "finance", "model": "smollm2"}
    assert (after.total("moat_prompt_tokens_total", **caller)
            - before.total("moat_prompt_tokens_total", **caller)
            == 2 * answer.usage.prompt_tokens)
    assert (after.total("moat_completion_tokens_total", **caller)
            - before.total("moat_completion_tokens_total", **caller)
            == answer.usage.completion_tokens + 4)
    ttft = "moat_time_to_first_token_seconds_count"
    assert after.total(ttft, model="smollm2") == before.total(ttft, model="smollm2") + 2
    assert after.total("moat_time_to_first_token_seconds_sum", model="smollm2") > 0
    assert after.total("moat_inter_token_latency_seconds_count", model="smollm2") > 0
    for gauge in ["moat_queue_depth", "moat_active_sequences"]:
        assert {s.labels["model"] for s in after.select(gauge)} == {"fixture", "smollm2"}
        assert after.total(gauge) == 0


def test_metrics_never_carry_request_content(moatd, api):
    secret = "the-merger-code-is-4471"
    api.post("/v1/chat/completions", json={"model": "fixture", "max_tokens": 2,
                                           "messages": [{"role": "user", "content": secret}]})
    api.post("/v1/chat/completions", json={"model": secret, "messages": FRANCE})
    assert secret not in moatd.metrics().text


def test_health_and_readiness_on_both_listeners(moatd, api):
    for response in [api.get("/healthz"), httpx.get(f"{moatd.metrics_url}/healthz")]:
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}
    # A caller the policy lets list models sees them; the metrics listener, which any
    # local user can reach, only whether the node is ready.
    response = api.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready",
                               "models": {"fixture": "ready", "smollm2": "ready"}}
    response = httpx.get(f"{moatd.metrics_url}/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


def test_metrics_and_api_stay_on_their_own_listeners(moatd, api):
    assert api.get("/metrics").status_code == 404
    assert httpx.get(f"{moatd.metrics_url}/v1/models").status_code == 404
    metrics = httpx.get(f"{moatd.metrics_url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "# TYPE moat_requests counter" in metrics.text


def test_a_shared_system_prompt_is_served_from_the_prefix_cache(moatd, client):
    system = {"role": "system", "content": "You answer for the finance department. " * 12}
    before = moatd.metrics()
    for question in ["What is an invoice?", "What is a ledger?"]:
        client.chat.completions.create(
            model="smollm2", temperature=0, max_tokens=2,
            messages=[system, {"role": "user", "content": question}])
    after = moatd.metrics()
    hits = "moat_prefix_cache_hits"
    # The second request copies the system prompt's blocks the first one computed.
    assert after.total(hits, model="smollm2") > before.total(hits, model="smollm2")
    assert after.total("moat_prefix_cache_bytes", model="smollm2") > 0
    assert after.total("moat_prefix_cache_misses", model="smollm2") > 0
