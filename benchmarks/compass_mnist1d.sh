#!/usr/bin/env bash
# FedCompass on MNIST-1D with cross-silo speeds (docs/benchmarks.md, "FedCompass on MNIST-1D (cross-silo speeds)"):
# FedAvg, FedAsync, FedBuff and FedCompass on examples/mnist1d_cross_silo.yaml, each tuned with the same budget
# (2 x 2 settings: the learning rate and one key of its own, x SWEEP_SEEDS), scored on a validation split (20% of
# each client's training samples) by OBJECTIVE, then compared at the chosen settings on the test split with 5 fresh
# seeds. Two streams run at once (each: two sweeps, then the comparison of those two algorithms; `hetfl compare`
# has no --jobs), and `compass_mnist1d.py table` puts the two comparisons together and tests every algorithm
# against the best. The budget is cut from the example's 600 simulated s to 300 s (target 0.5) so that it fits a
# 2-core machine in about half an hour; the same --set for the sweeps and the comparisons.
#
#   bash benchmarks/compass_mnist1d.sh [OUT]      (default results/compass_m1d)
#   HETFL="python -m hetfl.cli" PYTHON=python SWEEP_SEEDS=0,1,2 OBJECTIVE=time_to_target bash benchmarks/compass_mnist1d.sh
set -euo pipefail
OUT=${1:-results/compass_m1d}
HETFL=${HETFL:-hetfl}
PYTHON=${PYTHON:-python}
SWEEP_SEEDS=${SWEEP_SEEDS:-0,1}
OBJECTIVE=${OBJECTIVE:-final_accuracy}
CONFIG=examples/mnist1d_cross_silo.yaml
SET=(--set max_sim_time_s=300 --set evaluation.target_accuracy=0.5)
LR=training.lr=0.003,0.01
declare -A OWN=(
  [fedavg]=training.local_steps=5,20
  [fedasync]=strategy.params.alpha=0.3,0.9
  [fedbuff]=strategy.params.buffer_size=2,5
  [fedcompass]=strategy.params.q=0.1,0.4
)
mkdir -p "$OUT"

stream() {  # two algorithms: sweep each, then compare them at their chosen settings
  local a=$1 b=$2
  for alg in "$a" "$b"; do
    $HETFL sweep $CONFIG --algorithm "$alg" --grid $LR --grid "${OWN[$alg]}" --seeds "$SWEEP_SEEDS" \
      --objective "$OBJECTIVE" --out "$OUT/sweep" --quiet --overwrite "${SET[@]}"
  done
  $HETFL compare $CONFIG --tuned "$OUT/sweep" --algorithms "$a,$b" --seeds 10,11,12,13,14 --out "$OUT/compare-$a" \
    --quiet --overwrite "${SET[@]}"
}

stream fedasync fedcompass > "$OUT/stream-1.log" 2>&1 &
stream fedbuff fedavg > "$OUT/stream-2.log" 2>&1 &
wait
$PYTHON benchmarks/compass_mnist1d.py table "$OUT/compare-fedasync" "$OUT/compare-fedbuff"
