"""Robust aggregation against poisoned updates, and DP-FedAvg's accuracy against its privacy budget, on digits.

Two tables, each run a whole experiment through :func:`hetfl.engine.run.run_experiment` per row:

1. FedAvg with 10 IID clients, all of them every round for 20 rounds, 2 of them (20%, ``devices.byzantine``)
   attackers; each aggregation rule (``strategy.aggregator``) against each attack, and the clean run.
2. DP-FedAvg (``strategy.privacy``) with 20 clients, 10 a round, 20 rounds: accuracy and epsilon at
   delta 1e-5 for several clipping norms and noise multipliers.

Usage::

    .venv/bin/python benchmarks/robustness.py [--seeds 0 1 2]

Prints the tables (median over the seeds, min-max beside) and a JSON line. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import statistics
import sys
import tempfile
from pathlib import Path

from hetfl.config import validate
from hetfl.engine.run import run_experiment

BASE = {
    "name": "robustness", "rounds": 20, "checkpoint_every": 100,
    "data": {"dataset": "digits", "n_clients": 10, "partition": {"kind": "iid"}},
    "devices": {"compute": {"distribution": "constant", "median_flops": 2e8}, "jitter": 0.0},
    "model": {"name": "mlp", "hidden": [32]},
    "training": {"lr": 0.1, "batch_size": 16, "local_steps": 10},
    "strategy": {"name": "fedavg", "clients_per_round": 10},
    "evaluation": {"every": 20},
}
RULES = ("mean", "median", "trimmed_mean", "krum")
ATTACKS = ("sign_flip", "scaled_random")
PRIVACY = ((1.0, 0.0), (1.0, 0.3), (0.5, 1.0), (1.0, 1.0))  # (clip C, noise multiplier z)


def run(raw: dict, out: Path) -> dict:
    return run_experiment(validate(raw), out, show_progress=False)


def robust_row(seed: int, rule: str, attack: str | None, out: Path) -> float:
    raw = copy.deepcopy(BASE)
    raw["seed"] = seed
    if attack is not None:
        raw["devices"]["byzantine"] = {"fraction": 0.2, "attack": attack, "scale": 10.0}
    raw["strategy"]["aggregator"] = {"rule": rule, "trim_frac": 0.2, "byzantine": 2}
    return run(raw, out)["final_accuracy"]


def private_row(seed: int, clip: float, z: float, out: Path) -> tuple[float, float | None]:
    raw = copy.deepcopy(BASE)
    raw["seed"] = seed
    raw["data"]["n_clients"] = 20
    raw["strategy"]["privacy"] = {"clip": clip, "noise_multiplier": z, "delta": 1e-5}
    summary = run(raw, out)
    return summary["final_accuracy"], summary["strategy_summary"].get("dp_epsilon")


def spread(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:.3f}" if len(values) == 1 else f"{med:.3f} [{min(values):.3f}-{max(values):.3f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    rows: dict[str, list[float]] = {}
    private: dict[str, list[tuple[float, float | None]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for seed in args.seeds:
            rows.setdefault("clean", []).append(robust_row(seed, "mean", None, root / f"clean{seed}"))
            for attack in ATTACKS:
                for rule in RULES:
                    acc = robust_row(seed, rule, attack, root / f"{attack}-{rule}-{seed}")
                    rows.setdefault(f"{attack} / {rule}", []).append(acc)
            for clip, z in PRIVACY:
                private.setdefault(f"C={clip} z={z}", []).append(private_row(seed, clip, z, root / f"dp{clip}-{z}-{seed}"))
    print(f"Robust aggregation: digits, 10 IID clients, 2 attackers (scale 10), 20 rounds; seeds {args.seeds}")
    print(f"{'attack / rule':<28} final accuracy")
    for name, accs in rows.items():
        print(f"{name:<28} {spread(accs)}")
    print("\nDP-FedAvg: digits, 20 IID clients, 10 a round, 20 rounds, delta 1e-5")
    print(f"{'clip, noise':<28} {'final accuracy':<26} epsilon")
    for name, results in private.items():
        eps = results[0][1]
        print(f"{name:<28} {spread([a for a, _ in results]):<26} {'none (no noise)' if eps is None else f'{eps:.1f}'}")
    print(json.dumps({
        "benchmark": "robustness", "date": dt.date.today().isoformat(), "seeds": args.seeds,
        "robust": rows, "privacy": {k: [list(r) for r in v] for k, v in private.items()},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
