"""Update compression: accuracy against simulated time and bytes (docs/benchmarks.md, "Update compression").

    .venv/bin/python benchmarks/compression.py [--config examples/quickstart.yaml] [--seeds 0,1,2] [--rounds 40]
                                               [--target 0.9] [--set key=value ...]

FedAvg on the quickstart federation (digits, 20 clients, Dirichlet 0.5, MLP 64: 4,810 parameters) with every client
on the 3G tier (0.5 Mbit/s up, 2 Mbit/s down), so the upload is most of a task's time, and each client's upload
compressed by ``strategy.compression`` (:mod:`hetfl.compression`): none, float16, QSGD with 4 levels (as the QSGD
paper, without error feedback), top-k 10% and 1% with and without error feedback. Columns, mean ± std over the
seeds: ``final acc`` (after the last round), ``to target`` (``time_to_target_s``, simulated seconds, over the seeds
that reached ``--target``, how many in brackets), ``sim s`` (the rounds' simulated time), ``MB up`` (``bytes_up``,
what the codecs sent), ``wall s``. The last line is one JSON object with every run's numbers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from hetfl.config import load_config, validate
from hetfl.engine.run import run_experiment
from hetfl.results.seeds import format_spread, mean_std_ci, time_to_target

VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("none", {"kind": "none"}),
    ("float16", {"kind": "float16", "error_feedback": False}),
    ("qsgd s=4", {"kind": "qsgd", "levels": 4, "error_feedback": False}),
    ("top-k 10% + EF", {"kind": "topk", "ratio": 0.1, "error_feedback": True}),
    ("top-k 10%", {"kind": "topk", "ratio": 0.1, "error_feedback": False}),
    ("top-k 1% + EF", {"kind": "topk", "ratio": 0.01, "error_feedback": True}),
    ("top-k 1%", {"kind": "topk", "ratio": 0.01, "error_feedback": False}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="examples/quickstart.yaml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--set", action="append", default=["devices.network.tiers={3g: 1.0}"], metavar="KEY=VALUE")
    args = parser.parse_args()
    base = load_config(args.config, args.set)
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, compression in VARIANTS:
            for seed in seeds:
                raw = base.model_dump()
                raw.update(seed=seed, rounds=args.rounds)
                raw["evaluation"]["target_accuracy"] = args.target
                raw["strategy"].update(name="fedavg", compression=compression)
                s = run_experiment(validate(raw), Path(tmp) / f"{len(results)}-{seed}", show_progress=False)
                results.setdefault(label, []).append({
                    "acc": s["final_accuracy"], "to_target_s": s["time_to_target_s"], "sim_s": s["sim_time_s"],
                    "mb_up": s["bytes_up"] / 1e6, "wall_s": s["wall_time_s"]})
                print(label, seed, results[label][-1], flush=True)
    print(f"\n{base.name}, all 3G, fedavg, {args.rounds} rounds, seeds {args.seeds}, target {args.target}\n")
    print("| compression | final acc | to target (sim s) | sim s | MB up | wall s |\n|---|---|---|---|---|---|")
    for label, runs in results.items():
        def spread(key: str, digits: int) -> str:
            return format_spread(mean_std_ci([r[key] for r in runs]), lambda v: f"{v:.{digits}f}")

        hit = time_to_target([r["to_target_s"] for r in runs])
        to_target = "—" if hit["mean_s"] is None else f"{hit['mean_s']:.1f} ({hit['reached']}/{hit['n']})"
        print(f"| {label} | {spread('acc', 3)} | {to_target} | {spread('sim_s', 1)} | {spread('mb_up', 3)} | "
              f"{spread('wall_s', 1)} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
