#!/usr/bin/env python3
"""Greedy generation with onnxruntime-genai on a moat model directory: a benchmark peer.

    python bench/genai_peer.py --model DIR --prompt-ids 1,2,3 --max-new-tokens N \\
        [--threads T] [--own-config]

Runs in the `peers` environment of bench/install-peers.sh. onnxruntime-genai reads its own
`genai_config.json`; this writes one for the moat graph (same model.onnx, linked, in a
temporary directory) from moat-model.json: the fused graph's I/O is the one genai's model
builder produces (input_ids, attention_mask, past_key_values.N.key/value -> logits,
present.N.key/value), with the past and present buffers shared as genai does. With
`--own-config` the directory is an export of genai's model builder and its own
genai_config.json is used as the builder wrote it, but for the thread count. Feeds the
prompt ids, decodes greedily past end-of-sequence, and prints one JSON line:
{"generated_ids", "ttft_ms", "decode_tokens_per_s", "prompt_tokens"}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "model"))

import numpy as np  # noqa: E402

from moat_model import ort_telemetry  # noqa: E402, F401  (first: switches ONNX Runtime's telemetry off)
from moat_model.genai_config import config as genai_config_of  # noqa: E402
import onnxruntime_genai as og  # noqa: E402


def genai_config(meta: dict, threads: int, max_length: int) -> dict:
    return genai_config_of(
        model_type="llama", num_layers=meta["num_layers"], num_heads=meta["num_attention_heads"],
        num_kv_heads=meta["num_kv_heads"], head_size=meta["head_dim"], hidden_size=meta["hidden_size"],
        vocab_size=meta["vocab_size"], context_length=meta["context_length"], eos_token_id=meta["eos_token_ids"],
        bos_token_id=meta.get("bos_token_id") or 1, pad_token_id=meta["eos_token_ids"][0],
        session_options={"intra_op_num_threads": threads},
        search={"max_length": max_length, "min_length": 0, "num_return_sequences": 1, "repetition_penalty": 1.0,
                "temperature": 1.0, "top_p": 1.0})


def own_config(model_dir: str, threads: int, max_length: int) -> dict:
    """The builder's genai_config.json, with `threads` intra-op threads and room for the run."""
    with open(os.path.join(model_dir, "genai_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    config["search"]["max_length"] = max_length
    return config


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-ids", required=True)
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--own-config", action="store_true",
                    help="DIR is a model builder export: use its genai_config.json")
    args = ap.parse_args()
    prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    max_length = len(prompt) + args.max_new_tokens
    if args.own_config:
        config = own_config(args.model, args.threads, max_length)
        linked = [n for n in os.listdir(args.model) if n != "genai_config.json"]
    else:
        with open(os.path.join(args.model, "moat-model.json"), encoding="utf-8") as f:
            config = genai_config(json.load(f), args.threads, max_length)
        linked = ["model.onnx", "tokenizer.json"]

    with tempfile.TemporaryDirectory() as work:
        for name in linked:
            os.symlink(os.path.abspath(os.path.join(args.model, name)), os.path.join(work, name))
        with open(os.path.join(work, "genai_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
        model = og.Model(work)
        params = og.GeneratorParams(model)
        # min_length keeps end-of-sequence from ending the run: every engine generates the
        # same count.
        params.set_search_options(max_length=max_length, min_length=max_length,
                                  do_sample=False, top_k=1)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(np.array([prompt], dtype=np.int32))
        # Until a token is generated, get_next_tokens() answers the prompt's last token.
        generator.generate_next_token()
        generated = [int(generator.get_next_tokens()[0])]
        first = time.perf_counter()
        # End-of-sequence is not a reason to stop: every engine generates the same count.
        while len(generated) < args.max_new_tokens:
            generator.generate_next_token()
            generated.append(int(generator.get_next_tokens()[0]))
        end = time.perf_counter()

    print(json.dumps({
        "generated_ids": generated,
        "ttft_ms": (first - start) * 1e3,
        "decode_tokens_per_s": (len(generated) - 1) / (end - first),
        "prompt_tokens": len(prompt),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
