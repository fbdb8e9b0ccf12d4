"""FedProx's stragglers experiment (Li et al., arXiv:1812.06127, Figure 1) on Synthetic(1,1): partial work against dropping.

    .venv/bin/python benchmarks/fedprox_stragglers.py [--config benchmarks/fedprox_stragglers.yaml] [--seeds 0,1,2]
        [--stragglers 0,0.5,0.9] [--variants "fedavg (drop),fedprox mu=0,fedprox mu=1"] [--rounds N] [--out results/fedprox_stragglers]
        [--figure docs/figures/fedprox_stragglers.png] [--set key=value ...]

The federation (``benchmarks/fedprox_stragglers.yaml``): Synthetic(1,1), 30 clients, 10 a round, logreg, 20 local
epochs at batch 10 and lr 0.01 (the paper's), two device tiers, fast and slow (0.15 of the speed), and a round
deadline the fast tier meets with all 20 epochs and the slow tier does not. For each share of slow devices
(``--stragglers``, the probability of the slow tier: which devices are slow is drawn with the seed), three variants:

- ``fedavg (drop)``: FedAvg, stragglers dropped at the deadline (their work is lost);
- ``fedprox mu=0``: FedProx with mu 0 and ``strategy.partial_work``: a straggler returns the local steps it did
  by the deadline, aggregated with the usual sample weights (the paper's "FedProx, mu = 0");
- ``fedprox mu=1``: the same with the proximal term, mu 1 (the paper's value for the synthetic data).

Reported, mean ± standard deviation over the seeds: final and best test accuracy, final test loss (hetfl records
the global model's loss on the evaluation clients' test splits, not the training loss of the paper's figure),
partial updates and dropped updates per round, and the mean share of its steps a partial update did. A figure
(accuracy and loss against rounds, the mean and a band of one standard deviation) goes to ``--figure``.

Every run's folder stays under ``--out``; a run whose ``summary.json`` is there is not run again, so several
invocations (one per ``--stragglers`` value or ``--variants`` subset, say, in parallel) fill the folder and a last one tabulates them all. This is a
benchmark, not a test: nothing asserts a number. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from hetfl.config import load_config  # noqa: E402
from hetfl.engine.run import run_experiment  # noqa: E402

VARIANTS = {
    "fedavg (drop)": ["strategy.name=fedavg", "strategy.partial_work=false"],
    "fedprox mu=0": ["strategy.name=fedprox", "strategy.partial_work=true", "strategy.per_algorithm.fedprox.mu=0"],
    "fedprox mu=1": ["strategy.name=fedprox", "strategy.partial_work=true", "strategy.per_algorithm.fedprox.mu=1"],
}


def run_once(config: str, out: Path, overrides: list[str]) -> tuple[dict, list[dict]]:
    """The run's summary and metrics lines, from its folder if it has finished before, else run now."""
    if not (out / "summary.json").is_file():
        shutil.rmtree(out, ignore_errors=True)  # an unfinished run of an interrupted invocation: run it again
        run_experiment(load_config(config, overrides), out, show_progress=False)
    summary = json.loads((out / "summary.json").read_text())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, lines


def scores(summary: dict, lines: list[dict]) -> dict[str, float]:
    rounds = max(summary["rounds"], 1)
    speeds = summary["client_speed"]
    return {
        "final_acc": summary["final_accuracy"],
        "best_acc": summary["best_accuracy"],
        "final_loss": summary["final_loss"],
        "partial_per_round": summary["partial_updates"] / rounds,
        "dropped_per_round": summary["dropped"] / rounds,
        "work_of_partial": summary["partial_work_mean"],
        "slow_share": sum(s < 1 for s in speeds) / len(speeds),
        "wall_s": summary["wall_time_s"],
    }


def spread(values: list[float | None], fmt: str = ".3f") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{fmt}} ± {std:{fmt}}"


def plot(curves: dict[str, dict[str, list[list[dict]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(curves)
    fig, axes = plt.subplots(2, len(settings), figsize=(4.2 * len(settings), 6.4), sharex=True, squeeze=False)
    for col, setting in enumerate(settings):
        for variant, runs in curves[setting].items():
            rounds = np.array([line["round"] for line in runs[0]])
            for row, key in enumerate(("accuracy", "loss")):
                values = np.array([[line[key] for line in run] for run in runs])
                mean, std = values.mean(axis=0), values.std(axis=0)
                ax = axes[row][col]
                ax.plot(rounds, mean, label=variant)
                ax.fill_between(rounds, mean - std, mean + std, alpha=0.2)
        axes[0][col].set_title(f"{setting} stragglers")
        axes[1][col].set_xlabel("round")
    axes[0][0].set_ylabel("test accuracy")
    axes[1][0].set_ylabel("test loss")
    axes[0][0].legend()
    fig.suptitle("Synthetic(1,1): FedAvg dropping stragglers vs FedProx with partial work (mean ± std over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "benchmarks" / "fedprox_stragglers.yaml"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--stragglers", default="0,0.5,0.9")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="a comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--out", default=str(ROOT / "results" / "fedprox_stragglers"))
    parser.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "fedprox_stragglers.png"))
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    shares = [float(s) for s in args.stragglers.split(",")]
    results: dict[str, dict[str, list[dict]]] = {}
    curves: dict[str, dict[str, list[list[dict]]]] = {}
    for share in shares:
        setting = f"{share:.0%}"
        tiers = [f"devices.compute.tier_weights.fast={1 - share:g}", f"devices.compute.tier_weights.slow={share:g}"]
        for variant in args.variants.split(","):
            variant_overrides = VARIANTS[variant]
            for seed in seeds:
                overrides = [*args.set, *tiers, *variant_overrides, f"seed={seed}"]
                if args.rounds:
                    overrides.append(f"rounds={args.rounds}")
                slug = "".join(ch for ch in variant if ch.isalnum())
                folder = Path(args.out) / f"{share:g}-{slug}-{seed}"
                summary, lines = run_once(args.config, folder, overrides)
                results.setdefault(setting, {}).setdefault(variant, []).append(scores(summary, lines))
                curves.setdefault(setting, {}).setdefault(variant, []).append(lines)
                print(f"{setting} stragglers, {variant}, seed {seed}: {scores(summary, lines)}", flush=True)
    header = ("stragglers", "variant", "slow devices", "final acc", "best acc", "final loss", "partial/round",
              "work of a partial", "dropped/round")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for setting, by_variant in results.items():
        for variant, runs in by_variant.items():
            column = lambda key: [r[key] for r in runs]  # noqa: E731
            print(f"| {setting} | {variant} | {spread(column('slow_share'), '.2f')} | {spread(column('final_acc'))} | "
                  f"{spread(column('best_acc'))} | {spread(column('final_loss'))} | "
                  f"{spread(column('partial_per_round'), '.1f')} | {spread(column('work_of_partial'), '.2f')} | "
                  f"{spread(column('dropped_per_round'), '.1f')} |")
    plot(curves, Path(args.figure))
    print(f"figure: {args.figure}")
    print(json.dumps({"seeds": seeds, "stragglers": shares, "results": results}))


if __name__ == "__main__":
    main()
