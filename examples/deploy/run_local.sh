#!/usr/bin/env bash
# One server and its clients on this machine (loopback), for a first try of hetfl server / hetfl client.
#
#   examples/deploy/run_local.sh [COMPRESSION] [CONFIG] [--set KEY=VALUE ...]   COMPRESSION: none (default), float16, topk
#
# Exports the config's partition, makes tokens, starts the server and one client per data.n_clients,
# waits for the run to end and prints the summary's bytes and accuracy. Further arguments go to the server
# (e.g. --set deploy.topk_ratio=0.1). Work files go to $WORK (default results/deploy-local-COMPRESSION/).
set -euo pipefail
COMPRESSION=${1:-none}
CONFIG=${2:-$(dirname "$0")/digits.yaml}
HETFL=${HETFL:-hetfl}
PY=${PYTHON:-python3}
WORK=${WORK:-results/deploy-local-$COMPRESSION}
PORT=${PORT:-50051}
mkdir -p "$WORK"
N=$($PY -c "import sys; from hetfl.config import load_config; print(load_config(sys.argv[1]).data.n_clients)" "$CONFIG")
$HETFL partition "$CONFIG" --export "$WORK/parts"
$HETFL tokens "$N" --out "$WORK/tokens.yaml" --force --samples-from "$WORK/parts"
$PY - "$WORK" <<'PYEOF'
import sys, yaml, pathlib
work = pathlib.Path(sys.argv[1])
for token, client in yaml.safe_load((work / "tokens.yaml").read_text())["tokens"].items():
    (work / f"token_{client}").write_text(token + "\n")
PYEOF
$HETFL server "$CONFIG" --address "127.0.0.1:$PORT" --out "$WORK/run" --tokens "$WORK/tokens.yaml" --fresh \
    --set deploy.compression="$COMPRESSION" "${@:3}" 2> "$WORK/server.log" &
SERVER=$!
trap 'kill $SERVER ${CLIENTS:-} 2>/dev/null || true' EXIT
CLIENTS=""
for ((i = 0; i < N; i++)); do
    $HETFL client --server "127.0.0.1:$PORT" --token-file "$WORK/token_$i" --data "$WORK/parts/client_$i.npz" \
        2> "$WORK/client_$i.log" &
    CLIENTS="$CLIENTS $!"
done
wait $SERVER
$PY - "$WORK/run/summary.json" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"{s['algorithm']}: accuracy {s['final_accuracy']:.4f} after {s['rounds']} rounds; "
      f"bytes up {s['bytes_up']:,}, down {s['bytes_down']:,}")
PYEOF
