"""Where the time goes in a 5G / WiFi / Ethernet mix (docs/benchmarks.md, "Where the time goes").

Nine clients, three on each of the link tiers calibrated to Hayek et al. (arXiv 2504.04678; hetfl.devices.tiers:
``5g_measured``, ``wifi_measured``, ``ethernet_measured``), equal compute, FedAvg with every client in every round
(as the paper's rounds), a model of about SqueezeNet's size (an MLP 64-1024-1024-10: 1.1 M parameters, 4.4 MB, where
SqueezeNet has about 1.2 M), 10 rounds, seeds 0, 1, 2. Prints, per tier, the mean seconds of a task's phases and each
phase's share of the clients' time, and the 5G uplink's share of a round; writes each run and ``report.html``
with ``time_breakdown.png`` under OUT.

Usage: python benchmarks/time_breakdown.py [OUT]   (default results/time_breakdown)
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np

from hetfl.config import validate
from hetfl.engine.run import build_federation, run_experiment
from hetfl.results.report import render_report

SEEDS = (0, 1, 2)
TIERS = ("5g_measured", "wifi_measured", "ethernet_measured")
PHASES = ("wait", "download", "compute", "upload", "idle")


def config(seed: int) -> dict:
    return {
        "name": f"breakdown-seed{seed}", "seed": seed, "rounds": 10,
        "data": {"dataset": "digits", "n_clients": 9},
        "model": {"name": "mlp", "hidden": [1024, 1024]},
        "strategy": {"name": "fedavg", "clients_per_round": 9},
        "training": {"local_steps": 10, "batch_size": 32},
        "devices": {"compute": {"distribution": "constant"},
                    "network": {"tiers": {tier: 1 for tier in TIERS}}},
    }


def main(out: Path) -> None:
    per_tier = {tier: {phase: [] for phase in PHASES} for tier in TIERS}  # seed means of a task's seconds
    share_5g_up, rounds_s, walls = [], [], []
    for seed in SEEDS:
        cfg = validate(config(seed))
        profiles = build_federation(cfg).profiles
        tier_of = [profiles.tier_names[c].split("/")[-1] for c in profiles.tier_code]
        summary = run_experiment(cfg, out / f"seed{seed}", show_progress=False, overwrite=True)
        times, tasks = summary["client_time_s"], np.asarray(summary["participation"], dtype=float)
        rounds_s.append(summary["sim_time_s"] / summary["rounds"])
        walls.append(summary["wall_time_s"])
        for tier in TIERS:
            members = [c for c, t in enumerate(tier_of) if t == tier]
            for phase in PHASES:  # per task (idle: per round, between a client's tasks)
                per_tier[tier][phase].append(sum(times[phase][c] for c in members) / tasks[members].sum())
        share_5g_up.append(per_tier["5g_measured"]["upload"][-1] / rounds_s[-1])
    render_report(out)

    def cell(values: list[float]) -> str:
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"

    print("| tier | " + " | ".join(f"{p} s/task" for p in PHASES) + " |")
    print("|---|" + "---|" * len(PHASES))
    for tier in TIERS:
        print(f"| {tier} | " + " | ".join(cell(per_tier[tier][p]) for p in PHASES) + " |")
    print(f"\nround: {cell(rounds_s)} s; 5G upload / round: {cell(share_5g_up)}")
    up = {tier: statistics.mean(per_tier[tier]["upload"]) for tier in TIERS}
    print(f"upload time 5G / Ethernet: {up['5g_measured'] / up['ethernet_measured']:.1f}x, "
          f"5G / WiFi: {up['5g_measured'] / up['wifi_measured']:.1f}x")
    print(f"wall s per run: {[round(w, 1) for w in walls]}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/time_breakdown"))
