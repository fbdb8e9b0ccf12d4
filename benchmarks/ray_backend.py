"""The in-process and Ray backends on one machine: wall time of the same run, as a ratio.

    .venv/bin/python benchmarks/ray_backend.py [--workloads light heavy] [--repeats 3] [--workers 2]

Two workloads on digits with 100 clients and FedAvg (20 clients a round, every task arriving):

``light``
    The quickstart's MLP (64 hidden units, 4.8k parameters), 10 local steps of batch 16: a task trains in a
    few milliseconds, so what a backend adds per task decides.
``heavy``
    An MLP of two 1,024-unit layers (1.1M parameters), 20 local steps of batch 64: a task trains for a
    sizeable fraction of a second, so the training itself decides.

Each is run with ``backend: inprocess`` (``training.vectorize`` off, and for ``light`` auto, the default,
which batches its 20 tasks a round; it leaves the heavy model unbatched) and with
``backend: ray`` on a local Ray of ``--workers`` CPUs, every backend with 1 torch thread a task
(``threads: 1``). Only the event loop is timed (``while sim.step()``, as ``benchmarks/overhead.py`` does):
the federation and the simulator are built untimed, and the Ray cluster is started once, with its
workers warmed by one untimed run; that one-off cost is reported on its own. ``--repeats`` repeats, the
backends in a rotated order; medians, and each backend's median over the in-process (vectorize off) one.

A shared machine may have no core to spare: the script first measures the *parallel headroom*, ``workers``
times the seconds of a fixed single-threaded matrix-multiply task run alone on a worker over the seconds of
the same task run on every worker at once (2.0 on an idle 2-core machine, 1.0 when other processes already
keep both cores busy). A backend with ``workers`` workers cannot gain more than that over one process.

Each run's final model is compared with the in-process run's: the Ray backend trains each task as the
in-process path does (``vectorize: off``), so they must be equal bit for bit; vectorised training equals
them within 1e-5. Also printed: the bytes a Ray run ships once (the client side: strategy as built, trainers,
data) and a strategy's pickled size after the run (FedStale, whose server keeps a model per client), which
is what shipping the live strategy to the workers would cost. The last line of the output is one JSON object.
This is a benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import platform
import statistics
import time
from typing import Any

import torch

from hetfl.config import ExperimentConfig, validate
from hetfl.engine.backends import ClientSide
from hetfl.engine.run import build_federation

BASE: dict[str, Any] = {
    "seed": 0,
    "threads": 1,
    "data": {"dataset": "digits", "n_clients": 100, "partition": {"kind": "dirichlet", "alpha": 0.5}},
    "devices": {"compute": {"distribution": "lognormal", "median_flops": 2.0e8, "sigma": 0.8}},
    "strategy": {"name": "fedavg", "clients_per_round": 20},
}
WORKLOADS: dict[str, dict[str, Any]] = {
    "light": {"rounds": 10, "model": {"name": "mlp", "hidden": [64]},
              "training": {"lr": 0.05, "batch_size": 16, "local_steps": 10}},
    "heavy": {"rounds": 2, "model": {"name": "mlp", "hidden": [1024, 1024]},
              "training": {"lr": 0.05, "batch_size": 64, "local_steps": 20}},
}
BACKENDS = {  # label -> config changes
    "inprocess (vectorize off)": {"backend": {"name": "inprocess"}, "vectorize": "off"},
    "inprocess (vectorize auto)": {"backend": {"name": "inprocess"}, "vectorize": "auto"},
    "ray": {"backend": {"name": "ray"}, "vectorize": "off"},
}


def config(workload: str, backend: str) -> ExperimentConfig:
    raw = json.loads(json.dumps({**BASE, **WORKLOADS[workload], "name": f"{workload}-{backend}"}))
    change = BACKENDS[backend]
    raw["backend"] = change["backend"]
    raw["training"]["vectorize"] = change["vectorize"]
    return validate(raw)


def run_loop(cfg: ExperimentConfig) -> tuple[float, torch.Tensor, int, int, float]:
    """Wall seconds of the event loop for ``cfg.rounds`` aggregations; the final model, tasks arrived, bytes shipped
    once, and the seconds Ray workers spent in client halves (0 in-process)."""
    fed = build_federation(cfg)

    def stop(sim):
        if sim.version >= cfg.rounds:
            sim.stop("rounds")

    sim = fed.simulator(on_commit=stop)
    shipped = len(pickle.dumps(ClientSide.of(sim, cfg.threads))) if cfg.backend.name == "ray" else 0
    try:
        start = time.perf_counter()
        sim.proceed()
        while sim.step():
            pass
        elapsed = time.perf_counter() - start
    finally:
        sim.close()
    return elapsed, sim.params, sim.counters.arrived, shipped, getattr(sim.backend, "worker_seconds", 0.0)


def strategy_sizes(workload: str) -> dict[str, int]:
    """Pickled bytes of FedStale as built and after the workload's rounds (its server memory grows per client)."""
    cfg = config(workload, "inprocess (vectorize off)")
    cfg.strategy.name = "fedstale"
    fed = build_federation(cfg)
    strategy = fed.strategy()
    built = len(pickle.dumps(strategy))

    def stop(sim):
        if sim.version >= cfg.rounds:
            sim.stop("rounds")

    sim = fed.simulator(strategy, on_commit=stop)
    sim.proceed()
    while sim.step():
        pass
    sim.close()
    return {"fedstale_as_built_bytes": built, "fedstale_after_run_bytes": len(pickle.dumps(sim.state.strategy))}


