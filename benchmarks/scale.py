"""Many clients: peak resident memory and seconds per round of FedAvg at 10,000 and 100,000 clients.

    .venv/bin/python benchmarks/scale.py [--clients 10000 100000] [--share 0.01] [--rounds 6]
                                         [--runs 3] [--model logreg] [--steps 10] [--batch-size 16]

Every configuration is a whole ``hetfl run`` (``run_experiment``: build, simulate, evaluate every round,
checkpoint, summary) of FedAvg on ``data.dataset: synthetic`` (FedProx's Synthetic(1, 1), 60 features,
10 classes, each client's samples generated from (seed, client) when it trains; the paper's log-normal
sample counts, uncapped), ``clients_per_round = share * n_clients`` (1%: 100 and 1,000), ``--steps``
local SGD steps of batch ``--batch-size``, devices always online with log-normal speeds, training.vectorize
auto (the default), evaluation on the default 100 clients' test splits. Each run is its own process, so that

``peak_rss_mb``
    is that process's peak resident memory (``ru_maxrss``), everything included: Python, torch, the
    federation, the rounds;
``baseline_rss_mb``
    the same, measured after the imports and before the federation is built (what any run costs);
``cpu_s_per_round``
    the median CPU seconds of the process over the same rounds (``time.process_time``, commit to commit,
    evaluation included): on a machine shared with other work, wall seconds also count the waiting;
``build_s``
    wall seconds of ``build_federation`` (sample counts, device table, the evaluation set);
``s_per_round``
    the median of the wall seconds between consecutive evaluation records of ``metrics.jsonl``, rounds
    2..``--rounds`` (round 1 also pays the first vmap call, about 5 s of lazy imports, so it is left out).

Reported per configuration: the median over ``--runs`` runs of ``s_per_round``, ``cpu_s_per_round`` and
``build_s``, and the
largest ``peak_rss_mb``. The aims (issue 6): under 2 GB of peak memory at 100,000 clients; the JSON says
whether it was met. This is a benchmark, not a test: nothing here asserts a time. The last line of the
output is one JSON object.

Row for benchmarks/README.md:
| `scale.py` | peak resident memory and seconds per round of FedAvg on 10,000 and 100,000 synthetic clients (1% a round), each run its own process; median of `--runs` |
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

AIM_MB = 2048.0


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One run in this process: the measurements of the module docstring."""
    from hetfl.config import validate
    from hetfl.engine.run import Run, build_federation

    baseline = _rss_mb()
    n = args.child
    k = max(1, round(args.share * n))
    cfg = validate({
        "name": f"scale-{n}", "seed": args.seed, "rounds": args.rounds, "checkpoint_every": 10**6,
        "data": {"dataset": "synthetic", "n_clients": n},
        "devices": {"compute": {"distribution": "lognormal"}, "availability": {"kind": "always"}},
        "model": _model(args.model),
        "training": {"optimizer": "sgd", "lr": 0.05, "batch_size": args.batch_size, "local_steps": args.steps},
        "strategy": {"name": "fedavg", "clients_per_round": k},
    })
    t0 = time.perf_counter()
    fed = build_federation(cfg)
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as out:
        run = Run(cfg, Path(out), fed, fed.strategy(), resume=False)
        cpu = [time.process_time()]  # CPU seconds of this process at every commit (less sensitive to a loaded machine)
        evaluate = run.sim.on_commit

        def on_commit(sim: Any) -> None:
            evaluate(sim)
            cpu.append(time.process_time())

        run.sim.on_commit = on_commit
        summary = run.execute(show_progress=False)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    walls = [r["wall_time_s"] for r in records]
    per_round = [b - a for a, b in zip(walls, walls[1:])]
    return {
        "clients": n, "per_round": k, "params": fed.trainer.numel, "build_s": build_s,
        "round_s": per_round, "s_per_round": statistics.median(per_round[1:] or per_round),
        "cpu_s_per_round": statistics.median([b - a for a, b in zip(cpu[1:], cpu[2:])] or [cpu[-1] - cpu[0]]),
        "peak_rss_mb": _rss_mb(), "baseline_rss_mb": baseline, "rounds": summary["rounds"],
        "accuracy": summary["final_accuracy"], "train_samples": int(fed.data.train_sizes.sum()),
    }


def _model(spec: str) -> dict[str, Any]:
    name, *widths = spec.split("-")
    if name == "mlp":
        return {"name": "mlp", "hidden": [int(w) for w in widths] or [32]}
    if spec == "logreg":
        return {"name": "logreg"}
    raise SystemExit(f"--model: {spec!r} is not logreg or mlp-W[-W...]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", nargs="+", type=int, default=[10_000, 100_000], help="(default: 10000 100000)")
    parser.add_argument("--share", type=float, default=0.01, help="clients per round / clients (default 0.01)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of every run (default 6; round 1 is not timed)")
    parser.add_argument("--runs", type=int, default=3, help="processes per configuration (default 3)")
    parser.add_argument("--model", default="logreg", help="logreg or mlp-W[-W...] (default logreg)")
    parser.add_argument("--steps", type=int, default=10, help="local steps (default 10)")
    parser.add_argument("--batch-size", type=int, default=16, help="training.batch_size (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args)))
        return 0
    if args.rounds < 2 or args.runs < 1 or not 0 < args.share <= 1:
        parser.error("--rounds must be at least 2, --runs at least 1, --share in (0, 1]")

    load_before = os.getloadavg()[0]
    rows = []
    for n in args.clients:
        runs = []
        for _ in range(args.runs):
            cmd = [sys.executable, __file__, "--child", str(n), "--share", str(args.share), "--rounds", str(args.rounds),
                   "--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--seed", str(args.seed)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        row = {
            "clients": n, "per_round": runs[0]["per_round"], "params": runs[0]["params"],
            "s_per_round": statistics.median(r["s_per_round"] for r in runs),
            "build_s": statistics.median(r["build_s"] for r in runs),
            "cpu_s_per_round": statistics.median(r["cpu_s_per_round"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "baseline_rss_mb": statistics.median(r["baseline_rss_mb"] for r in runs),
            "train_samples": runs[0]["train_samples"], "accuracy": [r["accuracy"] for r in runs], "runs": runs,
        }
        row["aim_met"] = row["peak_rss_mb"] < AIM_MB
        rows.append(row)
        print(f"{n:>7,} clients, {row['per_round']:,} a round: {row['s_per_round']:.2f} s a round ({row['cpu_s_per_round']:.2f} CPU s; median of {args.runs}), "
              f"build {row['build_s']:.2f} s, peak RSS {row['peak_rss_mb']:.0f} MB "
              f"(after imports {row['baseline_rss_mb']:.0f} MB)", flush=True)
    load_after = os.getloadavg()[0]
    print(json.dumps({
        "benchmark": "scale", "date": dt.date.today().isoformat(), "model": args.model, "steps": args.steps,
        "batch_size": args.batch_size, "rounds": args.rounds, "runs": args.runs, "aim_peak_rss_mb": AIM_MB,
        "rows": rows, "load_average": [load_before, load_after], "cores": os.cpu_count(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
