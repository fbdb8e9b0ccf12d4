#!/usr/bin/env bash
# FedAvg (one local epoch of batch 16) against FedSGD (one full-batch gradient step a round) on the quickstart:
# rounds to 0.90 test accuracy, each at learning rates 0.05, 0.2, 0.5, seeds 0-2 (docs/reproductions.md, FedAvg row).
# Usage: benchmarks/fedsgd_rounds.sh [OUT]   (default results/repro-fedsgd)
set -euo pipefail
out=${1:-results/repro-fedsgd}
hetfl=${HETFL:-.venv/bin/hetfl}
for lr in 0.05 0.2 0.5; do
  "$hetfl" compare examples/quickstart.yaml --algorithms fedavg --seeds 0,1,2 --quiet --overwrite \
      --set training.lr=$lr --set rounds=100 --out "$out/fedavg-lr$lr"
  "$hetfl" compare examples/quickstart.yaml --algorithms fedavg --seeds 0,1,2 --quiet --overwrite \
      --set training.lr=$lr --set rounds=400 --set training.local_steps=1 --set training.batch_size=100000 \
      --out "$out/fedsgd-lr$lr"
done
"${PYTHON:-.venv/bin/python}" - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
for run in sorted(Path(sys.argv[1]).iterdir()):
    rounds, final = [], []
    for s in sorted(run.glob("**/summary.json")):
        d = json.loads(s.read_text())
        rounds.append(d.get("rounds_to_target")); final.append(d["final_accuracy"])
    reached = [r for r in rounds if r is not None]
    mean = f"{statistics.mean(reached):.1f} ± {statistics.stdev(reached):.1f}" if len(reached) > 1 else str(reached)
    print(f"{run.name:16s} rounds to 0.90 {rounds} (mean {mean}); final acc {statistics.mean(final):.3f} ± {statistics.stdev(final):.3f}")
PY
