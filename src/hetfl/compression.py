"""Update compression: the codecs of a tensor (bytes a client really sends), and the client's upload compressed with
error feedback. One implementation for both engines: the gRPC wire (:mod:`hetfl.deploy.wire`, ``deploy.compression``)
and the client half of a simulated or deployed task (``strategy.compression``, :class:`Compression`).

The codecs (:func:`encode` gives the bytes and a JSON-serialisable ``meta``; :func:`decode` the tensor back;
:func:`nbytes` the size of an encoding without making it):

- ``none``: the raw values, little-endian, in the tensor's own dtype: exact.
- ``float16``: each value rounded to IEEE half precision (round to nearest even), half the bytes of
  float32. The error of a value x in float16's normal range is at most 2^-11 |x| (a unit of half
  precision has 10 fraction bits), and at most 2^-25 (half the smallest subnormal step, 2^-24) below it.
  Values beyond +-65504 cannot be represented: encoding them is an error, not a silent infinity.
- ``topk``: sparsification to the k = ceil(topk_ratio * numel) entries of largest magnitude (ties go to
  the lower index), sent as k int32 indices (ascending) followed by k float32 values, 8 k bytes; the
  decoded tensor is zero elsewhere. Meant for model *updates* (a delta), where most of the mass is in a
  few coordinates (Aji & Heafield, "Sparse Communication for Distributed Gradient Descent", EMNLP 2017;
  Lin et al., "Deep Gradient Compression", ICLR 2018).
- ``qsgd``: QSGD's stochastic quantisation (Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient
  Quantization and Encoding", NeurIPS 2017, arXiv:1610.02132). Per bucket v of ``bucket`` consecutive entries,
  Q_s(v_i) = ||v||_2 sgn(v_i) xi_i, with l = floor(s |v_i| / ||v||_2) and xi_i = (l + 1) / s with probability
  s |v_i| / ||v||_2 - l, else l / s: E[Q_s(v)] = v. Sent as one float32 norm per bucket (rounded up to a float32,
  so that |v_i| / norm <= 1 and the draw stays unbiased), then per entry a sign bit and the level l (or l + 1)
  in ceil(log2(s + 1)) bits, packed most significant bit first: 4 * buckets + ceil(numel (1 + ceil(log2(s+1))) / 8)
  bytes. From the paper: buckets of d entries (d = 512 in its experiments) bound the variance by
  min(d / s^2, sqrt(d) / s) ||v||^2, and Elias coding of the levels sends fewer bits still. Our choices: the
  fixed-width packing above (the bytes depend only on the tensor's size, so a task's upload is timed at dispatch),
  ``bucket`` = 512 by default.

:class:`Compression` is ``strategy.compression``: the client's change w_i - w (the whole flat vector, buffers
included) is encoded by one of the codecs and decoded, so the server aggregates what the bytes carry, and the
engine charges ``nbytes`` for the upload (:meth:`hetfl.strategies.base.Strategy.transfer_bytes`). With error feedback
(``error_feedback: true``) the client keeps what compression dropped, e = (delta + e) - C(delta + e), in its
state (the engine's per-client store, as SCAFFOLD keeps c_i) and adds it to its next change: Stich, Cordonnier &
Jaggi, "Sparsified SGD with Memory", NeurIPS 2018 (arXiv:1809.07599), and Karimireddy et al., "Error Feedback Fixes
SignSGD and other Gradient Compression Schemes", ICML 2019 (arXiv:1901.09847). From the papers: the memory is
added to each SGD step's gradient. Our choices: it is added to a task's whole change (one upload per task, as
federated error feedback does), and a client keeps it between its tasks, however many aggregations pass.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from hetfl.config import CompressionConfig
    from hetfl.strategies.base import ClientResult, Strategy, Task

METHODS = ("none", "float16", "topk", "qsgd")

_DTYPES = {torch.float16: "<f2", torch.float32: "<f4", torch.float64: "<f8"}
_BY_NAME = {str(d).removeprefix("torch."): d for d in _DTYPES}
FLOAT16_MAX = 65504.0
RESIDUAL = "compression_residual"  # the client-state key error feedback keeps its memory under


def level_bits(levels: int) -> int:
    """ceil(log2(s + 1)): the bits of a QSGD level in 0..s."""
    return max(1, math.ceil(math.log2(levels + 1)))


def nbytes(method: str, numel: int, *, itemsize: int = 4, topk_ratio: float = 0.01, levels: int = 4,
           bucket: int = 512) -> int:
    """Bytes :func:`encode` makes of a tensor of ``numel`` entries (``itemsize`` bytes each, for ``none``)."""
    if method == "none":
        return numel * itemsize
    if method == "float16":
        return 2 * numel
    if method == "topk":
        return 8 * math.ceil(topk_ratio * numel)
    if method == "qsgd":
        return 4 * math.ceil(numel / bucket) + math.ceil(numel * (1 + level_bits(levels)) / 8)
    raise ValueError(f"compression method '{method}' is unknown (known: {', '.join(METHODS)})")


def encode(t: torch.Tensor, method: str = "none", *, topk_ratio: float = 0.01, levels: int = 4, bucket: int = 512,
           rng: np.random.Generator | None = None) -> tuple[bytes, dict[str, Any]]:
    """``t`` as bytes by ``method`` (see the module docstring), and the ``meta`` dict :func:`decode` needs:
    ``method``, ``dtype`` (the original dtype's name, e.g. ``"float32"``), ``shape`` (a list), ``k`` (how many values
    the bytes carry: ``numel`` for the dense methods) and, for ``qsgd``, ``levels`` and ``bucket``. ``qsgd`` draws
    its rounding from ``rng``."""
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
    if method == "qsgd":
        if rng is None:
            raise ValueError("qsgd draws its rounding at random: pass rng")
        meta.update(k=flat.size, levels=int(levels), bucket=int(bucket))
        return _qsgd_encode(flat.astype(np.float64), int(levels), int(bucket), rng), meta
    if not 0 < topk_ratio <= 1:
        raise ValueError(f"topk_ratio must be in (0, 1], got {topk_ratio}")
    if flat.size >= 2**31:
        raise ValueError(f"topk: {flat.size} entries do not fit int32 indices")
    chosen = topk_indices(flat, topk_ratio)
    meta["k"] = chosen.size
    return chosen.astype("<i4").tobytes() + flat[chosen].astype("<f4").tobytes(), meta


def topk_indices(flat: np.ndarray, ratio: float) -> np.ndarray:
    """The ``k = ceil(ratio * numel)`` entries of ``flat`` of largest magnitude, ascending (ties to the lower index):
    the rule of the ``topk`` codec, shared with cellm's sparse uploads."""
    k = math.ceil(ratio * flat.size)
    return np.sort(np.argsort(-np.abs(flat), kind="stable")[:k])  # stable: ties go to the lower index


