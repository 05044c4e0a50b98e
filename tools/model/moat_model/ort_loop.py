#!/usr/bin/env python3
"""Greedy generation with plain Python onnxruntime: the benchmark's Python peer.

    python -m moat_model.ort_loop --model DIR --prompt-ids 1,2,3 --max-new-tokens N \\
        [--threads T] [--ignore-eos] [--json]

Loads DIR/model.onnx on the CPU execution provider and runs the loop the way a Python user
would: one prefill call over the prompt, then one call per token, feeding each step's
`present.*` back as the next step's `past_key_values.*`. Serves both I/O contracts of a moat
model directory (it adds `position_ids` when the graph has that input).

With --json prints one line: {"generated_ids", "ttft_ms" (prefill including the first token),
"decode_tokens_per_s" (tokens after the first over the time after the first),
"prompt_tokens"}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from . import ort_telemetry  # noqa: F401  (first: switches ONNX Runtime's telemetry off)
import onnxruntime as ort  # noqa: E402


def physical_cores() -> int:
    cores = set()
    phys = core = None
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    core = value.strip()
                elif not key:
                    if core is not None:
                        cores.add((phys, core))
                    phys = core = None
    except OSError:
        pass
    return len(cores) or os.cpu_count() or 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="moat model directory (model.onnx, moat-model.json)")
    ap.add_argument("--prompt-ids", required=True, help="prompt token ids, comma separated")
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("--threads", type=int, default=physical_cores(), help="intra-op threads (default: physical cores)")
    ap.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of the ids")
    args = ap.parse_args(argv)

    prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    meta_path = os.path.join(args.model, "moat-model.json")
    meta = {}
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    eos = set() if args.ignore_eos else set(meta.get("eos_token_ids", []))

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    session = ort.InferenceSession(os.path.join(args.model, "model.onnx"), opts,
                                   providers=["CPUExecutionProvider"])
    input_names = {i.name for i in session.get_inputs()}
    output_names = [o.name for o in session.get_outputs()]
    past = {}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            _, heads, _, head_dim = i.shape
            # Exports may leave these dims symbolic; the directory's metadata has them.
            heads = heads if isinstance(heads, int) else meta["num_kv_heads"]
            head_dim = head_dim if isinstance(head_dim, int) else meta["head_dim"]
            dtype = np.float16 if i.type == "tensor(float16)" else np.float32
            past[i.name] = np.zeros((1, heads, 0, head_dim), dtype=dtype)

    generated: list[int] = []
    ids = prompt
    seen = 0  # tokens already in the KV cache
    t_start = time.perf_counter()
    t_first = None
    while len(generated) < args.max_new_tokens:
        feed = {"input_ids": np.array([ids], dtype=np.int64),
                "attention_mask": np.ones((1, seen + len(ids)), dtype=np.int64), **past}
        if "position_ids" in input_names:
            feed["position_ids"] = np.arange(seen, seen + len(ids), dtype=np.int64)[None, :]
        outputs = dict(zip(output_names, session.run(None, feed)))
        token = int(np.argmax(outputs["logits"][0, -1]))
        generated.append(token)
        if t_first is None:
            t_first = time.perf_counter()
        if token in eos:
            break
        past = {"past_key_values." + name[len("present."):]: value
                for name, value in outputs.items() if name.startswith("present.")}
        seen += len(ids)
        ids = [token]
    t_end = time.perf_counter()

    if args.json:
        decoded = len(generated) - 1
        t_first = t_first or t_end
        print(json.dumps({
            "generated_ids": generated,
            "ttft_ms": (t_first - t_start) * 1e3,
            "decode_tokens_per_s": decoded / (t_end - t_first) if decoded > 0 else 0.0,
            "prompt_tokens": len(prompt),
        }))
    else:
        print(",".join(map(str, generated)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
