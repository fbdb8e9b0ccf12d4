"""Simulation overhead: hetfl's wall time against a plain PyTorch FedAvg loop doing the same work.

    .venv/bin/python benchmarks/overhead.py [--config examples/quickstart.yaml] [--repeats 5]
                                            [--rounds N] [--set key=value ...]

Four measurements, in one process, on the same federation (data, partition, model, seed):

``hetfl loop``
    ``build_federation(cfg)`` and ``fed.simulator()`` are built untimed; only the event loop is
    timed (``while sim.step()``), stopped by an ``on_commit`` once ``cfg.rounds`` aggregations are
    done. No evaluation, no metrics, no checkpoints: the cost of simulating and training.
``hetfl run_experiment``
    The whole user-facing run, ``run_experiment(cfg, tmpdir, show_progress=False)``: building the
    federation (loading the dataset, partitioning), evaluation after every round, ``metrics.jsonl``,
    checkpoints, ``summary.json`` and the run index. It shows what evaluation and bookkeeping cost.
``hetfl loop, model by import path``
    The same loop with the built-in model given as a user gives their own: ``model.name`` the import path
    ``hetfl.models.zoo:mlp`` (or ``cnn``, ``logreg``) and its sizes in ``model.params``, through the registry's
    import-path door. The aim (issue 13): at most 1.05x the built-in name's loop; the two must train the same
    steps to the same accuracy.
``plain PyTorch``
    What a researcher writes by hand: the same architecture with the same initial weights
    (``build_model`` after ``torch.manual_seed(cfg.seed)``), the same per-client training tensors
    (``fed.pool.x[fed.pool.train_indices[c]]``), the same optimiser, learning rate and batch size,
    and exactly the (client, local steps) sequence hetfl trained, round by round (recorded from an
    untimed hetfl run). Per task: ``load_state_dict`` of the global weights, a new optimiser,
    ``steps`` mini-batches of ``min(batch_size, n)`` samples from a ``randperm`` (reshuffled when it
    runs out, as hetfl does), ``zero_grad``/forward/``cross_entropy``/``backward``/``step``; after each
    round the client ``state_dict``s are averaged weighted by sample count (plain FedAvg).

Everything runs on ``cfg.threads`` torch threads (default 1). One untimed warm-up of each, then
``--repeats`` repeats, each running the three measurements in a rotated order so that none is
always first. Reported: median, min and max wall seconds, process CPU seconds, client updates per
second, and the ratios of medians to the plain loop. The last line of the output is one JSON object.

The aim (issue): ``hetfl loop / plain PyTorch <= 1.15``. This is a benchmark, not a test: nothing
here asserts a time, only that both sides did the same number of local steps.
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
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table
from torch.nn import functional as F

from hetfl import registry
from hetfl.config import ExperimentConfig, load_config, validate
from hetfl.engine.run import Federation, build_federation, run_experiment
from hetfl.errors import HetflError
from hetfl.models import build_model

AIM = 1.15
PATH_AIM = 1.05  # the built-in model by import path against by name
ROOT = Path(__file__).resolve().parent.parent

Round = list[tuple[int, int, int]]  # (client, local steps, n_samples) of each aggregated update


# ----------------------------------------------------------------------------- hetfl
def record_schedule(cfg: ExperimentConfig) -> tuple[list[Round], int]:
    """Run the simulation once (untimed) and record which client trained how many steps, per aggregation."""
    fed = build_federation(cfg)
    sim = fed.simulator(on_commit=_stop_at(cfg.rounds))
    schedule: list[Round] = []
    commit = sim.commit

    def recording_commit(params, updates, *, dropped=0):
        schedule.append([(u.client_id, u.steps, u.n_samples) for u in updates])
        commit(params, updates, dropped=dropped)

    sim.commit = recording_commit  # type: ignore[method-assign]  # the strategy calls server.commit
    while sim.step():
        pass
    steps = sum(s for rnd in schedule for _, s, _ in rnd)
    if steps != sim.counters.trained_steps:
        raise SystemExit(
            f"hetfl trained {sim.counters.trained_steps} local steps but aggregated updates of {steps}: "
            f"the plain baseline replays aggregated updates only; use a strategy that aggregates every "
            f"trained update (fedavg without deadline_s, say)"
        )
    return schedule, steps


def _stop_at(rounds: int) -> Callable[[Any], None]:
    def on_commit(sim) -> None:
        if sim.version >= rounds:
            sim.stop("rounds")

    return on_commit


BUILD_S: list[float] = []  # wall seconds of each build_federation in time_hetfl_loop (reported, not compared)


def time_hetfl_loop(cfg: ExperimentConfig) -> tuple[float, float, int, int, float]:
    """Wall and CPU seconds of the simulation loop alone; its steps, updates and final accuracy (untimed)."""
    t0 = time.perf_counter()
    fed = build_federation(cfg)
    BUILD_S.append(time.perf_counter() - t0)
    sim = fed.simulator(on_commit=_stop_at(cfg.rounds))
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while sim.step():
        pass
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    accuracy = fed.evaluator(sim.params)["accuracy"]
    return wall, cpu, sim.counters.trained_steps, sim.counters.updates, accuracy


def time_hetfl_run(cfg: ExperimentConfig) -> tuple[float, float, int, int, float]:
    """Wall and CPU seconds of ``run_experiment`` into a temporary folder (its run index goes there too)."""
    with tempfile.TemporaryDirectory(prefix="hetfl-bench-") as tmp:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        summary = run_experiment(cfg, Path(tmp) / "run", show_progress=False)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if summary["status"] != "completed":
        raise SystemExit(f"run_experiment ended with status {summary['status']} ({summary['stop_reason']})")
    return wall, cpu, summary["trained_steps"], summary["updates"], summary["final_accuracy"]


# ----------------------------------------------------------------------------- plain PyTorch
class PlainFedAvg:
    """The hand-written baseline: one model, per-client loops, weighted state_dict averaging."""

    def __init__(self, cfg: ExperimentConfig, fed: Federation) -> None:
        ds = fed.data.dataset
        torch.manual_seed(cfg.seed)  # as build_federation does before build_model: same initial weights
        self.model = build_model(cfg.model, ds.input_shape, ds.n_classes, ds.vocab_size)
        self.init = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        pool = fed.pool
        self.x = [pool.x[idx] for idx in pool.train_indices]
        self.y = [pool.y[idx] for idx in pool.train_indices]
        self.training = cfg.training
        self.seed = cfg.seed
        self.evaluator = fed.evaluator  # untimed accuracy check only

    def optimizer(self) -> torch.optim.Optimizer:
        t = self.training
        if t.optimizer == "adam":
            return torch.optim.Adam(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        return torch.optim.SGD(self.model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)

    def run(self, schedule: list[Round]) -> tuple[dict[str, torch.Tensor], int]:
        torch.manual_seed(self.seed)
        model, bs = self.model, self.training.batch_size
        global_state = {k: v.clone() for k, v in self.init.items()}
        total_steps = 0
        for updates in schedule:
            states, weights = [], []
            for client, steps, n_samples in updates:
                x, y = self.x[client], self.y[client]
                model.load_state_dict(global_state)
                opt = self.optimizer()
                n = x.shape[0]
                b = min(bs, n)
                perm, cursor = torch.randperm(n), 0
                for _ in range(steps):
                    if cursor + b > n:
                        perm, cursor = torch.randperm(n), 0
                    idx = perm[cursor : cursor + b]
                    cursor += b
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                    loss.backward()
                    opt.step()
                total_steps += steps
                states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
                weights.append(n_samples)
            if states:
                total = sum(weights)
                global_state = {k: sum(w / total * s[k] for w, s in zip(weights, states)) for k in global_state}
        return global_state, total_steps

    def accuracy(self, state: dict[str, torch.Tensor]) -> float:
        self.model.load_state_dict(state)
        flat = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
        return self.evaluator(flat)["accuracy"]  # same parameter order as hetfl's flat buffer


def time_plain(plain: PlainFedAvg, schedule: list[Round]) -> tuple[float, float, int, int, float]:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    state, steps = plain.run(schedule)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return wall, cpu, steps, sum(len(r) for r in schedule), plain.accuracy(state)


# ----------------------------------------------------------------------------- reporting
BY_PATH = "hetfl loop, model by import path"


def model_by_path(cfg: ExperimentConfig) -> ExperimentConfig | None:
    """``cfg`` with its built-in model given by import path (``hetfl.models.zoo:mlp`` and ``model.params``), as a
    user gives their own; None for a model that is not one of the zoo's (tinylm, a user's own)."""
    name = cfg.model.name
    if not registry.is_builtin("model", name) or name == "tinylm":
        return None
    sizes = {"mlp": {"hidden": cfg.model.hidden}, "cnn": {"channels": cfg.model.channels}, "logreg": {}}[name]
    raw = cfg.model_dump(mode="json")
    raw["model"].update(name=f"hetfl.models.zoo:{name}", params=sizes)
    return validate(raw, source="model by import path")


def machine() -> dict[str, Any]:
    model_name = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu": model_name,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def summarise(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="examples/quickstart.yaml", help="(default: examples/quickstart.yaml)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each measurement (default 5)")
    parser.add_argument("--rounds", type=int, default=None, help="aggregations to run (default: the config's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    overrides = list(args.set) + ([f"rounds={args.rounds}"] if args.rounds is not None else [])
    config = Path(args.config)
    if not config.is_file() and not config.is_absolute() and (ROOT / config).is_file():
        config = ROOT / config  # run from another folder: resolve against the repository
    try:
        cfg = load_config(config, overrides)
    except HetflError as err:  # a config mistake is one line, as in the CLI
        print(f"error: {err}", file=sys.stderr)
        return 2
    load_before = os.getloadavg()[0]
    console = Console(width=None if sys.stdout.isatty() else 120)
    torch.set_num_threads(cfg.threads)
    if cfg.strategy.name != "fedavg":
        console.print(f"[yellow]note:[/] strategy {cfg.strategy.name}: the baseline still averages like FedAvg")

    # untimed: the schedule hetfl trains, and one warm-up of each measurement
    schedule, steps = record_schedule(cfg)
    updates = sum(len(r) for r in schedule)
    fed = build_federation(cfg)
    plain = PlainFedAvg(cfg, fed)
    measures: dict[str, Callable[[], tuple[float, float, int, int, float]]] = {
        "hetfl loop": lambda: time_hetfl_loop(cfg),
        "plain PyTorch": lambda: time_plain(plain, schedule),
        "hetfl run_experiment": lambda: time_hetfl_run(cfg),
    }
    by_path = model_by_path(cfg)
    if by_path is not None:
        measures[BY_PATH] = lambda: time_hetfl_loop(by_path)
    names = list(measures)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    accuracy: dict[str, float] = {}
    for repeat in range(-1, args.repeats):  # -1: warm-up, not recorded
        order = names[repeat % len(names):] + names[: repeat % len(names)] if repeat >= 0 else names
        for name in order:
            w, c, done_steps, done_updates, acc = measures[name]()
            if (done_steps, done_updates) != (steps, updates):
                raise SystemExit(
                    f"{name}: {done_steps} local steps in {done_updates} updates, "
                    f"expected {steps} in {updates} (a stop before cfg.rounds, e.g. evaluation.stop_at_target, "
                    f"or a non-deterministic run?)"
                )
            accuracy[name] = acc
            if repeat >= 0:
                wall[name].append(w)
                cpu[name].append(c)

    load_after = os.getloadavg()[0]
    del BUILD_S[0]  # the warm-up's
    stats = {k: summarise(wall[k]) for k in names}
    cpu_med = {k: statistics.median(cpu[k]) for k in names}
    base = stats["plain PyTorch"]["median"]
    ratio = {k: stats[k]["median"] / base for k in names}
    cpu_ratio = {k: cpu_med[k] / cpu_med["plain PyTorch"] for k in names}
    info = machine()

    table = Table(
        title=f"{Path(args.config).name} {' '.join(args.set)}: {cfg.model.name}, {cfg.data.n_clients} clients, "
        f"{len(schedule)} rounds, {updates} client updates, {steps} local steps; "
        f"median of {args.repeats}, {cfg.threads} torch thread(s)"
    )
    for col in ("measurement", "median s", "min s", "max s", "CPU s", "updates/s", "ratio", "CPU ratio", "accuracy"):
        table.add_column(col, justify="left" if col == "measurement" else "right")
    for k in names:
        s = stats[k]
        table.add_row(
            k, f"{s['median']:.3f}", f"{s['min']:.3f}", f"{s['max']:.3f}", f"{cpu_med[k]:.3f}",
            f"{updates / s['median']:.0f}", f"{ratio[k]:.2f}", f"{cpu_ratio[k]:.2f}", f"{accuracy[k]:.4f}",
        )
    console.print(table)
    met = ratio["hetfl loop"] <= AIM
    path_ratio = stats[BY_PATH]["median"] / stats["hetfl loop"]["median"] if BY_PATH in stats else None
    console.print(
        f"hetfl loop / plain PyTorch = {ratio['hetfl loop']:.2f} (aim <= {AIM}: {'met' if met else 'NOT met'}); "
        f"run_experiment / plain PyTorch = {ratio['hetfl run_experiment']:.2f}. "
        f"{info['cores']} cores, {info['cpu']}, torch {info['torch']}, python {info['python']}."
    )
    if path_ratio is not None:
        same = accuracy[BY_PATH] == accuracy["hetfl loop"]
        console.print(
            f"model by import path / by name = {path_ratio:.3f} (aim <= {PATH_AIM}: "
            f"{'met' if path_ratio <= PATH_AIM else 'NOT met'}); same final accuracy: {same}"
        )
    console.print(
        f"run_experiment includes build_federation (dataset, partition, model): median {statistics.median(BUILD_S):.3f} s "
        f"when built for the hetfl loop. 1-minute load average {load_before:.2f} before, {load_after:.2f} after"
        + (" [yellow](other processes compete for the cores: wall times include waiting; CPU s is less affected)[/]"
           if max(load_before, load_after) > 1.0 else "")
    )
    result = {
        "benchmark": "overhead",
        "date": dt.date.today().isoformat(),
        "config": args.config,
        "overrides": args.set,
        "model": cfg.model.name,
        "n_clients": cfg.data.n_clients,
        "rounds": len(schedule),
        "updates": updates,
        "local_steps": steps,
        "repeats": args.repeats,
        "threads": cfg.threads,
        "wall_s": stats,
        "cpu_s_median": cpu_med,
        "updates_per_s": {k: updates / stats[k]["median"] for k in names},
        "ratio_loop": ratio["hetfl loop"],
        "ratio_run_experiment": ratio["hetfl run_experiment"],
        "cpu_ratio_loop": cpu_ratio["hetfl loop"],
        "aim": AIM,
        "aim_met": met,
        "ratio_model_by_path": path_ratio,
        "path_aim": PATH_AIM,
        "build_federation_s_median": statistics.median(BUILD_S),
        "load_average_1min": [load_before, load_after],
        "final_accuracy": accuracy,
        "machine": info,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
