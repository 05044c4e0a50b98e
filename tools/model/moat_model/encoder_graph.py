"""Builds the ONNX graph of a BERT encoder (the `encoder` I/O contract) from standard ops.

    input_ids       int64   [batch, sequence]
    attention_mask  int64   [batch, sequence]   1 for tokens, 0 for padding
    token_type_ids  int64   [batch, sequence]
    last_hidden_state float32 [batch, sequence, hidden]

Positions are 0..sequence-1 in every row, so rows are right-padded. Padded keys get a
-1e9 bias before the softmax: their weight is exactly 0 in float32, and a real token's
output does not depend on how much padding its row has. Padded positions still produce
(meaningless) hidden states; pooling skips them with the mask.

Per layer, as BertModel computes it:

    q, k, v = x Wq + bq, x Wk + bk, x Wv + bv      split into heads
    a = softmax(q k^T / sqrt(head_dim) + mask bias) v
    x = LayerNorm(x + a Wo + bo)
    x = LayerNorm(x + gelu(x W1 + b1) W2 + b2)      gelu(y) = y/2 (1 + erf(y / sqrt 2))
"""

from __future__ import annotations

import numpy as np
import onnx

from .encoder_source import EncoderSource
from .onnx_graph import FLOAT, INT64, GraphBuilder, tensor_info

INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
OUTPUTS = ["last_hidden_state"]
# Added to the scores of padded keys. Finite, so a row without any token gives a uniform
# softmax rather than NaN; large enough that exp() of it is 0 in float32.
MASK_BIAS = -1e9


