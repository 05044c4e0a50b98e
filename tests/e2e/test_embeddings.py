"""POST /v1/embeddings on all-MiniLM-L6-v2 and the tiny encoder fixture: unit vectors of
the model's width whose geometry means something, in both encodings, and each model kind
refusing the other's endpoint."""

import base64
import math
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import MODELS, running, server_config, wait_until

MODELS_SERVED = {"minilm": "all-minilm-l6-v2", "fixture-embedding": "fixture-embedding",
                 "fixture": "fixture-fused"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, pki):
    absent = [d for d in MODELS_SERVED.values() if not (MODELS / d).is_dir()]
    if absent:
        pytest.fail(f"missing model directories {absent}: run `bash scripts/setup.sh`")
    with running(tmp_path_factory.mktemp("moatd-embeddings"),
                 server_config(pki, MODELS_SERVED)) as moatd:
        yield moatd


@pytest.fixture(scope="module")
def client(server, pki, alice):
    sdk = server.openai(pki.ca_cert, alice)
    yield sdk
    sdk.close()


@pytest.fixture(scope="module")
def api(server, pki, alice):
    with server.http(pki.ca_cert, alice) as http:
        yield http


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b))


def norm(v) -> float:
    return math.sqrt(sum(x * x for x in v))


def test_minilm_gives_384_wide_unit_vectors(client):
    texts = ["The cat sits on the mat.", "Quarterly revenue grew by four percent.", "hi"]
    response = client.embeddings.create(model="minilm", input=texts)
    assert response.model == "minilm"
    assert [d.index for d in response.data] == [0, 1, 2]
    for item in response.data:
        assert len(item.embedding) == 384
        assert abs(norm(item.embedding) - 1) < 1e-3
    assert response.usage.prompt_tokens >= len(texts)
    assert response.usage.total_tokens == response.usage.prompt_tokens


def test_paraphrases_are_closer_than_unrelated_sentences(client):
    anchor, paraphrase, unrelated = [d.embedding for d in client.embeddings.create(
        model="minilm", input=["A man is playing a guitar.",
                               "Someone is strumming a guitar.",
                               "The central bank raised interest rates today."]).data]
    close, far = cosine(anchor, paraphrase), cosine(anchor, unrelated)
    assert close > 0.6, close
    assert close > far + 0.3, (close, far)


def test_float_and_base64_encodings_agree(api):
    body = {"model": "minilm", "input": ["Encodings must agree."]}
    floats = api.post("/v1/embeddings", json={**body, "encoding_format": "float"})
    packed = api.post("/v1/embeddings", json={**body, "encoding_format": "base64"})
    assert floats.status_code == packed.status_code == 200, (floats.text, packed.text)
    assert floats.json()["object"] == "list"
    assert floats.json()["data"][0]["object"] == "embedding"
    vector = floats.json()["data"][0]["embedding"]
    raw = base64.b64decode(packed.json()["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(decoded) == len(vector) == 384
    assert max(abs(a - b) for a, b in zip(vector, decoded)) < 1e-6


def test_a_batch_gives_each_text_its_own_vector(client):
    texts = ["short", "a considerably longer sentence that pads the batch out a lot"]
    together = [d.embedding for d in client.embeddings.create(model="minilm", input=texts).data]
    for text, vector in zip(texts, together):
        alone = client.embeddings.create(model="minilm", input=text).data[0].embedding
        assert max(abs(a - b) for a, b in zip(alone, vector)) < 1e-4


def test_fixture_embedding_model_is_served(client):
    response = client.embeddings.create(model="fixture-embedding", input=["one", "two"])
    assert len(response.data) == 2
    width = len(response.data[0].embedding)
    assert width > 0 and len(response.data[1].embedding) == width


def test_embeddings_from_a_chat_model_is_422(api):
    response = api.post("/v1/embeddings", json={"model": "fixture", "input": ["hi"]})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "model"


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"prompt": "hi"}),
])
def test_generation_from_an_embedding_model_is_422(api, path, body):
    response = api.post(path, json={"model": "minilm", "max_tokens": 2, **body})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "model"


@pytest.mark.parametrize("body, param", [
    ({"input": []}, "input"),
    ({"input": [""]}, "input"),
    ({"input": ["word " * 1000]}, "input"),
    ({"input": ["hi"], "dimensions": 128}, "dimensions"),
    ({"input": ["hi"], "encoding_format": "int8"}, "encoding_format"),
])
def test_bad_embedding_requests_are_400(api, body, param):
    response = api.post("/v1/embeddings", json={"model": "minilm", **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_unknown_embedding_model_is_404(api):
    response = api.post("/v1/embeddings",
                        json={"model": "text-embedding-3-small", "input": ["hi"]})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_embeddings_are_counted_by_department_and_model(server, client):
    before = server.metrics()
    response = client.embeddings.create(model="minilm", input=["count me"])
    after = server.metrics()
    labels = {"endpoint": "embeddings", "status": "200", "department": "finance",
              "model": "minilm"}
    assert after.requests(**labels) == before.requests(**labels) + 1
    caller = {"department": "finance", "model": "minilm"}
    assert (after.total("moat_prompt_tokens_total", **caller)
            - before.total("moat_prompt_tokens_total", **caller)
            == response.usage.prompt_tokens)


def test_readiness_lists_every_kind_of_model(api):
    response = api.get("/readyz")
    assert response.status_code == 200
    assert response.json()["models"] == {name: "ready" for name in MODELS_SERVED}


def test_embedding_requests_past_capacity_get_503(tmp_path, pki, alice):
    """With room for one embedding request, a second one sent while the first is being
    embedded is refused at once with 503 and Retry-After; afterwards requests are served."""
    config = server_config(pki, {"minilm": "all-minilm-l6-v2"}, engine={"queue_capacity": 1})
    # 256 inputs of ~200 tokens: seconds of work for two cores.
    big = {"model": "minilm", "input": ["the quick brown fox jumps over the lazy dog " * 20] * 256}
    with running(tmp_path / "moatd", config) as server, \
            server.http(pki.ca_cert, alice) as first, server.http(pki.ca_cert, alice) as second:
        with ThreadPoolExecutor(max_workers=1) as pool:
            busy = pool.submit(first.post, "/v1/embeddings", json=big)
            wait_until(lambda: server.metrics().total("moat_active_sequences", model="minilm") == 1,
                       30, "the first request to be embedding")
            refused = second.post("/v1/embeddings", json={"model": "minilm", "input": "hi"})
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "queue_full"
            assert busy.result(timeout=120).status_code == 200
        wait_until(lambda: server.metrics().total("moat_active_sequences", model="minilm") == 0,
                   10, "the request to be released")
        served = second.post("/v1/embeddings", json={"model": "minilm", "input": "hi"})
        assert served.status_code == 200, served.text
