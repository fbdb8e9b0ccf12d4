#!/usr/bin/env bash
# The server's own cost changes a ranking (docs/benchmarks.md, "The server's cost"): FedAvg against FedBuff on the
# cross-silo federation (10 clients, Pareto speeds, Dirichlet 0.1), time to 0.90 within 150 simulated seconds,
# seeds 0-2, with a free server (hetfl's default), with a server whose link is 0.25 Mbit/s each way, serving one
# download at a time (FedBuff moves about 19x FedAvg's bytes), and with a server that computes at 1e7 FLOP/s, the
# median client's speed (the config evaluates after every aggregation: FedBuff aggregates about 30x as often).
# Usage: benchmarks/server_cost.sh [OUT]   (default results/server_cost)
set -euo pipefail
out=${1:-results/server_cost}
hetfl=${HETFL:-.venv/bin/hetfl}
common=(--algorithms fedavg,fedbuff --seeds 0,1,2 --quiet --overwrite
        --set max_sim_time_s=150 --set evaluation.target_accuracy=0.9)
"$hetfl" compare examples/cross_silo_devices.yaml "${common[@]}" --out "$out/free"
"$hetfl" compare examples/cross_silo_devices.yaml "${common[@]}" --out "$out/link" \
    --set server.up_mbps=0.25 --set server.down_mbps=0.25 --set server.concurrency=1
"$hetfl" compare examples/cross_silo_devices.yaml "${common[@]}" --out "$out/compute" --set server.flops=1e7
"${PYTHON:-.venv/bin/python}" - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
for setting in ("free", "link", "compute"):
    for entry in json.loads((Path(sys.argv[1]) / setting / "comparison.json").read_text()):
        times, finals, busy = [], [], []
        for folder in entry["folders"]:
            run = Path(sys.argv[1]) / setting / folder
            summary = json.loads((run / "summary.json").read_text())
            times.append(summary.get("time_to_target_s"))
            last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
            busy.append(last["server_busy_s"] / summary["sim_time_s"])
            finals.append(summary["final_accuracy"])
        reached = [t for t in times if t is not None]
        shown = [f"{t:.1f}" if t is not None else "-" for t in times]
        mean = f"{statistics.mean(reached):.1f} ± {statistics.stdev(reached):.1f}" if len(reached) > 1 else "-"
        print(f"{setting:5s} {entry['algorithm']:8s} time to 0.90 (s) {shown} mean {mean}, reached {len(reached)}/3; "
              f"final acc {statistics.mean(finals):.3f} ± {statistics.stdev(finals):.3f}; server busy {statistics.mean(busy):.0%}")
PY
