"""Linear layers over GGUF weights as ONNX Runtime ops, keeping the GGUF values exactly.

GGUF block formats and how each maps onto `MatMulNBits` (value = scale * (q - zero_point)):

- Q4_0: fp16 d, 32 x 4-bit q; value = d * (q - 8). MatMulNBits bits=4 with scale d and its
  default zero point 8: exact.
- Q4_1: fp16 d, fp16 m, 32 x 4-bit q; value = d * q + m. A uint8 zero point can only express
  m = -d * z for integer z, and a float zero point (-m/d) pushes ONNX Runtime's CPU kernel
  off its prepacked path onto dequantising the whole matrix on every call (~100x slower).
  So the layer is split: MatMulNBits with scale d and zero point 0 gives x . (d * q), and the
  block minimums add sum_b m[b, n] * (sum of x over block b): per-block sums of x, then a
  small [k/32, n] MatMul. Both parts are the GGUF values, unrounded.
- Q8_0: fp16 d, 32 x int8 q; value = d * q. As uint8 q + 128 with the default 8-bit zero
  point 128: exact. ONNX Runtime 1.32 has a packed 8-bit CPU kernel only for int8
  activations (accuracy_level 4); with fp32 activations it dequantises the whole matrix per
  call, so the exact variant uses a float32 MatMul instead (d * q is exact in float32).
- Anything else (F32, F16, BF16, other quantisations): float32 MatMul over gguf's dequantize.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q

from convert_source import Weight
from onnx_graph import MS_DOMAIN, GraphBuilder

BLOCK = 32
Q4_TYPES = (Q.Q4_0, Q.Q4_1)
ACCURACY_EXACT = 0  # fp32 activations
ACCURACY_FAST = 4  # int8 activations, quantised per block, as llama.cpp does


def _fp16_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[..., offset:offset + 2]).view(np.float16)[..., 0].astype(np.float32)


def q4_parts(w: Weight):
    """(packed [N, nb, 16] uint8, scales [N, nb], zero points [N, nb] uint8, mins [N, nb])."""
    n, k = w.out_features, w.in_features
    nb = k // BLOCK
    if w.qtype == Q.Q4_0:
        blocks = w.raw.reshape(n, nb, 18)
        d, qs = _fp16_field(blocks, 0), blocks[..., 2:18]
        zp = np.full((n, nb), 8, np.uint8)
        mins = np.zeros((n, nb), np.float32)
    elif w.qtype == Q.Q4_1:
        blocks = w.raw.reshape(n, nb, 20)
        d, mins, qs = _fp16_field(blocks, 0), _fp16_field(blocks, 2), blocks[..., 4:20]
        zp = np.zeros((n, nb), np.uint8)
    else:
        raise ValueError(w.qtype)
    # GGUF puts element j in the low nibble and element j + 16 in the high nibble of byte j;
    # MatMulNBits packs elements 2j and 2j + 1 into byte j.
    values = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    packed = (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)
    return packed, d, zp, mins


def q8_parts(w: Weight):
    """(offset-binary q [N, nb, 32] uint8, scales [N, nb])."""
    n, k = w.out_features, w.in_features
    nb = k // BLOCK
    blocks = w.raw.reshape(n, nb, 34)
    # Flipping the sign bit turns int8 q into uint8 q + 128.
    return (blocks[..., 2:34] ^ np.uint8(0x80)).astype(np.uint8), _fp16_field(blocks, 0)


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """uint8 values < 16 along the last axis, two per byte, low nibble first (odd length padded)."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


class LinearEmitter:
    """Emits `x @ W.T` for a row-wise concatenation of GGUF weights sharing one input.

    `x` is [batch, seq, in_features] (the Q4_1 block sums reshape it by rank).
    """

    def __init__(self, gb: GraphBuilder, fast: bool):
        self.gb = gb
        self.fast = fast

    def family(self, w: Weight) -> str:
        if w.in_features % BLOCK == 0:
            if w.qtype in Q4_TYPES:
                return "q4"
            if w.qtype == Q.Q8_0 and self.fast:
                return "q8"
        return "dense"

    def linear(self, x: str, weights: list[Weight], name: str, out: str | None = None) -> str:
        """`out` names the result (a graph output); otherwise a fresh name is made."""
        k = weights[0].in_features
        if any(w.in_features != k for w in weights):
            raise ValueError(f"{name}: weights disagree on the input size")
        families = {self.family(w) for w in weights}
        if len(families) == 1:
            return self._group(x, weights, families.pop(), name, out)
        parts = [self._group(x, [w], self.family(w), f"{name}.{i}", None) for i, w in enumerate(weights)]
        return self.gb.op("Concat", parts, _outs(out), name=f"{name}/concat", axis=-1)

    def _group(self, x: str, weights: list[Weight], family: str, name: str, out: str | None) -> str:
        if family == "q4":
            return self._q4(x, weights, name, out)
        if family == "q8":
            q, scales = zip(*(q8_parts(w) for w in weights))
            q, scales = np.concatenate(q), np.concatenate(scales)
            return self.matmul_nbits(x, self.gb.const(f"{name}.qweight", q), self.gb.const(f"{name}.scales", scales),
                                     bits=8, n=q.shape[0], k=weights[0].in_features, name=name, out=out)
        dense = np.concatenate([w.dense() for w in weights]).T
        return self.gb.op("MatMul", [x, self.gb.const(f"{name}.weight", dense)], _outs(out), name=name)

    def matmul_nbits(self, x: str, qweight: str, scales: str, *, bits: int, n: int, k: int, name: str,
                     zero_points: str | None = None, out: str | None = None) -> str:
        inputs = [x, qweight, scales] + ([zero_points] if zero_points else [])
        return self.gb.op("MatMulNBits", inputs, _outs(out), name=name, domain=MS_DOMAIN, K=k, N=n, bits=bits,
                          block_size=BLOCK, accuracy_level=ACCURACY_FAST if self.fast else ACCURACY_EXACT)

    def _q4(self, x: str, weights: list[Weight], name: str, out: str | None) -> str:
        parts = [q4_parts(w) for w in weights]
        packed = np.concatenate([p[0] for p in parts])
        scales = np.concatenate([p[1] for p in parts])
        zp = np.concatenate([p[2] for p in parts])
        mins = np.concatenate([p[3] for p in parts])
        k = weights[0].in_features
        zp_name = None if np.all(zp == 8) else self.gb.const(f"{name}.zero_points", pack_nibbles(zp))
        has_mins = bool(np.any(mins))
        y = self.matmul_nbits(x, self.gb.const(f"{name}.qweight", packed), self.gb.const(f"{name}.scales", scales),
                              bits=4, n=packed.shape[0], k=k, name=name, zero_points=zp_name,
                              out=None if has_mins else out)
        if not has_mins:
            return y
        # [b, s, k] -> [b, s, k/32, 32] is a view; summing the last axis reads x once.
        blocks = self.gb.op("Reshape", [x, self.gb.ints(0, 0, k // BLOCK, BLOCK)], name=f"{name}/blocks")
        block_sums = self.gb.op("ReduceSum", [blocks, self.gb.ints(-1)], name=f"{name}/block_sums", keepdims=0)
        min_term = self.gb.op("MatMul", [block_sums, self.gb.const(f"{name}.mins", mins.T)], name=f"{name}/mins")
        return self.gb.op("Add", [y, min_term], _outs(out), name=f"{name}/add_mins")


def _outs(out: str | None):
    return [out] if out else 1
