"""A tuned model brought the way an ML team brings one: the demo model written out as a
Hugging Face checkpoint (safetensors, config.json, tokenizer files, chat template) and turned
into a graph by `moat-model convert`, served over mutual TLS beside the graph converted
straight from the GGUF. Both are the same weights, so both must answer the same, token for
token."""

import pytest

from harness import MODELS, running, server_config

SERVED = {"from-gguf": "smollm2-135m-instruct-exact", "from-checkpoint": "smollm2-135m-instruct-hf-exact"}
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
PROMPTS = [
    "Once upon a time, there was a little",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def client(tmp_path_factory, pki, alice):
    absent = [d for d in SERVED.values() if not (MODELS / d / "moat-model.json").is_file()]
    if absent:
        pytest.fail(f"missing model directories {absent}: run `bash scripts/setup.sh`")
    with running(tmp_path_factory.mktemp("moatd-byom"), server_config(pki, SERVED)) as server:
        sdk = server.openai(pki.ca_cert, alice)
        yield sdk
        sdk.close()


def test_the_converted_checkpoint_answers_the_known_question(client):
    response = client.chat.completions.create(model="from-checkpoint", messages=CHATS[0], temperature=0,
                                              max_tokens=32)
    assert response.choices[0].message.content == "The capital of France is Paris."
    assert response.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("messages", CHATS, ids=["france", "haiku"])
def test_checkpoint_and_gguf_graphs_chat_alike(client, messages):
    answers = [client.chat.completions.create(model=m, messages=messages, temperature=0, max_tokens=40)
               for m in SERVED]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    assert answers[0].usage.completion_tokens == answers[1].usage.completion_tokens
    assert answers[0].usage.prompt_tokens == answers[1].usage.prompt_tokens


@pytest.mark.parametrize("prompt", PROMPTS, ids=["story", "bare-haiku"])
def test_checkpoint_and_gguf_graphs_complete_alike(client, prompt):
    answers = [client.completions.create(model=m, prompt=prompt, temperature=0, max_tokens=40) for m in SERVED]
    assert answers[0].choices[0].text == answers[1].choices[0].text
    assert answers[0].usage.completion_tokens == answers[1].usage.completion_tokens
