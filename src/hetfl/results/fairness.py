"""Staleness and fairness measures, as pure functions of the counters the simulator keeps.

Every definition here is the one ``docs/metrics.md`` states:

- staleness of an aggregated update: server versions committed between its dispatch and the
  commit that aggregates it (``version before the commit - task.version``); kept as a histogram
  ``{staleness: count}``, whose size is the number of distinct values, not of updates;
- :func:`staleness_stats`: mean, nearest-rank 90th percentile and maximum of a histogram;
- :func:`jain_index`: Jain's fairness index ``(sum x)^2 / (n sum x^2)`` of per-client counts,
  1 when every client counts the same, ``1/n`` when one client has everything;
- :func:`idle_fractions`: per client, ``(online - busy) / online`` over ``[0, now]``;
- :func:`fastest`: the fastest 10% of clients by device FLOP/s (at least one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

FAST_SHARE = 0.1  # "fast clients": this share of the federation, by device FLOP/s


def staleness_stats(hist: Mapping[int, int]) -> dict[str, float | int | None]:
    """``{"mean", "p90", "max"}`` of a staleness histogram; all ``None`` when it is empty.

    ``p90`` is the nearest-rank percentile: the smallest staleness ``s`` such that at least 90% of
    the updates have staleness ``<= s`` (always one of the observed values).
    """
    n = sum(hist.values())
    if n == 0:
        return {"mean": None, "p90": None, "max": None}
    values = sorted(v for v, count in hist.items() if count)
    mean = sum(v * hist[v] for v in values) / n
    rank = math.ceil(0.9 * n)
    seen = 0
    p90 = values[-1]
    for v in values:
        seen += hist[v]
        if seen >= rank:
            p90 = v
            break
    return {"mean": mean, "p90": p90, "max": values[-1]}


def jain_index(counts: Sequence[float] | np.ndarray) -> float | None:
    """Jain's fairness index ``(sum x)^2 / (n * sum x^2)``; ``None`` when every count is 0 (or there are none)."""
    x = np.asarray(counts, dtype=float)
    square = float((x * x).sum())
    if x.size == 0 or square == 0.0:
        return None
    return float(x.sum()) ** 2 / (x.size * square)


def fastest(flops: Sequence[float], share: float = FAST_SHARE) -> np.ndarray:
    """Indices of the ``ceil(share * n)`` clients with the most FLOP/s (at least one; ties: lower index first)."""
    n = len(flops)
    k = max(1, math.ceil(share * n)) if n else 0
    order = np.lexsort((np.arange(n), -np.asarray(flops, dtype=float)))  # most FLOP/s first, ties by index
    return order[:k].astype(np.int64)


def idle_fractions(busy_s: np.ndarray, online_s: np.ndarray) -> np.ndarray:
    """Per client ``(online - busy) / online``; ``nan`` for a client not online yet."""
    online = np.asarray(online_s, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        idle = np.where(online > 0, (online - np.asarray(busy_s, dtype=float)) / online, np.nan)
    return np.clip(idle, 0.0, 1.0)  # busy <= online; clip only rounding (nan stays nan)


def mean_or_none(values: np.ndarray) -> float | None:
    """The mean of the finite values; ``None`` when there are none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None
