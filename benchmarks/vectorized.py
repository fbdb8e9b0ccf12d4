"""Vectorised local training: client updates per second, K tasks at once, against training them one by one.

    .venv/bin/python benchmarks/vectorized.py [--models mlp-64 ...] [--clients 100 1000]
                                              [--dataset digits|synthetic]
                                              [--tasks 10 100 1000] [--threads 1 2]
                                              [--steps 10] [--batch-size 16] [--repeats 3]

For every model, federation size (``--clients``: ``data.n_clients`` of a digits federation with an
IID partition, built by ``build_federation`` from ``hetfl.config.validate``), number of tasks K
(``--tasks``) and torch thread count (``--threads``), two measurements in one process on the same K
tasks (task ``j`` trains client ``j mod n_clients`` for ``--steps`` local steps from the model's
initial parameters, batch seed ``j``; with K > n_clients a client has several tasks):

``sequential``
    ``LocalTrainer.train`` in a loop over the K tasks, as the simulator trains them.
``vectorised``
    One ``train_many`` call (``hetfl.training.vectorized``) on the K tasks.

Each is warmed up once, untimed, then timed ``--repeats`` times, alternating which runs first.
Reported: the median client updates (tasks) per second of each, and the ratio of medians
(vectorised / sequential updates per second: the speed-up). Untimed, the two results are compared
(largest absolute difference of the parameters). The issue's aim is a speed-up of at least 5x on
two cores; the JSON says for which rows it is met.

Models (``--models``): ``mlp-64`` (the quickstart MLP, hidden [64], 4,810 parameters),
``mlp-256-256`` (83,466), ``cnn-16-32`` (channels [16, 32]), ``logreg``.

Digits has 1,797 samples (1,437 for training after the test split), so ``data.n_clients=10000`` is
refused by the partitioner (``data.n_clients=10000 exceeds the 1797 samples of digits``); the script
reports that and goes on. 10,000 tasks at once are better measured as batches of K drawn from a
smaller federation, which is what ``--tasks`` does. With 100 clients every client holds 14 training
samples (batches of 14); with 1,000, one (batches of 1). ``--dataset synthetic`` measures the same on
FedProx's Synthetic(1, 1) (``data.dataset: synthetic``: 60 features, 10 classes, at least 40 training
samples a client, generated per client), which any number of clients can have: 10,000 included.

Row for benchmarks/README.md:
| `vectorized.py` | client updates per second of K local-training tasks at once (`train_many`, vmap) against `LocalTrainer.train` in a loop, by model, K and torch threads; median of `--repeats`, ratio measured in the same process |

This is a benchmark, not a test: nothing here asserts a time. The last line of the output is one
JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

from hetfl.config import validate
from hetfl.engine.run import Federation, build_federation
from hetfl.errors import HetflError
from hetfl.training.vectorized import train_many

AIM = 5.0


def model_config(spec: str) -> dict[str, Any]:
    """``mlp-64-64`` -> hidden [64, 64]; ``cnn-16-32`` -> channels [16, 32]; ``logreg``."""
    name, *widths = spec.split("-")
    sizes = [int(w) for w in widths]
    if name == "mlp":
        return {"name": "mlp", "hidden": sizes or [64]}
    if name == "cnn":
        return {"name": "cnn", "channels": sizes or [16, 32]}
    if name == "logreg" and not sizes:
        return {"name": "logreg"}
    raise SystemExit(f"--models: {spec!r} is not mlp-W[-W...], cnn-C[-C...] or logreg")


def federation(model: str, n_clients: int, steps: int, batch_size: int, dataset: str = "digits") -> Federation:
    data = {"dataset": "digits", "n_clients": n_clients, "partition": {"kind": "iid"}}
    if dataset == "synthetic":
        data = {"dataset": "synthetic", "n_clients": n_clients}
    cfg = validate({
        "name": "vectorized-benchmark",
        "seed": 0,
        "data": data,
        "model": model_config(model),
        "training": {"optimizer": "sgd", "lr": 0.05, "batch_size": batch_size, "local_steps": steps},
    })
    return build_federation(cfg)


class Tasks:
    """K tasks on a federation's clients: task j trains client j mod n_clients with batch seed j."""

    def __init__(self, fed: Federation, k: int, steps: int) -> None:
        pool = fed.pool
        clients = [j % pool.n_clients for j in range(k)]
        self.trainer = fed.trainer
        self.data = [(d.x, d.y) for d in (pool.data(c) for c in clients)]
        self.steps, self.seeds = [steps] * k, list(range(k))
        self.starts = fed.trainer.initial.expand(k, -1).contiguous()

    def sequential(self) -> torch.Tensor:
        t = self.trainer
        results = [
            t.train(self.starts[j], x, y, steps=s, seed=seed)
            for j, ((x, y), s, seed) in enumerate(zip(self.data, self.steps, self.seeds))
        ]
        return torch.stack([r.params for r in results])

    def vectorised(self) -> torch.Tensor:
        results = train_many(self.trainer, self.starts, self.data, self.steps, self.seeds)
        return torch.stack([r.params for r in results])


