"""The Ray backend on 1 against 2 worker nodes: wall time of the same CPU-heavy run, and the speed-up.

    PYTHONPATH=src .venv/bin/python benchmarks/ray_nodes.py [--repeats 3] [--rounds 2]

Each cluster is a head with no CPUs and ``n`` worker nodes of 1 CPU each, separate ``ray start`` processes
(``tests/ray_cluster.py``: in network namespaces where the machine allows it, else on loopback). The workload:
digits, 20 clients, FedAvg with 8 clients a round, an MLP of two 1,024-unit layers (1.1M parameters), 40 local
steps of batch 64, one torch thread a task, ``training.vectorize: off`` (a model this size is not batched under
``auto``): training dominates. Only the event loop is timed (``while sim.step()``); the cluster start and one
warm-up run (the workers import torch and hetfl) are not. ``--repeats`` runs per cluster size; medians, and the
speed-up of 2 nodes over 1 measured in the same invocation. Every run's final model is checked equal to the
first one's (the cluster size changes no result). On a machine of 2 cores the ceiling is 2x, less what the
driver and the Ray daemons use; other processes on the machine lower it further. Nothing here asserts a time.
The last line of the output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ray_cluster import LocalCluster, driver_env  # noqa: E402

from hetfl.config import validate  # noqa: E402
from hetfl.engine.run import build_federation  # noqa: E402

CONFIG = {
    "seed": 0,
    "threads": 1,
    "data": {"dataset": "digits", "n_clients": 20, "partition": {"kind": "iid"}},
    "model": {"name": "mlp", "hidden": [1024, 1024]},
    "training": {"lr": 0.05, "batch_size": 64, "local_steps": 40, "vectorize": "off"},
    "strategy": {"name": "fedavg", "clients_per_round": 8},
}


def run_loop(address: str, rounds: int) -> tuple[float, torch.Tensor, int]:
    cfg = validate({**CONFIG, "rounds": rounds, "backend": {"name": "ray", "address": address}})
    fed = build_federation(cfg)

    def stop(sim):
        if sim.version >= rounds:
            sim.stop("rounds")

    sim = fed.simulator(on_commit=stop)
    try:
        start = time.perf_counter()
        sim.proceed()
        while sim.step():
            pass
        elapsed = time.perf_counter() - start
    finally:
        sim.close()
    return elapsed, sim.params, len(sim.backend.nodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import ray

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"ray {ray.__version__}, load average {os.getloadavg()[0]:.1f}")
    out: dict = {"nodes": {}}
    first = None
    for n in (1, 2):
        with LocalCluster(workers=n, cpus=1) as cluster, driver_env(cluster):
            ray.init(address=cluster.address, logging_level=logging.WARNING)
            try:
                cluster.wait_for_nodes(ray)
                run_loop(cluster.address, 1)  # warm-up
                times = []
                for _ in range(args.repeats):
                    seconds, params, used = run_loop(cluster.address, args.rounds)
                    times.append(seconds)
                    first = params if first is None else first
                    assert torch.equal(params, first), "a run's model differs from the first one's"
            finally:
                ray.shutdown()
        out["network"] = cluster.network
        out["nodes"][n] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                           "nodes_used": used}
        print(f"{n} worker node(s) ({cluster.network}): median {statistics.median(times):.2f} s "
              f"(min {min(times):.2f}, max {max(times):.2f}) over {args.repeats} runs; tasks ran on {used} node(s)")
    out["speedup"] = out["nodes"][1]["median_s"] / out["nodes"][2]["median_s"]
    out["load_average_end"] = os.getloadavg()[0]
    print(f"speed-up of 2 worker nodes over 1: {out['speedup']:.2f}x (every run's model equal: True)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
