#!/usr/bin/env python3
"""Checks a converted model directory with onnxruntime (a development tool, not the converter).

    python -m moat_model.onnx_check greedy --model DIR [--chat TEXT | --prompt TEXT]...
        [--max-new-tokens 40] [--system default|none] [--modes plain,shared] [--threads T]
    python -m moat_model.onnx_check kernels --gguf MODEL.gguf [--layer 0]
    python -m moat_model.onnx_check tokenizer --model DIR

greedy    greedy decoding of each prompt; `plain` feeds exact-length past and takes the grown
          present, `shared` binds one preallocated [1, kv_heads, capacity, head_dim] buffer
          per layer as both past and present through IO binding (the engine's mode). Prints
          the texts, whether the modes agree, and decode speed.
kernels   runs the fused graph's linear layers of one block, its embedding and its lm_head
          as standalone ONNX Runtime graphs and compares them with float64 numpy over gguf's
          dequantized weights.
tokenizer encodes and decodes a few strings with the directory's tokenizer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time


import numpy as np  # noqa: E402

from . import ort_telemetry  # noqa: E402, F401  (first: switches ONNX Runtime's telemetry off)
import onnxruntime as ort  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from . import gguf_source  # noqa: E402
from .onnx_graph import FLOAT, INT64, MS_DOMAIN, GraphBuilder, tensor_info  # noqa: E402
from .onnx_linear import BLOCK, LinearEmitter, q8_parts  # noqa: E402


# -- greedy -------------------------------------------------------------------------------------

def render_chatml(template: str | None, user: str, system: str) -> str:
    """ChatML for one user turn, as SmolLM2's template renders it.

    system="default" inserts the system turn the template adds when the conversation has
    none (its text is read from the template); "none" leaves it out.
    """
    text = ""
    if system == "default":
        m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template or "", re.S)
        if m is None:
            raise SystemExit("the chat template has no default system turn")
        text += f"<|im_start|>system\n{m.group(1)}<|im_end|>\n"
    return text + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


class Runner:
    def __init__(self, model_dir: str, threads: int):
        with open(os.path.join(model_dir, "moat-model.json"), encoding="utf-8") as f:
            self.meta = json.load(f)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(os.path.join(model_dir, "model.onnx"), opts,
                                            providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.layers = self.meta["num_layers"]
        self.kv_shape = (self.meta["num_kv_heads"], self.meta["head_dim"])
        self.eos = set(self.meta["eos_token_ids"])

    def _feed(self, ids, seen):
        feed = {"input_ids": np.array([ids], np.int64),
                "attention_mask": np.ones((1, seen + len(ids)), np.int64)}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(seen, seen + len(ids), dtype=np.int64)[None]
        return feed

    def plain(self, prompt, max_new, ignore_eos=False):
        h, d = self.kv_shape
        past = {f"past_key_values.{i}.{kv}": np.zeros((1, h, 0, d), np.float32)
                for i in range(self.layers) for kv in ("key", "value")}
        return self._loop(prompt, max_new, ignore_eos, self._plain_step, {"past": past})

    def _plain_step(self, ids, seen, box):
        out = dict(zip(self.outputs, self.session.run(None, {**self._feed(ids, seen), **box["past"]})))
        box["past"] = {"past_key_values." + k[len("present."):]: v for k, v in out.items() if k.startswith("present.")}
        return out["logits"]

    def shared(self, prompt, max_new, ignore_eos=False):
        if "position_ids" in self.inputs:
            raise SystemExit("shared mode needs the fused graph (GroupQueryAttention)")
        h, d = self.kv_shape
        capacity = len(prompt) + max_new
        buffers = {i: {kv: ort.OrtValue.ortvalue_from_numpy(np.zeros((1, h, capacity, d), np.float32))
                       for kv in ("key", "value")} for i in range(self.layers)}
        binding = self.session.io_binding()

        def step(ids, seen, _box):
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            for name, value in self._feed(ids, seen).items():
                binding.bind_cpu_input(name, value)
            binding.bind_output("logits")  # first: get_outputs() follows binding order
            for i, kvs in buffers.items():
                for kv, buf in kvs.items():
                    binding.bind_ortvalue_input(f"past_key_values.{i}.{kv}", buf)
                    binding.bind_ortvalue_output(f"present.{i}.{kv}", buf)
            self.session.run_with_iobinding(binding)
            if seen == 0 and not np.any(buffers[0]["key"].numpy()[0, :, :len(ids)]):
                raise SystemExit("present was not written into the shared buffer")
            return binding.get_outputs()[0].numpy()

        return self._loop(prompt, max_new, ignore_eos, step, {})

    def _loop(self, prompt, max_new, ignore_eos, step, box):
        ids, seen, out = list(prompt), 0, []
        t0 = time.perf_counter()
        t_first = None
        while len(out) < max_new:
            token = int(np.argmax(step(ids, seen, box)[0, -1]))
            out.append(token)
            if t_first is None:
                t_first = time.perf_counter()
            if token in self.eos and not ignore_eos:
                break
            seen += len(ids)
            ids = [token]
        t_end = time.perf_counter()
        rate = (len(out) - 1) / (t_end - t_first) if len(out) > 1 else 0.0
        return out, (t_first - t0) * 1e3, rate


def cmd_greedy(args) -> int:
    runner = Runner(args.model, args.threads)
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    prompts = [("chat", c) for c in args.chat] + [("plain", p) for p in args.prompt]
    modes = args.modes.split(",")
    ok = True
    for kind, text in prompts:
        rendered = render_chatml(runner.meta["chat_template"], text, args.system) if kind == "chat" else text
        ids = tok.encode(rendered, add_special_tokens=False).ids
        results = {}
        for mode in modes:
            out, ttft, rate = getattr(runner, mode)(ids, args.max_new_tokens, args.ignore_eos)
            results[mode] = out
            shown = tok.decode([t for t in out if t not in runner.eos])
            print(json.dumps({"kind": kind, "prompt": text, "mode": mode, "prompt_tokens": len(ids),
                              "text": shown, "ids": out, "ttft_ms": round(ttft, 1),
                              "decode_tokens_per_s": round(rate, 1)}, ensure_ascii=False))
        if len(modes) > 1:
            same = all(results[m] == results[modes[0]] for m in modes)
            ok &= same
            print(f"modes {','.join(modes)} agree: {same}")
    return 0 if ok else 1


# -- kernels ------------------------------------------------------------------------------------

def _run_single(gb, x_name, x, out_name):
    m = gb.model([tensor_info(x_name, FLOAT, list(x.shape))], [tensor_info(out_name, FLOAT, None)], use_ms_domain=True)
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {x_name: x})[0]


def cmd_kernels(args) -> int:
    model = gguf_source.load(args.gguf)
    layer = model.layers[args.layer]
    rng = np.random.default_rng(0)
    worst = 0.0
    groups = {"qkv": [layer.wq, layer.wk, layer.wv], "o_proj": [layer.wo],
              "gate_up": [layer.w_gate, layer.w_up], "down": [layer.w_down], "lm_head": [model.output]}
    for name, weights in groups.items():
        dense = np.concatenate([w.dense() for w in weights]).astype(np.float64)
        x = rng.standard_normal((1, 3, dense.shape[1])).astype(np.float32)  # [batch, seq, in]
        ref = x.astype(np.float64) @ dense.T
        for fast in (False, True):
            gb = GraphBuilder("check")
            lin = LinearEmitter(gb, fast)
            lin.linear("x", weights, name, out="y")
            y = _run_single(gb, "x", x, "y")
            err = float(np.abs(y - ref).max() / np.abs(ref).max())
            kinds = sorted({n.op_type for n in gb.nodes})
            print(f"{name:8s} {'fast ' if fast else 'exact'} {'+'.join(kinds):28s} max rel err {err:.2e}")
            if not fast:
                worst = max(worst, err)

    # Embedding: GatherBlockQuantized over the Q8_0 table must equal gguf's dequantize bit for bit.
    embd = model.token_embd
    if embd.qtype.name == "Q8_0":
        q, scales = q8_parts(embd)
        gb = GraphBuilder("embed")
        g = gb.op("GatherBlockQuantized", [gb.const("t", q), "ids", gb.const("s", scales[..., None])],
                  domain=MS_DOMAIN, bits=8, block_size=BLOCK, gather_axis=0, quantize_axis=2)
        gb.op("Reshape", [g, gb.ints(0, -1)], ["y"])
        m = gb.model([tensor_info("ids", INT64, [None])], [tensor_info("y", FLOAT, None)], use_ms_domain=True)
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        ids = np.arange(embd.out_features, dtype=np.int64)
        got = s.run(None, {"ids": ids})[0]
        same = np.array_equal(got, embd.dense())
        print(f"embedding GatherBlockQuantized == gguf dequantize for all {len(ids)} rows: {same}")
        if not same:
            return 1
    print(f"worst exact-variant relative error: {worst:.2e}")
    return 0 if worst < 1e-5 else 1


# -- tokenizer ----------------------------------------------------------------------------------

def cmd_tokenizer(args) -> int:
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    ok = True
    chat = "<|im_start|>user\nWhat is 12345?<|im_end|>"
    enc = tok.encode(chat, add_special_tokens=False)
    pieces = enc.tokens
    digits_split = all(len(p) == 1 for p in pieces if any(c.isdigit() for c in p))
    print(json.dumps({"text": chat, "ids": enc.ids, "tokens": pieces}, ensure_ascii=False))
    ok &= enc.ids[0] == 1 and enc.ids[-1] == 2 and digits_split
    print(f"starts with 1: {enc.ids[0] == 1}, ends with 2: {enc.ids[-1] == 2}, digits split: {digits_split}")
    for text in ["café crème brûlée", "日本語のテキスト", "emoji 🙂🚀 and ZWJ 👩‍💻", "  two  spaces\ttab\nnewline",
                 "Hello, world!"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        back = tok.decode(ids, skip_special_tokens=False)
        print(json.dumps({"text": text, "ids": len(ids), "roundtrip": back == text}, ensure_ascii=False))
        ok &= back == text
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("greedy")
    g.add_argument("--model", required=True)
    g.add_argument("--chat", action="append", default=[], help="user message, rendered as ChatML")
    g.add_argument("--prompt", action="append", default=[], help="plain text prompt")
    g.add_argument("--system", choices=("default", "none"), default="default")
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--modes", default="plain,shared")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--threads", type=int, default=os.cpu_count())
    k = sub.add_parser("kernels")
    k.add_argument("--gguf", required=True)
    k.add_argument("--layer", type=int, default=0)
    t = sub.add_parser("tokenizer")
    t.add_argument("--model", required=True)
    args = ap.parse_args(argv)
    return {"greedy": cmd_greedy, "kernels": cmd_kernels, "tokenizer": cmd_tokenizer}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
