"""Server-side checks of a client's upload before it reaches the strategy.

A deployed server cannot trust what arrives: a buggy client may send a model of another architecture,
a diverged one NaNs, a malicious one a huge update meant to drag the global model away, extra tensors of
the wrong shape, or a sample count of a billion. :func:`check_update` (the parameters), :func:`check_payload`
(the extra tensors the strategy declared with :meth:`~hetfl.strategies.base.Strategy.expected_payload`),
:func:`check_stats` (the scalars) and :class:`NormBound` (``deploy.update_norm``) refuse those with a one-line
reason the server logs and returns to the client; the update is then treated like a lost task (the strategy's
``on_failure``). :func:`bounded_samples` is the weight a client's claimed sample count earns. Norm bounding of
updates is the simplest defence against model-replacement attacks (Sun et al., "Can You Really Backdoor Federated
Learning?", arXiv:1911.07963); the robust aggregators of :mod:`hetfl.strategies.robust` go further.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

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


def check_payload(payload: dict[str, torch.Tensor], expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> str | None:
    """None if ``payload`` (an update's extra tensors, by name) is exactly what the strategy declared in ``expected``
    (name -> (shape, dtype); :meth:`~hetfl.strategies.base.Strategy.expected_payload`), else a one-line reason:
    an undeclared tensor, a missing one, another shape or dtype, non-finite values."""
    unknown = sorted(set(payload) - set(expected))
    if unknown:
        allowed = ", ".join(sorted(expected)) or "none"
        return f"payload {unknown[0]} is not one the strategy expects (it expects: {allowed})"
    for name, (shape, dtype) in expected.items():
        tensor = payload.get(name)
        if tensor is None:
            return f"payload {name} is missing"
        if tuple(tensor.shape) != tuple(shape):
            return f"payload {name}: shape {tuple(tensor.shape)} != expected {tuple(shape)}"
        if tensor.dtype != dtype:
            return f"payload {name}: dtype {_dtype_name(tensor.dtype)} != {_dtype_name(dtype)}"
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                return f"payload {name}: {bad} non-finite value{'s' if bad != 1 else ''}"
    return None


def check_stats(stats: dict[str, float]) -> str | None:
    """None if every statistic a client reported is a finite number, else a one-line reason."""
    for key, value in stats.items():
        if not math.isfinite(value):
            return f"its statistic {key} is {value}"
    return None


def check_report(steps: int, loss: float) -> str | None:
    """None if an update's reported local steps (at least 1: FedNova divides by them) and loss (finite) are sane, else
    a one-line reason."""
    if steps < 1 or not math.isfinite(loss):
        return f"it reports {steps} local steps and loss {loss}"
    return None


def change_norm(params: torch.Tensor, reference: torch.Tensor) -> float:
    """``||params - reference||_2``, in double precision."""
    return float(torch.linalg.vector_norm((params - reference).double()))


class NormBound:
    """``deploy.update_norm``: which updates' changes are too large.

    - ``fixed``: the change's L2 norm must not exceed ``deploy.max_update_norm``.
    - ``adaptive``: an update's *score*, its change's norm divided by sqrt(the task's local steps), must not exceed
      ``factor`` times the median score of the last ``window`` accepted updates of the same size (the history is
      kept per number of parameters: a model zoo's architectures apart); no bound before ``warmup`` of them.
      Honest updates shrink as training converges, so a lagging median errs on the side of accepting; an update
      of +255 everywhere, or noise scaled up to replace the model, is thousands of times the median.
    - ``off``: none.

    The history is the caller's (the server checkpoints it): a dict from parameter count to recent scores.
    """

    def __init__(self, cfg: Any, max_norm: float | None = None, *, secure: bool = False) -> None:
        self.rule = "fixed" if max_norm is not None else cfg.rule
        if secure and self.rule == "adaptive":
            self.rule = "off"  # the server sees only the sum: nothing to bound (the default, so not an error)
        self.max_norm, self.factor, self.window, self.warmup = max_norm, cfg.factor, cfg.window, cfg.warmup

    @staticmethod
    def score(norm: float, steps: int) -> float:
        return norm / math.sqrt(max(int(steps), 1))

    def limit(self, history: dict[int, list[float]], numel: int) -> float | None:
        """The score bound for an update of ``numel`` parameters now (None: no bound yet, or none at all)."""
        if self.rule != "adaptive":
            return None
        recent = history.get(numel, [])
        if len(recent) < self.warmup:
            return None
        return self.factor * statistics.median(recent)

    def check(self, norm: float, steps: int, numel: int, history: dict[int, list[float]]) -> str | None:
        """None if an update whose change has L2 norm ``norm`` after ``steps`` local steps passes, else a reason."""
        if self.rule == "fixed" and self.max_norm is not None and norm > self.max_norm:
            shown = f"{norm:.1f}" if f"{norm:.1f}" != f"{self.max_norm:.1f}" else f"{norm:.6g}"  # 100.04 vs 100.0
            return f"update norm {shown} > bound {self.max_norm:.1f}"
        bound = self.limit(history, numel)
        if bound is not None:
            score = self.score(norm, steps)
            if not score <= bound:
                return (f"update norm {norm:.4g} ({score:.4g} per sqrt(step), {steps} steps) > {bound:.4g}, "
                        f"{self.factor:g} x the median of the last {len(history.get(numel, []))} accepted "
                        "(deploy.update_norm adaptive)")
        return None

    def accepted(self, norm: float, steps: int, numel: int, history: dict[int, list[float]]) -> None:
        """Remember an accepted update's score (adaptive only)."""
        if self.rule != "adaptive":
            return
        recent = history.setdefault(numel, [])
        recent.append(self.score(norm, steps))
        del recent[: max(0, len(recent) - self.window)]


def bounded_samples(claim: int, registered: int | None, cap: int | None) -> int:
    """The weight a client's claimed sample count earns: ``min(claim, registered, cap)`` over those given."""
    return int(min(v for v in (claim, registered, cap) if v is not None))
