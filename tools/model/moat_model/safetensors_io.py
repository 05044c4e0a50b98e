"""safetensors files, read and written without the `safetensors` package.

The layout: an 8-byte little-endian header length, a JSON header (dtype, shape and byte
range of each tensor, relative to the end of the header), then the raw little-endian tensor
bytes. Reading maps the file: a tensor costs no memory until something touches it, so a
sharded 6 GB checkpoint converts layer by layer. bfloat16 tensors come back with
ml_dtypes' `bfloat16` dtype (numpy has none of its own); `.astype(np.float32)` is exact.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
}
CODES = {dtype: code for code, dtype in DTYPES.items()}

# A header is a few hundred bytes per tensor; anything this large is not a checkpoint.
MAX_HEADER_BYTES = 100 << 20


class SafetensorsError(Exception):
    """A file is not a well-formed safetensors file; the message names the file and tensor."""


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file, as read-only arrays over a memory map.

    Every tensor's byte range must fit its dtype and shape and lie inside the file, so a
    truncated shard or a corrupt header is refused here, naming the tensor, not later as a
    wrong answer.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise SafetensorsError(f"{path}: {size} bytes, too short for a safetensors file")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise SafetensorsError(f"{path}: header length {header_len} does not fit a {size}-byte file "
                                   "(truncated, or not a safetensors file)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    data_len = size - 8 - header_len
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len) if data_len else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = info["dtype"], tuple(int(n) for n in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor {name} has a malformed header entry") from None
        dtype = DTYPES.get(code)
        if dtype is None:
            raise SafetensorsError(f"{path}: tensor {name} has unsupported dtype {code} "
                                   f"(supported: {', '.join(DTYPES)})")
        count = int(np.prod(shape, dtype=np.int64))
        if not (isinstance(begin, int) and isinstance(end, int)) or end - begin != count * dtype.itemsize:
            raise SafetensorsError(f"{path}: tensor {name} has a byte range that does not fit its shape {list(shape)}")
        if begin < 0 or end > data_len:
            raise SafetensorsError(f"{path}: tensor {name} ends at byte {end} of the data, which has only "
                                   f"{data_len} (the file is truncated)")
        tensors[name] = data[begin:end].view(dtype).reshape(shape)
    return tensors


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes tensors (float32, float16, bfloat16, int64, int32) sorted by name, one at a time."""
    header, offset = {}, 0
    arrays = []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        code = CODES.get(array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype)
        if code is None:
            raise SafetensorsError(f"{path}: cannot write tensor {name} of dtype {array.dtype}")
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        arrays.append(array)
        offset += array.nbytes
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for array in arrays:
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
