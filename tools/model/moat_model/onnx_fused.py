"""The fused graph: ONNX Runtime contrib ops, few kernels per token.

Per step: GatherBlockQuantized embedding; per layer one (Skip)SimplifiedLayerNormalization,
one QKV MatMulNBits, one GroupQueryAttention with the rotary embedding inside, one output
MatMulNBits, one SkipSimplifiedLayerNormalization, one gate/up MatMulNBits, Split, QuickGelu
(alpha 1 is SiLU), Mul and one down MatMulNBits; a final norm and the lm_head. Q4_1 layers
add their block minimums: in the exact variant as a separate term, in the fast one through
extra K columns of the same MatMulNBits (see onnx_linear).

I/O: input_ids [b, s], attention_mask [b, total] -> logits [b, s, vocab]; past_key_values /
present per layer [b, kv_heads, len, head_dim]. GroupQueryAttention takes the KV buffers in
two ways: exact-length past in, past+new out; or one buffer of fixed capacity bound as both
past and present (it writes the new rows in place).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q

from .decoder import Model, inv_freq
from .onnx_graph import INT32, MS_DOMAIN, GraphBuilder, decoder_io
from .onnx_linear import BLOCK, LinearEmitter, q8_parts


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def rotary_caches(model: Model) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [context_length, head_dim/2], float32 as HF computes them."""
    positions = np.arange(model.hyper.context_length, dtype=np.float32)
    freqs = np.outer(positions, inv_freq(model)).astype(np.float32)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def build(model: Model, fast: bool, int4_block: int | None = None, float_minimums: bool = True):
    """The fused graph of `model`.

    `fast`: quantised matmuls on int8 activations (and, for float checkpoints, an 8-bit
    embedding and a 4-bit lm_head). `int4_block`: float weights quantised to 4 bits per
    block of that many inputs, with float minimums (Q4_1's form) or integer zero points
    (`float_minimums`); the embedding and lm_head stay float32 unless `fast`.
    """
    h = model.hyper
    gb = GraphBuilder("moat_fused")
    lin = LinearEmitter(gb, fast, int4_block, float_minimums)
    in_names, out_names = io_names(h.num_layers)
    for n in in_names + out_names:
        gb.reserve(n)

    # Sequence bookkeeping, once for all layers: GroupQueryAttention wants the per-row
    # count of valid tokens minus one and the mask width, both int32.
    mask_sum = gb.op("ReduceSum", ["attention_mask", gb.ints(1)], name="mask_sum", keepdims=0)
    seqlens_k = gb.op("Cast", [gb.op("Sub", [mask_sum, gb.ints(1)], name="seqlens_minus_one")],
                      name="seqlens_k", to=INT32)
    mask_width = gb.op("Gather", [gb.op("Shape", ["attention_mask"], name="mask_shape"),
                                  gb.scalar(1, np.int64)], name="mask_width", axis=0)
    total_len = gb.op("Cast", [mask_width], name="total_sequence_length", to=INT32)
    cos, sin = rotary_caches(model)
    cos_name, sin_name = gb.const("cos_cache", cos), gb.const("sin_cache", sin)

    embd = model.token_embd
    shared_lm_head = None
    float_table = None
    quantised_embedding = embd.in_features % BLOCK == 0 and (embd.qtype == Q.Q8_0 or (embd.is_float and fast))
    if quantised_embedding:
        q, scales = q8_parts(embd)
        table = gb.const("embed.qweight", q)  # [vocab, blocks, 32], shared with a fast lm_head
        nb = q.shape[1]
        gathered = gb.op("GatherBlockQuantized",
                         [table, "input_ids", gb.const("embed.scales", scales.reshape(-1, nb, 1))],
                         name="embed", domain=MS_DOMAIN, bits=8, block_size=BLOCK, gather_axis=0,
                         quantize_axis=2)
        x = gb.op("Reshape", [gathered, gb.ints(0, 0, -1)], name="embed/flatten")
        if model.tied_embeddings and fast and not (embd.is_float and int4_block):
            shared_lm_head = (table, gb.const("lm_head.scales", scales))
    else:
        float_table = gb.const("embed.weight", embd.dense())
        x = gb.op("Gather", [float_table, "input_ids"], name="embed", axis=0)

    q_width, kv_width = h.num_heads * h.head_dim, h.num_kv_heads * h.head_dim
    local_window = {} if h.sliding_window is None else {"local_window_size": h.sliding_window}
    residual = None
    pending = x  # the sublayer output not yet added to the residual stream
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}"
        if residual is None:
            normed = gb.op("SimplifiedLayerNormalization", [pending, gb.const(f"{p}.attn_norm", layer.attn_norm)],
                           name=f"{p}/attn_norm", axis=-1, epsilon=h.rms_eps, stash_type=1)
            residual = pending
        else:
            normed, residual = _skip_norm(gb, pending, residual, layer.attn_norm, h.rms_eps, f"{p}/attn_norm")
        qkv = lin.linear(normed, [layer.wq, layer.wk, layer.wv], f"{p}.qkv")
        if layer.qkv_bias is not None:
            qkv = gb.op("Add", [qkv, gb.const(f"{p}.qkv.bias", layer.qkv_bias)], name=f"{p}/qkv_bias")
        if layer.q_norm is not None:
            q, k, v = gb.op("Split", [qkv, gb.ints(q_width, kv_width, kv_width)], 3, name=f"{p}/qkv_split", axis=-1)
            q = _head_norm(gb, q, layer.q_norm, h.num_heads, h.head_dim, h.rms_eps, f"{p}/q_norm")
            k = _head_norm(gb, k, layer.k_norm, h.num_kv_heads, h.head_dim, h.rms_eps, f"{p}/k_norm")
            qkv = gb.op("Concat", [q, k, v], name=f"{p}/qkv_normed", axis=-1)
        # GroupQueryAttention reads the head size off the packed width (heads + 2 kv heads).
        attn = gb.op("GroupQueryAttention",
                     [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                      seqlens_k, total_len, cos_name, sin_name],
                     [gb.unique(f"{p}/attn/out"), f"present.{i}.key", f"present.{i}.value"],
                     name=f"{p}/attn", domain=MS_DOMAIN, num_heads=h.num_heads, kv_num_heads=h.num_kv_heads,
                     scale=float(1.0 / np.sqrt(h.head_dim)), do_rotary=1, rotary_interleaved=0,
                     **local_window)[0]
        attn_out = lin.linear(attn, [layer.wo], f"{p}.o_proj")
        if layer.o_bias is not None:
            attn_out = gb.op("Add", [attn_out, gb.const(f"{p}.o_proj.bias", layer.o_bias)], name=f"{p}/o_bias")
        normed, residual = _skip_norm(gb, attn_out, residual, layer.ffn_norm, h.rms_eps, f"{p}/ffn_norm")
        gate_up = lin.linear(normed, [layer.w_gate, layer.w_up], f"{p}.gate_up")
        gate, up = gb.op("Split", [gate_up, gb.ints(h.ffn_size, h.ffn_size)], 2, name=f"{p}/split", axis=-1)
        act = gb.op("QuickGelu", [gate], name=f"{p}/silu", domain=MS_DOMAIN, alpha=1.0)
        pending = lin.linear(gb.op("Mul", [act, up], name=f"{p}/gated"), [layer.w_down], f"{p}.down")

    final = gb.op("SkipSimplifiedLayerNormalization",
                  [pending, residual, gb.const("final_norm", model.output_norm)],
                  name="final_norm", domain=MS_DOMAIN, epsilon=h.rms_eps)
    out = model.output
    if shared_lm_head is not None:
        lin.matmul_nbits(final, *shared_lm_head, bits=8, n=embd.out_features, k=embd.in_features,
                         name="lm_head", out="logits")
    elif out.is_float and fast and int4_block and out.in_features % int4_block == 0:
        # The lm_head is a sixth of a small model's weights, read for every token: in 4 bits
        # it reads half the bytes of an 8-bit one.
        lin.linear(final, [out], "lm_head", out="logits")
    elif out.is_float and fast and out.in_features % BLOCK == 0:
        q, scales = q8_parts(out)
        lin.matmul_nbits(final, gb.const("lm_head.qweight", q), gb.const("lm_head.scales", scales), bits=8,
                         n=out.out_features, k=out.in_features, name="lm_head", out="logits")
    elif out.is_float and model.tied_embeddings and float_table is not None:
        # One copy of the table in the file; ONNX Runtime folds the transpose at load.
        lm_weight = gb.op("Transpose", [float_table], name="lm_head_weight", perm=[1, 0])
        gb.op("MatMul", [final, lm_weight], ["logits"], name="lm_head")
    elif out.is_float:
        gb.op("MatMul", [final, gb.const("lm_head.weight", out.dense().T)], ["logits"], name="lm_head")
    else:
        lin.linear(final, [out], "lm_head", out="logits")

    inputs, outputs = decoder_io(h.num_layers, h.num_kv_heads, h.head_dim, h.vocab_size,
                                 position_ids=False)
    return gb.model(inputs, outputs, use_ms_domain=True, doc="moat fused graph"), in_names, out_names


def _head_norm(gb: GraphBuilder, x: str, gamma: np.ndarray, heads: int, head_dim: int, eps: float,
               name: str) -> str:
    """RMSNorm of each head of x [b, s, heads * head_dim] over its head_dim values (Qwen3)."""
    per_head = gb.op("Reshape", [x, gb.ints(0, 0, heads, head_dim)], name=f"{name}/heads")
    normed = gb.op("SimplifiedLayerNormalization", [per_head, gb.const(f"{name}.weight", gamma)],
                   name=name, axis=-1, epsilon=eps, stash_type=1)
    return gb.op("Reshape", [normed, gb.ints(0, 0, heads * head_dim)], name=f"{name}/merge")


def _skip_norm(gb: GraphBuilder, x: str, residual: str, gamma: np.ndarray, eps: float, name: str):
    """(RMSNorm(x + residual) * gamma, x + residual) in one kernel."""
    out, _, _, total = gb.op("SkipSimplifiedLayerNormalization", [x, residual, gb.const(f"{name}.weight", gamma)],
                             [gb.unique(f"{name}/out"), "", "", gb.unique(f"{name}/residual")],
                             name=name, domain=MS_DOMAIN, epsilon=eps)
    return out, total
