"""Linear layers over GGUF weights as ONNX Runtime ops, keeping the GGUF values exactly.

GGUF block formats and how each maps onto `MatMulNBits` (value = scale * (q - zero_point)):

- Q4_0: fp16 d, 32 x 4-bit q; value = d * (q - 8). MatMulNBits bits=4 with scale d and its
  default zero point 8: exact.
- Q4_1: fp16 d, fp16 m, 32 x 4-bit q; value = d * q + m. A uint8 zero point can only express
  m = -d * z for integer z, and a float zero point (-m/d) pushes ONNX Runtime's CPU kernel
  off its prepacked path onto dequantising the whole matrix on every call (~100x slower).
  Exact variant: MatMulNBits with scale d and zero point 0 gives x . (d * q), and the block
  minimums add sum_b m[b, n] * (sum of x over block b): per-block sums of x, then a small
  [k/32, n] MatMul. Both parts are the GGUF values, unrounded.
  Fast variant: the same sum with the minimum moved into the matmul (see `min_extension`):
  an integer zero point z = round(-m/d) carries -d * z ~ m, and the remainder r = m + d * z
  (|r| <= d/2) rides in extra K columns that carry the block sums of x.
- Q8_0: fp16 d, 32 x int8 q; value = d * q. As uint8 q + 128 with the default 8-bit zero
  point 128: exact. ONNX Runtime 1.32 has a packed 8-bit CPU kernel only for int8
  activations (accuracy_level 4); with fp32 activations it dequantises the whole matrix per
  call, so the exact variant uses a float32 MatMul instead (d * q is exact in float32).
- Float weights (F32, F16, BF16; Hugging Face checkpoints): float32 MatMul, or, when the
  variant asks for int4, Q4_1 blocks made by quantize.q4_1_blocks (block 32, then as Q4_1
  above) or MatMulNBits over quantize.int4_blocks (block 64, integer zero points).
- Anything else (other GGUF quantisations): float32 MatMul over gguf's dequantize.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from gguf import GGMLQuantizationType as Q

from .decoder import Weight
from .onnx_graph import MS_DOMAIN, GraphBuilder
from .quantize import int4_blocks, int8_blocks, q4_1_blocks

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
    """(offset-binary q [N, nb, 32] uint8, scales [N, nb]): a GGUF Q8_0 weight's own blocks,
    or a float weight quantised (quantize.int8_blocks)."""
    if w.is_float:
        return int8_blocks(w.dense(), BLOCK)
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


# The fast variant's remainder r is stored as this many signed 4-bit digits (see min_extension).
MIN_DIGITS = 2


def extension_layout(nb: int, digits: int) -> tuple[int, list[tuple[int, list[tuple[int, int]]]]]:
    """Where the block-minimum digits sit in the extra K columns of a fast Q4_1 matmul.

    The extension is `copies` back-to-back copies of the nb block sums; a 32-wide block of it
    has one scale per output, so every block serves one digit (its scale) and holds that
    digit for the sums it covers, zero weight elsewhere. Returns (copies, per extension block
    (digit, [(position in the block, block-sum index)])), each digit covering every sum once.
    """
    for copies in range(1, digits * (BLOCK // nb + 2) + 1):
        need = [set(range(nb)) for _ in range(digits)]
        width = copies * nb
        layout = []
        for start in range(0, width, BLOCK):
            here = [(p - start, p % nb) for p in range(start, min(width, start + BLOCK))]
            digit = max(range(digits), key=lambda dg: (len({b for _, b in here} & need[dg]), -dg))
            used = []
            for pos, b in here:
                if b in need[digit]:
                    need[digit].discard(b)
                    used.append((pos, b))
            layout.append((digit, used))
        if not any(need):
            return copies, layout
    raise ValueError(f"no extension layout for {nb} blocks")


def min_extension(d: np.ndarray, zp: np.ndarray, mins: np.ndarray, digits: int = MIN_DIGITS):
    """Folds Q4 block minimums into a MatMulNBits over [x, block sums of x, ...].

    A block's value d * (q - zp) + m equals d * (q - z) + r with the integer zero point
    z = clip(zp + round(-m / d), 0, 15) and r = m + d * (z - zp), exact in float32. MatMulNBits
    applies z itself (with int8 activations it subtracts z * d * the block's quantised sum,
    as llama.cpp applies m to its Q8_1 block sums); sum_b r[b, n] * S_b(x) comes from extra K
    columns holding the block sums S_b, whose 4-bit weights encode r per output in `digits`
    signed digits: each extension block has its own scale (max |what is left| / 7 over the
    sums it covers) and rounds what the digits before it left, so a stored r is off by at
    most max_b |r[b, n]| / 14**digits: with two digits max|r| / 196, and as |r| <= d/2 unless
    z is clipped (or d = 0), at most max_b d[b, n] / 392 - finer than the GGUF's own fp16 rounding of m
    (half an ulp, about |m| / 2048 with m typically ~ 7.5 d, so ~ d / 270).

    Returns (zero points [N, nb + ne] uint8, extension q [N, ne, 32] uint8 with zero point 8,
    extension scales [N, ne] float32 applying to block *sums*, copies of the block sums).
    """
    n, nb = d.shape
    safe_d = np.where(d > 0, d, 1)
    z = np.where(d > 0, np.clip(zp.astype(np.int64) + np.round(-mins / safe_d), 0, 15), zp).astype(np.uint8)
    rest = mins.astype(np.float64) + d.astype(np.float64) * (z.astype(np.float64) - zp)
    copies, layout = extension_layout(nb, digits)
    ne = len(layout)
    q_ext = np.full((n, ne, BLOCK), 8, np.uint8)
    s_ext = np.zeros((n, ne), np.float32)
    for digit in range(digits):
        covered = []
        for j, (dg, used) in enumerate(layout):
            if dg != digit or not used:
                continue
            pos = [p for p, _ in used]
            sums = [b for _, b in used]
            scale = (np.abs(rest[:, sums]).max(axis=1) / 7).astype(np.float32)
            q = np.round(rest[:, sums] / np.where(scale > 0, scale, 1)[:, None].astype(np.float64))
            q = np.clip(q, -8, 7)
            q_ext[:, j, pos] = (q + 8).astype(np.uint8)
            s_ext[:, j] = scale
            covered.append((sums, q * scale[:, None].astype(np.float64)))
        for sums, value in covered:  # the next digit encodes what this one left
            rest[:, sums] -= value
    zero_points = np.concatenate([z, np.full((n, ne), 8, np.uint8)], axis=1)
    return zero_points, q_ext, s_ext, copies


class LinearEmitter:
    """Emits `x @ W.T` for a row-wise concatenation of weights sharing one input.

    `x` is [batch, seq, in_features] (the Q4_1 block sums rely on that rank). `fast` runs the
    quantised matmuls on int8 activations; `int4_block` quantises float weights to 4 bits
    with that block size (None keeps them float32), with a float minimum per block (Q4_1's
    form, block 32) or, without `float_minimums`, an integer zero point.
    """

    def __init__(self, gb: GraphBuilder, fast: bool, int4_block: int | None = None, float_minimums: bool = True):
        self.gb = gb
        self.fast = fast
        self.int4_block = int4_block
        self.float_minimums = float_minimums

    def family(self, w: Weight) -> str:
        if w.in_features % BLOCK == 0:
            if w.qtype in Q4_TYPES:
                return "q4"
            if w.qtype == Q.Q8_0 and self.fast:
                return "q8"
        if w.is_float and self.int4_block and w.in_features % self.int4_block == 0:
            return "int4"
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
        if family == "int4":
            return self._int4(x, weights, name, out)
        if family == "q8":
            q, scales = zip(*(q8_parts(w) for w in weights))
            q, scales = np.concatenate(q), np.concatenate(scales)
            return self.matmul_nbits(x, self.gb.const(f"{name}.qweight", q), self.gb.const(f"{name}.scales", scales),
                                     bits=8, n=q.shape[0], k=weights[0].in_features, name=name, out=out)
        dense = np.concatenate([w.dense() for w in weights]).T
        return self.gb.op("MatMul", [x, self.gb.const(f"{name}.weight", dense)], _outs(out), name=name)

    def matmul_nbits(self, x: str, qweight: str, scales: str, *, bits: int, n: int, k: int, name: str,
                     zero_points: str | None = None, out: str | None = None, block: int = BLOCK) -> str:
        inputs = [x, qweight, scales] + ([zero_points] if zero_points else [])
        return self.gb.op("MatMulNBits", inputs, _outs(out), name=name, domain=MS_DOMAIN, K=k, N=n, bits=bits,
                          block_size=block, accuracy_level=ACCURACY_FAST if self.fast else ACCURACY_EXACT)

    def _int4(self, x: str, weights: list[Weight], name: str, out: str | None) -> str:
        """Float weights quantised to 4 bits, one weight at a time so a large model's float32
        copies never all exist at once.

        Float minimums (block 32): GGUF Q4_1 blocks (quantize.q4_1_blocks: a float16 step and
        minimum per block) through the Q4_1 path above, exact or fast. Otherwise an integer
        zero point per block (quantize.int4_blocks): a plain MatMulNBits, one kernel and no
        extra columns, so faster with int8 activations, but the grid must hold zero, which
        costs accuracy.
        """
        block = self.int4_block
        if block == BLOCK and self.float_minimums:
            return self._q4(x, [dataclasses.replace(w, qtype=Q.Q4_1, raw=q4_1_blocks(w.dense()))
                                for w in weights], name, out)
        parts = [int4_blocks(w.dense(), block) for w in weights]
        q = np.concatenate([p[0] for p in parts])
        scales = np.concatenate([p[1] for p in parts])
        zp = np.concatenate([p[2] for p in parts])
        return self.matmul_nbits(x, self.gb.const(f"{name}.qweight", pack_nibbles(q)),
                                 self.gb.const(f"{name}.scales", scales), bits=4, n=q.shape[0],
                                 k=weights[0].in_features, name=name,
                                 zero_points=self.gb.const(f"{name}.zero_points", pack_nibbles(zp)), out=out,
                                 block=block)

    def _q4(self, x: str, weights: list[Weight], name: str, out: str | None) -> str:
        parts = [q4_parts(w) for w in weights]
        packed = np.concatenate([p[0] for p in parts])
        scales = np.concatenate([p[1] for p in parts])
        zp = np.concatenate([p[2] for p in parts])
        mins = np.concatenate([p[3] for p in parts])
        k = weights[0].in_features
        has_mins = bool(np.any(mins))
        if has_mins and self.fast:
            return self._q4_extended(x, packed, scales, zp, mins, k, name, out)
        zp_name = None if np.all(zp == 8) else self.gb.const(f"{name}.zero_points", pack_nibbles(zp))
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

    def _q4_extended(self, x: str, packed, scales, zp, mins, k: int, name: str, out: str | None) -> str:
        """Fast Q4_1: one MatMulNBits over x followed by copies of its block sums (min_extension).

        The separate min term (float32 [k/32, n] per layer, ~13 MB per token on the demo
        model, read outside the weight stream) cost ~20% of decode speed; here the minimums
        travel as ~2 extra 4-bit blocks per output inside the packed weights.
        """
        zero_points, q_ext, s_ext, copies = min_extension(scales, zp, mins)
        nb = k // BLOCK
        # AveragePool over [b, s, k] (s as channels) gives block means in one kernel, for any
        # batch and length; the extension scales take the factor 32 (a power of two, exact).
        means = self.gb.op("AveragePool", [x], name=f"{name}/block_means", kernel_shape=[BLOCK], strides=[BLOCK])
        extended = self.gb.op("Concat", [x] + [means] * copies, name=f"{name}/with_block_sums", axis=-1)
        return self.matmul_nbits(
            extended, self.gb.const(f"{name}.qweight", np.concatenate([packed, pack_nibbles(q_ext)], axis=1)),
            self.gb.const(f"{name}.scales", np.concatenate([scales, s_ext * BLOCK], axis=1)),
            bits=4, n=packed.shape[0], k=k + copies * nb, name=name,
            zero_points=self.gb.const(f"{name}.zero_points", pack_nibbles(zero_points)), out=out)


def _outs(out: str | None):
    return [out] if out else 1