def _qsgd_encode(v: np.ndarray, levels: int, bucket: int, rng: np.random.Generator) -> bytes:
    if levels < 1 or bucket < 1:
        raise ValueError(f"qsgd needs levels >= 1 and bucket >= 1, got {levels} and {bucket}")
    n, bits = v.size, level_bits(levels)
    starts = np.arange(0, n, bucket)
    norms = np.sqrt(np.add.reduceat(v * v, starts)) if n else np.zeros(0)
    norms32 = norms.astype(np.float32)
    low = norms32.astype(np.float64) < norms
    norms32[low] = np.nextafter(norms32[low], np.float32(np.inf))  # rounded up: |v_i| / norm <= 1
    per_entry = np.repeat(norms32.astype(np.float64), np.diff(np.append(starts, n)))
    ratio = np.divide(np.abs(v), per_entry, out=np.zeros(n), where=per_entry > 0)
    scaled = ratio * levels
    level = np.floor(scaled)
    level += rng.random(n) < scaled - level  # up with probability s r - l: E[level] = s r
    codes = (np.signbit(v) & (level > 0)).astype(np.int64) << bits | np.minimum(level, levels).astype(np.int64)
    bit_rows = (codes[:, None] >> np.arange(bits, -1, -1)) & 1  # 1 + bits bits per entry, most significant first
    return norms32.astype("<f4").tobytes() + np.packbits(bit_rows.reshape(-1).astype(np.uint8)).tobytes()


def _qsgd_decode(data: bytes, numel: int, levels: int, bucket: int) -> np.ndarray:
    n_buckets, bits = math.ceil(numel / bucket), level_bits(levels)
    norms = np.frombuffer(data[: 4 * n_buckets], dtype="<f4").astype(np.float64)
    rows = np.unpackbits(np.frombuffer(data[4 * n_buckets :], dtype=np.uint8))[: numel * (1 + bits)]
    codes = rows.reshape(numel, 1 + bits).astype(np.int64) @ (1 << np.arange(bits, -1, -1))
    level, negative = codes & ((1 << bits) - 1), codes >> bits
    if numel and level.max() > levels:
        raise ValueError(f"qsgd: a level above {levels}")
    return np.repeat(norms, np.diff(np.append(np.arange(0, numel, bucket), numel))) * (1 - 2 * negative) * level / levels


