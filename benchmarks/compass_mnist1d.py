"""FedCompass against FedAvg, FedAsync and FedBuff on MNIST-1D with exponentially distributed client speeds.

    .venv/bin/python benchmarks/compass_mnist1d.py trace                   # (re)write the device trace, deterministic
    .venv/bin/python benchmarks/compass_mnist1d.py table OUT/compare-a OUT/compare-b ...   # the docs' table

The federation is ``examples/mnist1d_cross_silo.yaml``; the sweeps and the comparison are run by
``benchmarks/compass_mnist1d.sh``, which calls ``table`` at the end.

``trace`` writes ``examples/traces/compass_exponential.csv``: 10 devices whose time per local step t_i is the
(i + 1) / 11 quantile of an exponential distribution of mean 1 (in units of the config's mean step time), i = 0..9:
t_i = -ln(1 - (i + 1) / 11), from 0.095 to 2.40, a spread of 25x. (i + 1) / (n + 1) is the mean of F(X_(i)), the
distribution function at the i-th smallest of n draws, so device i stands for the i-th fastest of ten draws
without the luck of one draw (a random draw of ten can put the fastest device anywhere from 0.001 to 0.3).
``speed`` is 1 / t_i (the trace's speed is relative to ``devices.compute.median_flops``). Links: 1 Gbit/s, 5 ms, so that a task's time is its computation, as in the
paper's simulation.

``table`` reads the ``comparison.json`` of one or more ``hetfl compare`` folders (the comparison may be split into
parallel halves), puts their algorithms together, re-runs the paired tests of final accuracy against the best
(:func:`hetfl.results.seeds.against_best`) over all of them, and prints a Markdown table: time to target as mean ±
std over the seeds that reached it (k of n), final accuracy, mean and largest staleness, the fast devices' idle
share, MB up + down, and the paired t-test p against the best. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from hetfl.results.seeds import against_best, aggregate, mean_std_ci  # noqa: E402

TRACE = ROOT / "examples" / "traces" / "compass_exponential.csv"
N_DEVICES = 10


def step_times(n: int = N_DEVICES) -> list[float]:
    """Time per local step of ``n`` devices: the (i + 1) / (n + 1) quantiles of Exp(mean 1), fastest first."""
    return [-math.log(1 - (i + 1) / (n + 1)) for i in range(n)]


def write_trace(path: Path = TRACE) -> list[float]:
    times = step_times()
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["client_id", "speed", "down_mbps", "up_mbps", "latency_ms", "tier"])
        for i, t in enumerate(times):
            w.writerow([i, f"{1 / t:.6f}", 1000, 1000, 5, f"exp-q{i}"])
    return times


def _spread(values: list, fmt: str) -> str:
    s = mean_std_ci(values)
    if s["mean"] is None:
        return "—"
    return format(s["mean"], fmt) if s["std"] is None else f"{format(s['mean'], fmt)} ± {format(s['std'], fmt)}"


def _time_cell(times: list) -> str:
    """Mean ± std of the times of the seeds that reached a level, and how many did (k of n)."""
    hit = [t for t in times if t is not None]
    return f"{_spread(hit, '.0f')} s ({len(hit)} of {len(times)})" if hit else f"not reached (0 of {len(times)})"


def staleness_quantile(histogram: dict[str, int], q: float) -> float:
    """The ``q`` quantile of a run's staleness histogram (``{"staleness": updates}``): the smallest staleness with at
    least a share ``q`` of the updates at or below it."""
    counts = sorted((int(k), v) for k, v in histogram.items())
    total, seen = sum(v for _, v in counts), 0
    for value, n in counts:
        seen += n
        if seen >= q * total:
            return float(value)
    return math.nan


def read_records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def first_time_at(records: list[dict], level: float) -> float | None:
    """Simulated time of the first evaluation at or above accuracy ``level`` (None: never)."""
    return next((r["sim_time_s"] for r in records if (r.get("accuracy") or 0.0) >= level), None)


def table(folders: list[Path], levels: list[float]) -> list[dict]:
    entries, where = [], {}
    for folder in folders:
        for e in json.loads((folder / "comparison.json").read_text()):
            if "runs" not in e:  # a comparison of one seed lists the runs' summaries, each in a folder of its name
                e = aggregate(e["algorithm"], [e], [e["algorithm"]])
            e.pop("vs_best", None)
            entries.append(e)
            where[e["algorithm"]] = folder
    against_best(entries)
    rows = []
    print("| algorithm | chosen setting | time to target | final acc | mean staleness | staleness p90 "
          "| fastest silo's share of updates | fast idle | MB up + down | p vs best |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for e in entries:
        runs = e["runs"]
        vs = e.get("vs_best")
        p = "best" if vs is None else ("—" if vs.get("ttest_p") is None else f"{vs['ttest_p']:.3g}")
        setting = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in (e.get("tuned", {}).get("setting") or {}).items())
        row = {
            "algorithm": e["algorithm"],
            "setting": setting,
            "time_to_target": _time_cell([r.get("time_to_target_s") for r in runs]),
            "final_accuracy": _spread([r.get("final_accuracy") for r in runs], ".3f"),
            "staleness_mean": _spread([r.get("staleness_mean") for r in runs], ".1f"),
            "staleness_p90": _spread([staleness_quantile(r["staleness_histogram"], 0.9) for r in runs], ".0f"),
            "fastest_share": _spread([100 * r["participation"][0] / sum(r["participation"]) for r in runs], ".0f") + "%",
            "idle_fast": _spread([100 * r["idle_fast_frac"] for r in runs if r.get("idle_fast_frac") is not None],
                                 ".0f") + "%",
            "mb": _spread([(r["bytes_up"] + r["bytes_down"]) / 1e6 for r in runs], ".1f"),
            "p": p,
        }
        print("| " + " | ".join(str(v) for v in row.values()) + " |")
        records = [read_records(where[e["algorithm"]] / f) for f in e["folders"]]
        last = [r[-1] for r in records]  # the strategy's own metrics, e.g. FedCompass's group sizes
        row["strategy_metrics"] = {k: _spread([r[k] for r in last], ".2f") for k in last[0] if k.startswith("compass_")}
        for level in levels:  # time to other accuracies, from the runs' curves
            row[f"time_to_{level}"] = _time_cell([first_time_at(r, level) for r in records])
        rows.append(row)
    print(json.dumps(rows))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("trace", help=f"write {TRACE.relative_to(ROOT)}")
    t = sub.add_parser("table", help="the Markdown table of one or more hetfl compare folders")
    t.add_argument("folders", nargs="+", type=Path)
    t.add_argument("--levels", default="0.4,0.5,0.6,0.7", help="accuracies to time besides the target (in the JSON)")
    args = parser.parse_args(argv)
    if args.command == "trace":
        times = write_trace()
        print(f"{TRACE.relative_to(ROOT)}: step times {', '.join(f'{t:.3f}' for t in times)}; "
              f"sum of speeds {sum(1 / t for t in times):.1f}")
    else:
        table(args.folders, [float(v) for v in args.levels.split(",")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
