#!/usr/bin/env python3
"""Greedy generation with llama.cpp (llama-cpp-python) on a GGUF: the benchmark's peer.

    python bench/llama_cpp_peer.py --gguf FILE --prompt-ids 1,2,3 --max-new-tokens N \\
        [--threads T]

Runs in the virtual environment that bench/install-llama-cpp.sh builds. Feeds the same
prompt token ids the other engines get, decodes greedily past end-of-sequence, and prints one
JSON line: {"generated_ids", "ttft_ms", "decode_tokens_per_s", "prompt_tokens"}.
"""

import argparse
import json
import os
import time

import llama_cpp


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--prompt-ids", required=True)
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]

    llm = llama_cpp.Llama(
        model_path=args.gguf,
        n_ctx=max(512, len(prompt) + args.max_new_tokens + 8),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_batch=512,
        verbose=False,
    )
    generated = []
    start = time.perf_counter()
    first = None
    # top_k=1 with temperature 0 is greedy; the generator never stops on its own, so EOS
    # does not cut the run short.
    for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if first is None:
            first = time.perf_counter()
        generated.append(int(token))
        if len(generated) >= args.max_new_tokens:
            break
    end = time.perf_counter()
    decode_s = end - first
    print(json.dumps({
        "generated_ids": generated,
        "ttft_ms": (first - start) * 1e3,
        "decode_tokens_per_s": (len(generated) - 1) / decode_s if decode_s > 0 else 0.0,
        "prompt_tokens": len(prompt),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