def decode(data: bytes, meta: dict[str, Any]) -> torch.Tensor:
    """The tensor :func:`encode` made ``data`` and ``meta`` from (its dtype and shape; lossy but for none)."""
    method, name = meta.get("method"), meta.get("dtype")
    if method not in METHODS:
        raise ValueError(f"meta.method: '{method}' is unknown (known: {', '.join(METHODS)})")
    if name not in _BY_NAME:
        raise ValueError(f"meta.dtype: '{name}' is not supported (supported: {', '.join(_BY_NAME)})")
    dtype, shape = _BY_NAME[name], tuple(int(s) for s in meta.get("shape", ()))
    numel, k = math.prod(shape), int(meta.get("k", -1))
    levels, bucket = int(meta.get("levels", 4)), int(meta.get("bucket", 512))
    if method == "qsgd" and (levels < 1 or bucket < 1):
        raise ValueError(f"meta: qsgd needs levels >= 1 and bucket >= 1, got {levels} and {bucket}")
    expected = (8 * k if method == "topk" else
                nbytes(method, numel, itemsize=np.dtype(_DTYPES[dtype]).itemsize, levels=levels, bucket=bucket))
    if method != "topk" and k != numel:
        raise ValueError(f"meta.k: {k} values for a dense tensor of {numel} entries")
    if not 0 <= k <= numel or len(data) != expected:
        raise ValueError(f"{len(data)} bytes do not hold {method} encoding of shape {shape} with k={k} ({expected} bytes)")
    target = _DTYPES[dtype].lstrip("<")
    if method == "none":
        values = np.frombuffer(data, dtype=_DTYPES[dtype]).astype(target)
    elif method == "float16":
        values = np.frombuffer(data, dtype="<f2").astype(target)
    elif method == "qsgd":
        values = _qsgd_decode(data, numel, levels, bucket).astype(target)
    else:
        index = np.frombuffer(data[: 4 * k], dtype="<i4")
        if k and (index.min() < 0 or index.max() >= numel):
            raise ValueError(f"topk: an index is outside the tensor's {numel} entries")
        values = np.zeros(numel, dtype=target)
        values[index] = np.frombuffer(data[4 * k :], dtype="<f4")
    return torch.from_numpy(values).reshape(shape)  # values is a fresh array (astype copies; zeros)


def refusal(strategy: "Strategy") -> str | None:
    """Why ``strategy``'s upload cannot be compressed as a change of the global model (None: it can): a strategy
    that says so (``compressible = False``), one whose upload is something else (personal or heterogeneous models,
    a second tensor, its own ``transfer_bytes``)."""
    from hetfl.strategies.base import Strategy

    cls = type(strategy)
    if not getattr(cls, "compressible", True):
        return "needs its clients' exact updates"
    if cls.personalised or not cls.global_model or cls.model_heterogeneous:
        return "does not upload a change of one global model"
    if cls.upload_copies != 1 or cls.transfer_bytes is not Strategy.transfer_bytes:
        return "uploads more than a change of the global model"
    return None


class Compression:
    """``strategy.compression``: a client's upload, its change w_i - w, compressed by ``cfg.kind`` (with
    ``cfg.error_feedback``, what compression dropped carried to its next upload). See the module docstring."""

    def __init__(self, cfg: "CompressionConfig") -> None:
        self.kind, self.ratio, self.levels = cfg.kind, cfg.ratio, cfg.levels
        self.bucket, self.error_feedback = cfg.bucket, cfg.error_feedback

    def upload_bytes(self, params: torch.Tensor) -> int:
        """What the codec sends for a change of ``params``' size."""
        return nbytes(self.kind, params.numel(), itemsize=params.element_size(), topk_ratio=self.ratio,
                      levels=self.levels, bucket=self.bucket)

    def apply(self, task: "Task", result: "ClientResult", state: dict[str, Any], seed: int) -> "ClientResult":
        """``result`` with its parameters w + C(w_i - w + e), as the server decodes them; ``state``'s residual e
        replaced by what C dropped (error feedback). ``seed``: the task's, for QSGD's draws."""
        delta = result.params - task.params
        corrected = delta + state[RESIDUAL] if self.error_feedback and RESIDUAL in state else delta
        data, meta = encode(corrected, self.kind, topk_ratio=self.ratio, levels=self.levels, bucket=self.bucket,
                            rng=np.random.default_rng([seed, 18, 7]))
        sent = decode(data, meta).to(delta.dtype)
        if self.error_feedback:
            state[RESIDUAL] = corrected - sent
        return dataclasses.replace(result, params=task.params + sent)


def compress_upload(strategy: "Strategy", task: "Task", result: "ClientResult", state: dict[str, Any],
                    seed: int) -> "ClientResult":
    """The client half's last step, in every engine: ``result`` as ``strategy.compression`` sends it (unchanged
    without compression)."""
    compression = getattr(strategy, "compression", None)
    return result if compression is None else compression.apply(task, result, state, seed)
