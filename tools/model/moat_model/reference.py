#!/usr/bin/env python3
"""Independent numpy reference for llama-architecture GGUF models.

The Rust test-suite runs this as a subprocess to cross-check the engine's greedy token ids.
It deliberately shares nothing with the ONNX converter: tensors are read with
`gguf.GGUFReader` and dequantised with `gguf.quants.dequantize`, and rotary embeddings are
applied the way llama.cpp applies them to the GGUF's own row order (rotation of consecutive
pairs x[2i], x[2i+1]). The converter instead undoes llama.cpp's Q/K row permutation and
uses half-split rotation; if either side gets the permutation wrong the two disagree, which
is the point of having two implementations.

Precision: float32 throughout (weights, activations, KV cache, softmax). That is what the
exact ONNX graphs compute; numpy's BLAS and ONNX Runtime's kernels then differ only in
summation order (relative error ~1e-6). Rather than raising this side to float64, which
would still not make near-ties decidable for the engine, every step reports the top1-top2
logit margin so a test can recognise a step whose choice float noise could flip.

    python -m moat_model.reference --gguf PATH --ids 1,2,3 --max-new-tokens N \
        [--eos 2,...] [--top-logits K]

prints one JSON line: {"generated_ids": [...], "margins": [...]} (and "top" with
--top-logits: per step, K [id, logit] pairs, best first).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType
from gguf.quants import dequantize


def _field(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _tensor_f32(tensor) -> np.ndarray:
    """Dequantised copy of a GGUF tensor in numpy layout (rows = GGUF's last dimension)."""
    if tensor.tensor_type == GGMLQuantizationType.F32:
        # Copy: the reader's arrays are views of a memory map we want to release.
        out = np.array(tensor.data, dtype=np.float32)
    else:
        out = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
    # GGUF lists dimensions fastest-first; numpy wants them slowest-first.
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return np.ascontiguousarray(out.reshape(shape))


class LlamaReference:
    def __init__(self, path: str):
        reader = GGUFReader(path)
        arch = _field(reader, "general.architecture")
        if arch != "llama":
            raise SystemExit(f"reference.py: unsupported architecture {arch!r} (only llama)")

        def hp(name, default=None):
            value = _field(reader, f"{arch}.{name}", default)
            if value is None:
                raise SystemExit(f"reference.py: GGUF lacks {arch}.{name}")
            return value

        self.n_layer = int(hp("block_count"))
        self.d_model = int(hp("embedding_length"))
        self.n_head = int(hp("attention.head_count"))
        self.n_kv_head = int(hp("attention.head_count_kv", self.n_head))
        self.head_dim = int(hp("attention.key_length", self.d_model // self.n_head))
        self.n_rot = int(hp("rope.dimension_count", self.head_dim))
        self.rope_base = float(hp("rope.freq_base", 10000.0))
        self.eps = np.float32(hp("attention.layer_norm_rms_epsilon"))
        scaling = _field(reader, f"{arch}.rope.scaling.type")
        factor = _field(reader, f"{arch}.rope.scaling.factor")
        if scaling not in (None, "none") and not (scaling == "linear" and factor in (None, 1.0)):
            # A reference that silently ignores scaling would "confirm" a wrong engine.
            raise SystemExit(f"reference.py: rope scaling {scaling!r} is not implemented")
        if self.n_head % self.n_kv_head:
            raise SystemExit("reference.py: head_count is not a multiple of head_count_kv")
        if self.n_rot % 2 or self.n_rot > self.head_dim:
            raise SystemExit("reference.py: bad rope.dimension_count")

        tensors = {t.name: t for t in reader.tensors}

        def weight(name, shape):
            if name not in tensors:
                raise SystemExit(f"reference.py: GGUF lacks tensor {name}")
            w = _tensor_f32(tensors[name])
            if w.shape != shape:
                raise SystemExit(f"reference.py: {name} has shape {w.shape}, expected {shape}")
            return w

        d, hd = self.d_model, self.head_dim
        ff = int(hp("feed_forward_length"))
        if "token_embd.weight" not in tensors:
            raise SystemExit("reference.py: GGUF lacks tensor token_embd.weight")
        self.vocab = int(tensors["token_embd.weight"].shape[-1])
        self.tok_embd = weight("token_embd.weight", (self.vocab, d))
        self.layers = []
        for i in range(self.n_layer):
            p = f"blk.{i}."
            self.layers.append({
                "attn_norm": weight(p + "attn_norm.weight", (d,)),
                "wq": weight(p + "attn_q.weight", (self.n_head * hd, d)),
                "wk": weight(p + "attn_k.weight", (self.n_kv_head * hd, d)),
                "wv": weight(p + "attn_v.weight", (self.n_kv_head * hd, d)),
                "wo": weight(p + "attn_output.weight", (d, self.n_head * hd)),
                "ffn_norm": weight(p + "ffn_norm.weight", (d,)),
                "w_gate": weight(p + "ffn_gate.weight", (ff, d)),
                "w_up": weight(p + "ffn_up.weight", (ff, d)),
                "w_down": weight(p + "ffn_down.weight", (d, ff)),
            })
        self.out_norm = weight("output_norm.weight", (d,))
        # Tied embeddings: llama.cpp falls back to token_embd when output.weight is absent.
        self.lm_head = (weight("output.weight", (self.vocab, d))
                        if "output.weight" in tensors else self.tok_embd)

        # Per-pair inverse frequencies of llama.cpp's rope: pair i turns by pos * base^(-2i/n_rot).
        inv_freq = self.rope_base ** (-np.arange(0, self.n_rot, 2, dtype=np.float64) / self.n_rot)
        if "rope_freqs.weight" in tensors:  # llama-3 style per-pair frequency divisors
            inv_freq = inv_freq / _tensor_f32(tensors["rope_freqs.weight"]).astype(np.float64)
        self.inv_freq = inv_freq
        del reader, tensors

    # -- building blocks -------------------------------------------------------------------

    def _rmsnorm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        ms = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
        return (x / np.sqrt(ms + self.eps)) * w

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """llama.cpp's "normal" rope on x[T, heads, head_dim]: pairs (2i, 2i+1) of the first n_rot.

        The angles are formed in float64 and rounded once, so long positions do not lose
        precision before the cos/sin; the rotation itself is float32.
        """
        angles = positions.astype(np.float64)[:, None] * self.inv_freq[None, :]
        cos = np.cos(angles).astype(np.float32)[:, None, :]
        sin = np.sin(angles).astype(np.float32)[:, None, :]
        out = x.copy()
        x0 = x[..., 0:self.n_rot:2]
        x1 = x[..., 1:self.n_rot:2]
        out[..., 0:self.n_rot:2] = x0 * cos - x1 * sin
        out[..., 1:self.n_rot:2] = x0 * sin + x1 * cos
        return out

    # -- forward -----------------------------------------------------------------------------

    def new_cache(self, capacity: int):
        shape = (self.n_kv_head, capacity, self.head_dim)
        return {"len": 0,
                "k": [np.zeros(shape, np.float32) for _ in range(self.n_layer)],
                "v": [np.zeros(shape, np.float32) for _ in range(self.n_layer)]}

    def forward(self, ids: list[int], cache, all_positions: bool = False) -> np.ndarray:
        """Runs ids (appended after what the cache holds); returns the last position's logits,
        or with `all_positions` the logits of every new position [len(ids), vocab]."""
        T = len(ids)
        past = cache["len"]
        total = past + T
        H, KV, hd = self.n_head, self.n_kv_head, self.head_dim
        group = H // KV
        positions = np.arange(past, total)
        scale = np.float32(1.0 / np.sqrt(hd))
        # Causal mask over [query, key]: query at absolute position past+i sees keys 0..past+i.
        allowed = np.arange(total)[None, :] <= positions[:, None]

        x = self.tok_embd[np.asarray(ids, dtype=np.int64)]
        for li, L in enumerate(self.layers):
            h = self._rmsnorm(x, L["attn_norm"])
            q = self._rope((h @ L["wq"].T).reshape(T, H, hd), positions)
            k = self._rope((h @ L["wk"].T).reshape(T, KV, hd), positions)
            v = (h @ L["wv"].T).reshape(T, KV, hd)
            kc, vc = cache["k"][li], cache["v"][li]
            kc[:, past:total] = k.transpose(1, 0, 2)
            vc[:, past:total] = v.transpose(1, 0, 2)
            # GQA: query head h reads kv head h // group, i.e. heads grouped [KV, group].
            qg = q.reshape(T, KV, group, hd).transpose(1, 2, 0, 3)           # [KV, g, T, hd]
            scores = (qg @ kc[:, None, :total].transpose(0, 1, 3, 2)) * scale  # [KV, g, T, S]
            scores = np.where(allowed, scores, np.float32(-np.inf))
            scores -= scores.max(axis=-1, keepdims=True)
            p = np.exp(scores)
            p /= p.sum(axis=-1, keepdims=True)
            attn = p @ vc[:, None, :total]                                   # [KV, g, T, hd]
            attn = attn.transpose(2, 0, 1, 3).reshape(T, H * hd)
            x = x + attn @ L["wo"].T

            h = self._rmsnorm(x, L["ffn_norm"])
            gate = h @ L["w_gate"].T
            up = h @ L["w_up"].T
            act = gate / (np.float32(1.0) + np.exp(-gate)) * up  # SwiGLU: silu(gate) * up
            x = x + act @ L["w_down"].T
        cache["len"] = total
        if all_positions:
            return self._rmsnorm(x, self.out_norm) @ self.lm_head.T
        last = self._rmsnorm(x[-1:], self.out_norm)
        return (last @ self.lm_head.T)[0]

    def greedy(self, ids: list[int], max_new: int, eos: set[int], top_k: int = 0):
        cache = self.new_cache(len(ids) + max_new)
        generated, margins, tops = [], [], []
        logits = self.forward(ids, cache)  # prefill: the whole prompt in one causal pass
        for step in range(max_new):
            # Stable sort: on an exact tie the lower id wins, as np.argmax would pick.
            order = np.argsort(-logits, kind="stable")
            best = int(order[0])
            margins.append(float(logits[order[0]] - logits[order[1]]) if len(order) > 1 else 0.0)
            if top_k:
                tops.append([[int(t), float(logits[t])] for t in order[:top_k]])
            generated.append(best)
            if best in eos or step + 1 == max_new:
                break
            logits = self.forward([best], cache)
        return generated, margins, tops


def _int_list(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip() != ""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True, help="llama-architecture GGUF file")
    ap.add_argument("--ids", required=True, help="prompt token ids, comma separated")
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("--eos", default="", help="stop after emitting any of these ids")
    ap.add_argument("--top-logits", type=int, default=0, metavar="K",
                    help="also report the K best [id, logit] pairs per step")
    args = ap.parse_args(argv)

    ids = _int_list(args.ids)
    if not ids:
        ap.error("--ids must name at least one token")
    if args.max_new_tokens < 0 or args.top_logits < 0:
        ap.error("--max-new-tokens and --top-logits must not be negative")
    model = LlamaReference(args.gguf)
    bad = [i for i in ids if not 0 <= i < model.vocab]
    if bad:
        ap.error(f"token ids outside the vocabulary (size {model.vocab}): {bad}")

    if args.max_new_tokens == 0:
        generated, margins, tops = [], [], []
    else:
        generated, margins, tops = model.greedy(ids, args.max_new_tokens,
                                                set(_int_list(args.eos)), args.top_logits)
    result = {"generated_ids": generated, "margins": margins}
    if args.top_logits:
        result["top"] = tops
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
