"""What hierarchical aggregation (``aggregation.hierarchy``, LIFL arXiv:2405.10968) saves the server, per round.

    .venv/bin/python benchmarks/hierarchy.py [--clients 1000 100000] [--fan-ins 0 32 316] [--seeds 0 1 2]
                                             [--model logreg]

One FedAvg round of ``--clients`` synthetic clients, every one of them in the round (``clients_per_round`` =
clients), 1 local SGD step of logistic regression (610 parameters, 2,440 bytes a model: small so that 100,000
updates fit in memory; what the server saves grows with the model, see the docs), flat (fan-in 0) and with leaf
aggregators of each ``--fan-ins``, for each seed (the devices' draws and jitter change with it). Simulator only
(``Federation.simulator``; no evaluation, no run folder), so the round is exactly dispatch to commit.

The root (``server:``) and each leaf are one aggregation core: 2e9 FLOP/s (a weighted add moves about 12 bytes per
2 FLOPs, so one core's ~12 GB/s of memory bandwidth) and 10 Gbit/s links; the root serves 100 downloads (and receives
100 uploads) at once, 100 Mbit/s each. Leaves sit next to the root (LIFL's locality): their forwards are capped by
the root's share of its link.

Per configuration and seed:

``round_s``
    simulated seconds from the dispatch to the moment the new model is ready (the commit, plus the root's
    aggregation work still running then: ``ServerTime.free_at``);
``root_busy_s``, ``root_bytes_in``
    the root's aggregation seconds, and the bytes it received (the clients' uploads flat, the leaves' forwards
    with a hierarchy);
``root_link_s``
    ``root_bytes_in`` over the root's 10 Gbit/s, a derived number: the simulator caps each upload at its share of
    the root's link but does not queue uploads, so this is the least time the link needs to take them in;
``leaves_peak``, ``leaf_busy_s``
    the most leaves open at once, and their aggregation seconds together;
``wall_s``
    wall seconds of the simulation (training included); at the largest ``--clients``, the median over the seeds
    per fan-in and its ratio to the first fan-in's (flat), all in this one process, run interleaved.

The last line of the output is one JSON object. This is a benchmark, not a test: nothing asserts a time.

Row for benchmarks/README.md:
| `hierarchy.py` | one FedAvg round of 1,000 and 100,000 clients, flat vs leaf aggregators of several fan-ins: round
time, the root's busy seconds and received bytes; 3 seeds |
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from typing import Any

ROOT = {"flops": 2e9, "up_mbps": 10_000.0, "down_mbps": 10_000.0, "concurrency": 100}
LEAF = {"flops": 2e9, "up_mbps": 10_000.0, "down_mbps": 10_000.0}


def config(n: int, fan_in: int, seed: int, model: str = "logreg") -> Any:
    from hetfl.config import validate

    return validate({
        "name": f"hierarchy-{n}-{fan_in}", "seed": seed, "rounds": 1,
        "data": {"dataset": "synthetic", "n_clients": n,
                 "synthetic": {"size_mean_log": 2.0, "size_sigma_log": 0.5, "min_size": 10, "max_size": 40}},
        "devices": {"compute": {"distribution": "lognormal"}, "availability": {"kind": "always"}},
        "model": {"name": "logreg"} if model == "logreg" else {"name": "mlp", "hidden": [int(model.split("-")[1])]},
        "training": {"optimizer": "sgd", "lr": 0.05, "batch_size": 16, "local_steps": 1},
        "strategy": {"name": "fedavg", "clients_per_round": n},
        "server": ROOT,
        "aggregation": {"hierarchy": {"fan_in": fan_in, **LEAF} if fan_in else {}},
    })


def one_round(fed: Any, cfg: Any) -> dict[str, Any]:
    """One round of ``cfg`` on the federation ``fed`` (built once per seed: the configurations differ only in
    ``aggregation``, which the federation does not read)."""
    from hetfl.engine.hierarchy import Hierarchy

    fed.config = cfg
    sim = fed.simulator()
    if cfg.aggregation.hierarchy.fan_in is None:
        assert sim.state.hierarchy is None
    else:
        assert isinstance(sim.state.hierarchy, Hierarchy)
    sim.on_commit = lambda s: s.stop("one round")
    t0 = time.perf_counter()
    while sim.step():
        pass
    wall = time.perf_counter() - t0
    metrics = sim.engine_metrics()
    root_in = metrics.get("root_bytes_in", sim.counters.bytes_up)
    row = {
        "round_s": sim.server_time.work(sim.now, 0.0), "root_busy_s": metrics["server_busy_s"],
        "root_bytes_in": root_in, "root_link_s": root_in / (ROOT["down_mbps"] * 1e6 / 8),
        "leaves_peak": metrics.get("leaves_peak", 0), "leaf_busy_s": metrics.get("leaf_busy_s", 0.0),
        "updates": sim.counters.updates, "wall_s": wall,
    }
    sim.close()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", nargs="+", type=int, default=[1000, 100_000])
    parser.add_argument("--fan-ins", nargs="+", type=int, default=[0, 32, 316], help="0: flat (default 0 32 316)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--model", default="logreg", help="logreg or mlp-W (one hidden layer of W; default logreg)")
    args = parser.parse_args(argv)
    from hetfl.engine.run import build_federation

    load_before = os.getloadavg()[0]
    rows = []
    for n in args.clients:
        for seed in args.seeds:
            fed = build_federation(config(n, 0, seed, args.model))
            for fan_in in args.fan_ins:
                r = one_round(fed, config(n, fan_in, seed, args.model))
                rows.append({"clients": n, "fan_in": fan_in, "seed": seed, **r})
                print(f"{n:>7,} clients, fan-in {fan_in or 'flat':>4}, seed {seed}: round {r['round_s']:.4f} s, "
                      f"root busy {r['root_busy_s']:.4f} s, root in {r['root_bytes_in'] / 1e6:.2f} MB, "
                      f"leaves {r['leaves_peak']}, wall {r['wall_s']:.1f} s", flush=True)
    n = max(args.clients)  # the simulator's wall seconds, per fan-in: median over the seeds, and the ratio to flat
    walls = {f: statistics.median(r["wall_s"] for r in rows if r["clients"] == n and r["fan_in"] == f)
             for f in args.fan_ins}
    wall = {f: {"median_s": w, "ratio_to_first": w / walls[args.fan_ins[0]]} for f, w in walls.items()}
    for f, w in wall.items():
        print(f"wall at {n:,} clients, fan-in {f or 'flat'}: median {w['median_s']:.1f} s, x{w['ratio_to_first']:.3f}")
    print(json.dumps({
        "benchmark": "hierarchy", "model": args.model, "params": fed.trainer.numel,
        "date": dt.date.today().isoformat(), "root": ROOT, "leaf": LEAF, "rows": rows,
        "wall": wall, "load_average": [load_before, os.getloadavg()[0]], "cores": os.cpu_count(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
