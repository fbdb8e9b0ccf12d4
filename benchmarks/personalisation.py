"""Personalised and model-heterogeneous FL, HtFLlib-style: accuracy per client, compute and communication.

    .venv/bin/python benchmarks/personalisation.py [--config examples/model_zoo.yaml] [--seeds 0,1,2]
                                                   [--rounds N] [--only zoo|single] [--set key=value ...]

Two tables on the same federation (digits, Dirichlet alpha 0.1 over labels, three device tiers):

``single``
    Every client trains the reference architecture (``model.zoo`` emptied): the global FedAvg model
    against the personalised methods, and the model-heterogeneous ones on one architecture.
``zoo``
    The config's three-architecture zoo (slow devices: a linear model, middle: an MLP, fast: a CNN),
    for the methods that accept it.

Columns, each the mean over the seeds of the run's last evaluation (the spread over seeds in brackets):

- ``mean acc``: the mean over clients of the accuracy on its own test split of the model it uses: the
  global model for FedAvg (``client_acc_mean``), its own for the others (``personal_acc_mean``);
- ``p10`` and ``worst``: the 10th percentile and the minimum of the same per-client accuracies;
- ``MFLOP/client/round``: ``flops_per_task``, the local training one client's task costs;
- ``kB/round``: bytes up + down per round (``(bytes_up + bytes_down) / rounds``);
- ``kB/client/round``: the same per task.

Nothing is timed against a threshold: this is a benchmark, not a test. The last line of the output is
one JSON object with every run's numbers, for scripts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from hetfl.config import load_config, validate
from hetfl.engine.run import run_experiment
from hetfl.strategies import STRATEGIES

SINGLE = ["fedavg", "fedavg_ft", "ditto", "fedper", "fedrep", "pfedgate", "ifca", "flhc",
          "local", "lgfedavg", "fedproto", "fedgh", "fedsa", "fml", "pfedlora"]
ZOO = ["local", "lgfedavg", "fedproto", "fedgh", "fedsa", "fml", "pfedlora"]


def scores(summary: dict[str, Any]) -> dict[str, float]:
    personal = summary.get("personal_acc_mean") is not None
    rounds = max(summary["rounds"], 1)
    tasks = max(sum(summary["tasks_per_client"]), 1)
    traffic = summary["bytes_up"] + summary["bytes_down"]
    return {
        "mean": summary["personal_acc_mean"] if personal else summary["client_acc_mean"],
        "p10": summary["personal_acc_p10"] if personal else summary["client_acc_p10"],
        "worst": summary["personal_acc_min"] if personal else summary["client_acc_min"],
        "mflop": (summary["flops_per_task"] or 0.0) / 1e6,
        "kb_round": traffic / rounds / 1e3,
        "kb_task": traffic / tasks / 1e3,
        "wall_s": summary["wall_time_s"],
    }


def cell(values: list[float], digits: int = 3) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1 or max(values) == min(values):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="examples/model_zoo.yaml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--only", choices=["single", "zoo"])
    parser.add_argument("--algorithms", help="comma-separated subset")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    console = Console(width=150)
    base = load_config(args.config, args.set)
    seeds = [int(s) for s in args.seeds.split(",")]
    subset = set(args.algorithms.split(",")) if args.algorithms else None
    plans = []
    for table in ("single", "zoo"):
        if args.only and table != args.only:
            continue
        for name in SINGLE if table == "single" else ZOO:
            if name in STRATEGIES and (subset is None or name in subset):
                plans += [(table, name, seed) for seed in seeds]
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, Progress(console=console) as progress:
        bar = progress.add_task("runs", total=len(plans))
        for table, name, seed in plans:
            raw = base.model_dump()
            raw["seed"] = seed
            raw["rounds"] = args.rounds or base.rounds
            raw["strategy"].update(name=name, params=base.strategy.params_for(name), per_algorithm={})
            if table == "single":
                raw["model"]["zoo"] = []
            progress.update(bar, description=f"{table}: {name}, seed {seed}")
            summary = run_experiment(validate(raw), Path(tmp) / f"{table}-{name}-{seed}", show_progress=False)
            results.setdefault((table, name), []).append(scores(summary))
            progress.advance(bar)
    for table in ("single", "zoo"):
        rows = [(name, runs) for (t, name), runs in results.items() if t == table]
        if not rows:
            continue
        title = ("one architecture (the reference " + base.model.label() + ")" if table == "single"
                 else "zoo: " + ", ".join(a.label() for a in base.model.zoo))
        out = Table(title=f"{base.name}, {title}, seeds {args.seeds}, {args.rounds or base.rounds} rounds")
        for column in ("method", "mean acc", "p10", "worst", "MFLOP/client/round", "kB/round", "kB/client/round", "wall s"):
            out.add_column(column, justify="left" if column == "method" else "right")
        for name, runs in rows:
            out.add_row(name, *(cell([r[k] for r in runs], d) for k, d in
                                 (("mean", 3), ("p10", 3), ("worst", 3), ("mflop", 1), ("kb_round", 1), ("kb_task", 1),
                                  ("wall_s", 1))))
        console.print(out)
    print(json.dumps({f"{t}/{n}": runs for (t, n), runs in results.items()}))


if __name__ == "__main__":
    main()
