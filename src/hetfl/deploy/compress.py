"""Wire encodings of a model or update tensor, for the gRPC client and server.

Three methods, chosen per message:

- ``none``: the raw values, little-endian, in the tensor's own dtype: exact.
- ``float16``: each value rounded to IEEE half precision (round to nearest even), half the bytes of
  float32. The error of a value x in float16's normal range is at most 2^-11 |x| (a unit of half
  precision has 10 fraction bits), and at most 2^-25 (half the smallest subnormal step, 2^-24) below it.
  Values beyond +-65504 cannot be represented: encoding them is an error, not a silent infinity.
- ``topk``: sparsification to the k = ceil(topk_ratio * numel) entries of largest magnitude (ties go to
  the lower index), sent as k int32 indices (ascending) followed by k float32 values, 8 k bytes; the
  decoded tensor is zero elsewhere. Meant for model *updates* (a delta), where most of the mass is in a
  few coordinates (Aji & Heafield, "Sparse Communication for Distributed Gradient Descent", EMNLP 2017;
  Lin et al., "Deep Gradient Compression", ICLR 2018). No error feedback (keeping the dropped remainder
  for the next round) is done here: that state belongs to the client that calls :func:`encode`.

:func:`encode` returns the bytes and a JSON-serialisable ``meta`` dict that :func:`decode` needs:
``method``, ``dtype`` (the original dtype's name, e.g. ``"float32"``), ``shape`` (a list) and ``k``
(how many values the bytes carry: ``numel`` for the dense methods).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

METHODS = ("none", "float16", "topk")

_DTYPES = {torch.float16: "<f2", torch.float32: "<f4", torch.float64: "<f8"}
_BY_NAME = {str(d).removeprefix("torch."): d for d in _DTYPES}
FLOAT16_MAX = 65504.0


def encode(t: torch.Tensor, method: str = "none", *, topk_ratio: float = 0.01) -> tuple[bytes, dict[str, Any]]:
    """``t`` as bytes by ``method`` (see the module docstring), and the ``meta`` dict :func:`decode` needs."""
    if method not in METHODS:
        raise ValueError(f"compression method '{method}' is unknown (known: {', '.join(METHODS)})")
    if t.dtype not in _DTYPES:
        raise ValueError(f"cannot encode dtype {str(t.dtype).removeprefix('torch.')} (supported: {', '.join(_BY_NAME)})")
    flat = t.detach().reshape(-1).cpu().numpy()
    meta: dict[str, Any] = {"method": method, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if method == "none":
        meta["k"] = flat.size
        return flat.astype(_DTYPES[t.dtype]).tobytes(), meta
    if method == "float16":
        too_big = int((np.abs(flat[np.isfinite(flat)]) > FLOAT16_MAX).sum())
        if too_big:
            raise ValueError(f"{too_big} values exceed float16's range +-{FLOAT16_MAX:g}; use compression 'none'")
        meta["k"] = flat.size
        return flat.astype("<f2").tobytes(), meta
    if not 0 < topk_ratio <= 1:
        raise ValueError(f"topk_ratio must be in (0, 1], got {topk_ratio}")
    if flat.size >= 2**31:
        raise ValueError(f"topk: {flat.size} entries do not fit int32 indices")
    chosen = topk_indices(flat, topk_ratio)
    meta["k"] = chosen.size
    return chosen.astype("<i4").tobytes() + flat[chosen].astype("<f4").tobytes(), meta


def topk_indices(flat: np.ndarray, ratio: float) -> np.ndarray:
    """The ``k = ceil(ratio * numel)`` entries of ``flat`` of largest magnitude, ascending (ties to the lower index)."""
    k = math.ceil(ratio * flat.size)
    return np.sort(np.argsort(-np.abs(flat), kind="stable")[:k])  # stable: ties go to the lower index


def decode(data: bytes, meta: dict[str, Any]) -> torch.Tensor:
    """The tensor :func:`encode` made ``data`` and ``meta`` from (its dtype and shape; lossy for float16, topk)."""
    method, name = meta.get("method"), meta.get("dtype")
    if method not in METHODS:
        raise ValueError(f"meta.method: '{method}' is unknown (known: {', '.join(METHODS)})")
    if name not in _BY_NAME:
        raise ValueError(f"meta.dtype: '{name}' is not supported (supported: {', '.join(_BY_NAME)})")
    dtype, shape = _BY_NAME[name], tuple(int(s) for s in meta.get("shape", ()))
    numel, k = math.prod(shape), int(meta.get("k", -1))
    wire = {"none": np.dtype(_DTYPES[dtype]).itemsize, "float16": 2, "topk": 8}[method]
    expected = (k if method == "topk" else numel) * wire
    if method != "topk" and k != numel:
        raise ValueError(f"meta.k: {k} values for a dense tensor of {numel} entries")
    if not 0 <= k <= numel or len(data) != expected:
        raise ValueError(f"{len(data)} bytes do not hold {method} encoding of shape {shape} with k={k} ({expected} bytes)")
    if method == "none":
        values = np.frombuffer(data, dtype=_DTYPES[dtype]).astype(_DTYPES[dtype].lstrip("<"))
    elif method == "float16":
        values = np.frombuffer(data, dtype="<f2").astype(_DTYPES[dtype].lstrip("<"))
    else:
        index = np.frombuffer(data[: 4 * k], dtype="<i4")
        if k and (index.min() < 0 or index.max() >= numel):
            raise ValueError(f"topk: an index is outside the tensor's {numel} entries")
        values = np.zeros(numel, dtype=_DTYPES[dtype].lstrip("<"))
        values[index] = np.frombuffer(data[4 * k :], dtype="<f4")
    return torch.from_numpy(values).reshape(shape)  # values is a fresh array (astype copies; zeros)
