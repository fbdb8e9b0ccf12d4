"""A sweep's figure (``sweep.png`` beside ``sweep.json``): the validation score over the grid.

Two grid keys: a heatmap, one cell per setting, written ``mean ± std``, the chosen setting framed. One key: the
mean score against the key's values with error bars of one standard deviation, the chosen one marked. More keys:
the two first keys' plane at the chosen setting's values of the others (said in the title). A setting without a
score on every seed is a blank cell (a missing point). matplotlib through its object API, as the report draws.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hetfl.results.report import DPI, FIGSIZE
from hetfl.results.seeds import format_spread


def _value_fmt(objective: str):
    from hetfl.results import format_duration

    return format_duration if objective == "time_to_target" else (lambda v: f"{v:.3f}")


def _plane(sweep: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]], str]:
    """The grid keys drawn (one or two), the trials in the plane through the chosen setting, and the title's note."""
    keys = list(sweep["grid"])
    best = sweep["best"]["setting"]
    drawn, fixed = keys[:2], keys[2:]
    trials = [t for t in sweep["trials"] if all(t["setting"][k] == best[k] for k in fixed)]
    note = (" at " + ", ".join(f"{k}={best[k]}" for k in fixed) + " (the chosen values)") if fixed else ""
    return drawn, trials, note


def _mean(trial: dict[str, Any]) -> float:
    s = trial["score"]
    return s["mean"] if s.get("complete") and s.get("mean") is not None else math.nan


def draw_sweep(sweep: dict[str, Any], path: Path) -> Path:
    """Draw ``sweep`` (a ``sweep.json`` record) into ``path`` (a PNG); returns ``path``."""
    import numpy as np
    from matplotlib.figure import Figure

    keys, trials, note = _plane(sweep)
    fmt = _value_fmt(sweep["objective"])
    label = f"{sweep['objective']} (validation)"
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    chosen = sweep["best"]["index"]
    if len(keys) == 1:
        xs = list(range(len(trials)))
        means = [_mean(t) for t in trials]
        stds = [t["score"].get("std") or 0.0 for t in trials]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=4, color="tab:blue")
        for x, t in zip(xs, trials):
            if t["index"] == chosen:
                ax.plot([x], [_mean(t)], marker="*", markersize=16, color="tab:red", linestyle="none",
                        label="chosen")
        ax.set_xticks(xs, [str(t["setting"][keys[0]]) for t in trials])
        ax.set_xlabel(keys[0])
        ax.set_ylabel(label)
        ax.legend(loc="best")
    else:
        rows = list(dict.fromkeys(t["setting"][keys[0]] for t in trials))
        cols = list(dict.fromkeys(t["setting"][keys[1]] for t in trials))
        grid = np.full((len(rows), len(cols)), np.nan)
        for t in trials:
            grid[rows.index(t["setting"][keys[0]]), cols.index(t["setting"][keys[1]])] = _mean(t)
        image = ax.imshow(grid, cmap="viridis_r" if sweep["objective"] == "time_to_target" else "viridis",
                          aspect="auto")
        fig.colorbar(image, ax=ax, label=label)
        for t in trials:
            r, c = rows.index(t["setting"][keys[0]]), cols.index(t["setting"][keys[1]])
            text = format_spread(t["score"], fmt) if t["score"].get("complete") else "—"
            ax.text(c, r, text, ha="center", va="center", fontsize=8, color="white",
                    bbox={"facecolor": "black", "alpha": 0.35, "linewidth": 0})
            if t["index"] == chosen:
                ax.add_patch(_frame(r, c))
        ax.set_xticks(range(len(cols)), [str(c) for c in cols])
        ax.set_yticks(range(len(rows)), [str(r) for r in rows])
        ax.set_xlabel(keys[1])
        ax.set_ylabel(keys[0])
    ax.set_title(f"{sweep['algorithm']}: mean ± std over seeds {','.join(str(s) for s in sweep['seeds'])}{note}",
                 fontsize=9)
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def _frame(row: int, col: int):
    from matplotlib.patches import Rectangle

    return Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=3)


__all__ = ["draw_sweep"]
