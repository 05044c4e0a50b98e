#!/usr/bin/env python3
"""Independent float32 numpy forward pass of a Hugging Face decoder checkpoint directory.

`moat-model check` uses this to prove that the ONNX graphs converted from a checkpoint
compute what the checkpoint computes. It is deliberately a second, separate implementation:
it reads config.json and the safetensors files itself and imports nothing from the
converter (decoder, hf_source, safetensors_io, onnx_*, quantize). If either side gets the
rotary embedding, the grouped-query head mapping, the biases or the norms wrong, the two
disagree, which is the whole point of having two.

Supported: model_type llama, mistral, qwen2 and qwen3, with Hugging Face semantics:
RMSNorm, half-split ("rotate_half") rotary embeddings with default, linear or llama3
frequency scaling, grouped-query attention, mistral's sliding window, qwen2's q/k/v biases,
llama's (and qwen3's) optional attention biases, qwen3's per-head q/k norms, a SwiGLU MLP
and tied or separate output embeddings. Anything else is refused with a ValueError rather
than approximated: a reference that silently ignores a feature would "confirm" a converter
that ignores it too.

Precision: float32 throughout (weights, activations, KV cache, softmax), which is what the
exact ONNX graphs compute; numpy's BLAS and ONNX Runtime then differ only in summation
order. The checkpoint's float16/bfloat16 weights widen to float32 exactly.

    python -m moat_model.reference_hf --checkpoint DIR --ids 1,2,3 --max-new-tokens N [--eos 2,...]

prints one JSON line: {"generated_ids": [...], "margins": [...]}, where a margin is the
best minus the second-best logit of the step that chose the token.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# safetensors dtype code -> the little-endian numpy dtype its bytes are read as. numpy has no
# bfloat16, so BF16 is read as raw uint16 and widened by hand (see _widen_to_float32).
_STORED_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}

# A safetensors header is a few hundred bytes per tensor; anything far larger is not one.
_MAX_HEADER_BYTES = 100 << 20


# -- reading the checkpoint ------------------------------------------------------------------


def _widen_to_float32(raw: np.ndarray, code: str) -> np.ndarray:
    """A fresh float32 array from a tensor's stored elements (F32, F16 or BF16)."""
    if code == "BF16":
        # bfloat16 is the upper half of a float32: shifting its bits up 16 places is exact.
        return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return raw.astype(np.float32)  # always a copy, so the memory map can be released


class _SafetensorsFile:
    """One .safetensors file: its header parsed now, tensor bytes mapped only when read."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise ValueError(f"{path}: too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise ValueError(f"{path}: header length {header_len} does not fit a {size}-byte file")
            header = json.loads(f.read(header_len).decode("utf-8"))
        self._data_start = 8 + header_len
        data_len = size - self._data_start
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            code, shape, (begin, end) = info["dtype"], tuple(int(n) for n in info["shape"]), info["data_offsets"]
            if code not in _STORED_DTYPES:
                raise ValueError(f"{path}: tensor {name} has dtype {code}; supported: {', '.join(_STORED_DTYPES)}")
            expected = math.prod(shape) * _STORED_DTYPES[code].itemsize
            if end - begin != expected or begin < 0 or end > data_len:
                raise ValueError(f"{path}: tensor {name}'s byte range [{begin}, {end}) does not fit "
                                 f"shape {list(shape)} in {data_len} bytes of data")
            self.entries[name] = (code, shape, begin, end)
        self._map = None

    def read_float32(self, name: str) -> np.ndarray:
        code, shape, begin, end = self.entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._map[self._data_start + begin:self._data_start + end].view(_STORED_DTYPES[code])
        return _widen_to_float32(raw, code).reshape(shape)

    def close(self) -> None:
        self._map = None  # dropping the last reference unmaps the file


class CheckpointTensors:
    """The tensors of a checkpoint directory (single file or shards), read as float32 copies."""

    def __init__(self, checkpoint_dir: str):
        single = os.path.join(checkpoint_dir, "model.safetensors")
        index = os.path.join(checkpoint_dir, "model.safetensors.index.json")
        self._file_of: dict[str, _SafetensorsFile] = {}
        if os.path.exists(single):
            files = [_SafetensorsFile(single)]
        elif os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = [_SafetensorsFile(os.path.join(checkpoint_dir, name)) for name in sorted(set(weight_map.values()))]
        else:
            raise ValueError(f"{checkpoint_dir}: neither model.safetensors nor model.safetensors.index.json")
        for file in files:
            for name in file.entries:
                if name in self._file_of:
                    raise ValueError(f"{checkpoint_dir}: tensor {name} is stored twice "
                                     f"({self._file_of[name].path} and {file.path})")
                self._file_of[name] = file
        self._files = files

    def names(self) -> set[str]:
        return set(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def read(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if name not in self._file_of:
            raise ValueError(f"checkpoint lacks tensor {name}")
        tensor = self._file_of[name].read_float32(name)
        if shape is not None and tensor.shape != tuple(shape):
            raise ValueError(f"tensor {name} has shape {list(tensor.shape)}, expected {list(shape)}")
        return tensor

    def close(self) -> None:
        for file in self._files:
            file.close()


def read_checkpoint_tensors(checkpoint_dir: str) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint as float32 (for tests and inspection; the model reads lazily)."""
    tensors = CheckpointTensors(checkpoint_dir)
    try:
        return {name: tensors.read(name) for name in sorted(tensors.names())}
    finally:
        tensors.close()


