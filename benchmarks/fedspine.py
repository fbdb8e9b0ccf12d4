"""FedSpine-style adaptive (pruning ratio, LoRA rank) against fixed arms and against LoRA without pruning.

    .venv/bin/python benchmarks/fedspine.py [--config examples/fedspine_text.yaml] [--rounds N] [--seeds 0 1 2]
                                            [--d-model D --n-heads H --d-ff F --n-layers L] [--pretrain-steps S]
                                            [--memory config|fit] [--target PPL] [--fixed RATIO,RANK ...]
                                            [--methods fedspine fixed fedlora] [--jobs N] [--json FILE]
                                            [--set key=value ...]

Runs per seed on the same federation and devices (the config's: text clients, three compute tiers
with memory limits):

``fedspine``
    The config's strategy: a UCB1 bandit per device over ratios x ranks, arms masked by device memory.
``fixed``
    One run per arm of ``--fixed`` (default 0.5,4: the largest that fits the config's low-memory devices):
    fedspine with that ``arm`` and no bandit, every device training it where it fits and the next smaller model
    of its rank where it does not (so ``0,4`` is "the largest model each device can train").
``fedlora``
    LoRA on the unpruned base (HetLoRA, the first ``--fixed`` arm's rank for all). fedlora reads no memory limit:
    with the config's limits its low and mid devices would not fit the unpruned model (it runs anyway).

Model size. ``--d-model``, ``--n-heads``, ``--d-ff``, ``--n-layers`` replace the config's TinyLM sizes (the
base is pretrained for them once and cached; ``--pretrain-steps`` sets ``model.pretrain.steps``). The
config's memory limits are bytes for its own model; ``--memory fit`` (the default when a size is changed)
sets them from the arms instead: with the compute tiers sorted from slowest to fastest, the i-th tier
(from 0) can train exactly the arms of the ``i + 1`` largest ratios (the largest rank of each), and the
fastest tier is unlimited. With the config's three tiers and ratios {0, 0.25, 0.5}: low trains only the
half-pruned model, mid also the quarter-pruned one, high anything, as the config's limits say for its model.

Columns, per method, the median over ``--seeds`` and [min - max] beside it: ``time to ppl``: simulated
seconds until the evaluation perplexity (each device's own model) first reaches the target (``--target``,
default 0.95 x the perplexity of the pretrained base at round 0, per seed; a seed that never reaches it
counts as infinite, and the column says how many seeds reached it); ``final ppl``; ``sim s``: simulated
time of all the rounds; ``MB``: bytes up + down; ``GFLOP (arm)``: the training FLOPs of the tasks on the
model each task trained (FedSpine.task_flops summed over dispatched tasks; fedlora: the engine's count);
``params``: mean parameter count of the devices' final models; ``latency ms``: per compute tier, the mean
over its devices of the measured inference latency of each device's final model (one forward pass of 8
windows, median of 20 repeats); ``exploit`` (fedspine): how settled the bandits are at the end, the mean
over devices of the share of the second half of a device's tasks that went to the arm it chose most often
in that half (1: one arm; about 1/k for a device still trying its k feasible arms in turn).

At equal perplexity (a second table, mean ± std over seeds): per seed, the *common target* is the lowest
perplexity every method reaches (the largest of the methods' best evaluations; none if some method never gets
below the base); ``time to common target`` is each method's simulated seconds to reach it and ``speed-up vs
fedlora`` fedlora's time divided by the method's. The bases are pretrained (or loaded from the cache) first,
one per seed, and their pretraining time is printed apart from the runs'. ``--jobs N`` runs N runs at once,
one process each (one torch thread each, ``threads``).

The engine times every task with ``Strategy.task_flops``, so a pruned, low-rank task takes less simulated
time than a full one. The last line of the output is one JSON object, for scripts (``--json`` also writes
it to a file, after every run, so an interrupted benchmark keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hetfl.config import validate
from hetfl.engine.run import Run, build_federation
from hetfl.models.pretrain import load_or_pretrain
from hetfl.models.pruning import inference_latency, param_count
from hetfl.models.transformer import TinyLM
from hetfl.strategies import FedSpine
from hetfl.strategies.fedspine import to_model

ROOT = Path(__file__).resolve().parent.parent
SIZE_KEYS = {"d_model": "d_model", "n_heads": "n_heads", "d_ff": "d_ff", "n_layers": "n_layers"}


def _set(raw: dict, key: str, value: Any) -> None:
    node = raw
    *path, last = key.split(".")
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value


def _copy(raw: dict) -> dict:
    return json.loads(json.dumps(raw))


def variants(raw: dict, fixed: list[tuple[float, int]]) -> dict[str, dict]:
    """fedspine (the config's), one run per arm of ``fixed`` (fedspine's ``arm``) and fedlora at the first one's rank."""
    params = raw["strategy"].get("params", {})
    targets = params.get("targets")
    out = {"fedspine": _copy(raw)}
    for ratio, rank in fixed:
        one = _copy(raw)
        one["strategy"]["params"] = {**params, "arm": [ratio, rank]}
        out[f"fixed {ratio:g},{rank}"] = one
    lora = _copy(raw)
    lora["strategy"] = {**raw["strategy"], "name": "fedlora", "params": {
        "aggregation": "hetlora", "rank": fixed[0][1], **({"targets": targets} if targets else {})}}
    out[f"fedlora r{fixed[0][1]}"] = lora
    return out


