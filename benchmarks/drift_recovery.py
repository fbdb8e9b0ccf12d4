"""Concept drift: how far each algorithm falls at the drift and how soon it recovers, from a `hetfl compare` folder.

    .venv/bin/python benchmarks/drift_recovery.py RESULTS_DIR --at-s 5 [--tol 0.02]

RESULTS_DIR is what `hetfl compare CONFIG --algorithms ... --seeds ... --out RESULTS_DIR` wrote for a config with
`data.drift` (its `ALGORITHM-seedN/metrics.jsonl`). The accuracy read is the one each method is judged by: each
client's own model for personalised methods (`personal_acc_mean`, the mean over clients of their own test split),
the global model's per-client mean for the others (`client_acc_mean`); after the drift the drifting clients' test
labels are the new ones. Per algorithm, mean ± std over the seeds of

- ``before``: the last evaluation before ``at_s``;
- ``dip``: the lowest evaluation at or after ``at_s``;
- ``after``: the mean of the evaluations at or after ``at_s`` (the whole post-drift curve);
- ``final``: the last evaluation;
- ``recovery_s``: simulated seconds from ``at_s`` to the first evaluation back within ``tol`` of ``before``
  (seeds that never recover are counted apart, "n/k recovered").

Nothing is timed: simulated results do not depend on the machine's load. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def accuracy(record: dict[str, Any]) -> float | None:
    value = record.get("personal_acc_mean")
    return value if value is not None else record.get("client_acc_mean")


def one_run(path: Path, at_s: float, tol: float) -> dict[str, Any]:
    curve = [(r["sim_time_s"], accuracy(r)) for r in map(json.loads, path.read_text().splitlines())]
    curve = [(t, a) for t, a in curve if a is not None]
    before = [a for t, a in curve if t < at_s]
    after = [(t, a) for t, a in curve if t >= at_s]
    if not before or not after:
        raise SystemExit(f"{path}: no evaluation on both sides of --at-s {at_s}")
    back = next((t - at_s for t, a in after if a >= before[-1] - tol), None)
    return {"before": before[-1], "dip": min(a for _, a in after), "after": statistics.fmean(a for _, a in after),
            "final": curve[-1][1], "recovery_s": back}


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--at-s", type=float, required=True, help="data.drift.at_s of the runs")
    parser.add_argument("--tol", type=float, default=0.02, help="recovered: back within this of the pre-drift accuracy")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(args.results.glob("*-seed*/metrics.jsonl")):
        algorithm = path.parent.name.rsplit("-seed", 1)[0]
        runs.setdefault(algorithm, []).append(one_run(path, args.at_s, args.tol))
    print(f"{'algorithm':<12} {'before':>14} {'dip':>14} {'after':>14} {'final':>14} {'recovery_s':>22}")
    for algorithm, rs in runs.items():
        cells = [mean_std([r[k] for r in rs]) for k in ("before", "dip", "after", "final")]
        back = [r["recovery_s"] for r in rs if r["recovery_s"] is not None]
        print(f"{algorithm:<12} " + " ".join(f"{c:>14}" for c in cells)
              + f" {mean_std(back) + f' ({len(back)}/{len(rs)} recovered)':>22}")
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