# -- rotary embeddings -----------------------------------------------------------------------


def rope_inverse_frequencies(head_dim: int, theta: float, rope_scaling: dict | None) -> np.ndarray:
    """inv_freq[i] = 1 / theta^(2i/head_dim) for i < head_dim/2, after any scaling (float64).

    The scalings follow transformers' rope initialisers: "linear" slows every frequency by
    the factor; "llama3" slows only the low frequencies (long wavelengths), keeps the high
    ones and blends linearly in between.
    """
    inv_freq = 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    rope_type = _rope_type(rope_scaling)
    if rope_type == "default":
        return inv_freq
    factor = float(rope_scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor
    # llama3
    low_freq_factor = float(rope_scaling["low_freq_factor"])
    high_freq_factor = float(rope_scaling["high_freq_factor"])
    original_context = float(rope_scaling["original_max_position_embeddings"])
    wavelength = 2.0 * math.pi / inv_freq
    long_wavelength = original_context / low_freq_factor    # longer than this: fully scaled
    short_wavelength = original_context / high_freq_factor  # shorter than this: untouched
    smooth = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
    return np.where(wavelength > long_wavelength, inv_freq / factor,
                    np.where(wavelength < short_wavelength, inv_freq, blended))


def _rope_type(rope_scaling: dict | None) -> str:
    if rope_scaling is None:
        return "default"
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    return rope_type


def rotary_tables(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [T, 1, head_dim] for positions, each frequency repeated over both halves.

    The angles are formed in float64 and rounded to float32 once, after cos/sin, so large
    positions lose no precision to the product. (transformers forms them in float32; at the
    positions a check runs the difference is ~1e-6 rad, far below anything that moves a
    token.)
    """
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32)[:, None, :], np.sin(angles).astype(np.float32)[:, None, :]


def apply_rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Hugging Face's rotation of x [T, heads, head_dim]: x*cos + rotate_half(x)*sin.

    rotate_half pairs element i with element i + head_dim/2 (not neighbours 2i, 2i+1, as
    llama.cpp's GGUF layout does): rotate_half(x) = concat(-x[half:], x[:half]).
    """
    half = x.shape[-1] // 2
    rotated_half = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated_half * sin


# -- the model -------------------------------------------------------------------------------


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: np.float32) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, in float32."""
    mean_square = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(mean_square + eps)) * weight


def _silu(x: np.ndarray) -> np.ndarray:
    # exp(-x) overflows to inf for very negative x, and x / inf = -0 is the right limit.
    with np.errstate(over="ignore"):
        return x / (np.float32(1.0) + np.exp(-x))


class KVCache:
    """Per-layer keys (after rope) and values [kv_heads, capacity, head_dim] of the positions so far."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int):
        shape = (n_kv_heads, capacity, head_dim)
        self.keys = [np.zeros(shape, np.float32) for _ in range(n_layers)]
        self.values = [np.zeros(shape, np.float32) for _ in range(n_layers)]
        self.capacity = capacity
        self.length = 0


class _Layer:
    """One decoder layer's weights as float32; a bias or q/k norm the architecture lacks is None."""

    def __init__(self, tensors: CheckpointTensors, index: int, dims: "CheckpointReference",
                 attention_biases: tuple[str, ...], has_qk_norm: bool):
        prefix, attn = f"model.layers.{index}.", f"model.layers.{index}.self_attn."
        d, q_width, kv_width = dims.hidden_size, dims.n_heads * dims.head_dim, dims.n_kv_heads * dims.head_dim
        self.used = set()

        def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
            self.used.add(name)
            return tensors.read(name, shape)

        self.input_norm = take(prefix + "input_layernorm.weight", (d,))
        self.wq = take(attn + "q_proj.weight", (q_width, d))
        self.wk = take(attn + "k_proj.weight", (kv_width, d))
        self.wv = take(attn + "v_proj.weight", (kv_width, d))
        self.wo = take(attn + "o_proj.weight", (d, q_width))
        bias_width = {"q": q_width, "k": kv_width, "v": kv_width, "o": d}
        self.bq, self.bk, self.bv, self.bo = (
            take(attn + f"{p}_proj.bias", (bias_width[p],)) if p in attention_biases else None for p in "qkvo")
        self.q_norm = take(attn + "q_norm.weight", (dims.head_dim,)) if has_qk_norm else None
        self.k_norm = take(attn + "k_norm.weight", (dims.head_dim,)) if has_qk_norm else None
        self.post_attention_norm = take(prefix + "post_attention_layernorm.weight", (d,))
        ffn = dims.intermediate_size
        self.w_gate = take(prefix + "mlp.gate_proj.weight", (ffn, d))
        self.w_up = take(prefix + "mlp.up_proj.weight", (ffn, d))
        self.w_down = take(prefix + "mlp.down_proj.weight", (d, ffn))


def _linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """PyTorch Linear: weight is [out, in], y = x @ W^T (+ b)."""
    y = x @ weight.T
    return y if bias is None else y + bias


class CheckpointReference:
    """A Hugging Face llama/mistral/qwen2/qwen3 checkpoint directory, run in float32 numpy."""

    def __init__(self, checkpoint_dir: str):
        with open(os.path.join(checkpoint_dir, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        self._read_config(config)

        tensors = CheckpointTensors(checkpoint_dir)
        try:
            self._read_weights(tensors)
        finally:
            tensors.close()

    # -- loading -----------------------------------------------------------------------------

    def _read_config(self, config: dict) -> None:
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        self.model_type = model_type
        activation = config.get("hidden_act", "silu")
        if activation != "silu":
            raise ValueError(f"hidden_act {activation!r} is not supported (only silu)")
        if config.get("mlp_bias"):
            raise ValueError("mlp_bias is not supported")
        if float(config.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor is not supported (rope must cover the whole head)")

        self.n_layers = int(config["num_hidden_layers"])
        self.hidden_size = int(config["hidden_size"])
        self.n_heads = int(config["num_attention_heads"])
        kv_heads = config.get("num_key_value_heads")
        self.n_kv_heads = self.n_heads if kv_heads is None else int(kv_heads)
        head_dim = config.get("head_dim")
        # qwen3 (and some mistral/llama configs) set head_dim independently of hidden/heads.
        self.head_dim = self.hidden_size // self.n_heads if head_dim is None else int(head_dim)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"num_attention_heads {self.n_heads} is not a multiple of "
                             f"num_key_value_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} is odd; rotary embeddings need pairs")
        self.intermediate_size = int(config["intermediate_size"])
        self.context_length = int(config["max_position_embeddings"])
        self.eps = np.float32(config["rms_norm_eps"])
        self.tied = bool(config.get("tie_word_embeddings", False))
        theta = config.get("rope_theta")
        self.inv_freq = rope_inverse_frequencies(self.head_dim, 10000.0 if theta is None else float(theta),
                                                 config.get("rope_scaling"))

        self.sliding_window = None
        if model_type == "mistral":
            window = config.get("sliding_window")
            # A window at least as long as the context never hides anything.
            if window is not None and int(window) < self.context_length:
                self.sliding_window = int(window)
        elif model_type in ("qwen2", "qwen3"):
            # qwen configs carry a sliding_window value even when it is switched off.
            if config.get("use_sliding_window"):
                raise ValueError(f"{model_type} with use_sliding_window is not supported")
            if "sliding_attention" in (config.get("layer_types") or []):
                raise ValueError(f"{model_type} with sliding_attention layers is not supported")

        if model_type == "qwen2":
            self._attention_biases = ("q", "k", "v")  # always, and never on o_proj
        elif model_type in ("llama", "qwen3") and config.get("attention_bias"):
            self._attention_biases = ("q", "k", "v", "o")
        else:
            self._attention_biases = ()
        self._has_qk_norm = model_type == "qwen3"

    def _read_weights(self, tensors: CheckpointTensors) -> None:
        if "model.embed_tokens.weight" not in tensors:
            raise ValueError("checkpoint lacks tensor model.embed_tokens.weight")
        self.embed = tensors.read("model.embed_tokens.weight")
        if self.embed.ndim != 2 or self.embed.shape[1] != self.hidden_size:
            raise ValueError(f"model.embed_tokens.weight has shape {list(self.embed.shape)}, "
                             f"expected [vocab, {self.hidden_size}]")
        used = {"model.embed_tokens.weight", "model.norm.weight"}
        self.layers = []
        for index in range(self.n_layers):
            layer = _Layer(tensors, index, self, self._attention_biases, self._has_qk_norm)
            used |= layer.used
            self.layers.append(layer)
        self.final_norm = tensors.read("model.norm.weight", (self.hidden_size,))
        if not self.tied:
            self.lm_head = tensors.read("lm_head.weight", (self.embed.shape[0], self.hidden_size))
            used.add("lm_head.weight")
        else:
            self.lm_head = self.embed  # the same array: no second copy
            if "lm_head.weight" in tensors:
                # Which of two differing copies transformers keeps depends on load order; refuse.
                if not np.array_equal(tensors.read("lm_head.weight"), self.embed):
                    raise ValueError("tie_word_embeddings is true but lm_head.weight differs from "
                                     "model.embed_tokens.weight")
                used.add("lm_head.weight")
        self.vocab_size = int(self.lm_head.shape[0])

        # A tensor this reference does not use means a feature it does not implement (a bias,
        # a norm); computing without it would agree with a converter that drops it too.
        unused = sorted(n for n in tensors.names() - used if not n.endswith("rotary_emb.inv_freq"))
        if unused:
            shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
            raise ValueError(f"{self.model_type} checkpoint has tensors this reference does not use: {shown}")

    # -- running -----------------------------------------------------------------------------

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.n_layers, self.n_kv_heads, self.head_dim, int(capacity))

    def forward(self, ids: list[int], cache: KVCache) -> np.ndarray:
        """Appends ids after what the cache holds; returns float32 logits [len(ids), vocab_size]."""
        token_ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= self.embed.shape[0]):
            raise ValueError(f"token ids outside the embedding (rows {self.embed.shape[0]}): {ids}")
        past, count = cache.length, token_ids.size
        end = past + count
        if end > cache.capacity:
            raise ValueError(f"cache holds {cache.capacity} positions; {end} needed")
        if end > self.context_length:
            raise ValueError(f"position {end - 1} is beyond max_position_embeddings {self.context_length}")
        if count == 0:
            return np.zeros((0, self.vocab_size), np.float32)

        positions = np.arange(past, end)
        cos, sin = rotary_tables(positions, self.inv_freq)
        key_positions = np.arange(end)
        # visible[t, j]: the query at position past+t may read the key at position j.
        visible = key_positions[None, :] <= positions[:, None]
        if self.sliding_window is not None:
            visible &= key_positions[None, :] > positions[:, None] - self.sliding_window

        x = self.embed[token_ids]
        for layer_index, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_norm, self.eps)
            x = x + self._attention(layer, h, cache.keys[layer_index], cache.values[layer_index],
                                    past, end, cos, sin, visible)
            h = rms_norm(x, layer.post_attention_norm, self.eps)
            x = x + (_silu(h @ layer.w_gate.T) * (h @ layer.w_up.T)) @ layer.w_down.T
        cache.length = end
        return (rms_norm(x, self.final_norm, self.eps) @ self.lm_head.T).astype(np.float32, copy=False)

    def _attention(self, layer: _Layer, h: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray,
                   past: int, end: int, cos: np.ndarray, sin: np.ndarray, visible: np.ndarray) -> np.ndarray:
        count, hd = h.shape[0], self.head_dim
        q = _linear(h, layer.wq, layer.bq).reshape(count, self.n_heads, hd)
        k = _linear(h, layer.wk, layer.bk).reshape(count, self.n_kv_heads, hd)
        v = _linear(h, layer.wv, layer.bv).reshape(count, self.n_kv_heads, hd)
        if layer.q_norm is not None:
            # qwen3 normalises each head over head_dim, before the rotation.
            q = rms_norm(q, layer.q_norm, self.eps)
            k = rms_norm(k, layer.k_norm, self.eps)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        key_cache[:, past:end] = k.transpose(1, 0, 2)
        value_cache[:, past:end] = v.transpose(1, 0, 2)

        # Grouped-query attention: consecutive query heads share a kv head, h -> h // group.
        group = self.n_heads // self.n_kv_heads
        kv_of_head = np.arange(self.n_heads) // group
        keys = key_cache[kv_of_head, :end]      # [H, S, hd]
        values = value_cache[kv_of_head, :end]  # [H, S, hd]
        scores = (q.transpose(1, 0, 2) @ keys.transpose(0, 2, 1)) * np.float32(1.0 / math.sqrt(hd))  # [H, T, S]
        scores = np.where(visible[None], scores, np.float32(-np.inf))
        scores -= scores.max(axis=-1, keepdims=True)  # every query sees at least itself: max is finite
        weights = np.exp(scores)
        weights /= weights.sum(axis=-1, keepdims=True)
        merged = (weights @ values).transpose(1, 0, 2).reshape(count, self.n_heads * hd)
        return _linear(merged, layer.wo, layer.bo)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Teacher-forced logits [len(ids), vocab_size] of ids from an empty cache."""
        return self.forward(ids, self.new_cache(len(ids)))

    def greedy(self, ids: list[int], max_new: int, eos: set[int]) -> tuple[list[int], list[float]]:
        """Greedy continuation of ids and, per generated token, best minus second-best logit.

        Stops after emitting an id in eos or after max_new tokens. Ties go to the lower id
        (np.argmax), so a margin of 0 marks a step that float noise may decide either way.
        """
        if max_new <= 0:
            return [], []
        # The last generated token is never fed back, so it needs no cache slot.
        cache = self.new_cache(len(ids) + max_new - 1)
        step_logits = self.forward(ids, cache)[-1]
        generated, margins = [], []
        while True:
            best = int(np.argmax(step_logits))
            if step_logits.size > 1:
                runner_up, top = np.partition(step_logits, step_logits.size - 2)[-2:]
                margins.append(float(top) - float(runner_up))
            else:
                margins.append(0.0)
            generated.append(best)
            if best in eos or len(generated) == max_new:
                return generated, margins
            step_logits = self.forward([best], cache)[-1]


# -- command line ----------------------------------------------------------------------------


def _id_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--ids", required=True, help="prompt token ids, comma separated")
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--eos", default="", help="stop after emitting any of these ids (comma separated)")
    args = parser.parse_args(argv)
    ids = _id_list(args.ids)
    if not ids:
        parser.error("--ids must name at least one token")
    if args.max_new_tokens < 0:
        parser.error("--max-new-tokens must not be negative")
    try:
        model = CheckpointReference(args.checkpoint)
        generated, margins = model.greedy(ids, args.max_new_tokens, set(_id_list(args.eos)))
    except ValueError as e:
        print(f"reference_hf: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(json.dumps({"generated_ids": generated, "margins": margins}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
