"""Client updates per second on the GPU and on the CPU of the same machine: the MLP and the CNN, K tasks, vectorised
and sequential.

    python benchmarks/gpu.py [--models mlp-64 cnn-16-32] [--tasks 100 1000 10000] [--devices cpu cuda]
                             [--threads 1] [--steps 5] [--batch-size 16] [--repeats 3] [--sequential-budget-s 4]
                             [--json results/gpu_benchmark.json]

For every model, device (``--devices``; default: ``cpu`` and, when this machine has one, ``cuda``; also ``mps``) and
number of tasks K, a digits federation of 100 clients (IID, 14 training samples each) is built by
``build_federation`` with ``training.device`` set to that device, so the clients' data are on it. Task ``j`` trains
client ``j mod 100`` for ``--steps`` local steps from the model's initial parameters, batch seed ``j``:

``vectorised``
    one ``train_many`` call on the K tasks (``hetfl.training.vectorized``), results brought back to the CPU;
``sequential``
    ``LocalTrainer.train`` task after task, as the simulator trains them, each result brought back to the CPU.

Each is warmed up once (untimed, 10 tasks), then timed ``--repeats`` times; reported: the median client updates
per second. A vectorised K = 10,000 is timed once (said in the ``repeats`` column). Sequential training is
timed on the first tasks until ``--sequential-budget-s`` seconds have passed (at least 10 tasks) and its rate
extrapolated to K: the ``timed`` column says how many of the K tasks were timed, and ``extrapolated`` in the JSON
is true for those rows. GPU times are taken after ``torch.cuda.synchronize()``.

With the defaults the whole script takes under 5 minutes on 2 CPU cores (no GPU) and less with one.

Row for benchmarks/README.md:
| `gpu.py` | client updates per second of the MLP and the CNN at K = 100, 1,000, 10,000 tasks, vectorised and sequential, on the GPU and the CPU of one machine (`training.device`); median of `--repeats`; sequential extrapolated from a timed subset, marked |

This is a benchmark, not a test: nothing here asserts a time. The last line of the output is one JSON object,
also written to ``--json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from hetfl.config import validate
from hetfl.engine.run import Federation, build_federation
from hetfl.training.device import CPU
from hetfl.training.vectorized import train_many
from vectorized import machine, model_config  # benchmarks/vectorized.py, beside this script

WARMUP_TASKS = 10


def federation(model: str, device: str, steps: int, batch_size: int, threads: int) -> Federation:
    return build_federation(validate({
        "name": "gpu-benchmark", "seed": 0, "threads": threads,
        "data": {"dataset": "digits", "n_clients": 100, "partition": {"kind": "iid"}},
        "model": model_config(model),
        "training": {"optimizer": "sgd", "lr": 0.05, "batch_size": batch_size, "local_steps": steps, "device": device},
    }))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Tasks:
    """K tasks on a 100-client federation: task j trains client j mod 100 with batch seed j."""

    def __init__(self, fed: Federation, steps: int) -> None:
        self.trainer, self.steps = fed.trainer, steps
        self.data = [(d.x, d.y) for d in (fed.pool.data(c) for c in range(fed.pool.n_clients))]

    def vectorised(self, k: int) -> float:
        """Seconds to train K tasks in one call and bring the results to the CPU."""
        t, n = self.trainer, len(self.data)
        starts = t.initial.expand(k, -1)
        data = [self.data[j % n] for j in range(k)]
        sync(t.device)
        t0 = time.perf_counter()
        results = train_many(t, starts, data, [self.steps] * k, list(range(k)))
        torch.stack([r.params for r in results]).to(CPU)
        sync(t.device)
        return time.perf_counter() - t0

    def sequential(self, k: int, budget_s: float) -> tuple[float, int]:
        """(seconds, tasks timed): tasks one by one until K or until ``budget_s`` (at least WARMUP_TASKS tasks)."""
        t, n = self.trainer, len(self.data)
        sync(t.device)
        t0 = time.perf_counter()
        done = 0
        while done < k and (done < WARMUP_TASKS or time.perf_counter() - t0 < budget_s):
            x, y = self.data[done % n]
            t.train(t.initial, x, y, steps=self.steps, seed=done).params.to(CPU)
            done += 1
        sync(t.device)
        return time.perf_counter() - t0, done


def default_devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp-64", "cnn-16-32"], help="(default: mlp-64 cnn-16-32)")
    parser.add_argument("--tasks", nargs="+", type=int, default=[100, 1000, 10000], help="K (default: 100 1000 10000)")
    parser.add_argument("--devices", nargs="+", default=default_devices(),
                        help=f"training.device values (default here: {' '.join(default_devices())})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the CPU rows (the run's threads; default 1)")
    parser.add_argument("--steps", type=int, default=5, help="local steps of every task (default 5)")
    parser.add_argument("--batch-size", type=int, default=16, help="training.batch_size (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, K below 10,000 (default 3)")
    parser.add_argument("--sequential-budget-s", type=float, default=4.0,
                        help="seconds of sequential tasks timed per row before extrapolating to K (default 4)")
    parser.add_argument("--json", default="results/gpu_benchmark.json",
                        help="where to write the JSON (default results/gpu_benchmark.json; results/ is not committed)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps < 1 or min(args.tasks) < 1 or args.threads < 1:
        parser.error("--repeats, --steps, --tasks and --threads must be at least 1")

    console = Console(width=None if sys.stdout.isatty() else 140)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    info = machine()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    rows: list[dict[str, Any]] = []
    table = Table(title=f"digits, 100 clients, {args.steps} local steps, batch {args.batch_size}, SGD, {args.threads} torch "
                  f"thread{'s' * (args.threads > 1)}; client updates/s")
    for col in ("model", "params", "device", "K", "vectorised upd/s", "repeats", "sequential upd/s", "timed", "vec/seq"):
        table.add_column(col, justify="left" if col in ("model", "device") else "right")
    for model in args.models:
        for device in args.devices:
            fed = federation(model, device, args.steps, args.batch_size, args.threads)
            tasks = Tasks(fed, args.steps)
            tasks.vectorised(WARMUP_TASKS)  # warm-up: kernels, allocator, torch.func's tracing
            tasks.sequential(WARMUP_TASKS, 0.0)
            for k in args.tasks:
                repeats = 1 if k >= 10000 else args.repeats
                vec = statistics.median(tasks.vectorised(k) for _ in range(repeats))
                seconds, timed = tasks.sequential(k, args.sequential_budget_s)
                seq_rate, vec_rate = timed / seconds, k / vec
                rows.append({
                    "model": model, "params": fed.trainer.numel, "device": str(fed.trainer.device), "K": k,
                    "vectorised_updates_per_s": vec_rate, "vectorised_repeats": repeats,
                    "sequential_updates_per_s": seq_rate, "sequential_timed_tasks": timed, "extrapolated": timed < k,
                })
                table.add_row(model, f"{fed.trainer.numel:,}", str(fed.trainer.device), f"{k:,}", f"{vec_rate:,.0f}",
                              str(repeats), f"{seq_rate:,.0f}", f"{timed:,}" + ("*" if timed < k else ""),
                              f"{vec_rate / seq_rate:.1f}")
            del fed, tasks
    console.print(table)
    load_after, total = os.getloadavg()[0], time.perf_counter() - started
    console.print(
        f"* sequential rate extrapolated from the tasks timed. {total:.0f} s in all. {info['cores']} cores, {info['cpu']}"
        + (f", {info['gpu']}" if "gpu" in info else ", no GPU") + f"; torch {info['torch']}. 1-minute load average "
        f"{load_before:.2f} before, {load_after:.2f} after"
        + (" [yellow](other processes compete for the cores)[/]" if max(load_before, load_after) > 1.0 else "")
    )
    out = {
        "benchmark": "gpu", "date": dt.date.today().isoformat(), "steps": args.steps, "batch_size": args.batch_size,
        "repeats": args.repeats, "sequential_budget_s": args.sequential_budget_s, "threads": args.threads, "seconds": total, "rows": rows,
        "load_average": [load_before, load_after], "machine": info,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
