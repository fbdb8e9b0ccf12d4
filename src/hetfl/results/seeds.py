"""Repeated seeds: one algorithm run under several seeds, summarised as mean, spread and confidence.

``hetfl compare --seeds 0,1,2`` runs every (algorithm, seed) pair; this module turns each algorithm's
run summaries into its ``comparison.json`` entry (:func:`aggregate`), and gives the report its
arithmetic: accuracy curves on a common simulated-time grid (:func:`step_interpolate`) and the paired
tests of one algorithm's final accuracy against another's over the same seeds (:func:`paired_tests`).

The statistics, for ``n`` values ``x_1 .. x_n`` (docs/metrics.md):

- ``mean``: their arithmetic mean;
- ``std``: the sample standard deviation, ``sqrt(sum (x_i - mean)^2 / (n - 1))`` (``None`` for n < 2);
- ``ci95``: ``mean -/+ t(0.975, n - 1) * std / sqrt(n)``, Student's t interval for the mean at 95%
  (``None`` for n < 2).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

CONFIDENCE = 0.95
SIGNIFICANCE = 0.05
"""A p-value below this marks a difference as significant in the report."""
MEASURES = {  # comparison.json key -> how it is read from one run's summary
    "final_accuracy": lambda s: s.get("final_accuracy"),
    "best_accuracy": lambda s: s.get("best_accuracy"),
    "client_acc_p10": lambda s: s.get("client_acc_p10"),
    "bytes": lambda s: _sum(s.get("bytes_up"), s.get("bytes_down")),
    "wall_time_s": lambda s: s.get("wall_time_s"),
}


def _sum(a: Any, b: Any) -> float | None:
    return a + b if _real(a) is not None and _real(b) is not None else None


def _real(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def mean_std_ci(values: Sequence[Any], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """``{n, mean, std, ci95}`` of the finite numbers in ``values`` (others, e.g. None, are left out)."""
    from scipy import stats

    xs = [v for v in (_real(v) for v in values) if v is not None]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean = float(np.mean(xs))
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "ci95": None}
    std = float(np.std(xs, ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def time_to_target(times: Sequence[Any]) -> dict[str, Any]:
    """Over the seeds: ``mean_s`` of the times of those that reached the target (None: none did), ``reached``
    (how many did) and ``n`` (how many ran)."""
    reached = [t for t in (_real(t) for t in times) if t is not None]
    return {"mean_s": float(np.mean(reached)) if reached else None, "reached": len(reached), "n": len(times)}


def step_interpolate(times: Sequence[float], values: Sequence[float], grid: Sequence[float]) -> np.ndarray:
    """``values`` measured at ``times`` (ascending), read at each point of ``grid`` step-wise: the value of the
    last measurement at or before that point (it holds until the next one); ``nan`` before the first."""
    times, values, grid = np.asarray(times, float), np.asarray(values, float), np.asarray(grid, float)
    at = np.searchsorted(times, grid, side="right") - 1
    return np.where(at >= 0, values[np.clip(at, 0, None)], np.nan) if len(times) else np.full(len(grid), np.nan)


def common_grid(curves: Sequence[tuple[Sequence[float], Sequence[float]]], points: int = 200) -> np.ndarray:
    """``points`` evenly spaced times from 0 to the end of the shortest of ``curves`` (each ``(times, values)``):
    every seed is measured over the whole grid."""
    end = min((float(np.max(t)) for t, _ in curves if len(t)), default=0.0)
    return np.linspace(0.0, end, points)


def band(curves: Sequence[tuple[Sequence[float], Sequence[float]]], points: int = 200
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid, mean, std) of the curves step-interpolated onto :func:`common_grid`; std is the sample one (ddof=1),
    0 for a single curve."""
    grid = common_grid(curves, points)
    rows = np.array([step_interpolate(t, v, grid) for t, v in curves])
    with warnings.catch_warnings():  # a point no seed has measured yet is nan, said once by the plot, not numpy
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(rows, axis=0) if len(rows) else np.full(len(grid), np.nan)
        std = np.nanstd(rows, axis=0, ddof=1) if len(rows) > 1 else np.zeros(len(grid))
    return grid, mean, std