def _matmuls(n: int = 300) -> float:
    """Fixed CPU work, one thread: seconds it took."""
    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024), torch.randn(64, 1024)
    start = time.perf_counter()
    for _ in range(n):
        b @ a
    return time.perf_counter() - start


def headroom(ray: Any, workers: int) -> float:
    """How many workers' worth of CPU the machine gives right now: ``workers`` times the seconds of one task of
    fixed work run alone, over the seconds of the same task run on every worker at once (``workers`` on an idle
    machine, 1 when other processes already use every core)."""
    remote = ray.remote(num_cpus=1)(_matmuls)
    ray.get(remote.remote(10))  # the workers are up
    alone = statistics.median(ray.get(remote.remote()) for _ in range(3))
    together = statistics.median(statistics.mean(ray.get([remote.remote() for _ in range(workers)])) for _ in range(3))
    return workers * alone / together


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray")
    args = parser.parse_args()

    import ray

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, logging_level=logging.WARNING)
    init_s = time.perf_counter() - t0
    torch.set_num_threads(1)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"ray {ray.__version__}, load average {os.getloadavg()[0]:.1f}")
    print(f"ray.init: {init_s:.1f} s")
    room = headroom(ray, args.workers)
    print(f"parallel headroom: {room:.2f} of {args.workers} workers' CPU (the most a backend with "
          f"{args.workers} workers can gain over one process)")
    out: dict[str, Any] = {"ray_init_s": init_s, "workers": args.workers, "headroom": room, "workloads": {}}
    for workload in args.workloads:
        t0 = time.perf_counter()
        run_loop(config(workload, "ray"))  # warm-up: the workers import torch and hetfl, unpack the client side
        warm = time.perf_counter() - t0
        times: dict[str, list[float]] = {b: [] for b in BACKENDS}
        finals: dict[str, torch.Tensor] = {}
        arrived, shipped, busy = 0, 0, []
        labels = [b for b in BACKENDS if b != "inprocess (vectorize auto)" or workload == "light"]
        times = {b: times[b] for b in labels}  # heavy: auto would not batch a 1.1M-parameter model (off = auto)
        for r in range(args.repeats):
            for backend in labels[r % len(labels):] + labels[: r % len(labels)]:
                seconds, params, arrived, size, worker_s = run_loop(config(workload, backend))
                times[backend].append(seconds)
                if backend == "ray":
                    busy.append((worker_s, seconds))
                finals[backend] = params
                shipped = max(shipped, size)
        base = statistics.median(times["inprocess (vectorize off)"])
        exact = torch.equal(finals["ray"], finals["inprocess (vectorize off)"])
        auto = finals.get("inprocess (vectorize auto)", finals["inprocess (vectorize off)"])
        vec_diff = float((auto - finals["inprocess (vectorize off)"]).abs().max())
        print(f"\n{workload}: {arrived} tasks; first Ray run (workers starting) {warm:.1f} s; "
              f"client side shipped once: {shipped / 1e3:.0f} kB")
        print(f"{'backend':<28} {'median s':>9} {'min':>7} {'max':>7} {'ms/task':>8} {'vs inprocess off':>17}")
        rows = {}
        for backend, ts in times.items():
            med = statistics.median(ts)
            rows[backend] = {"median_s": med, "min_s": min(ts), "max_s": max(ts), "ratio": med / base}
            print(f"{backend:<28} {med:9.2f} {min(ts):7.2f} {max(ts):7.2f} {1e3 * med / arrived:8.1f} {med / base:16.2f}x")
        worker_s, ray_s = map(statistics.median, zip(*busy))
        print(f"ray workers: {1e3 * worker_s / arrived:.1f} ms a task inside client_train (in-process: "
              f"{1e3 * base / arrived:.1f} ms a task, loop included), {worker_s / ray_s:.2f} workers busy on average")
        print(f"ray result equals in-process bit for bit: {exact}; vectorised differs by at most {vec_diff:.1e}")
        out["workloads"][workload] = {"tasks": arrived, "first_ray_run_s": warm, "client_side_bytes": shipped,
                                      "ray_worker_ms_per_task": 1e3 * worker_s / arrived, "ray_busy_workers": worker_s / ray_s,
                                      "ray_equal_bitwise": exact, "vectorized_max_diff": vec_diff, "backends": rows}
    sizes = strategy_sizes(args.workloads[0])
    print(f"\nFedStale pickled: {sizes['fedstale_as_built_bytes'] / 1e3:.1f} kB as built (what workers get), "
          f"{sizes['fedstale_after_run_bytes'] / 1e3:.1f} kB after the run")
    out.update(sizes)
    ray.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
