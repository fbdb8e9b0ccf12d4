"""FedSpine-style adaptive (pruning ratio, LoRA rank) against one fixed arm and against LoRA without pruning.

    .venv/bin/python benchmarks/fedspine.py [--config examples/fedspine_text.yaml] [--rounds N]
                                            [--target PPL] [--fixed RATIO,RANK] [--set key=value ...]

Three runs on the same federation and devices (the config's: text clients, three compute tiers with
memory limits):

``fedspine``
    The config's strategy: a UCB1 bandit per device over ratios x ranks, arms masked by device memory.
``fixed``
    fedspine with one arm for every device (``--fixed``, default 0.5,4: the largest that fits the
    config's low-memory devices), so no bandit choice.
``fedlora``
    LoRA on the unpruned base (HetLoRA, rank ``--fixed``'s rank for all). fedlora reads no memory limit:
    with the config's limits its low and mid devices would not fit the unpruned model (it runs anyway).

Columns: ``time to ppl``: simulated seconds until the evaluation perplexity (each device's own model)
first reaches ``--target`` (default 0.95 x the perplexity of the pretrained base at round 0); ``final ppl``; ``MB``: bytes up + down; ``GFLOP (arm)``: the training FLOPs of
the tasks on the model each task trained (FedSpine.task_flops summed over dispatched tasks; fedlora: the
engine's count); ``params``: mean parameter count of the devices' final models; ``latency ms``: mean
measured inference latency of the devices' final models (one forward pass of 8 windows, median of 20),
per compute tier.

The engine times every task with ``Strategy.task_flops``, so a pruned, low-rank task takes less simulated
time than a full one. The last line of the output is one JSON object, for scripts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.table import Table

from hetfl.config import validate
from hetfl.engine.run import Run, build_federation
from hetfl.models.pruning import inference_latency, param_count
from hetfl.strategies import FedSpine
from hetfl.strategies.fedspine import to_model

ROOT = Path(__file__).resolve().parent.parent


def _set(raw: dict, key: str, value: Any) -> None:
    node = raw
    *path, last = key.split(".")
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value


def variants(raw: dict, fixed: tuple[float, int]) -> dict[str, dict]:
    params = raw["strategy"].get("params", {})
    targets = params.get("targets")
    spine = json.loads(json.dumps(raw))
    one = json.loads(json.dumps(raw))
    one["strategy"]["params"] = {**params, "ratios": [fixed[0]], "ranks": [fixed[1]]}
    lora = json.loads(json.dumps(raw))
    lora["strategy"] = {**raw["strategy"], "name": "fedlora",
                        "params": {"aggregation": "hetlora", "rank": fixed[1], **({"targets": targets} if targets else {})}}
    return {"fedspine": spine, f"fixed {fixed[0]:g},{fixed[1]}": one, f"fedlora r{fixed[1]}": lora}


def run_one(raw: dict, out: Path, target: float | None) -> dict[str, Any]:
    cfg = validate(raw)
    fed = build_federation(cfg)
    strategy = fed.strategy()
    run = Run(cfg, out, fed, strategy, resume=False)
    summary = run.execute(show_progress=False)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    target = 0.95 * lines[0]["perplexity"] if target is None else target
    reached = next((r["sim_time_s"] for r in lines if r.get("perplexity", float("inf")) <= target), None)
    sim = run.sim
    batch = torch.zeros(8, fed.trainer.model.context, dtype=torch.long)
    if isinstance(strategy, FedSpine):
        devices = strategy.device_report(sim, batch, repeats=20)
        steps = cfg.training.local_steps or 1
        gflop = sum(n * f * steps for n, f in zip(strategy._chosen, strategy._arm_flops)) / 1e9
        shares = {k: v for k, v in lines[-1].items() if k.startswith("fedspine_arm_") and v > 0}
    else:
        model = to_model(fed.trainer, fed.trainer.initial)
        latency, params = inference_latency(model, batch, repeats=20), param_count(model)
        devices = [{"client": c, "tier": p.tier, "params": params, "latency_s": latency} for c, p in enumerate(fed.profiles)]
        gflop, shares = sim.counters.trained_flops / 1e9, {}
    tiers: dict[str, list[float]] = {}
    for d in devices:
        tiers.setdefault(d["tier"].split("/")[0], []).append(d["latency_s"] * 1e3)
    return {
        "target_perplexity": target,
        "time_to_target_s": reached,
        "final_perplexity": summary["final_perplexity"],
        "sim_time_s": summary["sim_time_s"],
        "mb": (summary["bytes_up"] + summary["bytes_down"]) / 1e6,
        "gflop_arm": gflop,
        "params_mean": statistics.mean(d["params"] for d in devices),
        "latency_ms_by_tier": {t: statistics.mean(v) for t, v in sorted(tiers.items())},
        "arm_shares": shares,
        "devices": [{k: v for k, v in d.items() if k != "arms"} for d in devices],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "examples" / "fedspine_text.yaml"))
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--target", type=float, help="perplexity to reach (default: 0.95 x the base's, round 0)")
    parser.add_argument("--fixed", default="0.5,4", help="the fixed arm RATIO,RANK (default 0.5,4)")
    parser.add_argument("--set", action="append", default=[], metavar="key=value")
    args = parser.parse_args()
    raw = yaml.safe_load(Path(args.config).read_text())
    if args.rounds:
        raw["rounds"] = args.rounds
    for item in args.set:
        key, value = item.split("=", 1)
        _set(raw, key, yaml.safe_load(value))
    ratio, rank = args.fixed.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, variant in variants(raw, (float(ratio), int(rank))).items():
            results[name] = run_one(variant, Path(tmp) / name.replace(" ", "_").replace(",", "_"), args.target)
    target = results["fedspine"]["target_perplexity"]
    table = Table(title=f"{raw['name']}: {raw['rounds']} rounds, target perplexity {target:.2f}")
    for column in ("method", "time to ppl s", "final ppl", "sim s", "MB", "GFLOP (arm)", "params", "latency ms by tier"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, r in results.items():
        reached = "—" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.0f}"
        latency = ", ".join(f"{t} {v:.3f}" for t, v in r["latency_ms_by_tier"].items())
        table.add_row(name, reached, f"{r['final_perplexity']:.2f}", f"{r['sim_time_s']:.0f}", f"{r['mb']:.2f}",
                      f"{r['gflop_arm']:.1f}", f"{r['params_mean']:.0f}", latency)
    console = Console(width=160)
    console.print(table)
    shares = results["fedspine"]["arm_shares"]
    console.print("fedspine arm shares: " + ", ".join(f"{k.removeprefix('fedspine_arm_')} {v:.0%}" for k, v in shares.items()))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
