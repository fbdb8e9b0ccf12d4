#!/usr/bin/env bash
# Tuned comparison (docs/benchmarks.md, "Tuned comparison"): FedAvg, FedAsync, FedBuff and FedCompass on
# examples/heterogeneous_devices.yaml, each tuned with the same budget (2 x 2 settings x 3 seeds = 12 runs), scored
# on a validation split (20% of each client's training samples), then compared at the chosen settings on the test
# split with 3 fresh seeds. The simulated-time budget is cut from 300 s to 40 s (and evaluation.every set to 5) so
# that the 60 runs fit on a small machine: same --set for the sweeps and the comparison (hetfl compare --tuned
# refuses another config).
#
#   bash benchmarks/tuned_comparison.sh [OUT] [JOBS]      (default results/tuned, 2 worker processes)
set -euo pipefail
OUT=${1:-results/tuned}
JOBS=${2:-2}
HETFL=${HETFL:-hetfl}
CONFIG=examples/heterogeneous_devices.yaml
SET=(--set max_sim_time_s=40 --set evaluation.every=5)
SWEEP=(--seeds 0,1,2 --out "$OUT/sweep" --jobs "$JOBS" --quiet --overwrite "${SET[@]}")
LR=training.lr=0.02,0.1
$HETFL sweep $CONFIG --algorithm fedavg     --grid $LR --grid strategy.clients_per_round=5,20 "${SWEEP[@]}"
$HETFL sweep $CONFIG --algorithm fedasync   --grid $LR --grid strategy.params.alpha=0.3,0.9 "${SWEEP[@]}"
$HETFL sweep $CONFIG --algorithm fedbuff    --grid $LR --grid strategy.params.buffer_size=5,20 "${SWEEP[@]}"
$HETFL sweep $CONFIG --algorithm fedcompass --grid $LR --grid strategy.params.q=0.1,0.4 "${SWEEP[@]}"
$HETFL compare $CONFIG --tuned "$OUT/sweep" --seeds 10,11,12 --out "$OUT/compare" --quiet --overwrite "${SET[@]}"
