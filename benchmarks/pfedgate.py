"""pFedGate's efficiency claim: personal accuracy against the compute a client spends, at sparsity 1, 0.5 and 0.3.

    .venv/bin/python benchmarks/pfedgate.py [--config examples/model_zoo.yaml] [--seeds 0,1,2] [--rounds 20]
                                            [--sparsities 1.0,0.5,0.3] [--target 0.9] [--set key=value ...]

Chen et al. (ICML 2023, arXiv:2305.02776) report that a client's sparse personal model, adapted from the global
one by a small gate, reaches comparable or better accuracy with less computation at sparsity below 1. pFedGate's
task is charged its sparse model and its gate (``charge: sparse``, the strategy's module docstring), so the
saving, if any, shows in ``train_flops`` and in the simulated time.

The federation is the personalisation benchmark's with one architecture (``benchmarks/personalisation.py``:
digits, 20 clients, Dirichlet alpha 0.1, three device tiers, the reference MLP, ``model.zoo`` emptied). Rows:
FedAvg (its global model on each client's test split), FedAvg + fine-tuning, and pFedGate at each sparsity.
Columns, mean ± std over the seeds of each run's last evaluation:

- ``personal acc``: ``personal_acc_mean`` (FedAvg: ``client_acc_mean``, the global model per client);
- ``GFLOP``: ``train_flops``, all local training; ``MFLOP/task``: ``flops_per_task``;
- ``sim s``: ``sim_time_s``, the simulated time the rounds took;
- ``to target``: the first evaluation's ``sim_time_s`` at which the personal accuracy reaches ``--target``,
  mean over the seeds that reached it (how many did in brackets).

FedAvg + fine-tuning's fine-tuning at evaluation is not charged (it is not local training). Nothing is timed
against a threshold: this is a benchmark, not a test. The last line is one JSON object with every run's numbers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from hetfl.config import load_config, validate
from hetfl.engine.run import run_experiment
from hetfl.results.seeds import format_spread, mean_std_ci, time_to_target


def personal(record: dict[str, Any]) -> float | None:
    value = record.get("personal_acc_mean")
    return record.get("client_acc_mean") if value is None else value


def measure(summary: dict[str, Any], metrics: list[dict[str, Any]], target: float) -> dict[str, Any]:
    reached = next((r["sim_time_s"] for r in metrics if (personal(r) or 0.0) >= target), None)
    return {"acc": personal(summary), "gflop": summary["train_flops"] / 1e9,
            "mflop_task": (summary["flops_per_task"] or 0.0) / 1e6, "sim_s": summary["sim_time_s"],
            "to_target_s": reached, "wall_s": summary["wall_time_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="examples/model_zoo.yaml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--sparsities", default="1.0,0.5,0.3")
    parser.add_argument("--target", type=float, default=0.9, help="personal accuracy whose first crossing is timed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    base = load_config(args.config, args.set)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [("FedAvg", "fedavg", {}), ("FedAvg + fine-tuning", "fedavg_ft", {})]
    variants += [(f"pFedGate s={s}", "pfedgate", {"sparsity": float(s)}) for s in args.sparsities.split(",")]
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, name, params in variants:
            for seed in seeds:
                raw = base.model_dump()
                raw.update(seed=seed, rounds=args.rounds)
                raw["model"]["zoo"] = []
                raw["strategy"].update(name=name, params=params, per_algorithm={})
                out = Path(tmp) / f"{name}-{len(results)}-{seed}"
                summary = run_experiment(validate(raw), out, show_progress=False)
                metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                results.setdefault(label, []).append(measure(summary, metrics, args.target))
                print(label, seed, results[label][-1], flush=True)
    table = Table(title=f"{base.name}, one architecture ({base.model.label()}), seeds {args.seeds}, "
                        f"{args.rounds} rounds, target {args.target}")
    for column in ("method", "personal acc", "GFLOP", "MFLOP/task", "sim s", "to target s", "wall s"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for label, runs in results.items():
        def spread(key: str, digits: int) -> str:
            return format_spread(mean_std_ci([r[key] for r in runs]), lambda v: f"{v:.{digits}f}")

        hit = time_to_target([r["to_target_s"] for r in runs])
        to_target = "—" if hit["mean_s"] is None else f"{hit['mean_s']:.0f} ({hit['reached']}/{hit['n']})"
        table.add_row(label, spread("acc", 3), spread("gflop", 2), spread("mflop_task", 2), spread("sim_s", 0),
                      to_target, spread("wall_s", 1))
    Console(width=150).print(table)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
