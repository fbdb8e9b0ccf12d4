#!/usr/bin/env bash
# FedTiny: progressive pruning within memory budgets (docs/benchmarks.md, "FedTiny: progressive pruning within memory
# budgets"): fedtiny at density 0.5, 0.2 and 0.1 against FedAvg on the dense model and HideNseek at the same density
# (sparsity 0.5, 0.8, 0.9), and fedtiny at `density: 1` under a 40 kB device memory (the density the memory allows),
# on the quickstart (examples/quickstart.yaml: digits, MLP 64, 20 clients, Dirichlet 0.5, 10 a round, SGD lr 0.05,
# one local epoch), 40 rounds, seeds 0-2: final accuracy, simulated time, bytes and FLOPs (the table: benchmarks/pruning.sh's).
# Usage: benchmarks/fedtiny.sh [OUT]   (default results/fedtiny)
set -euo pipefail
out=${1:-results/fedtiny}
hetfl=${HETFL:-.venv/bin/hetfl}
common=(--seeds 0,1,2 --quiet --overwrite)
"$hetfl" compare examples/quickstart.yaml --algorithms fedavg "${common[@]}" --out "$out/fedavg"
for d in 0.5 0.2 0.1; do
    s=$(python3 -c "print(round(1 - $d, 1))")
    "$hetfl" compare examples/quickstart.yaml --algorithms hidenseek "${common[@]}" --out "$out/hidenseek-$s" \
        --set strategy.name=hidenseek --set strategy.params.sparsity=$s
    "$hetfl" compare examples/quickstart.yaml --algorithms fedtiny "${common[@]}" --out "$out/fedtiny-$d" \
        --set strategy.name=fedtiny --set strategy.params.density=$d
done
"$hetfl" compare examples/quickstart.yaml --algorithms fedtiny "${common[@]}" --out "$out/fedtiny-memory-40kB" \
    --set strategy.name=fedtiny --set strategy.params.density=1 --set devices.memory.limit=40e3
"${PYTHON:-.venv/bin/python}" - "$out" <<'PY'
import json, sys
from pathlib import Path
from hetfl.results.seeds import format_spread, mean_std_ci
print("| run | final acc | sim s | MB down | MB up | GFLOP trained | density | wall s a run |")
print("|---|---|---|---|---|---|---|---|")
for setting in sorted(Path(sys.argv[1]).iterdir()):
    for entry in json.loads((setting / "comparison.json").read_text()):
        lasts = [json.loads((setting / f / "metrics.jsonl").read_text().splitlines()[-1]) for f in entry["folders"]]
        cell = lambda key, scale, fmt: (format_spread(mean_std_ci([r[key] / scale for r in lasts]), fmt.format)
                                        if key in lasts[0] else "—")  # fedtiny_density: fedtiny's runs only
        print(f"| {setting.name} | {cell('accuracy', 1, '{:.3f}')} | {cell('sim_time_s', 1, '{:.1f}')} | "
              f"{cell('bytes_down', 1e6, '{:.2f}')} | {cell('bytes_up', 1e6, '{:.3f}')} | "
              f"{cell('train_flops', 1e9, '{:.2f}')} | {cell('fedtiny_density', 1, '{:.3f}')} | "
              f"{cell('wall_time_s', 1, '{:.0f}')} |")
PY
