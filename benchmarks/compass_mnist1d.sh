#!/usr/bin/env bash
# FedCompass on MNIST-1D with cross-silo speeds (docs/benchmarks.md, "FedCompass on MNIST-1D (cross-silo speeds)"):
# FedAvg, FedAsync, FedBuff and FedCompass on examples/mnist1d_cross_silo.yaml, each tuned with the same budget
# (2 x 2 settings: the learning rate and one key of its own, x 3 seeds = 12 runs), scored by the time to the target
# on a validation split (20% of each client's training samples), then compared at the chosen settings on the test
# split with 5 fresh seeds. The comparison runs as three `hetfl compare` processes at once (the command has no
# --jobs); `compass_mnist1d.py table` puts them together and tests every algorithm against the best.
#
#   bash benchmarks/compass_mnist1d.sh [OUT] [JOBS]      (default results/compass_m1d, 2 worker processes)
set -euo pipefail
OUT=${1:-results/compass_m1d}
JOBS=${2:-2}
HETFL=${HETFL:-hetfl}
PYTHON=${PYTHON:-python}
CONFIG=examples/mnist1d_cross_silo.yaml
SEEDS=10,11,12,13,14
SWEEP=(--seeds 0,1,2 --objective time_to_target --out "$OUT/sweep" --jobs "$JOBS" --quiet --overwrite)
LR=training.lr=0.003,0.01
$HETFL sweep $CONFIG --algorithm fedavg     --grid $LR --grid training.local_steps=5,20 "${SWEEP[@]}"
$HETFL sweep $CONFIG --algorithm fedasync   --grid $LR --grid strategy.params.alpha=0.3,0.9 "${SWEEP[@]}"
$HETFL sweep $CONFIG --algorithm fedbuff    --grid $LR --grid strategy.params.buffer_size=2,5 "${SWEEP[@]}"
$HETFL sweep $CONFIG --algorithm fedcompass --grid $LR --grid strategy.params.q=0.1,0.4 "${SWEEP[@]}"
COMPARE=(--tuned "$OUT/sweep" --seeds $SEEDS --quiet --overwrite)
$HETFL compare $CONFIG --algorithms fedavg,fedcompass --out "$OUT/compare-a" "${COMPARE[@]}" > "$OUT/compare-a.log" &
$HETFL compare $CONFIG --algorithms fedasync --out "$OUT/compare-b" "${COMPARE[@]}" > "$OUT/compare-b.log" &
$HETFL compare $CONFIG --algorithms fedbuff --out "$OUT/compare-c" "${COMPARE[@]}" > "$OUT/compare-c.log" &
wait
$PYTHON benchmarks/compass_mnist1d.py table "$OUT/compare-a" "$OUT/compare-b" "$OUT/compare-c"
