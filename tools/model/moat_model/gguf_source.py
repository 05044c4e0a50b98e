"""Reads a llama-architecture GGUF into the decoder the graph builders read (decoder.Model).

Weights stay in their GGUF block encoding so a builder can keep quantised blocks as they
are, or ask for the float32 matrix when it has no exact quantised form.
"""

from __future__ import annotations

import os

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from .decoder import ConversionError, Hyper, Layer, Model, TokenizerSpec, Weight

SUPPORTED_ARCHITECTURES = ("llama",)


def _field(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _required(reader: GGUFReader, key: str):
    value = _field(reader, key)
    if value is None:
        raise ConversionError(f"GGUF metadata has no {key}")
    return value


def unpermute_qk_rows(rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation for its interleaved rope.

    llama.cpp's converter stores, per head, HF rows (i, i + head_dim/2) next to each other as
    rows (2i, 2i+1); GroupQueryAttention and the optimum graph rotate HF's halves, so the
    rows go back to HF order. The permutation acts on whole rows, so quantised blocks move
    unchanged.
    """
    head_dim = rows // n_head
    idx = np.arange(rows).reshape(n_head, head_dim // 2, 2)
    return idx.swapaxes(1, 2).reshape(rows)


def load(path: str) -> Model:
    reader = GGUFReader(path)
    arch = _required(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    tensors = {t.name: t for t in reader.tensors}

    def weight(name: str) -> Weight:
        t = tensors.get(name)
        if t is None:
            raise ConversionError(f"GGUF has no tensor {name}")
        if len(t.shape) != 2:
            raise ConversionError(f"{name}: expected a matrix, got shape {list(t.shape)}")
        in_features, out_features = int(t.shape[0]), int(t.shape[1])
        raw = np.asarray(t.data)
        if raw.shape[0] != out_features:
            raise ConversionError(f"{name}: unexpected data layout {raw.shape}")
        return Weight(name, GGMLQuantizationType(t.tensor_type), raw, in_features)

    def vector(name: str) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise ConversionError(f"GGUF has no tensor {name}")
        if t.tensor_type == GGMLQuantizationType.F32:
            return np.asarray(t.data, dtype=np.float32).reshape(-1)
        return dequantize(np.asarray(t.data), GGMLQuantizationType(t.tensor_type)).astype(np.float32).reshape(-1)

    tokens = list(_required(reader, "tokenizer.ggml.tokens"))
    hidden = int(_required(reader, f"{arch}.embedding_length"))
    n_head = int(_required(reader, f"{arch}.attention.head_count"))
    n_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // n_head))
    rope_dims = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ConversionError(f"partial rotary embedding ({rope_dims} of {head_dim} dims) is not supported")
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ConversionError(f"rope scaling {scaling!r} is not supported")

    hyper = Hyper(
        architecture=arch,
        num_layers=int(_required(reader, f"{arch}.block_count")),
        hidden_size=hidden,
        num_heads=n_head,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        ffn_size=int(_required(reader, f"{arch}.feed_forward_length")),
        vocab_size=int(_field(reader, f"{arch}.vocab_size", len(tokens))),
        context_length=int(_required(reader, f"{arch}.context_length")),
        rms_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
    )

    def opt_int(key: str) -> int | None:
        v = _field(reader, key)
        return None if v is None else int(v)

    tok = TokenizerSpec(
        model=str(_required(reader, "tokenizer.ggml.model")),
        tokens=tokens,
        token_types=[int(x) for x in _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))],
        merges=list(_field(reader, "tokenizer.ggml.merges", [])),
        bos_token_id=opt_int("tokenizer.ggml.bos_token_id"),
        eos_token_id=opt_int("tokenizer.ggml.eos_token_id"),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        chat_template=_field(reader, "tokenizer.chat_template"),
    )

    q_order = unpermute_qk_rows(n_head * head_dim, n_head)
    k_order = unpermute_qk_rows(n_kv * head_dim, n_kv)
    layers = []
    for i in range(hyper.num_layers):
        p = f"blk.{i}."
        layers.append(Layer(
            attn_norm=vector(p + "attn_norm.weight"),
            wq=weight(p + "attn_q.weight").take_rows(q_order),
            wk=weight(p + "attn_k.weight").take_rows(k_order),
            wv=weight(p + "attn_v.weight"),
            wo=weight(p + "attn_output.weight"),
            ffn_norm=vector(p + "ffn_norm.weight"),
            w_gate=weight(p + "ffn_gate.weight"),
            w_up=weight(p + "ffn_up.weight"),
            w_down=weight(p + "ffn_down.weight"),
        ))

    token_embd = weight("token_embd.weight")
    output = weight("output.weight") if "output.weight" in tensors else token_embd
    freqs = vector("rope_freqs.weight") if "rope_freqs.weight" in tensors else None
    return Model(
        path=os.path.abspath(path),
        hyper=hyper,
        tokenizer=tok,
        token_embd=token_embd,
        output=output,
        output_norm=vector("output_norm.weight"),
        layers=layers,
        inv_freq_divisor=freqs,
    )

