"""MNIST-1D: generation time, and the final test accuracy of an MLP and a 1-d CNN, centralised and under FedAvg.

Every accuracy is a ``hetfl compare`` of FedAvg over ``--seeds`` on ``examples/mnist1d.yaml`` (40,000 samples:
32,000 training, 8,000 test), printed as mean +- sample std over the seeds with the exact command:

- ``central``: one client holding every training sample (``data.n_clients=1``, iid), ``clients_per_round`` times
  the federated task's local steps in each round: the same optimiser steps as a federated round, in sequence;
- ``dir0.5``, ``dir0.1``: 20 clients, Dirichlet label skew of that alpha, 10 clients a round.

Generation is timed in a fresh cache folder (the mnist1d package's ``make_dataset``), then read back from it.

    .venv/bin/python benchmarks/mnist1d_bench.py                          # everything: 2 models x 3 settings x 3 seeds
    .venv/bin/python benchmarks/mnist1d_bench.py --models cnn1d --settings central --seeds 0
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "mnist1d.yaml"


def settings(name: str, clients_per_round: int, local_steps: int) -> list[str]:
    if name == "central":
        return ["data.n_clients=1", "data.partition.kind=iid", "strategy.clients_per_round=1",
                f"training.local_steps={clients_per_round * local_steps}"]
    alpha = name.removeprefix("dir")
    return [f"data.partition.alpha={alpha}"]


def generation_time(num_samples: int) -> dict:
    from hetfl.data import mnist1d

    settings_ = mnist1d.check_params({"num_samples": num_samples})
    with tempfile.TemporaryDirectory() as folder:
        started, cpu = time.perf_counter(), time.process_time()
        mnist1d.samples(settings_, Path(folder))
        generated, generated_cpu = time.perf_counter() - started, time.process_time() - cpu
        started = time.perf_counter()
        mnist1d.samples(settings_, Path(folder))
        cached = time.perf_counter() - started
    return {"num_samples": num_samples, "generate_s": generated, "generate_cpu_s": generated_cpu,
            "cached_read_s": cached}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,cnn1d")
    p.add_argument("--settings", default="central,dir0.5,dir0.1")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=str(ROOT / "results" / "bench-mnist1d"))
    p.add_argument("--no-generation", action="store_true", help="skip timing the generation")
    args = p.parse_args()
    import yaml

    base = yaml.safe_load(CONFIG.read_text())
    per_round, steps = base["strategy"]["clients_per_round"], base["training"]["local_steps"]
    report: dict = {"load_1min": os.getloadavg()[0], "rows": []}
    if not args.no_generation:
        report["generation"] = generation_time(base["data"]["params"]["num_samples"])
        print(json.dumps(report["generation"]), flush=True)
    for model in args.models.split(","):
        for setting in args.settings.split(","):
            out = Path(args.out) / f"{model}-{setting}"
            command = ["hetfl", "compare", str(CONFIG.relative_to(ROOT)), "--algorithms", "fedavg", "--seeds", args.seeds,
                       "--out", str(out), "--overwrite", "--quiet", "--set", f"model.name={model}"]
            for s in settings(setting, per_round, steps):
                command += ["--set", s]
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "hetfl.cli", *command[1:]], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - started
            entry = json.loads((out / "comparison.json").read_text())[0]
            acc = entry["final_accuracy"]
            if not isinstance(acc, dict):  # one seed: the run's own summary
                acc, entry = {"mean": acc, "std": None, "n": 1}, {"runs": [entry]}
            row = {"model": model, "setting": setting, "mean": acc["mean"], "std": acc["std"], "n": acc["n"],
                   "per_seed": [r.get("final_accuracy") for r in entry["runs"]], "wall_s": wall,
                   "command": shlex.join(command)}
            report["rows"].append(row)
            print(f"{model:6} {setting:8} {acc['mean']:.3f} +- {acc['std'] or 0:.3f} (n={acc['n']}) "
                  f"{wall:.0f} s  {row['command']}", flush=True)
    report["load_1min_end"] = os.getloadavg()[0]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
