"""LLM-side efficiency on examples/lora_text.yaml: sparse LoRA uploads (cellm), domain experts (hdee, flexmore) against fedlora.

    .venv/bin/python benchmarks/llm_efficiency.py [--methods fedlora cellm hdee hdee-homo flexmore ...] [--seeds 0 1 2]
                                                  [--rounds N] [--json FILE]

Every method runs the config's federation (8 text clients of two styles, three compute tiers, 20 rounds,
4 clients a round) with the same targets (q, k, v, o, fc1, fc2) on the same pretrained TinyLM:

``fedlora``      the config as it is: HetLoRA, rank 2/4/8 by compute tier.
``cellm``        the same ranks, uploads the top 10 % of the adapters' change (values + indices), error feedback.
``hdee``         one expert per style (code, prose): rank 8 trained 1.5 x the local steps for code, rank 2 for
                 0.5 x on prose (the same steps in total as ``hdee-homo``); the ensemble is scored.
``hdee-homo``    the homogeneous ensemble: rank 4 and 1 x the local steps for both.
``flexmore``     hdee's experts (ranks 8 and 2, 1.5 x and 0.5 x the steps) with router vectors, joined by the router.
``flexmore-full``  the same with full-sized experts (a dense change of every target layer) for both domains.
``flexmore-2-8``   the ranks swapped: rank 2 on code, rank 8 on prose (the same steps as ``flexmore``).
``flexmore-router``, ``flexmore-full-router``  ``flexmore`` / ``flexmore-full`` (the same 20 rounds of experts)
                 and 5 more rounds that train the joined router on every client (``expert_rounds: 20``, ``rounds: 25``).

Prints one row per method: final perplexity (each client's model on its test split, pooled), simulated
seconds, MB up and down, train GFLOP and wall seconds, mean +- std over the seeds; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from hetfl.config import validate
from hetfl.engine.run import Run, build_federation

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["q", "k", "v", "o", "fc1", "fc2"]
METHODS = {
    "fedlora": None,
    "cellm": {"name": "cellm", "params": {"density": 0.1, "ranks": {"low": 2, "mid": 4, "high": 8}, "targets": TARGETS}},
    "hdee": {"name": "hdee", "params": {"domains": 2, "ranks": [8, 2], "steps": [1.5, 0.5], "targets": TARGETS}},
    "hdee-homo": {"name": "hdee", "params": {"domains": 2, "ranks": [4, 4], "steps": [1.0, 1.0], "targets": TARGETS}},
    "flexmore": {"name": "flexmore", "params": {"domains": 2, "ranks": [8, 2], "steps": [1.5, 0.5], "targets": TARGETS}},
    "flexmore-full": {"name": "flexmore", "params": {"domains": 2, "ranks": ["full", "full"], "steps": [1.5, 0.5],
                                                     "targets": TARGETS}},
    "flexmore-2-8": {"name": "flexmore", "params": {"domains": 2, "ranks": [2, 8], "steps": [1.5, 0.5], "targets": TARGETS}},
    "flexmore-router": {"name": "flexmore", "params": {"domains": 2, "ranks": [8, 2], "steps": [1.5, 0.5], "targets": TARGETS,
                                                       "expert_rounds": 20}, "rounds": 25},
    "flexmore-full-router": {"name": "flexmore", "params": {"domains": 2, "ranks": ["full", "full"], "steps": [1.5, 0.5],
                                                            "targets": TARGETS, "expert_rounds": 20}, "rounds": 25},
}


def run_one(raw: dict, out: Path) -> dict:
    started = time.perf_counter()
    cfg = validate(raw)
    fed = build_federation(cfg)
    summary = Run(cfg, out, fed, fed.strategy(), resume=False).execute(show_progress=False)
    return {"seed": cfg.seed, "perplexity": summary["final_perplexity"], "sim_s": summary["sim_time_s"],
            "mb_up": summary["bytes_up"] / 1e6, "mb_down": summary["bytes_down"] / 1e6,
            "gflop": summary["train_flops"] / 1e9, "wall_s": time.perf_counter() - started}


def mean_std(values: list[float], digits: int) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "examples" / "lora_text.yaml"))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--json", type=Path, help="also write the runs to this file")
    args = parser.parse_args()
    base = yaml.safe_load(Path(args.config).read_text())
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for seed in args.seeds:
                raw = json.loads(json.dumps(base))
                raw["seed"] = seed
                if args.rounds:
                    raw["rounds"] = args.rounds
                if METHODS[method] is not None:
                    spec = dict(METHODS[method])
                    raw["rounds"] = spec.pop("rounds", raw["rounds"])
                    raw["strategy"] = {**raw["strategy"], **spec}
                results.setdefault(method, []).append(run_one(raw, Path(tmp) / f"{method}_{seed}"))
                if args.json:
                    args.json.write_text(json.dumps(results, indent=1))
    print("| method | final perplexity | simulated s | MB up | MB down | train GFLOP | wall s |")
    print("|---|---|---|---|---|---|---|")
    for method, runs in results.items():
        col = lambda key, d: mean_std([r[key] for r in runs], d)  # noqa: E731
        print(f"| {method} | {col('perplexity', 3)} | {col('sim_s', 0)} | {col('mb_up', 3)} | {col('mb_down', 3)} "
              f"| {col('gflop', 1)} | {col('wall_s', 0)} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