class _Encoder:
    def __init__(self, src: EncoderSource):
        self.src = src
        self.g = GraphBuilder("bert_encoder")
        self.cfg = src.config

    def linear(self, x: str, w: np.ndarray, b: np.ndarray, name: str) -> str:
        # PyTorch stores [out, in]; MatMul wants [in, out].
        wt = self.g.const(f"{name}.weight", np.ascontiguousarray(w.T, dtype=np.float32))
        bias = self.g.const(f"{name}.bias", np.asarray(b, dtype=np.float32))
        return self.g.op("Add", [self.g.op("MatMul", [x, wt], name=f"{name}/MatMul"), bias],
                         name=f"{name}/Add")

    def layer_norm(self, x: str, w: np.ndarray, b: np.ndarray, name: str, out: str | None = None) -> str:
        g = self.g
        scale = g.const(f"{name}.weight", np.asarray(w, dtype=np.float32))
        bias = g.const(f"{name}.bias", np.asarray(b, dtype=np.float32))
        outputs = [out] if out else 1
        return g.op("LayerNormalization", [x, scale, bias], outputs, name=name, axis=-1,
                    epsilon=self.cfg.layer_norm_eps)

    def gelu(self, x: str, name: str) -> str:
        g = self.g
        erf = g.op("Erf", [g.op("Mul", [x, g.scalar(np.float32(1 / np.sqrt(2)), np.float32)],
                                name=f"{name}/Scale")], name=f"{name}/Erf")
        half_x = g.op("Mul", [x, g.scalar(np.float32(0.5), np.float32)], name=f"{name}/Half")
        return g.op("Mul", [half_x, g.op("Add", [erf, g.scalar(np.float32(1.0), np.float32)],
                                         name=f"{name}/OnePlus")], name=f"{name}/Mul")

    def heads(self, x: str, name: str, perm: list[int]) -> str:
        """[b, s, hidden] -> [b, heads, s, head_dim] (perm [0, 2, 1, 3]) or its key form."""
        g = self.g
        split = g.op("Reshape", [x, g.ints(0, 0, self.cfg.num_heads, self.cfg.head_dim)],
                     name=f"{name}/Reshape")
        return g.op("Transpose", [split], name=f"{name}/Transpose", perm=perm)

    def embeddings(self) -> str:
        g, src = self.g, self.src
        word = g.const("embeddings.word_embeddings", np.asarray(src.word_embeddings, dtype=np.float32))
        pos = g.const("embeddings.position_embeddings", np.asarray(src.position_embeddings, dtype=np.float32))
        typ = g.const("embeddings.token_type_embeddings",
                      np.asarray(src.token_type_embeddings, dtype=np.float32))
        # Positions 0..s-1: the first s rows of the table.
        seq_len = g.op("Shape", ["input_ids"], name="seq_len", start=1, end=2)
        positions = g.op("Slice", [pos, g.ints(0), seq_len, g.ints(0)], name="pos_embed")
        x = g.op("Add", [g.op("Gather", [word, "input_ids"], name="word_embed", axis=0),
                         g.op("Gather", [typ, "token_type_ids"], name="type_embed", axis=0)],
                 name="embed_sum")
        x = g.op("Add", [x, positions], name="embed_pos")
        return self.layer_norm(x, src.embed_norm_w, src.embed_norm_b, "embeddings.LayerNorm")

    def mask_bias(self) -> str:
        """[b, 1, 1, s]: 0 where attention_mask is 1, MASK_BIAS where it is 0."""
        g = self.g
        mask = g.op("Cast", ["attention_mask"], name="mask_float", to=FLOAT)
        missing = g.op("Sub", [g.scalar(np.float32(1.0), np.float32), mask], name="mask_missing")
        bias = g.op("Mul", [missing, g.scalar(np.float32(MASK_BIAS), np.float32)], name="mask_bias")
        return g.op("Unsqueeze", [bias, g.ints(1, 2)], name="mask_bias_4d")

    def layer(self, x: str, bias: str, i: int, out: str | None) -> str:
        g, L, cfg = self.g, self.src.layers[i], self.cfg
        p = f"encoder.layer.{i}"
        q = self.heads(self.linear(x, L.wq, L.bq, f"{p}.query"), f"{p}.q", [0, 2, 1, 3])
        k = self.heads(self.linear(x, L.wk, L.bk, f"{p}.key"), f"{p}.k", [0, 2, 3, 1])
        v = self.heads(self.linear(x, L.wv, L.bv, f"{p}.value"), f"{p}.v", [0, 2, 1, 3])
        scores = g.op("MatMul", [q, k], name=f"{p}/QK")
        scale = g.scalar(np.float32(1 / np.sqrt(cfg.head_dim)), np.float32)
        scores = g.op("Add", [g.op("Mul", [scores, scale], name=f"{p}/Scale"), bias], name=f"{p}/Mask")
        probs = g.op("Softmax", [scores], name=f"{p}/Softmax", axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [probs, v], name=f"{p}/PV")], name=f"{p}/Merge",
                   perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, g.ints(0, 0, cfg.hidden_size)], name=f"{p}/MergeReshape")
        attn = self.linear(ctx, L.wo, L.bo, f"{p}.attention.output")
        x = self.layer_norm(g.op("Add", [x, attn], name=f"{p}/AttnResidual"), L.attn_norm_w,
                            L.attn_norm_b, f"{p}.attention.LayerNorm")
        ff = self.gelu(self.linear(x, L.w_in, L.b_in, f"{p}.intermediate"), f"{p}.gelu")
        ff = self.linear(ff, L.w_out, L.b_out, f"{p}.output")
        return self.layer_norm(g.op("Add", [x, ff], name=f"{p}/FfnResidual"), L.ffn_norm_w,
                               L.ffn_norm_b, f"{p}.output.LayerNorm", out)

    def build(self) -> onnx.ModelProto:
        g, cfg = self.g, self.cfg
        for name in INPUTS + OUTPUTS:
            g.reserve(name)
        x = self.embeddings()
        bias = self.mask_bias()
        for i in range(cfg.num_layers):
            x = self.layer(x, bias, i, OUTPUTS[0] if i == cfg.num_layers - 1 else None)
        if cfg.num_layers == 0:
            x = g.op("Identity", [x], [OUTPUTS[0]], name="output")
        inputs = [tensor_info(n, INT64, ["batch", "sequence_length"]) for n in INPUTS]
        outputs = [tensor_info(OUTPUTS[0], FLOAT, ["batch", "sequence_length", cfg.hidden_size])]
        return g.model(inputs, outputs, use_ms_domain=False,
                       doc="BERT encoder, moat `encoder` I/O contract (docs/model-directory.md)")


def build(src: EncoderSource) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """The graph and its input / output names in graph order."""
    return _Encoder(src).build(), list(INPUTS), list(OUTPUTS)