def fit_memory(raw: dict) -> dict[str, float]:
    """Memory limits by compute tier from the arms' training memory (module docstring, ``--memory fit``)."""
    free = _copy(raw)
    free["devices"].pop("memory", None)
    strategy = build_federation(validate(free)).strategy()
    assert isinstance(strategy, FedSpine), "--memory fit needs a fedspine config"
    memory = strategy.arm_memory()
    tiers = sorted(raw["devices"]["compute"]["tiers"].items(), key=lambda item: item[1])
    limits = {}
    for i, (tier, _) in enumerate(tiers[:-1]):
        allowed = strategy.ratios[-(i + 1):]
        limits[tier] = float(max(m for (ratio, _), m in zip(strategy.arms, memory) if ratio in allowed))
    return limits


def exploit_share(arms_per_device: list[list]) -> float | None:
    """Mean over devices (with two tasks or more) of the modal arm's share of the second half of its tasks."""
    shares = []
    for arms in arms_per_device:
        late = [tuple(a) for a in arms[len(arms) // 2 :]]
        if len(arms) >= 2:
            shares.append(max(late.count(a) for a in set(late)) / len(late))
    return statistics.mean(shares) if shares else None


def run_one(raw: dict, out: Path, target: float | None) -> dict[str, Any]:
    started = time.perf_counter()
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
        exploit = exploit_share([d["arms"] for d in devices])
    else:
        model = to_model(fed.trainer, fed.trainer.initial)
        latency, params = inference_latency(model, batch, repeats=20), param_count(model)
        devices = [{"client": c, "tier": p.tier, "params": params, "latency_s": latency} for c, p in enumerate(fed.profiles)]
        gflop, shares, exploit = sim.counters.trained_flops / 1e9, {}, None
    tiers: dict[str, list[float]] = {}
    for d in devices:
        tiers.setdefault(d["tier"].split("/")[0], []).append(d["latency_s"] * 1e3)
    return {
        "seed": cfg.seed,
        "base_perplexity": lines[0]["perplexity"],
        "target_perplexity": target,
        "time_to_target_s": reached,
        "final_perplexity": summary["final_perplexity"],
        "sim_time_s": summary["sim_time_s"],
        "mb": (summary["bytes_up"] + summary["bytes_down"]) / 1e6,
        "gflop_arm": gflop,
        "params_mean": statistics.mean(d["params"] for d in devices),
        "latency_ms_by_tier": {t: statistics.mean(v) for t, v in sorted(tiers.items())},
        "arm_shares": shares,
        "exploit": exploit,
        "wall_s": time.perf_counter() - started,
        "devices": [{k: v for k, v in d.items() if k != "arms"} for d in devices],
        "curve": [[r["sim_time_s"], r["perplexity"]] for r in lines if "perplexity" in r],
    }


def spread(values: list[float | None], digits: int = 2) -> str:
    """``median [min-max]`` of ``values`` (None: never, counted as infinite); one value alone as itself."""
    finite = [math.inf if v is None else float(v) for v in values]
    med = statistics.median(finite)

    def fmt(v: float) -> str:
        return "—" if math.isinf(v) else f"{v:,.{digits}f}"

    if len(finite) == 1:
        return fmt(med)
    return f"{fmt(med)} [{fmt(min(finite))}-{fmt(max(finite))}]"


def mean_std(values: list[float | None], digits: int = 2) -> str:
    """``mean ± std`` of the values that are not None (sample std; one value alone as itself), with ``(n/N)``
    when some are None; ``—`` when all are."""
    finite = [float(v) for v in values if v is not None]
    if not finite:
        return "—"
    text = f"{statistics.mean(finite):,.{digits}f}"
    if len(finite) > 1:
        text += f" ± {statistics.stdev(finite):,.{digits}f}"
    return text if len(finite) == len(values) else f"{text} ({len(finite)}/{len(values)})"


def time_to(curve: list[list[float]], target: float) -> float | None:
    """Simulated seconds until a curve of ``[sim_time_s, perplexity]`` first reaches ``target`` (None: never)."""
    return next((t for t, ppl in curve if ppl <= target), None)


def common_target(runs: list[dict[str, Any]]) -> float | None:
    """The lowest perplexity every run reaches: the largest of the runs' lowest evaluated perplexities, if that is
    below the base's (round 0, the same for all); None when some run never gets below the base."""
    target = max(min(ppl for _, ppl in r["curve"]) for r in runs)
    return target if target < min(r["base_perplexity"] for r in runs) else None


def equal_perplexity(results: dict[str, list[dict[str, Any]]]) -> None:
    """Per seed, time of every run to the seed's common target and its speed-up against the fedlora run
    (fedlora's time / the run's), written into each result (``common_target``, ``time_to_common_s``, ``speedup``)."""
    lora = next((name for name in results if name.startswith("fedlora")), None)
    for seed in sorted({r["seed"] for runs in results.values() for r in runs}):
        runs = {name: r for name, rs in results.items() for r in rs if r["seed"] == seed}
        target = common_target(list(runs.values()))
        for r in runs.values():
            r["common_target"] = target
            r["time_to_common_s"] = None if target is None else time_to(r["curve"], target)
        base = runs[lora]["time_to_common_s"] if lora in runs else None
        for r in runs.values():
            t = r["time_to_common_s"]
            r["speedup"] = base / t if base is not None and t else None


def pretrain_base(raw: dict) -> dict[str, Any]:
    """Pretrain (or load from the cache) the TinyLM base of ``raw``'s seed, as the run will; what it took."""
    cfg = validate(raw)
    torch.set_num_threads(cfg.threads)
    m = cfg.model
    model = TinyLM(d_model=m.d_model, n_heads=m.n_heads, d_ff=m.d_ff, n_layers=m.n_layers, context=cfg.data.text.context)
    done = load_or_pretrain(model, m.pretrain, cfg.data, cfg.seed)
    return {"seed": cfg.seed, "params": param_count(model), "cached": done.cached, "seconds": done.seconds,
            "perplexity": done.perplexity}


def run_job(job: tuple[str, dict, str, float | None]) -> tuple[str, dict[str, Any]]:
    name, variant, folder, target = job
    return name, run_one(variant, Path(folder), target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "examples" / "fedspine_text.yaml"))
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default: the config's)")
    for key in SIZE_KEYS:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"TinyLM model.{key}")
    parser.add_argument("--pretrain-steps", type=int, help="model.pretrain.steps of the base")
    parser.add_argument("--memory", choices=("config", "fit"),
                        help="device memory limits: the config's, or fitted to the arms (default: fit if a size is set)")
    parser.add_argument("--target", type=float, help="perplexity to reach (default: 0.95 x the base's, round 0)")
    parser.add_argument("--fixed", nargs="+", default=["0.5,4"],
                        help="fixed arms RATIO,RANK, one run each (default 0.5,4); fedlora takes the first one's rank")
    parser.add_argument("--methods", nargs="+", choices=("fedspine", "fixed", "fedlora"),
                        default=["fedspine", "fixed", "fedlora"], help="which of the three to run (default all)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one process each (default 1)")
    parser.add_argument("--json", type=Path, help="also write the results to this file (after every run)")
    parser.add_argument("--set", action="append", default=[], metavar="key=value")
    args = parser.parse_args()
    raw = yaml.safe_load(Path(args.config).read_text())
    if args.rounds:
        raw["rounds"] = args.rounds
    sized = False
    for key in SIZE_KEYS:
        if getattr(args, key) is not None:
            raw["model"][key] = getattr(args, key)
            sized = True
    if args.pretrain_steps:
        _set(raw, "model.pretrain.steps", args.pretrain_steps)
    for item in args.set:
        key, value = item.split("=", 1)
        _set(raw, key, yaml.safe_load(value))
    if (args.memory or ("fit" if sized else "config")) == "fit":
        raw["devices"]["memory"] = {"tiers": fit_memory(raw)}
    fixed = [(float(a.split(",")[0]), int(a.split(",")[1])) for a in args.fixed]
    seeds = args.seeds or [raw.get("seed", 0)]
    console = Console(width=180)
    console.print(f"memory limits: {raw['devices'].get('memory')}; model: "
                  + ", ".join(f"{k} {raw['model'].get(k)}" for k in SIZE_KEYS), highlight=False)
    per_seed = [{**_copy(raw), "seed": seed} for seed in seeds]
    pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) if args.jobs > 1 else None
    pretrained = list(pool.map(pretrain_base, per_seed) if pool else map(pretrain_base, per_seed))
    for p in pretrained:
        console.print(f"seed {p['seed']}: base of {p['params']:,} parameters, held-out perplexity {p['perplexity']:.3f}, "
                      + ("cached" if p["cached"] else f"pretrained in {p['seconds']:.0f} s"), highlight=False)
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(name, variant, str(Path(tmp) / f"{seed}_{name.replace(' ', '_').replace(',', '_')}"), args.target)
                for seed, one in zip(seeds, per_seed) for name, variant in variants(one, fixed).items()
                if name.split()[0] in args.methods]
        for name, result in (pool.map(run_job, jobs) if pool else map(run_job, jobs)):
            results.setdefault(name, []).append(result)
            console.print(f"seed {result['seed']} {name}: final ppl {result['final_perplexity']:.3f}, time to target "
                          f"{result['time_to_target_s']}, wall {result['wall_s']:.0f} s", highlight=False)
            if args.json:
                args.json.write_text(json.dumps({"config": raw, "pretrained": pretrained, "results": results}, indent=1))
    if pool:
        pool.shutdown()
    equal_perplexity(results)
    if args.json:
        args.json.write_text(json.dumps({"config": raw, "pretrained": pretrained, "results": results}, indent=1))
    targets = sorted({r["target_perplexity"] for runs in results.values() for r in runs})
    title = (f"{raw['name']}: {raw['rounds']} rounds, seeds {', '.join(map(str, seeds))}, target perplexity "
             + ", ".join(f"{t:.2f}" for t in targets) + "; median [min-max] over seeds")
    table = Table(title=escape(title))
    for column in ("method", "time to ppl s (reached)", "final ppl", "sim s", "MB", "GFLOP (arm)", "params",
                   "latency ms by tier", "exploit"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, runs in results.items():
        hits = sum(r["time_to_target_s"] is not None for r in runs)
        tiers = sorted({t for r in runs for t in r["latency_ms_by_tier"]})
        latency = ", ".join(f"{t} {spread([r['latency_ms_by_tier'][t] for r in runs], 3)}" for t in tiers)
        table.add_row(name, f"{spread([r['time_to_target_s'] for r in runs], 0)} ({hits}/{len(runs)})",
                      spread([r["final_perplexity"] for r in runs]), spread([r["sim_time_s"] for r in runs], 0),
                      spread([r["mb"] for r in runs]), spread([r["gflop_arm"] for r in runs], 1),
                      spread([r["params_mean"] for r in runs], 0), latency,
                      "—" if runs[0]["exploit"] is None else spread([r["exploit"] for r in runs]))
    console.print(table)
    common = {r["seed"]: r["common_target"] for runs in results.values() for r in runs}
    equal = Table(title=escape("at equal perplexity, mean ± std over seeds; common target per seed (the lowest "
                               "perplexity every method reaches): " + ", ".join(
                                   f"{s}: {'none' if t is None else f'{t:.3f}'}" for s, t in common.items())))
    for column in ("method", "time to common target s", "speed-up vs fedlora", "final ppl", "best ppl", "params"):
        equal.add_column(column, justify="left" if column == "method" else "right")
    for name, runs in results.items():
        equal.add_row(name, mean_std([r["time_to_common_s"] for r in runs], 0), mean_std([r["speedup"] for r in runs]),
                      mean_std([r["final_perplexity"] for r in runs], 3),
                      mean_std([min(p for _, p in r["curve"]) for r in runs], 3),
                      mean_std([r["params_mean"] for r in runs], 0))
    console.print(equal)
    for r in results.get("fedspine", []):
        console.print(f"fedspine arm shares, seed {r['seed']}: "
                      + ", ".join(f"{k.removeprefix('fedspine_arm_')} {v:.0%}" for k, v in r["arm_shares"].items()),
                      highlight=False)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
