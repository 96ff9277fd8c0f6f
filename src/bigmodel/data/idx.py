"""The IDX format of MNIST-style data sets (http://yann.lecun.com/exdb/mnist/), gzipped or not.

Header: 2 zero bytes, a type code (0x08 = uint8), the number of dimensions, then each dimension as a big-endian
uint32; the values follow, row-major.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from bigmodel.errors import UserError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (`.gz` or raw) into a numpy array. Malformed files raise `UserError` naming the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read a gzipped IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise UserError(f"{path}: not an IDX file (expected the magic bytes 00 00 <type> <ndim>)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: IDX header truncated")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise UserError(f"{path}: IDX data is {len(raw) - header} bytes, the header {dims} says {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | Path, array: np.ndarray, compress: bool | None = None) -> None:
    """Write `array` as IDX (gzipped when the name ends in .gz). Used to make fixtures in the true format."""
    path = Path(path)
    codes = {"uint8": 0x08, "int8": 0x09, "int16": 0x0B, "int32": 0x0C, "float32": 0x0D, "float64": 0x0E}
    if array.dtype.name not in codes:
        raise ValueError(f"IDX cannot hold dtype {array.dtype}")
    big = array.dtype.newbyteorder(">")
    data = bytes([0, 0, codes[array.dtype.name], array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data += np.ascontiguousarray(array, dtype=big).tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
