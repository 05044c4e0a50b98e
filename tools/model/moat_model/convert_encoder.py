#!/usr/bin/env python3
"""Converts a BERT sentence-embedding checkpoint into a moat model directory.

    python -m moat_model.convert_encoder --source DIR --out DIR --name NAME [--context-length N]

DIR is a Hugging Face / sentence-transformers directory (config.json, model.safetensors,
tokenizer.json, optionally modules.json, 1_Pooling/config.json, sentence_bert_config.json;
see encoder_source.py). Writes model.onnx (the `encoder` I/O contract, standard ONNX ops,
float32), tokenizer.json (the source's, with its truncation and padding removed: moat never
cuts an input short and pads batches itself) and moat-model.json (task "embedding").

--context-length defaults to sentence-transformers' max_seq_length, else the number of
position embeddings; longer inputs are refused by moat, never truncated.

Needs numpy, onnx and tokenizers; no torch, no ONNX Runtime. See docs/model-directory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


import onnx  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from . import encoder_graph  # noqa: E402
from . import encoder_source  # noqa: E402
from . import onnx_graph  # noqa: E402

FORMAT_VERSION = 1


def tokenizer(src: encoder_source.EncoderSource) -> Tokenizer:
    tok = Tokenizer.from_file(src.tokenizer_path)
    tok.no_truncation()
    tok.no_padding()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if vocab != src.config.vocab_size:
        raise encoder_source.SourceError(
            f"tokenizer.json has {vocab} tokens but the model's embedding table has "
            f"{src.config.vocab_size} rows")
    ids = tok.encode("a", add_special_tokens=True).ids
    plain = tok.encode("a", add_special_tokens=False).ids
    if len(ids) != len(plain) + 2:
        raise encoder_source.SourceError(
            "tokenizer.json does not put [CLS] ... [SEP] around an input (no BERT post-processor)")
    return tok


def metadata(src: encoder_source.EncoderSource, args, context_length: int, inputs: list[str],
             outputs: list[str]) -> dict:
    c = src.config
    return {
        "format": FORMAT_VERSION,
        "name": args.name,
        "architecture": "bert",
        "task": "embedding",
        "io_contract": "encoder",
        "num_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "num_attention_heads": c.num_heads,
        "vocab_size": c.vocab_size,
        "context_length": context_length,
        "embedding_dim": c.hidden_size,
        "pooling": src.pooling,
        "normalize": src.normalize,
        "inputs": inputs,
        "outputs": outputs,
        "source": {"file": "model.safetensors", "sha256": encoder_source.sha256_of(src.weights_path)},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, help="BERT checkpoint directory")
    ap.add_argument("--out", required=True, help="model directory to write (created)")
    ap.add_argument("--name", required=True, help="model name recorded in moat-model.json")
    ap.add_argument("--context-length", type=int, help="longest input in tokens, special tokens included")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    try:
        src = encoder_source.load(args.source)
        tok = tokenizer(src)
        context_length = args.context_length or src.max_seq_length
        if not 0 < context_length <= src.config.max_positions:
            raise encoder_source.SourceError(
                f"context length {context_length} is outside 1..{src.config.max_positions} "
                "(the model's position embeddings)")
        graph, inputs, outputs = encoder_graph.build(src)
    except encoder_source.SourceError as e:
        print(f"error: {args.source}: {e}", file=sys.stderr)
        return 1
    graph.producer_name = "moat convert_encoder"
    onnx.checker.check_model(graph, full_check=True)

    os.makedirs(args.out, exist_ok=True)
    written = onnx_graph.save(graph, os.path.join(args.out, "model.onnx"), external="never")
    size = os.path.getsize(written[0])
    del graph
    tok.save(os.path.join(args.out, "tokenizer.json"))
    meta = metadata(src, args, context_length, inputs, outputs)
    with open(os.path.join(args.out, "moat-model.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(f"{args.out}: encoder graph, {src.config.num_layers} layers, hidden {src.config.hidden_size}, "
          f"model.onnx {size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
