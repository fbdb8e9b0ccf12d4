"""Server-side checks of a client's upload before it reaches the strategy.

A deployed server cannot trust what arrives: a buggy client may send a model of another architecture,
a diverged one NaNs, a malicious one a huge update meant to drag the global model away. :func:`check_update`
refuses those with a one-line reason the server logs and returns to the client; the update is then
treated like a lost task (the strategy's ``on_failure``). Norm bounding of updates is the simplest
defence against model-replacement attacks (Sun et al., "Can You Really Backdoor Federated Learning?",
arXiv:1911.07963); the robust aggregators of :mod:`hetfl.strategies.robust` go further.
"""

from __future__ import annotations

import torch


def check_update(params: torch.Tensor, *, reference: torch.Tensor, max_norm: float | None) -> str | None:
    """None if ``params`` is an acceptable upload, else a one-line reason.

    Checked in this order, the first failure is reported:

    1. shape equals ``reference.shape`` ("shape (10,) != expected (4810,)");
    2. dtype equals ``reference.dtype`` ("dtype float64 != float32");
    3. every value is finite ("3 non-finite values");
    4. with ``max_norm``, the update norm ``||params - reference||_2 <= max_norm``
       ("update norm 812.3 > bound 100.0"). ``reference`` is the model the client started from.
    """
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"max_norm must be positive or None, got {max_norm}")
    if tuple(params.shape) != tuple(reference.shape):
        return f"shape {tuple(params.shape)} != expected {tuple(reference.shape)}"
    if params.dtype != reference.dtype:
        return f"dtype {_dtype_name(params.dtype)} != {_dtype_name(reference.dtype)}"
    bad = int((~torch.isfinite(params)).sum())
    if bad:
        return f"{bad} non-finite value{'s' if bad != 1 else ''}"
    if max_norm is not None:
        norm = float(torch.linalg.vector_norm((params - reference).double()))
        if norm > max_norm:
            shown = f"{norm:.1f}" if f"{norm:.1f}" != f"{max_norm:.1f}" else f"{norm:.6g}"  # 100.04 vs 100.0
            return f"update norm {shown} > bound {max_norm:.1f}"
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
