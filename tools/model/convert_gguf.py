#!/usr/bin/env python3
"""Converts a llama GGUF into a moat model directory (model.onnx, tokenizer.json, moat-model.json).

    python tools/model/convert_gguf.py --gguf MODEL.gguf --out DIR \\
        --graph fused|optimum --variant exact|fast [--float16] --name NAME

--graph fused    ONNX Runtime contrib ops (MatMulNBits, GroupQueryAttention, ...), the GGUF's
                 quantised blocks kept exactly; the graph moat serves.
--graph optimum  standard ONNX ops with float32 weights and the I/O of an optimum export.
--variant exact  float32 activations everywhere.
--variant fast   MatMulNBits with int8 activations (accuracy_level 4), as llama.cpp computes.
                 Only the fused graph has quantised matmuls, so optimum takes exact only.
--float16        the fused graph in float16 (activations and KV cache; logits stay float32),
                 for GPUs (onnx_fp16).

Needs numpy, gguf, onnx and tokenizers; no ONNX Runtime. See docs/model-directory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import onnx  # noqa: E402

import convert_source  # noqa: E402
import convert_tokenizer  # noqa: E402
import onnx_fp16  # noqa: E402
import onnx_fused  # noqa: E402
import onnx_graph  # noqa: E402
import onnx_optimum  # noqa: E402

FORMAT_VERSION = 1


def metadata(model: convert_source.Model, args, tokenizer, inputs: list[str], outputs: list[str]) -> dict:
    h, tok = model.hyper, model.tokenizer
    eos = [] if tok.eos_token_id is None else [tok.eos_token_id]
    im_end = tokenizer.token_to_id("<|im_end|>")
    if im_end is not None and im_end not in eos:
        eos.append(im_end)
    return {
        "format": FORMAT_VERSION,
        "name": args.name,
        "variant": args.variant + ("-float16" if args.float16 else ""),
        "architecture": h.architecture,
        "io_contract": args.graph,
        "num_layers": h.num_layers,
        "hidden_size": h.hidden_size,
        "num_attention_heads": h.num_heads,
        "num_kv_heads": h.num_kv_heads,
        "head_dim": h.head_dim,
        "vocab_size": h.vocab_size,
        "context_length": h.context_length,
        "eos_token_ids": eos,
        "bos_token_id": tok.bos_token_id if tok.add_bos_token else None,
        "add_bos_token": tok.add_bos_token,
        "chat_template": tok.chat_template,
        "default_system_prompt": None,
        "kv_dtype": "float16" if args.float16 else "float32",
        "inputs": inputs,
        "outputs": outputs,
        "source": {"file": os.path.basename(args.gguf), "sha256": convert_source.sha256_of(args.gguf)},
    }


def check(model: onnx.ModelProto) -> None:
    """onnx.checker, with strict shape inference, over the graph.

    SimplifiedLayerNormalization lives in the default domain but its schema comes from ONNX
    Runtime, not onnx, so the checker would reject it: it is checked as a Mul of the same
    inputs and outputs, then put back. (The checker skips com.microsoft nodes itself.)
    """
    swapped = {}
    for i, node in enumerate(model.graph.node):
        if node.domain == "" and node.op_type == "SimplifiedLayerNormalization":
            swapped[i] = onnx.NodeProto()
            swapped[i].CopyFrom(node)
            node.ClearField("attribute")
            del node.output[1:]
            node.op_type = "Mul"
    try:
        onnx.checker.check_model(model, full_check=True)
    finally:
        for i, original in swapped.items():
            model.graph.node[i].CopyFrom(original)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True, help="llama-architecture GGUF file")
    ap.add_argument("--out", required=True, help="model directory to write (created)")
    ap.add_argument("--graph", choices=("fused", "optimum"), required=True)
    ap.add_argument("--variant", choices=("exact", "fast"), default="exact")
    ap.add_argument("--float16", action="store_true", help="fused graph in float16, for GPUs")
    ap.add_argument("--name", required=True, help="model name recorded in moat-model.json")
    args = ap.parse_args(argv)
    if args.graph == "optimum" and args.variant != "exact":
        ap.error("the optimum graph has float32 weights and activations only: use --variant exact")
    if args.graph == "optimum" and args.float16:
        ap.error("--float16 is for the fused graph")

    t0 = time.perf_counter()
    try:
        model = convert_source.load(args.gguf)
        tokenizer = convert_tokenizer.build(model.tokenizer)
        if args.graph == "fused":
            graph, inputs, outputs = onnx_fused.build(model, fast=args.variant == "fast")
        else:
            graph, inputs, outputs = onnx_optimum.build(model)
    except convert_source.ConversionError as e:
        print(f"error: {args.gguf}: {e}", file=sys.stderr)
        return 1
    check(graph)
    if args.float16:
        graph = onnx_fp16.to_float16(graph)
        check(graph)

    os.makedirs(args.out, exist_ok=True)
    size = onnx_graph.save(graph, os.path.join(args.out, "model.onnx"))
    del graph
    tokenizer.save(os.path.join(args.out, "tokenizer.json"))
    meta = metadata(model, args, tokenizer, inputs, outputs)
    with open(os.path.join(args.out, "moat-model.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(f"{args.out}: {args.graph}/{meta['variant']} graph, {len(model.layers)} layers, "
          f"model.onnx {size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
