#!/usr/bin/env python3
"""Independent numpy reference for BERT sentence embeddings.

The Rust test-suite runs this as a subprocess to cross-check the embedder. It shares only
the weight reader with the ONNX converter, never the graph: every text is run alone (no
batch, no padding, no mask), in float32, straight from the source directory's
model.safetensors, then mean-pooled over its tokens and L2-normalised when the model's
sentence-transformers pipeline normalises.

    python -m moat_model.reference_encoder --source DIR --text TEXT [--text TEXT]...

prints one JSON line: {"token_ids": [[...], ...], "embeddings": [[...], ...]}. Token ids
come from the source's tokenizer.json with its special tokens ([CLS] ... [SEP]) and without
the truncation or padding it may carry.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


import numpy as np  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from . import encoder_source  # noqa: E402

_ERF = np.frompyfunc(math.erf, 1, 1)


class BertReference:
    def __init__(self, root: str):
        self.src = encoder_source.load(root)
        self.tokenizer = Tokenizer.from_file(self.src.tokenizer_path)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

    def _layer_norm(self, x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        return (x - mean) / np.sqrt(var + np.float32(self.src.config.layer_norm_eps)) * w + b

    @staticmethod
    def _gelu(x: np.ndarray) -> np.ndarray:
        # numpy has no erf; math.erf per element (float64) is exact and fast enough here.
        y = x.astype(np.float64)
        erf = _ERF(y / np.sqrt(2.0)).astype(np.float64)
        return (0.5 * y * (1.0 + erf)).astype(np.float32)

    def hidden(self, ids: list[int]) -> np.ndarray:
        """last_hidden_state [len(ids), hidden] of one unpadded sequence (token type 0)."""
        src, cfg = self.src, self.src.config
        n, heads, hd = len(ids), cfg.num_heads, cfg.head_dim
        if n > cfg.max_positions:
            raise SystemExit(f"reference_encoder.py: {n} tokens exceed {cfg.max_positions} positions")
        x = (src.word_embeddings[np.asarray(ids, dtype=np.int64)]
             + src.position_embeddings[:n] + src.token_type_embeddings[0])
        x = self._layer_norm(x.astype(np.float32), src.embed_norm_w, src.embed_norm_b)
        scale = np.float32(1.0 / np.sqrt(hd))
        for L in src.layers:
            q = (x @ L.wq.T + L.bq).reshape(n, heads, hd).transpose(1, 0, 2)
            k = (x @ L.wk.T + L.bk).reshape(n, heads, hd).transpose(1, 0, 2)
            v = (x @ L.wv.T + L.bv).reshape(n, heads, hd).transpose(1, 0, 2)
            scores = (q @ k.transpose(0, 2, 1)) * scale
            scores -= scores.max(axis=-1, keepdims=True)
            p = np.exp(scores)
            p /= p.sum(axis=-1, keepdims=True)
            ctx = (p @ v).transpose(1, 0, 2).reshape(n, heads * hd)
            x = self._layer_norm(x + ctx @ L.wo.T + L.bo, L.attn_norm_w, L.attn_norm_b)
            ff = self._gelu(x @ L.w_in.T + L.b_in) @ L.w_out.T + L.b_out
            x = self._layer_norm(x + ff, L.ffn_norm_w, L.ffn_norm_b)
        return x.astype(np.float32)

    def token_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def embed(self, ids: list[int]) -> np.ndarray:
        if self.src.pooling != "mean":
            raise SystemExit(f"reference_encoder.py: pooling {self.src.pooling!r} is not implemented")
        pooled = self.hidden(ids).astype(np.float64).mean(axis=0)
        if self.src.normalize:
            pooled /= max(np.linalg.norm(pooled), 1e-12)
        return pooled.astype(np.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, help="BERT source directory (see encoder_source.py)")
    ap.add_argument("--text", action="append", required=True, help="text to embed (repeatable)")
    args = ap.parse_args(argv)
    ref = BertReference(args.source)
    ids = [ref.token_ids(t) for t in args.text]
    out = {"token_ids": ids, "embeddings": [ref.embed(i).tolist() for i in ids]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