def paired_tests(a: dict[int, Any], b: dict[int, Any]) -> dict[str, Any]:
    """Paired tests of ``a`` against ``b`` (each seed -> a final accuracy) over the seeds both have.

    Returns ``seeds`` (the common ones), ``n``, ``mean_diff`` (mean of a - b), ``ttest_p`` (two-sided, scipy's
    ``ttest_rel``) and ``wilcoxon_p`` (two-sided signed-rank, scipy's ``wilcoxon``); a p-value is None where n does
    not allow the test: fewer than 2 common seeds, or (Wilcoxon) no difference other than 0, or (t-test) all
    differences alike, so that they have no variance."""
    from scipy import stats

    seeds = sorted(s for s in set(a) & set(b) if _real(a[s]) is not None and _real(b[s]) is not None)
    x = np.array([float(a[s]) for s in seeds])
    y = np.array([float(b[s]) for s in seeds])
    out: dict[str, Any] = {"seeds": seeds, "n": len(seeds), "mean_diff": float(np.mean(x - y)) if seeds else None,
                           "ttest_p": None, "wilcoxon_p": None}
    if len(seeds) < 2:
        return out
    d = x - y
    with warnings.catch_warnings():  # scipy's about few samples or ties: the caller reports n, nothing to add
        warnings.simplefilter("ignore")
        if np.ptp(d) > 0:
            out["ttest_p"] = float(stats.ttest_rel(x, y).pvalue)
        if np.any(d != 0):
            out["wilcoxon_p"] = float(stats.wilcoxon(x, y).pvalue)
    return out


def _status(summaries: list[dict]) -> str:
    """``completed`` when every run says so; else each status and its count, ``completed 2, diverged 1``."""
    counts: dict[str, int] = {}
    for s in summaries:
        counts[str(s.get("status"))] = counts.get(str(s.get("status")), 0) + 1
    return next(iter(counts)) if len(counts) == 1 else ", ".join(f"{k} {v}" for k, v in counts.items())


def aggregate(algorithm: str, summaries: list[dict], folders: list[str]) -> dict[str, Any]:
    """An algorithm's ``comparison.json`` entry from its runs' summaries (one per seed, each with its ``seed``) and
    their run folders: the seeds, each measure's :func:`mean_std_ci`, the time to target over the seeds that reached
    it, and the runs' summaries whole."""
    entry: dict[str, Any] = {
        "algorithm": algorithm,
        "seeds": [s.get("seed") for s in summaries],
        "status": _status(summaries),
        "folders": list(folders),
    }
    for key, read in MEASURES.items():
        entry[key] = mean_std_ci([read(s) for s in summaries])
    entry["target_accuracy"] = next((s["target_accuracy"] for s in summaries if s.get("target_accuracy") is not None),
                                    None)
    # a language model's target is a perplexity, each seed's own by default (0.95 x its starting model's)
    perplexity_targets = [s.get("target_perplexity") for s in summaries]
    entry["target_perplexity"] = perplexity_targets if any(t is not None for t in perplexity_targets) else None
    entry["time_to_target_s"] = time_to_target([s.get("time_to_target_s") for s in summaries])
    entry["runs"] = summaries
    return entry


def against_best(entries: list[dict[str, Any]]) -> None:
    """Add to each entry ``vs_best``: :func:`paired_tests` of its runs' final accuracies against those of the entry
    with the highest mean final accuracy (``best``: that algorithm; None for the best itself)."""
    finals = {e["algorithm"]: {s.get("seed"): s.get("final_accuracy") for s in e["runs"]} for e in entries}
    ranked = [e for e in entries if e["final_accuracy"]["mean"] is not None]
    if not ranked:
        return
    best = max(ranked, key=lambda e: e["final_accuracy"]["mean"])["algorithm"]
    for e in entries:
        if e["algorithm"] == best:
            e["vs_best"] = None
        else:
            e["vs_best"] = {"best": best, **paired_tests(finals[e["algorithm"]], finals[best])}


def format_spread(value: dict[str, Any] | None, fmt: Any) -> str:
    """``mean ± std`` of a measure over seeds (:func:`mean_std_ci`; ``mean`` alone for one seed, ``—`` for none),
    each part as ``fmt`` writes it: the printed comparison table's and the report's cells."""
    if not value or value.get("mean") is None:
        return "—"
    if value.get("std") is None:
        return fmt(value["mean"])
    return f"{fmt(value['mean'])} ± {fmt(value['std'])}"


__all__ = ["CONFIDENCE", "MEASURES", "SIGNIFICANCE", "against_best", "aggregate", "band", "common_grid",
           "format_spread", "mean_std_ci", "paired_tests", "step_interpolate", "time_to_target"]
