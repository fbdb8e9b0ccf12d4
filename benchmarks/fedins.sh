#!/usr/bin/env bash
# FedIns (arXiv:2308.06051) where its paper claims a gain, intra-client heterogeneity: the quickstart (digits, MLP 64,
# 20 clients, 10 a round, 40 rounds) with IID labels and every sample rotated by one of 0, 90, 180, 270 degrees
# drawn per sample (data.feature_skew.per: sample), so each client mixes four feature distributions.
# FedIns: 20 FedAvg warm-up rounds (the backbone's pretraining), then 20 SSF rounds at ssf_lr 0.5, pool 4, top 1;
# beside FedAvg and FedAvg + fine-tuning (40 rounds each), and FedIns with a pool of 1 (one SSF for all instances:
# the paper's "federated SSF", the ablation of instance adaptivity). Seeds 0-2 (docs/reproductions.md, FedIns row).
# Usage: benchmarks/fedins.sh [OUT]   (default results/repro-fedins)
set -euo pipefail
out=${1:-results/repro-fedins}
hetfl=${HETFL:-.venv/bin/hetfl}
skew=(--set data.partition.kind=iid --set data.feature_skew.kind=rotation --set data.feature_skew.strength=270
      --set data.feature_skew.groups=4 --set data.feature_skew.per=sample
      --set strategy.per_algorithm.fedins.warmup_rounds=20 --set strategy.per_algorithm.fedins.ssf_lr=0.5)
"$hetfl" compare examples/quickstart.yaml --algorithms fedavg,fedavg_ft,fedins --seeds 0,1,2 --quiet --overwrite \
    "${skew[@]}" --out "$out/main"
"$hetfl" compare examples/quickstart.yaml --algorithms fedins --seeds 0,1,2 --quiet --overwrite \
    "${skew[@]}" --set strategy.per_algorithm.fedins.pool_size=1 --out "$out/pool1"
"${PYTHON:-.venv/bin/python}" - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
for part in ("main", "pool1"):
    for group in json.loads((Path(sys.argv[1]) / part / "comparison.json").read_text()):
        algo, runs = group["algorithm"], group["runs"]
        cells = []
        for key in ("final_accuracy", "client_acc_mean", "personal_acc_mean"):
            xs = [r[key] for r in runs if r[key] is not None]
            if xs:
                cells.append(f"{key} {statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f} {[round(x, 3) for x in xs]}")
        print(f"{part:5s} {algo:9s} " + "; ".join(cells))
PY
