"""Hierarchical aggregation over gRPC: what two ``hetfl aggregator`` processes save the server, on loopback.

    .venv/bin/python benchmarks/aggregator_deploy.py                    # 8 clients, 10 rounds, 3 runs each
    .venv/bin/python benchmarks/aggregator_deploy.py --clients 16 --runs 3 --out /tmp/aggbench

Each run starts a real ``hetfl server`` and ``--clients`` ``hetfl client`` processes (digits, MLP [32], FedAvg with
every client in every round, 20 local steps), either flat (every client talks to the server) or through two
aggregators (half the clients each; ``--fan-in 0 --flush-s 5``: an aggregator forwards once all its relayed tasks of
a version are back). Runs alternate flat / hierarchy so that load on the machine falls on both alike.

What it reports (and writes to ``OUT/aggregator_deploy.json``), per layout, the median over runs of:

- ``uploads_received``: update messages the server received (clients' updates, or aggregates);
- ``bytes_up``: bytes of updates the server received;
- ``s_per_round``: wall seconds per aggregation from the first to the last (process start-up excluded);
- ``final_accuracy``, and whether the hierarchy's final model equals the flat one's (max abs difference).

A benchmark, not a test: nothing is asserted. docs/benchmarks.md ("Hierarchical aggregation over gRPC") quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HETFL = [sys.executable, "-m", "hetfl.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(root: Path, clients: int, rounds: int) -> Path:
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({
        "name": "aggregator-bench", "seed": 0, "rounds": rounds,
        "data": {"dataset": "digits", "n_clients": clients, "partition": {"kind": "iid"}},
        "model": {"name": "mlp", "hidden": [32]},
        "training": {"lr": 0.05, "batch_size": 16, "local_steps": 20},
        "strategy": {"name": "fedavg", "clients_per_round": clients},
        "deploy": {"heartbeat_timeout_s": 30, "poll_s": 2},
    }, sort_keys=False))
    subprocess.run([*HETFL, "partition", str(config), "--export", str(root / "parts")], check=True, capture_output=True)
    subprocess.run([*HETFL, "tokens", str(clients), "--out", str(root / "tokens.yaml"), "--samples-from",
                    str(root / "parts"), "--aggregators", "2"], check=True, capture_output=True)
    table = yaml.safe_load((root / "tokens.yaml").read_text())
    for token, client in table["tokens"].items():
        (root / f"token_{client}").write_text(token + "\n")
    for token, name in table["aggregators"].items():
        (root / f"token_{name}").write_text(token + "\n")
    return config


def one_run(root: Path, config: Path, clients: int, layout: str, k: int) -> dict:
    out = root / f"{layout}-{k}"
    port = free_port()
    procs, logs = [], root / f"{layout}-{k}-logs"
    logs.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(name: str, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen([*HETFL, *args], stdout=(logs / f"{name}.log").open("w"), stderr=subprocess.STDOUT, env=env)
        procs.append(proc)
        return proc

    server = start("server", "server", str(config), "--address", f"127.0.0.1:{port}", "--out", str(out),
                   "--tokens", str(root / "tokens.yaml"))
    targets = [port] * clients
    if layout == "hierarchy":
        ports = [free_port(), free_port()]
        for i, p in enumerate(ports):
            start(f"agg-{i}", "aggregator", "--parent", f"127.0.0.1:{port}", "--address", f"127.0.0.1:{p}",
                  "--token-file", str(root / f"token_agg-{i}"))
        targets = [ports[0] if c < clients // 2 else ports[1] for c in range(clients)]
    for c in range(clients):
        start(f"client-{c}", "client", "--server", f"127.0.0.1:{targets[c]}", "--token-file", str(root / f"token_{c}"),
              "--data", str(root / "parts" / f"client_{c}.npz"), "--threads", "1")
    try:
        server.wait(900)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((out / "summary.json").read_text())
    first, last = metrics[0], metrics[-1]
    return {
        "layout": layout, "run": k, "status": summary["status"], "rounds": last["round"],
        "uploads_received": last["uploads_received"], "bytes_up": last["bytes_up"],
        "updates": summary["updates"], "final_accuracy": summary["final_accuracy"],
        "s_per_round": (last["sim_time_s"] - first["sim_time_s"]) / max(last["round"] - first["round"], 1),
        "checkpoint": str(out / "checkpoint.pt"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="aggbench-"))
    root.mkdir(parents=True, exist_ok=True)
    config = prepare(root, args.clients, args.rounds)
    runs = []
    for k in range(args.runs):
        for layout in ("flat", "hierarchy"):
            started = time.monotonic()
            runs.append(one_run(root, config, args.clients, layout, k))
            print(json.dumps({**runs[-1], "wall_s": round(time.monotonic() - started, 1)}), flush=True)
    import torch

    flat_model = torch.load(runs[0]["checkpoint"], weights_only=False)["state"].params
    table = {}
    for layout in ("flat", "hierarchy"):
        mine = [r for r in runs if r["layout"] == layout]
        diff = max(float((torch.load(r["checkpoint"], weights_only=False)["state"].params - flat_model).abs().max())
                   for r in mine)
        table[layout] = {key: statistics.median(r[key] for r in mine)
                         for key in ("uploads_received", "bytes_up", "s_per_round", "final_accuracy")}
        table[layout]["s_per_round_all"] = [round(r["s_per_round"], 3) for r in mine]
        table[layout]["max_abs_diff_to_flat"] = diff
        table[layout]["completed"] = all(r["status"] == "completed" for r in mine)
    result = {"clients": args.clients, "rounds": args.rounds, "runs": args.runs, "table": table, "all": runs}
    (root / "aggregator_deploy.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
