"""The optimum graph: the I/O contract of `optimum-cli export onnx` for a llama decoder.

Standard opset-17 ops only, float32 weights dequantised from the GGUF. It exists to be
correct and portable (fixture models, and the same contract ML teams' exports have), not
fast.

I/O: input_ids [b, s], attention_mask [b, past + s], position_ids [b, s],
past_key_values.{i}.key|value [b, kv_heads, past, head_dim] (past may be 0)
-> logits [b, s, vocab], present.{i}.key|value = concat(past, new) on axis 2.
"""

from __future__ import annotations

import numpy as np

from .decoder import Model, inv_freq
from .onnx_graph import BOOL, FLOAT, GraphBuilder, decoder_io


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def build(model: Model):
    h = model.hyper
    gb = GraphBuilder("moat_optimum")
    in_names, out_names = io_names(h.num_layers)
    for n in in_names + out_names:
        gb.reserve(n)
    groups = h.num_heads // h.num_kv_heads
    hd = h.head_dim

    # Additive mask [b, 1, 1, s, total]: query row r sits at absolute position past + r and
    # may see key j when j <= past + r and attention_mask[b, j] is 1.
    seq_len = gb.op("Gather", [gb.op("Shape", ["input_ids"], name="ids_shape"), gb.scalar(1, np.int64)],
                    name="seq_len", axis=0)
    total_len = gb.op("Gather", [gb.op("Shape", ["attention_mask"], name="mask_shape"), gb.scalar(1, np.int64)],
                      name="total_len", axis=0)
    past_len = gb.op("Sub", [total_len, seq_len], name="past_len")
    zero, one = gb.scalar(0, np.int64), gb.scalar(1, np.int64)
    key_pos = gb.op("Range", [zero, total_len, one], name="key_pos")
    query_pos = gb.op("Add", [gb.op("Range", [zero, seq_len, one], name="query_rows"), past_len], name="query_pos")
    causal = gb.op("LessOrEqual", [gb.op("Unsqueeze", [key_pos, gb.ints(0)], name="key_pos_row"),
                                   gb.op("Unsqueeze", [query_pos, gb.ints(1)], name="query_pos_col")],
                   name="causal")
    padding = gb.op("Unsqueeze", [gb.op("Cast", ["attention_mask"], name="mask_bool", to=BOOL), gb.ints(1, 2, 3)],
                    name="padding")
    if h.sliding_window is not None:
        # Mistral's window: a query sees the `window` most recent positions, itself included.
        oldest = gb.op("Sub", [query_pos, gb.scalar(h.sliding_window, np.int64)], name="window_start")
        recent = gb.op("Greater", [gb.op("Unsqueeze", [key_pos, gb.ints(0)], name="key_pos_row_w"),
                                   gb.op("Unsqueeze", [oldest, gb.ints(1)], name="window_start_col")],
                       name="in_window")
        causal = gb.op("And", [causal, recent], name="causal_window")
    allowed = gb.op("And", [causal, padding], name="allowed")
    mask = gb.op("Where", [allowed, gb.scalar(0.0, np.float32),
                           gb.scalar(float(np.finfo(np.float32).min), np.float32)], name="additive_mask")

    # HF's rotary embedding: angles = position * inv_freq, duplicated over both halves.
    pos = gb.op("Unsqueeze", [gb.op("Cast", ["position_ids"], name="pos_float", to=FLOAT), gb.ints(-1)],
                name="pos_col")
    freqs = gb.op("Mul", [pos, gb.const("inv_freq", inv_freq(model))], name="freqs")
    angles = gb.op("Concat", [freqs, freqs], name="angles", axis=-1)
    cos = gb.op("Unsqueeze", [gb.op("Cos", [angles], name="cos_full"), gb.ints(2)], name="cos")
    sin = gb.op("Unsqueeze", [gb.op("Sin", [angles], name="sin_full"), gb.ints(2)], name="sin")

    def rope(x: str, name: str) -> str:
        lo = gb.op("Slice", [x, gb.ints(0), gb.ints(hd // 2), gb.ints(-1)], name=f"{name}/lo")
        hi = gb.op("Slice", [x, gb.ints(hd // 2), gb.ints(hd), gb.ints(-1)], name=f"{name}/hi")
        rotated = gb.op("Concat", [gb.op("Neg", [hi], name=f"{name}/neg"), lo], name=f"{name}/rotate_half", axis=-1)
        return gb.op("Add", [gb.op("Mul", [x, cos], name=f"{name}/x_cos"),
                             gb.op("Mul", [rotated, sin], name=f"{name}/rot_sin")], name=name)

    def rms_norm(x: str, gamma: np.ndarray, name: str) -> str:
        ms = gb.op("ReduceMean", [gb.op("Mul", [x, x], name=f"{name}/square")], name=f"{name}/mean", axes=[-1],
                   keepdims=1)
        inv = gb.op("Reciprocal", [gb.op("Sqrt", [gb.op("Add", [ms, gb.scalar(h.rms_eps, np.float32)],
                                                        name=f"{name}/eps")], name=f"{name}/sqrt")],
                    name=f"{name}/rsqrt")
        return gb.op("Mul", [gb.op("Mul", [x, inv], name=f"{name}/scaled"), gb.const(f"{name}.weight", gamma)],
                     name=name)

    def linear(x: str, w, name: str, bias: np.ndarray | None = None) -> str:
        y = gb.op("MatMul", [x, gb.const(f"{name}.weight", w.dense().T)], name=name)
        if bias is None:
            return y
        return gb.op("Add", [y, gb.const(f"{name}.bias", bias)], name=f"{name}/bias")

    embd = gb.const("embed_tokens.weight", model.token_embd.dense())
    x = gb.op("Gather", [embd, "input_ids"], name="embed", axis=0)
    scale = gb.scalar(float(1.0 / np.sqrt(hd)), np.float32)
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}"
        normed = rms_norm(x, layer.attn_norm, f"{p}.input_layernorm")
        q = gb.op("Reshape", [linear(normed, layer.wq, f"{p}.q_proj", layer.q_bias), gb.ints(0, 0, h.num_heads, hd)],
                  name=f"{p}/q_heads")
        k = gb.op("Reshape", [linear(normed, layer.wk, f"{p}.k_proj", layer.k_bias),
                              gb.ints(0, 0, h.num_kv_heads, hd)], name=f"{p}/k_heads")
        v = gb.op("Reshape", [linear(normed, layer.wv, f"{p}.v_proj", layer.v_bias),
                              gb.ints(0, 0, h.num_kv_heads, hd)], name=f"{p}/v_heads")
        if layer.q_norm is not None:
            q = rms_norm(q, layer.q_norm, f"{p}.q_norm")
            k = rms_norm(k, layer.k_norm, f"{p}.k_norm")
        q, k = rope(q, f"{p}/q_rope"), rope(k, f"{p}/k_rope")
        k = gb.op("Transpose", [k], name=f"{p}/k_bnsh", perm=[0, 2, 1, 3])
        v = gb.op("Transpose", [v], name=f"{p}/v_bnsh", perm=[0, 2, 1, 3])
        present_k = gb.op("Concat", [f"past_key_values.{i}.key", k], [f"present.{i}.key"], name=f"{p}/present_k",
                          axis=2)
        present_v = gb.op("Concat", [f"past_key_values.{i}.value", v], [f"present.{i}.value"],
                          name=f"{p}/present_v", axis=2)
        # Grouped heads without copying K/V: q as [b, kv, group, s, d] against k/v as
        # [b, kv, 1, total, d]; MatMul broadcasts the group axis.
        q5 = gb.op("Transpose", [gb.op("Reshape", [q, gb.ints(0, 0, h.num_kv_heads, groups, hd)], name=f"{p}/q_groups")],
                   name=f"{p}/q_bkgsd", perm=[0, 2, 3, 1, 4])
        k5 = gb.op("Unsqueeze", [present_k, gb.ints(2)], name=f"{p}/k5")
        v5 = gb.op("Unsqueeze", [present_v, gb.ints(2)], name=f"{p}/v5")
        kt = gb.op("Transpose", [k5], name=f"{p}/k5_t", perm=[0, 1, 2, 4, 3])
        scores = gb.op("Add", [gb.op("Mul", [gb.op("MatMul", [q5, kt], name=f"{p}/qk"), scale], name=f"{p}/qk_scaled"),
                               mask], name=f"{p}/qk_masked")
        probs = gb.op("Softmax", [scores], name=f"{p}/softmax", axis=-1)
        ctx = gb.op("MatMul", [probs, v5], name=f"{p}/attn_v")  # [b, kv, group, s, d]
        ctx = gb.op("Reshape", [gb.op("Transpose", [ctx], name=f"{p}/ctx_bskgd", perm=[0, 3, 1, 2, 4]),
                                gb.ints(0, 0, -1)], name=f"{p}/ctx")
        x = gb.op("Add", [x, linear(ctx, layer.wo, f"{p}.o_proj", layer.o_bias)], name=f"{p}/attn_residual")

        normed = rms_norm(x, layer.ffn_norm, f"{p}.post_attention_layernorm")
        gate = linear(normed, layer.w_gate, f"{p}.gate_proj")
        up = linear(normed, layer.w_up, f"{p}.up_proj")
        act = gb.op("Mul", [gate, gb.op("Sigmoid", [gate], name=f"{p}/sigmoid")], name=f"{p}/silu")
        down = linear(gb.op("Mul", [act, up], name=f"{p}/gated"), layer.w_down, f"{p}.down_proj")
        x = gb.op("Add", [x, down], name=f"{p}/mlp_residual")

    final = rms_norm(x, model.output_norm, "norm")
    if model.tied_embeddings:
        # One copy of the table in the file; ONNX Runtime folds the transpose at load.
        lm_weight = gb.op("Transpose", [embd], name="lm_head_weight", perm=[1, 0])
    else:
        lm_weight = gb.const("lm_head.weight", model.output.dense().T)
    gb.op("MatMul", [final, lm_weight], ["logits"], name="lm_head")

    inputs, outputs = decoder_io(h.num_layers, h.num_kv_heads, hd, h.vocab_size,
                                 position_ids=True)
    return gb.model(inputs, outputs, use_ms_domain=False, doc="moat optimum-contract graph"), in_names, out_names
