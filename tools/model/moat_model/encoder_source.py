"""Reads a Hugging Face BERT checkpoint directory into the plain values the encoder tools need.

A source directory holds what a sentence-transformers model repository holds:

    config.json                  BertModel hyperparameters (model_type "bert")
    model.safetensors            float32 weights
    tokenizer.json               WordPiece tokenizer with the [CLS] ... [SEP] post-processor
    modules.json                 optional: the sentence-transformers pipeline (a Normalize
                                 module means the embeddings are L2-normalised)
    1_Pooling/config.json        optional: the pooling mode (only mean pooling is supported)
    sentence_bert_config.json    optional: max_seq_length, the longest input the model takes

The safetensors file is read by safetensors_io.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from .safetensors_io import SafetensorsError, read_safetensors

# Checkpoints saved from BertForXxx carry this prefix on every encoder tensor.
OPTIONAL_PREFIX = "bert."


class SourceError(Exception):
    """The directory cannot be used as asked; the message says what and why."""


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class BertConfig:
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class EncoderLayer:
    wq: np.ndarray  # [hidden, hidden], rows = output features (PyTorch Linear layout)
    bq: np.ndarray
    wk: np.ndarray
    bk: np.ndarray
    wv: np.ndarray
    bv: np.ndarray
    wo: np.ndarray
    bo: np.ndarray
    attn_norm_w: np.ndarray
    attn_norm_b: np.ndarray
    w_in: np.ndarray  # [intermediate, hidden]
    b_in: np.ndarray
    w_out: np.ndarray  # [hidden, intermediate]
    b_out: np.ndarray
    ffn_norm_w: np.ndarray
    ffn_norm_b: np.ndarray


@dataclasses.dataclass(frozen=True)
class EncoderSource:
    root: str
    config: BertConfig
    word_embeddings: np.ndarray
    position_embeddings: np.ndarray
    token_type_embeddings: np.ndarray
    embed_norm_w: np.ndarray
    embed_norm_b: np.ndarray
    layers: list[EncoderLayer]
    pooling: str
    normalize: bool
    max_seq_length: int

    @property
    def weights_path(self) -> str:
        return os.path.join(self.root, "model.safetensors")

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.root, "tokenizer.json")


def _read_json(path: str, default=None):
    if not os.path.exists(path):
        if default is None:
            raise SourceError(f"{path} is missing")
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _config(root: str) -> BertConfig:
    c = _read_json(os.path.join(root, "config.json"))
    if c.get("model_type") != "bert":
        raise SourceError(f"model_type {c.get('model_type')!r} is not supported (only 'bert')")
    if c.get("hidden_act", "gelu") != "gelu":
        raise SourceError(f"hidden_act {c['hidden_act']!r} is not supported (only exact 'gelu')")
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise SourceError("only absolute position embeddings are supported")
    config = BertConfig(
        num_layers=int(c["num_hidden_layers"]),
        hidden_size=int(c["hidden_size"]),
        num_heads=int(c["num_attention_heads"]),
        intermediate_size=int(c["intermediate_size"]),
        vocab_size=int(c["vocab_size"]),
        max_positions=int(c["max_position_embeddings"]),
        type_vocab_size=int(c.get("type_vocab_size", 2)),
        layer_norm_eps=float(c.get("layer_norm_eps", 1e-12)),
    )
    if config.hidden_size % config.num_heads:
        raise SourceError("hidden_size is not a multiple of num_attention_heads")
    return config


def _pooling(root: str) -> tuple[str, bool]:
    """sentence-transformers' pooling mode and whether a Normalize module follows it."""
    modules = _read_json(os.path.join(root, "modules.json"), default=[])
    normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    pooling = _read_json(os.path.join(root, "1_Pooling", "config.json"),
                         default={"pooling_mode_mean_tokens": True})
    others = [k for k, v in pooling.items()
              if k.startswith("pooling_mode_") and k != "pooling_mode_mean_tokens" and v]
    if not pooling.get("pooling_mode_mean_tokens") or others:
        raise SourceError(f"pooling {pooling} is not supported (only mean pooling)")
    return "mean", normalize


def load(root: str) -> EncoderSource:
    config = _config(root)
    try:
        tensors = read_safetensors(os.path.join(root, "model.safetensors"))
    except SafetensorsError as e:
        raise SourceError(str(e)) from None
    h, ff = config.hidden_size, config.intermediate_size

    def weight(name: str, shape: tuple) -> np.ndarray:
        for key in (name, OPTIONAL_PREFIX + name):
            if key in tensors:
                w = tensors[key]
                if w.shape != shape:
                    raise SourceError(f"tensor {key} has shape {w.shape}, expected {shape}")
                if w.dtype != np.float32:
                    raise SourceError(f"tensor {key} is {w.dtype}, only float32 is supported")
                return np.asarray(w)
        raise SourceError(f"model.safetensors lacks tensor {name}")

    layers = []
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}."
        layers.append(EncoderLayer(
            wq=weight(p + "attention.self.query.weight", (h, h)),
            bq=weight(p + "attention.self.query.bias", (h,)),
            wk=weight(p + "attention.self.key.weight", (h, h)),
            bk=weight(p + "attention.self.key.bias", (h,)),
            wv=weight(p + "attention.self.value.weight", (h, h)),
            bv=weight(p + "attention.self.value.bias", (h,)),
            wo=weight(p + "attention.output.dense.weight", (h, h)),
            bo=weight(p + "attention.output.dense.bias", (h,)),
            attn_norm_w=weight(p + "attention.output.LayerNorm.weight", (h,)),
            attn_norm_b=weight(p + "attention.output.LayerNorm.bias", (h,)),
            w_in=weight(p + "intermediate.dense.weight", (ff, h)),
            b_in=weight(p + "intermediate.dense.bias", (ff,)),
            w_out=weight(p + "output.dense.weight", (h, ff)),
            b_out=weight(p + "output.dense.bias", (h,)),
            ffn_norm_w=weight(p + "output.LayerNorm.weight", (h,)),
            ffn_norm_b=weight(p + "output.LayerNorm.bias", (h,)),
        ))
    pooling, normalize = _pooling(root)
    st = _read_json(os.path.join(root, "sentence_bert_config.json"), default={})
    max_seq_length = int(st.get("max_seq_length") or config.max_positions)
    if not 0 < max_seq_length <= config.max_positions:
        raise SourceError(f"max_seq_length {max_seq_length} exceeds the {config.max_positions} "
                          "position embeddings")
    if not os.path.exists(os.path.join(root, "tokenizer.json")):
        raise SourceError(f"{root}/tokenizer.json is missing")
    return EncoderSource(
        root=root,
        config=config,
        word_embeddings=weight("embeddings.word_embeddings.weight", (config.vocab_size, h)),
        position_embeddings=weight("embeddings.position_embeddings.weight", (config.max_positions, h)),
        token_type_embeddings=weight("embeddings.token_type_embeddings.weight",
                                     (config.type_vocab_size, h)),
        embed_norm_w=weight("embeddings.LayerNorm.weight", (h,)),
        embed_norm_b=weight("embeddings.LayerNorm.bias", (h,)),
        layers=layers,
        pooling=pooling,
        normalize=normalize,
        max_seq_length=max_seq_length,
    )
