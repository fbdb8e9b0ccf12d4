"""FedConv: heterogeneous model shapes by convolution (docs/benchmarks.md, the section of that name).

benchmarks/fedconv.yaml (digits, 20 clients, three compute tiers with shrinkage ratios 0.25 / 0.5 / 1 of an MLP of 128
hidden units, 30 rounds of 10 clients), seeds 0-2, four runs each:

- ``fedconv``: learned compression, dilation and per-size aggregation weights (10 server steps a size and round);
- ``fedconv-static``: ``server_steps: 0``: sub-models sliced from the global model (HeteroFL's sub-models), their
  changes zero-padded onto the global model and averaged by sample count;
- ``fedavg-smallest``: FedAvg on the model every device holds, the MLP of 32 hidden units (0.25 x 128);
- ``fedavg-full``: FedAvg on the 128-unit MLP on every device, as if the weak ones could hold it (a reference).

Printed: the global model's final test accuracy; the accuracy of each size's sub-model compressed from the final
global model (the models the clients of that size start from), on the pooled test splits; the clients' own trained
models (``personal_acc_mean``); simulated time, MB moved, GFLOP trained, the server's busy seconds
(``server.flops: 1e10``) and wall seconds, mean +- std over the seeds.

Usage: PYTHONPATH=src python benchmarks/fedconv.py [OUT]   (default results/fedconv)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from hetfl.cli import main
from hetfl.config import load_config
from hetfl.engine.run import build_federation
from hetfl.results.seeds import format_spread, mean_std_ci
from hetfl.strategies.fedconv import _forward, compress, delta_kernel, plan, sub_model

CONFIG = Path(__file__).with_name("fedconv.yaml")
SEEDS = (0, 1, 2)
RUNS = {
    "fedconv": [],
    "fedconv-static": ["strategy.params.server_steps=0"],
    "fedavg-smallest": ["strategy.name=fedavg", "strategy.params={}", "model.hidden=[32]"],
    "fedavg-full": ["strategy.name=fedavg", "strategy.params={}"],
}
RATIOS = (0.25, 0.5, 1.0)


def size_accuracies(folder: Path) -> dict[float, float]:
    """Each size's sub-model, compressed from the final global model by the run's final kernels, on the test splits."""
    state = torch.load(folder / "checkpoint.pt", weights_only=False)["state"]
    fed = build_federation(load_config(folder / "config.yaml"))
    test = np.concatenate(fed.data.test)
    x, y = torch.from_numpy(fed.data.dataset.x[test]), torch.from_numpy(fed.data.dataset.y[test])
    model, strategy, out = fed.trainer.model, state.strategy, {}
    for r in RATIOS:
        pieces = plan(model, r)
        kernels = strategy._shrink.get(r) or [delta_kernel(p) for p in pieces]
        small = model if r == 1.0 else sub_model(model, r)
        with torch.no_grad():
            flat = state.params if r == 1.0 else compress(state.params, pieces, kernels)
            out[r] = float((_forward(small, flat, x).argmax(1) == y).float().mean())
    return out


def run_all(root: Path) -> None:
    for name, overrides in RUNS.items():
        for seed in SEEDS:
            folder = root / name / f"seed{seed}"
            if (folder / "summary.json").exists():
                continue
            argv = ["run", str(CONFIG), "--out", str(folder), "--overwrite", "--quiet", "--set", f"seed={seed}"]
            for o in overrides:
                argv += ["--set", o]
            assert main(argv) == 0, argv


def table(root: Path) -> None:
    print("| run | global acc | acc x0.25 | acc x0.5 | acc x1 | own models | sim s | MB moved | GFLOP trained | "
          "server busy s | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in RUNS:
        folders = [root / name / f"seed{seed}" for seed in SEEDS]
        summaries = [json.loads((f / "summary.json").read_text()) for f in folders]
        lasts = [json.loads((f / "metrics.jsonl").read_text().splitlines()[-1]) for f in folders]

        def cell(values, fmt="{:.3f}"):
            return format_spread(mean_std_ci(list(values)), fmt.format)

        if name.startswith("fedconv"):
            sizes = [size_accuracies(f) for f in folders]
            per_size = [cell(s[r] for s in sizes) for r in RATIOS]
            own = cell(s["personal_acc_mean"] for s in summaries)
        else:
            per_size, own = ["—"] * 3, "—"
        print(f"| {name} | {cell(s['final_accuracy'] for s in summaries)} | {' | '.join(per_size)} | {own} | "
              f"{cell((s['sim_time_s'] for s in summaries), '{:.2f}')} | "
              f"{cell(((s['bytes_up'] + s['bytes_down']) / 1e6 for s in summaries), '{:.2f}')} | "
              f"{cell((s['train_flops'] / 1e9 for s in summaries), '{:.2f}')} | "
              f"{cell((r['server_busy_s'] for r in lasts), '{:.2f}')} | "
              f"{cell((s['wall_time_s'] for s in summaries), '{:.1f}')} |")


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "results/fedconv")
    run_all(out)
    table(out)
