"""Block quantisation of float weights for MatMulNBits and GatherBlockQuantized.

int4 (`int4_blocks`): asymmetric, per block of 32 or 64 input features, a float32 scale and
a 4-bit zero point per block; value = scale * (q - zero_point). Plain round-to-nearest
(scale = (max - min) / 15) lets one outlier stretch the grid for the whole block. Here each
block tries a few narrower ranges (the grid clipped to 100%, 95%, ... 75% of its span, centred
on where the values are), keeps the one with the least squared error, and then refits the
scale by least squares for the chosen codes (the best scale for fixed q and zero point).
Round-to-nearest is the first candidate, so the result is never worse than it on any block,
by construction. docs/bring-your-model.md gives the measured error on real weights.

int8 (`int8_blocks`): symmetric, per block of 32, scale = max |w| / 127, stored offset-binary
(q + 128, zero point 128), as GGUF's Q8_0 is; used for the embedding table and lm_head of
the int4-fast variant.
"""

from __future__ import annotations

import numpy as np

INT4_BLOCKS = (32, 64)
Q4_1_BLOCK = 32
# Fractions of a block's span tried as the quantisation range; 1.0 is plain round-to-nearest.
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
# Rows quantised per numpy pass: bounds the temporaries to ~100 MB whatever the matrix size.
ROWS_PER_PASS = 1 << 22


