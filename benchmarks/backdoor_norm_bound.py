"""A backdoor (model replacement) against norm bounding and weak differential privacy, on digits.

Sun et al., "Can You Really Backdoor Federated Learning?" (arXiv:1911.07963), claim that bounding the norm of
each client's update (and, more so, adding a little Gaussian noise: "weak DP") mitigates backdoor attacks. Here:
``examples/quickstart.yaml`` (20 digits clients, Dirichlet 0.5, 10 a round, FedAvg, 40 rounds) with 1 client
(``devices.byzantine.fraction: 0.05``) running the backdoor attack of Bagdasaryan et al. (arXiv:1807.00459) every
round it is chosen: half its samples stamped with the trigger (the last 4 pixels at 16) and relabelled 0, its
change boosted 10x (model replacement for 10 clients a round). Rows: no attacker, no defence, norm bounding
(``strategy.aggregator.max_update_norm``) at three bounds, weak DP (``strategy.privacy``: clipping plus noise).

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/backdoor_norm_bound.py [--seeds 0 1 2] [--rounds 40]

Prints a table (mean ± std over the seeds of the final main accuracy, the final attack success rate
``backdoor_asr`` and its largest value during the run, and the share of client changes the bound or the clipping
scaled down, ``norm_bounded_frac`` or ``dp_clipped_frac``) and a JSON line. Asserts nothing.
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

import yaml

from hetfl.config import validate
from hetfl.engine.run import run_experiment

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml"
ATTACK = {"fraction": 0.05, "attack": "backdoor", "scale": 10.0, "target": 0, "poison_frac": 0.5, "trigger_size": 4}
ROWS = {  # label -> (attack?, strategy keys)
    "no attacker": (False, {}),
    "no defence": (True, {}),
    "norm bound M=0.1": (True, {"aggregator": {"max_update_norm": 0.1}}),
    "norm bound M=0.25": (True, {"aggregator": {"max_update_norm": 0.25}}),
    "norm bound M=0.5": (True, {"aggregator": {"max_update_norm": 0.5}}),
    "weak DP C=0.5 z=0.5": (True, {"privacy": {"clip": 0.5, "noise_multiplier": 0.5}}),
    "weak DP C=0.5 z=1": (True, {"privacy": {"clip": 0.5, "noise_multiplier": 1.0}}),
}


def row(seed: int, rounds: int, attack: bool, strategy: dict, out: Path) -> tuple[float, float | None, float | None, float | None]:
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw.update(seed=seed, rounds=rounds, checkpoint_every=1000)
    raw["strategy"].pop("per_algorithm", None)
    raw["strategy"].update(copy.deepcopy(strategy))
    if attack:
        raw["devices"]["byzantine"] = dict(ATTACK)
    run_experiment(validate(raw), out, show_progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    asr = [r["backdoor_asr"] for r in records if r.get("backdoor_asr") is not None]
    last = records[-1]
    bounded = last.get("norm_bounded_frac", last.get("dp_clipped_frac"))  # the share of changes scaled down
    return last["accuracy"], (asr[-1] if asr else None), (max(asr) if asr else None), bounded


def mean_std(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float | None, float | None, float | None]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for i, (label, (attack, strategy)) in enumerate(ROWS.items()):
                out = Path(tmp) / f"{i}-{seed}"
                results.setdefault(label, []).append(row(seed, args.rounds, attack, strategy, out))
    print(f"digits quickstart, 1 of 20 clients backdoors (boost 10), {args.rounds} rounds; seeds {args.seeds}")
    print("| defence | final accuracy | final attack success | largest attack success | changes scaled down |")
    print("|---|---|---|---|---|")
    for label, rs in results.items():
        cells = " | ".join(mean_std([r[k] for r in rs]) for k in range(4))
        print(f"| {label} | {cells} |")
    print(json.dumps({"benchmark": "backdoor_norm_bound", "date": dt.date.today().isoformat(), "seeds": args.seeds,
                      "rounds": args.rounds, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
