"""The decoder every source reads into and every graph builder reads from.

A source (a GGUF, a Hugging Face checkpoint) produces a `Model`: hyperparameters, per-layer
weights and the tokenizer facts. Weights stay in their stored encoding (`Weight`): GGUF
blocks stay blocks so a builder can keep them exactly; float weights stay in their file's
type (often a memory map) until a builder asks for the float32 matrix or quantises them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


class ConversionError(Exception):
    """The source cannot be converted as asked; the message says what and why."""


def read_json_object(directory: str, name: str, required: bool = True) -> dict | None:
    """A model directory's JSON file (config.json, tokenizer_config.json, ...) as a dict;
    `None` when it is absent and not `required`. Refusals name the file."""
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        if required:
            raise ConversionError(f"{name} is missing")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{name} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{name} is not a JSON object")
    return value


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 values (ml_dtypes' dtype, as safetensors_io reads them, or their uint16 bit
    patterns) to float32: a bfloat16 is the upper half of a float32, so this is exact."""
    if raw.dtype == np.uint16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(raw).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Weight:
    """One matrix [out_features, in_features] as stored in its source.

    `raw` holds one row per output feature: the GGUF block bytes for quantised types; the
    values for F32, F16 and BF16 (ml_dtypes.bfloat16, or uint16 bit patterns).
    """

    name: str
    qtype: GGMLQuantizationType
    raw: np.ndarray
    in_features: int

    @property
    def out_features(self) -> int:
        return self.raw.shape[0]

    @property
    def is_float(self) -> bool:
        return self.qtype in FLOAT_TYPES

    def dense(self) -> np.ndarray:
        """float32 [out_features, in_features]: the stored values, exactly."""
        if self.qtype == GGMLQuantizationType.F32:
            return np.asarray(self.raw, dtype=np.float32)
        if self.qtype == GGMLQuantizationType.F16:
            return np.asarray(self.raw).astype(np.float32)
        if self.qtype == GGMLQuantizationType.BF16:
            return bf16_to_f32(self.raw)
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
    # Qwen2 (and Llama with attention_bias) add biases to the projections.
    q_bias: np.ndarray | None = None
    k_bias: np.ndarray | None = None
    v_bias: np.ndarray | None = None
    o_bias: np.ndarray | None = None
    # Qwen3 normalises each head of q and k (RMSNorm over head_dim) before the rotary step.
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None

    @property
    def qkv_bias(self) -> np.ndarray | None:
        """The fused q|k|v bias, zeros where one projection has none; None if all have none."""
        parts = (self.q_bias, self.k_bias, self.v_bias)
        if all(b is None for b in parts):
            return None
        widths = (self.wq.out_features, self.wk.out_features, self.wv.out_features)
        return np.concatenate([np.zeros(w, np.float32) if b is None else b.astype(np.float32)
                               for b, w in zip(parts, widths)])


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary scaling the graph bakes into its frequencies: `linear` or `llama3`."""

    kind: str
    factor: float
    # llama3 only.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


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
    rope_scaling: RopeScaling | None = None
    # Keys older than this many positions are not attended to (Mistral's sliding window).
    sliding_window: int | None = None


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """A GGUF's tokenizer, for gguf_tokenizer to build a tokenizer.json from."""

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
    token_embd: Weight
    output: Weight  # token_embd itself when the embeddings are tied
    output_norm: np.ndarray
    layers: list[Layer]
    inv_freq_divisor: np.ndarray | None = None  # llama.cpp's rope_freqs factors, if any
    tokenizer: TokenizerSpec | None = None  # GGUF sources only

    @property
    def tied_embeddings(self) -> bool:
        return self.output is self.token_embd


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def inv_freq(model: Model) -> np.ndarray:
    """Rotary frequencies as Hugging Face computes them (float32), with the model's scaling."""
    h = model.hyper
    d = h.head_dim
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    f = (np.float32(1.0) / np.power(np.float32(h.rope_theta), exponent)).astype(np.float32)
    if model.inv_freq_divisor is not None:
        f = (f / model.inv_freq_divisor.astype(np.float32)).astype(np.float32)
    s = h.rope_scaling
    if s is None:
        return f
    if s.kind == "linear":
        return (f / np.float32(s.factor)).astype(np.float32)
    if s.kind == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, those between blended.
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * np.pi / f
        scaled = np.where(wavelen > low_wavelen, f / s.factor, f)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, blended, scaled).astype(np.float32)
    raise ConversionError(f"rope scaling {s.kind!r} is not implemented")