def _int4_rows(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, k = w.shape
    x = w.reshape(n, k // block, block).astype(np.float32)
    lo, hi = x.min(axis=-1), x.max(axis=-1)
    best_err = np.full(lo.shape, np.inf, np.float32)
    best_q = np.zeros(x.shape, np.uint8)
    best_zp = np.zeros(lo.shape, np.uint8)
    best_scale = np.zeros(lo.shape, np.float32)
    centre = (lo + hi) / 2
    for ratio in CLIP_RATIOS:
        half = (hi - lo) * np.float32(ratio / 2)
        c_lo, c_hi = centre - half, centre + half
        # The grid must hold 0 so zero weights stay exactly zero (and the range never inverts).
        c_lo, c_hi = np.minimum(c_lo, 0), np.maximum(c_hi, 0)
        scale = (c_hi - c_lo) / np.float32(15)
        safe = np.where(scale > 0, scale, np.float32(1))
        zp = np.clip(np.round(-c_lo / safe), 0, 15)
        q = np.clip(np.round(x / safe[..., None]) + zp[..., None], 0, 15)
        centred = q - zp[..., None]
        # The least-squares scale for these codes: <w, c> / <c, c>.
        denom = (centred * centred).sum(axis=-1)
        fit = np.where(denom > 0, (x * centred).sum(axis=-1) / np.where(denom > 0, denom, 1), 0).astype(np.float32)
        err = ((centred * fit[..., None] - x) ** 2).sum(axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_q = np.where(better[..., None], q.astype(np.uint8), best_q)
        best_zp = np.where(better, zp.astype(np.uint8), best_zp)
        best_scale = np.where(better, fit, best_scale)
    return best_q, best_scale, best_zp


def int4_blocks(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes [n, k/block, block] uint8 in 0..15, scales [n, k/block] float32, zero points uint8)."""
    if block not in INT4_BLOCKS:
        raise ValueError(f"int4 block size {block} (supported: {INT4_BLOCKS})")
    n, k = w.shape
    if k % block:
        raise ValueError(f"{k} input features are not a multiple of the block size {block}")
    step = max(1, ROWS_PER_PASS // k)
    parts = [_int4_rows(np.asarray(w[i:i + step], dtype=np.float32), block) for i in range(0, n, step)]
    return tuple(np.concatenate(p) for p in zip(*parts))


def _q4_1_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, k = w.shape
    x = w.reshape(n, k // Q4_1_BLOCK, Q4_1_BLOCK).astype(np.float32)
    lo, hi = x.min(axis=-1), x.max(axis=-1)
    centre = (lo + hi) / 2
    best_err = np.full(lo.shape, np.inf, np.float32)
    best_q = np.zeros(x.shape, np.uint8)
    best_d = np.zeros(lo.shape, np.float32)
    best_m = np.zeros(lo.shape, np.float32)
    for ratio in CLIP_RATIOS:
        half = (hi - lo) * np.float32(ratio / 2)
        c_lo = centre - half
        d = (2 * half) / np.float32(15)
        safe = np.where(d > 0, d, np.float32(1))
        q = np.clip(np.round((x - c_lo[..., None]) / safe[..., None]), 0, 15)
        # Least squares for both the step and the minimum given the codes: x ~ d q + m.
        count = np.float32(Q4_1_BLOCK)
        sq, sqq = q.sum(-1), (q * q).sum(-1)
        sx, sqx = x.sum(-1), (q * x).sum(-1)
        det = count * sqq - sq * sq
        fit_d = np.where(det > 0, (count * sqx - sq * sx) / np.where(det > 0, det, 1), 0).astype(np.float32)
        fit_m = np.where(det > 0, (sx - fit_d * sq) / count, x.mean(-1)).astype(np.float32)
        # Stored as float16, as GGUF's Q4_1 stores them; judged after that rounding.
        fit_d, fit_m = fit_d.astype(np.float16).astype(np.float32), fit_m.astype(np.float16).astype(np.float32)
        err = ((q * fit_d[..., None] + fit_m[..., None] - x) ** 2).sum(axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_q = np.where(better[..., None], q.astype(np.uint8), best_q)
        best_d = np.where(better, fit_d, best_d)
        best_m = np.where(better, fit_m, best_m)
    return best_q, best_d, best_m


def q4_1_blocks(w: np.ndarray) -> np.ndarray:
    """GGUF Q4_1 blocks [n, k/32 * 20] uint8 for a float matrix [n, k].

    Each block of 32 is d * q + m with a float16 step d and minimum m: unlike an integer
    zero point, the grid may sit anywhere, so a checkpoint dequantised from Q4_1 comes back
    exactly, and trained weights lose less. The search is the int4 one (narrower ranges
    tried, d and m refitted by least squares for the chosen codes).
    """
    n, k = w.shape
    if k % Q4_1_BLOCK:
        raise ValueError(f"{k} input features are not a multiple of {Q4_1_BLOCK}")
    step = max(1, ROWS_PER_PASS // k)
    out = np.empty((n, (k // Q4_1_BLOCK) * 20), np.uint8)
    for i in range(0, n, step):
        q, d, m = _q4_1_rows(np.asarray(w[i:i + step], dtype=np.float32))
        rows = q.shape[0]
        blocks = np.empty((rows, q.shape[1], 20), np.uint8)
        blocks[..., 0:2] = d.astype("<f2")[..., None].view(np.uint8).reshape(rows, -1, 2)
        blocks[..., 2:4] = m.astype("<f2")[..., None].view(np.uint8).reshape(rows, -1, 2)
        # GGUF's nibble order: byte j holds element j (low) and element j + 16 (high).
        blocks[..., 4:20] = q[..., :16] | (q[..., 16:] << 4)
        out[i:i + step] = blocks.reshape(rows, -1)
    return out


def int4_dequantize(q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray) -> np.ndarray:
    """The float32 [n, k] matrix the codes stand for (for error reports and tests)."""
    values = (q.astype(np.float32) - zero_points[..., None]) * scales[..., None]
    return values.reshape(q.shape[0], -1)


def int8_blocks(w: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(offset-binary codes [n, k/block, block] uint8 = q + 128, scales [n, k/block] float32)."""
    n, k = w.shape
    if k % block:
        raise ValueError(f"{k} input features are not a multiple of the block size {block}")
    codes = np.empty((n, k // block, block), np.uint8)
    scales = np.empty((n, k // block), np.float32)
    step = max(1, ROWS_PER_PASS // k)
    for i in range(0, n, step):
        x = np.asarray(w[i:i + step], dtype=np.float32).reshape(-1, k // block, block)
        s = np.abs(x).max(axis=-1) / np.float32(127)
        safe = np.where(s > 0, s, np.float32(1))
        codes[i:i + step] = (np.clip(np.round(x / safe[..., None]), -127, 127) + 128).astype(np.uint8)
        scales[i:i + step] = s
    return codes, scales
