"""A tuned model brought the way an ML team brings one: the demo model written out as a
Hugging Face checkpoint (safetensors, config.json, tokenizer files, chat template) and turned
into a graph by `moat-model convert`, served over mutual TLS beside the graph converted
straight from the GGUF. Both are the same weights, so both must answer the same, token for
token."""

import json
import subprocess
import sys

import pytest

from audit_trail import run_moatctl
from harness import (MODELS, ONNXRUNTIME, binary, moatctl, running, server_config, signed_bundle, signing_key,
                     store_config)

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


def test_the_documented_path_from_checkpoint_to_promotion(pki, alice, tmp_path):
    """docs/bring-your-model.md, command by command: a fine-tuned checkpoint (a tiny Qwen2
    here) converted, checked, packed, signed, imported, canaried and promoted; the admin
    sees the check's figures in `moatctl model list --details`."""
    tool = [sys.executable, "-m", "moat_model"]
    checkpoint, model = tmp_path / "my-finetune", tmp_path / "my-finetune-int4"
    subprocess.run([sys.executable, "-m", "moat_model.make_checkpoint", "--arch", "qwen2", "--dtype", "bfloat16",
                    "--out", checkpoint], check=True, capture_output=True)
    subprocess.run([*tool, "convert", checkpoint, "--out", model, "--variant", "int4-fast", "--name", "my-finetune"],
                   check=True, capture_output=True)
    checked = subprocess.run([*tool, "check", model, "--against", checkpoint], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    report = json.loads((model / "check.json").read_text())
    assert report["variant"] == "int4-fast" and report["passed"]

    answer = subprocess.run(
        [binary("moatd"), "generate", "--model", model, "--chat", "Hello", "--max-tokens", "8",
         "--onnxruntime-library", ONNXRUNTIME], capture_output=True, text=True, timeout=120, check=True)
    key, trusted = signing_key(tmp_path)
    bundles = [signed_bundle(
        model,
        f'name = "my-finetune"\nversion = "{version}"\ntask = "chat"\n'
        f'classification_ceiling = "internal"\n\n[sampling]\ntemperature = 0.0\n\n'
        f'[[golden]]\nprompt = "Hello"\nexpect = {json.dumps(answer.stdout.removesuffix(chr(10)))}\n'
        f'max_tokens = 8\n',
        tmp_path / f"my-finetune-{version}.tar", key) for version in ("1.0.0", "1.1.0")]

    config = store_config(pki, tmp_path, trusted)
    socket = ["--socket", config["admin"]["socket"]]
    with running(tmp_path / "node", config) as server:
        for out in bundles:
            moatctl("model", "import", out, *socket, timeout=300)
        moatctl("model", "activate", "my-finetune@1.0.0", *socket, timeout=300)
        moatctl("model", "canary", "my-finetune@1.1.0", "--percent", "10", *socket, timeout=300)
        moatctl("model", "promote", "my-finetune", *socket, timeout=300)
        listed = moatctl("model", "list", "--details", *socket).stdout
        assert "check (int4-fast, against my-finetune): passed" in listed, listed
        assert listed.count("KL mean") == 2
        with server.http(pki.ca_cert, alice) as client:
            response = client.post("/v1/chat/completions", json={
                "model": "my-finetune", "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}]})
            assert response.status_code == 200, response.text
            assert response.headers["x-moat-model-version"] == "my-finetune@1.1.0"


def test_promotion_is_gated_by_the_evaluation_set(pki, alice, tmp_path):
    """A canary that answers the bundle's evaluation set worse than the active version is
    not promoted unless the admin insists; `moatctl model eval` shows both scores first."""
    tool = [sys.executable, "-m", "moat_model"]
    prompts = ["Hello", "What is the capital of France?", "Tell me a story."]
    answers = {}
    for seed in (11, 12):
        # Two tiny models of the same shape that answer differently (the GGUF fixture's
        # generator, whose large gains make varied text).
        source, model = tmp_path / f"tuned-{seed}.gguf", tmp_path / f"model-{seed}"
        subprocess.run([sys.executable, "-m", "moat_model.make_fixture", "--seed", str(seed), "--out", source],
                       check=True, capture_output=True)
        subprocess.run([*tool, "convert", source, "--out", model, "--name", "tuned"], check=True,
                       capture_output=True)
        # Bytes, not text mode: universal newlines would turn a generated "\r" into "\n".
        answers[seed] = [subprocess.run(
            [binary("moatd"), "generate", "--model", model, "--chat", prompt, "--max-tokens", "8",
             "--onnxruntime-library", ONNXRUNTIME], capture_output=True, timeout=120,
            check=True).stdout.decode().removesuffix("\n") for prompt in prompts]
    assert answers[11] != answers[12]
    # The set a good version passes: version 1.0.0's own answers, and a format rule both meet.
    eval_set = [{"prompt": p, "expect": a, "max_tokens": 8} for p, a in zip(prompts, answers[11])]
    eval_set.append({"prompt": "Hello", "pattern": "(?s).*", "max_tokens": 4})
    key, trusted = signing_key(tmp_path)
    bundles = []
    for seed, version in ((11, "1.0.0"), (12, "2.0.0")):
        model = tmp_path / f"model-{seed}"
        (model / "eval.jsonl").write_text("".join(json.dumps(item) + "\n" for item in eval_set))
        bundles.append(signed_bundle(
            model,
            f'name = "tuned"\nversion = "{version}"\ntask = "chat"\nclassification_ceiling = "internal"\n\n'
            f'[[golden]]\nprompt = "Hello"\nexpect = {json.dumps(answers[seed][0])}\nmax_tokens = 8\n',
            tmp_path / f"tuned-{version}.tar", key))

    config = store_config(pki, tmp_path, trusted)
    socket = ["--socket", config["admin"]["socket"]]
    with running(tmp_path / "node", config):
        for out in bundles:
            moatctl("model", "import", out, *socket, timeout=300)
        moatctl("model", "activate", "tuned@1.0.0", *socket, timeout=300)
        moatctl("model", "canary", "tuned@2.0.0", "--percent", "10", *socket, timeout=300)

        good = json.loads(moatctl("model", "eval", "tuned@1.0.0", "--json", *socket, timeout=300).stdout)
        assert good["evaluation"]["accuracy"] == 1.0
        assert good["evaluation"]["format_validity"] == 1.0
        assert good["evaluation"]["items"] == 4 and good["evaluation"]["mean_output_tokens"] > 0
        worse = moatctl("model", "eval", "tuned@2.0.0", *socket, timeout=300).stdout
        assert "accuracy 0.250 (1/4)" in worse or "accuracy 0.500 (2/4)" in worse, worse

        refused = run_moatctl("model", "promote", "tuned", *socket)
        assert refused.returncode != 0
        assert "tuned@2.0.0 scores" in refused.stderr and "below tuned@1.0.0" in refused.stderr, refused.stderr
        listed = moatctl("model", "list", *socket).stdout
        assert "1.0.0" in listed.split("active")[0].splitlines()[-1], listed  # still the active one

        forced = moatctl("model", "promote", "tuned", "--force", *socket, timeout=300).stdout
        assert "promoted despite the lower score (--force)" in forced and "tuned@2.0.0 is active" in forced, forced
