"""Reads a llama-architecture GGUF into the plain values the graph builders need.

Weights stay in their GGUF block encoding (`Weight`) so a builder can keep quantised blocks
as they are, or ask for the float32 matrix when it has no exact quantised form.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

SUPPORTED_ARCHITECTURES = ("llama",)


class ConversionError(Exception):
    """The GGUF cannot be converted as asked; the message says what and why."""


@dataclasses.dataclass(frozen=True)
class Weight:
    """One matrix [out_features, in_features] as stored in the GGUF.

    `raw` holds one row per output feature: the GGUF block bytes for quantised types, the
    values themselves for float types.
    """

    name: str
    qtype: GGMLQuantizationType
    raw: np.ndarray
    in_features: int

    @property
    def out_features(self) -> int:
        return self.raw.shape[0]

    def dense(self) -> np.ndarray:
        """float32 [out_features, in_features], exactly what gguf's dequantize gives."""
        if self.qtype == GGMLQuantizationType.F32:
            return np.asarray(self.raw, dtype=np.float32)
        return dequantize(self.raw, self.qtype).astype(np.float32, copy=False)

    def take_rows(self, order: np.ndarray) -> "Weight":
        return dataclasses.replace(self, raw=self.raw[order])


@dataclasses.dataclass(frozen=True)
class Layer:
    attn_norm: np.ndarray
    wq: Weight
    wk: Weight
    wv: Weight
    wo: Weight
    ffn_norm: np.ndarray
    w_gate: Weight
    w_up: Weight
    w_down: Weight


@dataclasses.dataclass(frozen=True)
class Hyper:
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope_theta: float


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    model: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos_token: bool
    chat_template: str | None


@dataclasses.dataclass(frozen=True)
class Model:
    path: str
    hyper: Hyper
    tokenizer: TokenizerSpec
    token_embd: Weight
    output: Weight  # token_embd itself when the embeddings are tied
    output_norm: np.ndarray
    layers: list[Layer]
    inv_freq_divisor: np.ndarray | None  # llama.cpp's rope_freqs factors, if any

    @property
    def tied_embeddings(self) -> bool:
        return self.output is self.token_embd


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def inv_freq(model: Model) -> np.ndarray:
    """Rotary frequencies as HF computes them (float32), divided by rope_freqs if present."""
    d = model.hyper.head_dim
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    f = (np.float32(1.0) / np.power(np.float32(model.hyper.rope_theta), exponent)).astype(np.float32)
    if model.inv_freq_divisor is not None:
        f = (f / model.inv_freq_divisor.astype(np.float32)).astype(np.float32)
    return f