def time_pair(tasks: Tasks, repeats: int) -> tuple[dict[str, list[float]], float]:
    """Wall seconds of each measurement over ``repeats`` (after one warm-up); the largest parameter difference."""
    measures: dict[str, Callable[[], torch.Tensor]] = {"sequential": tasks.sequential, "vectorised": tasks.vectorised}
    out = {name: fn() for name, fn in measures.items()}  # warm-up, and the equivalence check
    diff = float((out["sequential"] - out["vectorised"]).abs().max())
    wall: dict[str, list[float]] = {name: [] for name in measures}
    names = list(measures)
    for repeat in range(repeats):
        for name in names[repeat % 2:] + names[: repeat % 2]:
            t0 = time.perf_counter()
            measures[name]()
            wall[name].append(time.perf_counter() - t0)
    return wall, diff


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp-64"], help="(default: mlp-64)")
    parser.add_argument("--clients", nargs="+", type=int, default=[100, 1000, 10000],
                        help="data.n_clients of the digits federations (default: 100 1000 10000)")
    parser.add_argument("--tasks", nargs="+", type=int, default=[10, 100, 1000], help="K (default: 10 100 1000)")
    parser.add_argument("--dataset", choices=["digits", "synthetic"], default="digits", help="(default: digits)")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch threads (default: 1 2)")
    parser.add_argument("--steps", type=int, default=10, help="local steps of every task (default 10)")
    parser.add_argument("--batch-size", type=int, default=16, help="training.batch_size (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each measurement (default 3)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps < 1 or min(args.tasks) < 1 or min(args.threads) < 1:
        parser.error("--repeats, --steps, --tasks and --threads must be at least 1")

    console = Console(width=None if sys.stdout.isatty() else 140)
    load_before = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    refused: dict[str, str] = {}
    table = Table(title=f"{args.dataset}, {args.steps} local steps, batch {args.batch_size}, SGD; median of {args.repeats}")
    for col in ("model", "params", "clients", "batch", "K", "threads", "sequential upd/s", "vectorised upd/s",
                "speed-up", "max |diff|"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for model in args.models:
        for n_clients in args.clients:
            try:
                fed = federation(model, n_clients, args.steps, args.batch_size, args.dataset)
            except HetflError as err:
                refused[f"{model} n_clients={n_clients}"] = str(err)
                console.print(f"[yellow]{model}, n_clients={n_clients}: refused: {err}[/]")
                continue
            sizes = fed.pool.sample_counts().tolist()
            batch = f"{min(args.batch_size, min(sizes))}-{min(args.batch_size, max(sizes))}"
            for k in args.tasks:
                tasks = Tasks(fed, k, args.steps)
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    wall, diff = time_pair(tasks, args.repeats)
                    seq, vec = statistics.median(wall["sequential"]), statistics.median(wall["vectorised"])
                    row = {
                        "model": model, "params": fed.trainer.numel, "clients": n_clients, "batch": batch, "K": k,
                        "threads": threads, "sequential_updates_per_s": k / seq, "vectorised_updates_per_s": k / vec,
                        "speedup": seq / vec, "max_abs_diff": diff,
                        "sequential_s": wall["sequential"], "vectorised_s": wall["vectorised"],
                    }
                    rows.append(row)
                    table.add_row(
                        model, f"{fed.trainer.numel:,}", str(n_clients), batch, str(k), str(threads),
                        f"{k / seq:,.0f}", f"{k / vec:,.0f}", f"{seq / vec:.2f}", f"{diff:.1e}",
                    )
    console.print(table)
    load_after = os.getloadavg()[0]
    info = machine()
    met = [r for r in rows if r["speedup"] >= AIM]
    console.print(
        f"speed-up >= {AIM:g}x in {len(met)} of {len(rows)} rows. {info['cores']} cores, {info['cpu']}, "
        f"torch {info['torch']}. 1-minute load average {load_before:.2f} before, {load_after:.2f} after"
        + (" [yellow](other processes compete for the cores)[/]" if max(load_before, load_after) > 1.0 else "")
    )
    print(json.dumps({
        "benchmark": "vectorized",
        "dataset": args.dataset,
        "date": dt.date.today().isoformat(),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "aim_speedup": AIM,
        "rows": rows,
        "refused": refused,
        "load_average": [load_before, load_after],
        "machine": info,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
