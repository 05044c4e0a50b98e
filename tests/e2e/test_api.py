"""The OpenAI-compatible API through the official openai SDK (and curl), on the real demo
model: the answers a department relies on, usage, limits, stop strings and seeds."""

import json
import shutil
import subprocess

import openai
import pytest

from harness import MODELS, ONNXRUNTIME, binary

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = "Once upon a time, there was a little"
# The haiku prompt rendered without any system block (the template adds a default one to
# chats that have none).
BARE_HAIKU = "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"


def test_chat_answers_the_known_question(client):
    response = client.chat.completions.create(model="smollm2", messages=FRANCE,
                                              temperature=0, max_tokens=32)
    choice = response.choices[0]
    assert choice.message.content == "The capital of France is Paris."
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert response.object == "chat.completion"
    assert response.model == "smollm2"
    assert response.id.startswith("chatcmpl-")
    usage = response.usage
    assert 10 < usage.prompt_tokens < 64
    assert 0 < usage.completion_tokens <= 32
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_applies_the_models_template_like_the_cli(client):
    """A chat with no system message gets the template's default system block, exactly as
    `moatd generate --chat` renders it; the same text without that block gives the answer
    the model is known for."""
    chat = client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=12,
        messages=[{"role": "user", "content": "Write a haiku about the sea."}])
    cli = subprocess.run(
        [binary("moatd"), "generate", "--model", MODELS / "smollm2-135m-instruct-exact",
         "--onnxruntime-library", ONNXRUNTIME, "--chat", "Write a haiku about the sea.",
         "--max-tokens", "12"],
        capture_output=True, text=True, timeout=120, check=True)
    assert chat.choices[0].message.content == cli.stdout.rstrip("\n")
    assert chat.choices[0].message.content.startswith("The waves of the sea")

    bare = client.completions.create(model="smollm2", prompt=BARE_HAIKU, temperature=0,
                                     max_tokens=40)
    assert bare.choices[0].text == "The sea is a mirror that reflects the soul."
    assert bare.choices[0].finish_reason == "stop"


def test_completion_continues_the_story(client):
    response = client.completions.create(model="smollm2", prompt=STORY, temperature=0,
                                         max_tokens=16)
    choice = response.choices[0]
    assert choice.text.startswith(" girl named Emma who loved to play in the sun")
    assert choice.finish_reason == "length"
    assert response.object == "text_completion"
    assert response.usage.completion_tokens == 16
    assert response.usage.total_tokens == response.usage.prompt_tokens + 16


def test_models_are_listed_and_retrievable(client):
    assert sorted(m.id for m in client.models.list()) == ["fixture", "smollm2"]
    model = client.models.retrieve("smollm2")
    assert (model.id, model.object) == ("smollm2", "model")
    with pytest.raises(openai.NotFoundError) as refused:
        client.models.retrieve("gpt-4")
    assert refused.value.code == "model_not_found"


def test_unknown_model_is_a_not_found_error_in_the_sdk(client):
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model="gpt-4", messages=FRANCE)
    assert refused.value.code == "model_not_found"
    assert "gpt-4" in refused.value.message


@pytest.mark.parametrize("field", ["max_completion_tokens", "max_tokens"])
def test_token_limit_is_honoured(client, field):
    response = client.chat.completions.create(
        model="smollm2", temperature=0, **{field: 3},
        messages=[{"role": "user", "content": "Tell me a long story about a dragon."}])
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 3


def test_stop_string_ends_the_answer_before_it(client):
    response = client.completions.create(model="smollm2", prompt=STORY, temperature=0,
                                         max_tokens=20, stop=[" who", "zzz"])
    assert response.choices[0].text == " girl named Emma"
    assert response.choices[0].finish_reason == "stop"


def test_stop_string_in_chat(client):
    response = client.chat.completions.create(model="smollm2", messages=FRANCE,
                                              temperature=0, max_tokens=32, stop="Paris")
    assert response.choices[0].message.content == "The capital of France is "
    assert response.choices[0].finish_reason == "stop"


def test_same_seed_same_sample(client):
    def sample(seed):
        return client.completions.create(model="smollm2", prompt=STORY, temperature=0.8,
                                         seed=seed, max_tokens=12).choices[0].text

    first = sample(7)
    assert sample(7) == first
    # Sampling does depend on the seed: four seeds do not all give the same text.
    assert len({first, sample(8), sample(9), sample(10)}) > 1


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_a_client_certificate(moatd, pki, alice):
    body = {"model": "smollm2", "messages": FRANCE, "temperature": 0, "max_tokens": 32}
    result = subprocess.run(
        ["curl", "--silent", "--show-error", "--fail-with-body",
         "--cacert", pki.ca_cert, "--cert", alice.cert, "--key", alice.key,
         "-H", "content-type: application/json", "--data", json.dumps(body),
         f"{moatd.api_url}/v1/chat/completions"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
    answer = json.loads(result.stdout)
    assert answer["choices"][0]["message"]["content"] == "The capital of France is Paris."
