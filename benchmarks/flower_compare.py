"""hetfl against Flower's simulation engine: wall time per client update on the same FedAvg workload.

    make bench-flower          # creates .venv-flower (torch, hetfl, flwr[simulation]) if missing, runs this
    .venv-flower/bin/python benchmarks/flower_compare.py [--clients 100 1000] [--per-round 20 100]
                                                         [--rounds 10] [--steps 5] [--batch-size 16]
                                                         [--repeats 3] [--flower-cpus 1 0.5]
                                                         [--vectorize off auto] [--partition iid]

Runs in ``.venv-flower``, where hetfl and ``flwr[simulation]`` are both installed, so both systems run
on the same interpreter, torch and NumPy. hetfl's own ``.venv`` has ``flwr`` (``hetfl[flower]``) but not its
simulation engine: ``flwr[simulation]`` pins a ray (2.55.1 for flwr 1.41 and 1.42) older than the one
``hetfl[ray]`` keeps there, and this script refuses an interpreter whose ray is not the pinned one.

**The workload** (:func:`workload`): digits, ``--clients`` N clients partitioned by hetfl
(``--partition``: ``iid`` or ``dirichlet:ALPHA``), the quickstart's MLP (hidden [64], 4,810
parameters, the same initial weights), FedAvg weighted by sample count, K (``--per-round``) clients
sampled a round, ``--steps`` local SGD steps (lr 0.05, batch ``--batch-size``), one torch thread per
process. Every client update runs hetfl's ``LocalTrainer.train`` on that client's rows of hetfl's
partition, in both systems: the ratio measures the engines, not two training loops.

**Measurements** (each a fresh process of this interpreter, started by this script):

``hetfl vectorize=off`` / ``hetfl vectorize=auto``
    ``build_federation`` and ``Federation.simulator`` (hetfl's Python API: the loop of
    ``run_experiment`` without its evaluation and files), with ``training.vectorize`` off (one task at
    a time, the engine alone) or auto (the round's tasks trained in one batched ``train_many`` call
    when there are at least 16 of them).
``flower cpus=C``
    ``flwr.simulation.run_simulation`` with a ServerApp running Flower's message-API ``FedAvg``
    (``fraction_train`` K/N, federated evaluation off) and a ClientApp (``flower_apps.py``) whose
    ``train`` calls ``LocalTrainer.train``; N supernodes; the Ray backend with
    ``client_resources = {num_cpus: C, num_gpus: 0}`` on a Ray instance of ``os.cpu_count()`` CPUs,
    so ``cpu_count / C`` actors train clients in parallel (C = 1: 2 actors on 2 cores; 0.5: 4). Ray starts
    its worker processes at niceness 15 unless ``RAY_worker_niceness`` says otherwise; on a machine shared
    with other jobs that alone slows the actors down, so this script sets it to ``--ray-niceness`` (0:
    the priority of hetfl's process).

**What is timed.** ``--rounds`` R + 1 rounds are run; the first is a warm-up (Flower: the actors
import the ClientApp and build their data; hetfl: torch's first calls) and is not timed. The rounds
after it are timed from the end of round 1 to the end of round R + 1 with ``time.perf_counter`` at
the round boundaries (hetfl: its commit callback; Flower: ``evaluate_fn``, which Flower calls after
every round and which here only takes the time). ms per update = those seconds / (R x K). Also
reported: each measurement's end-to-end seconds (hetfl: build and all rounds; Flower: the whole
``run_simulation`` call, Ray's start and shutdown included), and the CPU seconds of the timed rounds
(``time.process_time``; hetfl: its process; Flower: the process running the ServerApp and the simulation
engine, plus every actor's own CPU seconds, which each reply reports; Ray's daemons (raylet, GCS) are
not counted, so Flower's figure is a lower bound). On a machine shared with other jobs, CPU seconds are
less affected by waiting for a core than wall seconds. The final model's test accuracy is
evaluated afterwards, untimed, by hetfl's evaluator: the sanity check that both did the same work.
The two systems sample different clients (each with its own random generator) and shuffle batches
with different seeds, so accuracies are close, not equal.

The measurements alternate: repeat r runs them in an order rotated by r (ABCD, BCDA, ...); reported
are medians over ``--repeats`` and the ratio of medians, Flower / hetfl, measured in this invocation.
The issue's aim: hetfl at least 5x faster per client update (ratio >= 5).

Row for benchmarks/README.md:
| `flower_compare.py` | ms per client update of the same FedAvg workload (digits, MLP, hetfl's partition and `LocalTrainer.train`) on hetfl's simulator (vectorize off and auto) and on Flower's simulation engine (Ray, 1 and 0.5 CPU per client); run in `.venv-flower` by `make bench-flower`; medians of alternating repeats, ratio Flower / hetfl |

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
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

AIM = 5.0
HERE = Path(__file__).resolve().parent
RESULT = "FLOWER_COMPARE_RESULT "  # prefix of a measurement process's one result line


def workload(spec: dict[str, Any], vectorize: str):
    """The hetfl config both systems train: ``spec`` has clients, per_round, rounds, steps, batch_size,
    partition, seed."""
    from hetfl.config import validate

    kind, _, alpha = spec["partition"].partition(":")
    partition: dict[str, Any] = {"kind": kind}
    if kind == "dirichlet":
        partition["alpha"] = float(alpha or 0.5)
    return validate({
        "name": "flower-compare",
        "seed": spec["seed"],
        "rounds": spec["rounds"],
        "threads": 1,
        "data": {"dataset": "digits", "n_clients": spec["clients"], "partition": partition},
        "model": {"name": "mlp", "hidden": [64]},
        "training": {"optimizer": "sgd", "lr": 0.05, "batch_size": spec["batch_size"], "local_steps": spec["steps"],
                     "vectorize": vectorize},
        "strategy": {"name": "fedavg", "clients_per_round": spec["per_round"]},
    }, source="flower_compare")


# ----------------------------------------------------------------------------- one measurement (a process)
def measure_hetfl(spec: dict[str, Any], vectorize: str) -> dict[str, Any]:
    from hetfl.engine.run import build_federation

    start = time.perf_counter()
    fed = build_federation(workload(spec, vectorize))
    marks: list[tuple[float, float]] = []

    def on_commit(sim) -> None:
        marks.append((time.perf_counter(), time.process_time()))
        if sim.version >= spec["rounds"]:
            sim.stop("rounds")

    sim = fed.simulator(on_commit=on_commit)
    marks.append((time.perf_counter(), time.process_time()))
    while sim.step():
        pass
    end_to_end = time.perf_counter() - start
    return {
        "marks": marks,
        "updates": sim.counters.updates,
        "batches": len(sim.batches),
        "end_to_end_s": end_to_end,
        "accuracy": fed.evaluator(sim.params)["accuracy"],
    }


def measure_flower(spec: dict[str, Any], cpus: float, niceness: int) -> dict[str, Any]:
    os.environ["HETFL_FLOWER_COMPARE_SPEC"] = json.dumps(spec, sort_keys=True)  # before Ray starts: actors inherit it
    os.environ["RAY_worker_niceness"] = str(niceness)  # Ray's own setting; its default starts workers at nice 15
    import logging

    from flwr.simulation import run_simulation

    import flower_apps

    logging.getLogger("flwr").setLevel(logging.WARNING)  # no INFO line per round on the timed path
    marks: list[tuple[float, float]] = []
    out: dict[str, Any] = {}
    start = time.perf_counter()
    run_simulation(
        server_app=flower_apps.server_app(spec, marks, out),
        client_app=flower_apps.client_app,
        num_supernodes=spec["clients"],
        backend_config={
            "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count(), "num_gpus": 0, "logging_level": logging.ERROR,
                          "log_to_driver": False},
        },
    )
    end_to_end = time.perf_counter() - start
    if "accuracy" not in out:
        raise SystemExit("the Flower ServerApp did not finish (see the log above)")
    rounds = out["rounds"]
    # the actors' CPU seconds over the timed rounds: each actor's last report minus its last one in round 1
    # (an actor first seen later counts from its first report: a slight undercount)
    actor_cpu = 0.0
    for pid in {p for r in rounds for p in r["actor_cpu_s"]}:
        seen = [r["actor_cpu_s"][pid] for r in rounds[1:] if pid in r["actor_cpu_s"]]
        if seen:
            actor_cpu += max(seen) - rounds[0]["actor_cpu_s"].get(pid, min(seen))
    return {
        "marks": marks, "updates": sum(r["updates"] for r in rounds), "end_to_end_s": end_to_end,
        "accuracy": out["accuracy"], "actors": len({p for r in rounds for p in r["actor_cpu_s"]}),
        "actor_cpu_s": actor_cpu, "train_s": sum(r["train_s"] for r in rounds[1:]),
    }


def worker(job: dict[str, Any]) -> None:
    spec = job["spec"]
    if job["system"] == "hetfl":
        result = measure_hetfl(spec, job["vectorize"])
    else:
        result = measure_flower(spec, job["cpus"], job["niceness"])
    print(RESULT + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- the driver
def run_job(job: dict[str, Any], log: Path) -> dict[str, Any]:
    """Run one measurement in a fresh process of this interpreter; its output goes to ``log``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    with log.open("a") as f:
        f.write(f"\n=== {json.dumps(job)}\n")
        f.flush()
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
            stdout=subprocess.PIPE, stderr=f, text=True, env=env, check=False,
        )
        f.write(proc.stdout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{job['name']}: the measurement failed (exit {proc.returncode}); its output is in {log}")
    return json.loads(lines[-1][len(RESULT):])


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def simulation_ray() -> str | None:
    """The ray version ``flwr[simulation]`` pins in this interpreter's flwr (None: no pin found)."""
    try:
        requirements = metadata.requires("flwr") or []
    except metadata.PackageNotFoundError:
        return None
    for requirement in requirements:
        name, _, rest = requirement.partition("==")
        if name.strip() == "ray" and "simulation" in rest:
            return rest.split(";")[0].strip()
    return None


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
        **{p: version(p) for p in ("torch", "flwr", "ray", "protobuf", "numpy", "hetfl")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", nargs="+", type=int, default=[100, 1000], help="N (default: 100 1000)")
    parser.add_argument("--per-round", nargs="+", type=int, default=[20, 100],
                        help="K for each --clients, in order (default: 20 100)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds R, after one warm-up round (default 10)")
    parser.add_argument("--steps", type=int, default=5, help="local SGD steps of every update (default 5)")
    parser.add_argument("--batch-size", type=int, default=16, help="(default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each measurement (default 3)")
    parser.add_argument("--flower-cpus", nargs="+", type=float, default=[1.0, 0.5],
                        help="Flower client_resources num_cpus, one measurement each (default: 1 0.5)")
    parser.add_argument("--vectorize", nargs="+", default=["off", "auto"], choices=["off", "auto", "on"],
                        help="hetfl training.vectorize, one measurement each (default: off auto)")
    parser.add_argument("--ray-niceness", type=int, default=0,
                        help="niceness of Ray's worker processes (RAY_worker_niceness; Ray's default is 15): 0, the "
                             "default here, gives Flower's actors the priority of hetfl's process (default 0)")
    parser.add_argument("--partition", default="iid", help="iid or dirichlet:ALPHA (default iid)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", default=None, help="the measurement processes' output (default: a temporary file)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(json.loads(args.worker))
        return 0
    if len(args.per_round) != len(args.clients):
        parser.error("--per-round needs one K for each --clients")
    if min(args.repeats, args.rounds, args.steps, *args.per_round) < 1 or min(args.flower_cpus) <= 0:
        parser.error("--repeats, --rounds, --steps, --per-round and --flower-cpus must be positive")
    if any(k > n for k, n in zip(args.per_round, args.clients)):
        parser.error("--per-round: K cannot exceed its N")

    import torch  # noqa: F401  (fails early, in the driver, if this interpreter has no torch)
    from rich.console import Console
    from rich.table import Table

    info = machine()
    if info["flwr"] == "not installed":
        print("error: flwr is not installed in this interpreter; run `make bench-flower` "
              "(it creates .venv-flower with flwr[simulation])", file=sys.stderr)
        return 2
    pinned = simulation_ray()
    if pinned is not None and info["ray"] != pinned:
        print(f"error: flwr {info['flwr']}'s simulation engine pins ray=={pinned}, and this interpreter has ray "
              f"{info['ray']}; run `make bench-flower` (.venv-flower has flwr[simulation])", file=sys.stderr)
        return 2
    console = Console(width=None if sys.stdout.isatty() else 140)
    log = Path(args.log) if args.log else Path(tempfile.mkstemp(prefix="flower-compare-", suffix=".log")[1])
    console.print(f"measurement processes' output: {log}")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()

    rows: list[dict[str, Any]] = []
    for n, k in zip(args.clients, args.per_round):
        spec = {"clients": n, "per_round": k, "rounds": args.rounds + 1, "steps": args.steps,
                "batch_size": args.batch_size, "partition": args.partition, "seed": args.seed}
        jobs = [{"name": f"hetfl vectorize={v}", "system": "hetfl", "vectorize": v, "spec": spec}
                for v in args.vectorize]
        jobs += [{"name": f"flower cpus={c:g}", "system": "flower", "cpus": c, "niceness": args.ray_niceness, "spec": spec}
                 for c in args.flower_cpus]
        results: dict[str, list[dict[str, Any]]] = {j["name"]: [] for j in jobs}
        for repeat in range(args.repeats):
            shift = repeat % len(jobs)
            for job in jobs[shift:] + jobs[:shift]:
                r = run_job(job, log)
                expected = (args.rounds + 1) * k
                if r["updates"] != expected or len(r["marks"]) != args.rounds + 2:
                    raise SystemExit(f"{job['name']}: {r['updates']} updates in {len(r['marks']) - 1} rounds, "
                                     f"expected {expected} in {args.rounds + 1}")
                r["timed_s"] = r["marks"][-1][0] - r["marks"][1][0]
                # CPU seconds of the timed rounds: the measured process (hetfl: all of it; Flower: the ServerApp
                # and the simulation engine's threads) plus, for Flower, its actors' (Ray's daemons not counted)
                r["timed_cpu_s"] = r["marks"][-1][1] - r["marks"][1][1] + r.get("actor_cpu_s", 0.0)
                results[job["name"]].append(r)
                console.print(f"  N={n} K={k} repeat {repeat + 1}/{args.repeats}: {job['name']:<22} "
                              f"{r['timed_s']:7.3f} s timed ({r['timed_cpu_s']:6.2f} CPU s), "
                              f"{r['end_to_end_s']:7.2f} s end to end, "
                              f"accuracy {r['accuracy']:.3f}", highlight=False)
        updates = args.rounds * k
        for job in jobs:
            rs = results[job["name"]]
            rows.append({
                "system": job["name"], "clients": n, "per_round": k, "updates": updates,
                "timed_s": [r["timed_s"] for r in rs], "timed_cpu_s": [r["timed_cpu_s"] for r in rs],
                "end_to_end_s": [r["end_to_end_s"] for r in rs],
                "first_round_s": [r["marks"][1][0] - r["marks"][0][0] for r in rs],
                "accuracy": [r["accuracy"] for r in rs],
                "median_s": statistics.median(r["timed_s"] for r in rs),
                "median_cpu_s": statistics.median(r["timed_cpu_s"] for r in rs),
                "median_end_to_end_s": statistics.median(r["end_to_end_s"] for r in rs),
            })
            if job["system"] == "flower":
                rows[-1]["actors"] = rs[0]["actors"]
                rows[-1]["train_ms_per_update"] = 1e3 * statistics.median(r["train_s"] for r in rs) / updates
            rows[-1]["ms_per_update"] = 1e3 * rows[-1]["median_s"] / updates
    load_after = os.getloadavg()[0]

    # ratios: every Flower row against every hetfl row of the same (N, K)
    ratios: list[dict[str, Any]] = []
    for row in rows:
        if not row["system"].startswith("flower"):
            continue
        for base in rows:
            if base["system"].startswith("hetfl") and base["clients"] == row["clients"]:
                ratios.append({
                    "clients": row["clients"], "flower": row["system"], "hetfl": base["system"],
                    "ratio": row["median_s"] / base["median_s"],
                    "cpu_ratio": row["median_cpu_s"] / base["median_cpu_s"],
                    "ratio_end_to_end": row["median_end_to_end_s"] / base["median_end_to_end_s"],
                })

    table = Table(title=f"FedAvg on digits, MLP [64], {args.partition} partition, {args.steps} local steps of batch "
                        f"{args.batch_size}, {args.rounds} timed rounds after 1 warm-up; median of {args.repeats}")
    for col in ("system", "clients", "K", "updates", "wall s", "ms/update", "Flower / this", "CPU s",
                "CPU: Flower / this", "end-to-end s", "accuracy"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for row in rows:
        mine = [r for r in ratios if r["hetfl"] == row["system"] and r["clients"] == row["clients"]]
        table.add_row(
            row["system"], str(row["clients"]), str(row["per_round"]), str(row["updates"]),
            f"{row['median_s']:.3f}", f"{row['ms_per_update']:.2f}",
            ", ".join(f"{r['ratio']:.1f}x ({r['flower'].split()[1]})" for r in mine) or "-",
            f"{row['median_cpu_s']:.2f}",
            ", ".join(f"{r['cpu_ratio']:.1f}x ({r['flower'].split()[1]})" for r in mine) or "-",
            f"{row['median_end_to_end_s']:.2f}", f"{statistics.median(row['accuracy']):.3f}",
        )
    console.print(table)
    for row in rows:
        if "actors" in row:
            console.print(f"N={row['clients']} {row['system']}: {row['actors']} actors in parallel, "
                          f"{row['ms_per_update']:.2f} ms of wall time per update, of which an update's "
                          f"LocalTrainer.train took {row['train_ms_per_update']:.2f} ms on average", highlight=False)
    best_flower = {}
    for r in ratios:  # the aim is judged against Flower's fastest setting
        key = (r["clients"], r["hetfl"])
        best_flower[key] = min(best_flower.get(key, r), r, key=lambda x: x["ratio"])
    for (n, system), r in sorted(best_flower.items()):
        console.print(f"N={n}: Flower's fastest ({r['flower']}) / {system} = {r['ratio']:.1f}x per client update "
                      f"(aim >= {AIM:g}x: {'met' if r['ratio'] >= AIM else 'NOT met'}); CPU seconds "
                      f"{r['cpu_ratio']:.1f}x; end to end {r['ratio_end_to_end']:.1f}x", highlight=False)
    console.print(
        f"flwr {info['flwr']}, ray {info['ray']}, torch {info['torch']}, protobuf {info['protobuf']}, python "
        f"{info['python']}; {info['cores']} cores, {info['cpu']}. {time.perf_counter() - started:.0f} s in all. "
        f"1-minute load average {load_before:.2f} before, {load_after:.2f} after"
        + (" (other processes compete for the cores: wall times include waiting)" if max(load_before, load_after) > 1.0
           else ""),
        highlight=False,
    )
    print(json.dumps({
        "benchmark": "flower_compare",
        "date": dt.date.today().isoformat(),
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "log")},
        "rows": rows,
        "ratios": ratios,
        "aim": AIM,
        "load_average_1min": [load_before, load_after],
        "machine": info,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
