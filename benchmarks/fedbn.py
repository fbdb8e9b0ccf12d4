"""FedBN against FedAvg under feature shift: a user's BatchNorm CNN, named by import path.

    .venv/bin/python benchmarks/fedbn.py [--config examples/custom/feature_skew.yaml] [--seeds 0,1,2]
                                         [--strengths 0,1,2] [--kind affine] [--rounds N] [--set key=value ...]

The federation (``examples/custom/feature_skew.yaml``): scikit-learn's digits, 10 clients with IID labels, all
of them in every round, each with its own shift of the inputs (``data.feature_skew``, default ``affine``: client
``i``'s features become ``(1 + l_i) x + l_i`` in feature standard deviations, the levels ``l_i`` spread evenly
from 0 to the strength), and ``mylab.models:SmallResNet`` from ``examples/custom`` (a ResNet-style CNN with three
BatchNorm layers), given by import path as a user gives their own model.

For every strength and seed it runs FedAvg and FedBN (Li et al., ICLR 2021, arXiv:2102.07623: the BatchNorm
layers stay on each client) for the config's rounds and reports, as mean ± standard deviation over the seeds:

- ``client acc``: the mean over clients of the accuracy on its own test split of the model it uses: FedAvg's
  global model (``client_acc_mean``), FedBN's shared layers with the client's own BatchNorm (``personal_acc_mean``);
- ``p10``: the 10th percentile of the same per-client accuracies;
- ``global acc``: the global model's accuracy on all test samples (FedBN's global BatchNorm entries are the
  sample-weighted mean of the clients', its default ``global_norm: mean``);
- ``kB/round``: bytes up and down per round.

The paper's claim is a direction: under feature shift, keeping BatchNorm local gives each client a better model
than FedAvg's. Both algorithms get the same data, devices, model, seeds, rounds and local training (no tuning
for either). This is a benchmark, not a test: nothing asserts a number. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "custom"))  # mylab, the example user package (also found from the config)

from hetfl.config import load_config  # noqa: E402
from hetfl.engine.run import run_experiment  # noqa: E402

ALGORITHMS = ("fedavg", "fedbn")


def scores(summary: dict) -> dict[str, float]:
    personal = summary.get("personal_acc_mean") is not None
    rounds = max(summary["rounds"], 1)
    return {
        "client": summary["personal_acc_mean"] if personal else summary["client_acc_mean"],
        "p10": summary["personal_acc_p10"] if personal else summary["client_acc_p10"],
        "global": summary["final_accuracy"],
        "kb_round": (summary["bytes_up"] + summary["bytes_down"]) / rounds / 1e3,
    }


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "examples" / "custom" / "feature_skew.yaml"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--strengths", default="0,1,2")
    parser.add_argument("--kind", default="affine", choices=["affine", "noise", "rotation"])
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    strengths = [float(s) for s in args.strengths.split(",")]
    console = Console(width=160)
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strength in strengths:
            skew = ["data.feature_skew.kind=none"] if strength == 0 else [
                f"data.feature_skew.kind={args.kind}", f"data.feature_skew.strength={strength:g}"]
            for algorithm in ALGORITHMS:
                for seed in seeds:
                    overrides = [*args.set, *skew, f"strategy.name={algorithm}", f"seed={seed}"]
                    if args.rounds:
                        overrides.append(f"rounds={args.rounds}")
                    cfg = load_config(args.config, overrides)
                    out = Path(tmp) / f"{strength:g}-{algorithm}-{seed}"
                    summary = run_experiment(cfg, out, show_progress=False)
                    results.setdefault(f"{strength:g}", {}).setdefault(algorithm, []).append(scores(summary))
                    console.print(f"strength {strength:g} {algorithm} seed {seed}: {scores(summary)}", highlight=False)
    table = Table(title=f"FedAvg and FedBN under {args.kind} feature shift (digits, 10 clients, SmallResNet; "
                        f"mean ± std over seeds {args.seeds})")
    for column in ("strength", "algorithm", "client acc", "p10", "global acc", "kB/round"):
        table.add_column(column, justify="right")
    for strength, by_algorithm in results.items():
        for algorithm, runs in by_algorithm.items():
            table.add_row(strength, algorithm, *(spread([r[k] for r in runs]) for k in ("client", "p10", "global")),
                          f"{statistics.mean(r['kb_round'] for r in runs):.1f}")
    console.print(table)
    print(json.dumps({"kind": args.kind, "seeds": seeds, "results": results}))


if __name__ == "__main__":
    main()
