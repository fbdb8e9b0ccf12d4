"""Stale-update recovery (Wang and Gao, arXiv:2309.13536) at the paper's large staleness: FedAsync and FedBuff, each
without recovery, with hetfl's recovery and with the paper's variant, over seeds.

    .venv/bin/python benchmarks/recovery.py --out results/recovery                    # 2 x 3 x 3 runs, 2 at a time
    .venv/bin/python benchmarks/recovery.py --out results/recovery --table-only       # the table of finished runs
    .venv/bin/python benchmarks/recovery.py --out results/recovery-server --server-flops 1e9 --variants off,hetfl

The federation is ``examples/custom/intertwined.yaml``: digits 8 and 9 only on the two slowest of ten clients, 20x
slower than the others. Variants (``strategy.params.recovery``), both at ``--iterations`` (50) and 8 samples:

- ``off``: no recovery.
- ``hetfl``: the default (relative squared L2 per tensor, L-BFGS, every entry matched, blend of converted and stale).
- ``paper``: as the paper and its code do it: L1 distance, Adam (signed input gradient, lr 0.1, decayed 10x at
  3/8, 5/8, 7/8 of the iterations), the 5% largest entries matched, the converted update alone, and the switch
  back to plain asynchronous FL once the inversion's error is at least the staleness error.
- ``paper_noswitch``: the paper's inversion and conversion without the switch (every slow update converted).

Per run: final accuracy on the whole test set and on the slow clients' classes (8 and 9, scored from the final
checkpoint), simulated time to ``evaluation.target_accuracy`` (0.9), and the server's cost of recovery (FLOPs as
``hetfl.strategies.recovery`` counts them, wall seconds). The table gives mean ± std over the seeds. The last line
printed is one JSON object of every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

CONFIG = ROOT / "examples" / "custom" / "intertwined.yaml"
SLOW_CLASSES = (8, 9)
STRATEGIES = ("fedasync", "fedbuff")
PAPER = {"loss": "l1", "optimizer": "adam", "lr": 0.1, "keep": 0.05, "blend": False, "switch_back": True}
VARIANTS = {"off": None, "hetfl": {}, "paper": PAPER, "paper_noswitch": {**PAPER, "switch_back": False}}
# recover the slow clients' updates only, as the paper converts only the delayed clients': fast clients' updates
# arrive about 8 versions stale under FedAsync and 2 under FedBuff (K = 5), slow ones about 80 and 16
MIN_STALENESS = {"fedasync": 20, "fedbuff": 5}


def overrides(strategy: str, variant: str, seed: int, iterations: int, sim_time: float,
              server_flops: float | None = None) -> list[str]:
    sets = [f"strategy.name={strategy}", f"seed={seed}", f"max_sim_time_s={sim_time}"]
    if server_flops is not None:  # the server's own work takes time (hetfl.engine.server_time): the inversion's too
        sets.append(f"server.flops={server_flops}")
    if VARIANTS[variant] is not None:
        params = {"min_staleness": MIN_STALENESS[strategy], "iterations": iterations, "samples": 8, **VARIANTS[variant]}
        sets += [f"strategy.params.recovery.{key}={json.dumps(value)}" for key, value in params.items()]
    return sets


def run_one(job: tuple[str, str, int, int, float, str, float | None]) -> dict:
    """One run into OUT/strategy-variant-seed; its numbers (the run is reused if its summary exists)."""
    strategy, variant, seed, iterations, sim_time, out, server_flops = job
    import torch

    torch.set_num_threads(1)  # a 4,810-parameter MLP gains nothing from threads; two runs share the machine
    from hetfl.config import load_config
    from hetfl.engine.run import CHECKPOINT, build_federation, read_checkpoint, run_experiment

    folder = Path(out) / f"{strategy}-{variant}-{seed}"
    cfg = load_config(CONFIG, overrides(strategy, variant, seed, iterations, sim_time, server_flops))
    if not (folder / "summary.json").is_file():
        run_experiment(cfg, folder, show_progress=False)
    summary = json.loads((folder / "summary.json").read_text())
    last = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    fed = build_federation(cfg)
    params = read_checkpoint(folder / CHECKPOINT)["state"].params
    x, y = fed.evaluator.x, fed.evaluator.y
    slow = torch.isin(y, torch.tensor(SLOW_CLASSES))
    predicted = fed.trainer.predict(params, x[slow]).argmax(1)
    return {
        "strategy": strategy, "variant": variant, "seed": seed,
        "final_accuracy": summary["final_accuracy"],
        "slow_class_accuracy": float((predicted == y[slow]).float().mean()),
        "time_to_target_s": summary["time_to_target_s"],
        "staleness_max": summary["staleness_max"],
        "recovered": last.get("recovered", 0.0),
        "recovery_gflops": last.get("recovery_flops", 0.0) / 1e9,
        "recovery_wall_s": last.get("recovery_wall_s", 0.0),
        "recovery_weight": last.get("recovery_weight"),
        "switched_at": last.get("recovery_switched_at"),
        "wall_s": summary["wall_time_s"],
    }


def spread(values: list, fmt: str = ".3f") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{fmt}} ± {sd:{fmt}}"


def table(rows: list[dict], n_seeds: int) -> str:
    lines = ["| | final acc | acc on classes 8, 9 | time to 0.9 (s) | recovered | server GFLOP | server wall (s) | run wall (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for strategy in STRATEGIES:
        for variant in VARIANTS:
            group = [r for r in rows if r["strategy"] == strategy and r["variant"] == variant]
            if not group:
                continue
            reached = [r["time_to_target_s"] for r in group if r["time_to_target_s"] is not None]
            target = f"{spread(reached, '.1f')} ({len(reached)} of {len(group)})" if reached else f"— (0 of {len(group)})"
            rec = variant != "off"
            lines.append(
                f"| {strategy} {variant} | {spread([r['final_accuracy'] for r in group])} | "
                f"{spread([r['slow_class_accuracy'] for r in group])} | {target} | "
                f"{spread([r['recovered'] for r in group], '.0f') if rec else '—'} | "
                f"{spread([r['recovery_gflops'] for r in group], '.1f') if rec else '—'} | "
                f"{spread([r['recovery_wall_s'] for r in group], '.0f') if rec else '—'} | "
                f"{spread([r['wall_s'] for r in group], '.0f')} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/recovery")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--sim-time", type=float, default=6.0, help="simulated seconds a run (max_sim_time_s)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--server-flops", type=float, default=None,
                        help="server.flops: the server's FLOP/s, so that its inversions take simulated time (default: free)")
    parser.add_argument("--table-only", action="store_true", help="the table of the runs already finished in --out")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(s, v, seed, args.iterations, args.sim_time, args.out, args.server_flops)
            for seed in seeds for s in args.strategies.split(",") for v in args.variants.split(",")]
    # the recovery runs are the long ones: start them first so that two run side by side to the end
    jobs.sort(key=lambda j: j[1] == "off")
    if args.table_only:
        jobs = [j for j in jobs if (Path(args.out) / f"{j[0]}-{j[1]}-{j[2]}" / "summary.json").is_file()]
    os.makedirs(args.out, exist_ok=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run_one, jobs))
    print(table(rows, len(seeds)))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
