#!/usr/bin/env bash
# Pruning for weak devices (docs/benchmarks.md, "Pruning for weak devices"): HideNseek at sparsity 0.5, 0.8 and 0.9
# against FedAvg on the dense model, the quickstart (examples/quickstart.yaml: digits, MLP 64, 20 clients, Dirichlet
# 0.5, 10 a round, SGD lr 0.05, one local epoch), 40 rounds, seeds 0-2: final accuracy against the simulated time,
# the bytes moved and the FLOPs trained (HideNseek is charged its sparse model and one bit per kept weight).
# Usage: benchmarks/pruning.sh [OUT]   (default results/pruning)
set -euo pipefail
out=${1:-results/pruning}
hetfl=${HETFL:-.venv/bin/hetfl}
common=(--seeds 0,1,2 --quiet --overwrite)
"$hetfl" compare examples/quickstart.yaml --algorithms fedavg "${common[@]}" --out "$out/fedavg"
for s in 0.5 0.8 0.9; do
    "$hetfl" compare examples/quickstart.yaml --algorithms hidenseek "${common[@]}" --out "$out/hidenseek-$s" \
        --set strategy.name=hidenseek --set strategy.params.sparsity=$s
done
"${PYTHON:-.venv/bin/python}" - "$out" <<'PY'
import json, sys
from pathlib import Path
from hetfl.results.seeds import format_spread, mean_std_ci
print("| run | final acc | sim s | MB down | MB up | GFLOP trained | wall s a run |")
print("|---|---|---|---|---|---|---|")
for setting in sorted(Path(sys.argv[1]).iterdir()):
    for entry in json.loads((setting / "comparison.json").read_text()):
        lasts = [json.loads((setting / f / "metrics.jsonl").read_text().splitlines()[-1]) for f in entry["folders"]]
        cell = lambda key, scale, fmt: format_spread(mean_std_ci([r[key] / scale for r in lasts]), fmt.format)
        print(f"| {setting.name} | {cell('accuracy', 1, '{:.3f}')} | {cell('sim_time_s', 1, '{:.1f}')} | "
              f"{cell('bytes_down', 1e6, '{:.2f}')} | {cell('bytes_up', 1e6, '{:.3f}')} | "
              f"{cell('train_flops', 1e9, '{:.1f}')} | {cell('wall_time_s', 1, '{:.0f}')} |")
PY
