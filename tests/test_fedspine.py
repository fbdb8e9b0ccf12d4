"""FedSpine: per-device (pruning ratio, LoRA rank) chosen by a bandit under device memory limits."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import run_rounds
from hetfl.config import validate
from hetfl.engine.run import build_federation, run_experiment
from hetfl.errors import ConfigError, HetflError
from hetfl.models.lora import pad_rank
from hetfl.models.pruning import kept
from hetfl.strategies import STRATEGIES, FedSpine, Task, Update
from hetfl.strategies.fedspine import to_model

ALL_LINEARS = ["q", "k", "v", "o", "fc1", "fc2"]


def spine_config(tmp_path, memory=None, pretrained=True, **params) -> dict:
    """4 text clients, a d_model-16 TinyLM with 4 heads (pretrained briefly into ``tmp_path``), 3 rounds of 3."""
    devices = {"compute": {"distribution": "tiers", "median_flops": 2e8}}
    if memory is not None:
        devices["memory"] = memory
    return {
        "name": "spine", "seed": 0, "rounds": 3,
        "data": {"dataset": "text", "n_clients": 4, "text": {"context": 16, "tokens_per_client": 4096}},
        "devices": devices,
        "model": {"name": "tinylm", "d_model": 16, "n_heads": 4, "d_ff": 32, "n_layers": 2, "pretrained": pretrained,
                  "pretrain": {"steps": 100, "cache_dir": str(tmp_path / "cache")}},
        "training": {"optimizer": "adam", "lr": 0.01, "batch_size": 16, "local_steps": 5},
        "strategy": {"name": "fedspine", "clients_per_round": 3,
                     "params": {"ratios": [0.0, 0.5], "ranks": [2, 4], **params}},
    }


# --------------------------------------------------------------------------- memory
def test_memory_limit_masks_arms_and_a_device_no_arm_fits_is_a_one_line_error(tmp_path):
    assert STRATEGIES["fedspine"] is FedSpine
    fed = build_federation(validate(spine_config(tmp_path, pretrained=False)))
    assert all(p.memory_bytes == float("inf") for p in fed.profiles)  # unlimited unless configured
    memory = fed.strategy().arm_memory()
    assert memory[0] > memory[2] and memory[1] > memory[0]  # ratio 0.5 needs less; rank 4 more than rank 2
    limit = float(np.sort(memory)[1])  # low devices fit the two smallest arms only
    raw = spine_config(tmp_path, memory={"tiers": {"low": limit}}, pretrained=False)
    raw["rounds"] = 6
    fed = build_federation(validate(raw))
    assert {p.tier.split("/")[0] for p in fed.profiles if p.memory_bytes == limit} == {"low"}
    strategy = fed.strategy()
    sim = fed.simulator(strategy)
    dispatched, dispatch = [], sim.dispatch

    def recording(client, **kwargs):
        dispatched.append((client, kwargs["options"]["arm"]))
        return dispatch(client, **kwargs)

    sim.dispatch = recording
    run_rounds(sim, 6)
    low = [arm for c, arm in dispatched if fed.profiles[c].memory_bytes == limit]
    assert low and all(memory[arm] <= limit for arm in low)
    assert any(memory[arm] > limit for c, arm in dispatched if fed.profiles[c].memory_bytes > limit)

    raw = spine_config(tmp_path, memory={"limit": float(memory.min()) - 1}, pretrained=False)
    with pytest.raises(ConfigError) as err:
        build_federation(validate(raw)).strategy()
    assert "devices.memory" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("memory, key", [
    ({"tiers": {"huge": 1e9}}, "devices.memory.tiers"),
    ({"tiers": {"low": -1.0}}, "devices.memory.tiers"),
    ({"limit": 0}, "devices.memory.limit"),
])
def test_bad_memory_configs_are_one_line_naming_the_key(tmp_path, memory, key):
    with pytest.raises(HetflError) as err:
        validate(spine_config(tmp_path, memory=memory))
    assert key in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- the client half
def _client(tmp_path, **params):
    fed = build_federation(validate(spine_config(tmp_path, pretrained=False)))
    strategy = FedSpine(targets=ALL_LINEARS, **{"ratios": [0.0, 0.5], "ranks": [2, 4], **params})
    strategy.setup(fed.trainer)
    return fed, strategy


def _task(strategy, params, ratio, rank, steps=3):
    arm = strategy.arms.index((ratio, rank)) if (ratio, rank) in strategy.arms else 0
    return Task(0, 0, 0, params, steps, 0.0, options={"ratio": ratio, "rank": rank, "arm": arm})


def test_client_prunes_to_the_formula_and_maps_adapters_back_with_zeros(tmp_path):
    fed, strategy = _client(tmp_path)
    trainer, data = fed.trainer, fed.pool.data(0)
    params = strategy.initial_params(trainer)
    state: dict = {}
    result = strategy.client_train(trainer, _task(strategy, params, 0.5, 2), data, state, seed=1)
    assert torch.equal(trainer.flat, trainer.initial)  # the client trains a pruned copy, never the stored base
    heads, chans = state["keep"]
    assert [len(h) for h in heads] == [kept(4, 0.5)] * 2 == [2, 2] and [len(c) for c in chans] == [16, 16]
    V, d, P, dh = 256, 16, 16, 4
    block = lambda h, f: 4 * d + 3 * (d * h * dh + h * dh) + (h * dh * d + d) + (d * f + f) + (f * d + d)
    assert state["params"] == result.stats["params"] == V * d + P * d + 2 * d + 2 * block(2, 16)
    layers = strategy.layers(trainer)
    factors = strategy.unpack(layers, result.params, 2)
    server = strategy.pack([pad_rank(A, B, 4) for A, B in factors])  # as if the server held exactly this upload
    small = strategy.device_model(trainer, server, state)
    out = small(data.x[:3])
    assert out.shape == (3, 16, 256) and torch.isfinite(out).all()
    # the upload: full shapes, zero rows of B for pruned q/k/v heads and fc1 channels, zero columns of A for o, fc2
    for layer, (A, B) in zip(layers, factors):
        assert A.shape == (2, layer.d_in) and B.shape == (layer.d_out, 2)
        rows, cols = strategy.pruned_dims(layer, state["keep"], dh)
        if rows is not None:
            gone = torch.ones(layer.d_out, dtype=torch.bool)
            gone[rows] = False
            assert gone.any() and (B[gone] == 0).all() and B[~gone].abs().sum() > 0
        if cols is not None:
            gone = torch.ones(layer.d_in, dtype=torch.bool)
            gone[cols] = False
            assert gone.any() and (A[:, gone] == 0).all() and A[:, ~gone].abs().sum() > 0
    # the full-architecture personal model computes exactly what the pruned model computes
    full = to_model(trainer, strategy.personal_params(trainer, server, data, state, 0))
    with torch.no_grad():
        assert torch.allclose(full(data.x[:3]), small(data.x[:3]), atol=1e-5)


def test_pruning_is_iterative_nested_and_a_lower_ratio_restores_the_full_base(tmp_path):
    fed, strategy = _client(tmp_path, ratios=[0.0, 0.25, 0.5])
    trainer, data = fed.trainer, fed.pool.data(1)
    params, state = strategy.initial_params(trainer), {}
    strategy.client_train(trainer, _task(strategy, params, 0.25, 2), data, state, seed=1)
    first = [h.tolist() for h in state["keep"][0]], [c.tolist() for c in state["keep"][1]]
    assert [len(c) for c in first[1]] == [24, 24]
    strategy.client_train(trainer, _task(strategy, params, 0.5, 2), data, state, seed=2)
    second = [h.tolist() for h in state["keep"][0]], [c.tolist() for c in state["keep"][1]]
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert set(b) < set(a)  # pruned further within what was kept
    strategy.client_train(trainer, _task(strategy, params, 0.0, 2), data, state, seed=3)
    assert [len(c) for c in state["keep"][1]] == [32, 32] and state["params"] == sum(
        p.numel() for p in trainer.model.parameters())


# --------------------------------------------------------------------------- the server half
@pytest.mark.parametrize("bandit", ["ucb1", "exp3"])
def test_the_bandit_converges_to_the_best_arm_through_on_update(tmp_path, bandit):
    fed, strategy = _client(tmp_path, bandit=bandit, rate_scale=1.0, exp3_gamma=0.2)
    server = SimpleNamespace(trainer=fed.trainer, profiles=fed.profiles, rng=np.random.default_rng(0))
    best = strategy.arms.index((0.5, 2))
    noise = np.random.default_rng(1)
    chosen = []
    for t in range(400):
        options = strategy.configure(server, 0)["options"]
        chosen.append(options["arm"])
        gain = (1.0 if options["arm"] == best else 0.3) + 0.05 * float(noise.standard_normal())
        task = Task(t, 0, 0, fed.trainer.initial, 1, float(t), options=options)
        update = Update(task=task, params=task.params, n_samples=1, steps=1, loss=0.0, arrived_at=t + 1.0,
                        stats={"gain": gain, "params": 1.0})
        strategy.on_update(server, update)  # not part of a round: only the bandit and the history learn
    assert np.mean(np.array(chosen[-100:]) == best) > 0.8
    assert len(strategy.history[0]) == 400 and strategy.bandit_of(0).t == 400
    shares = strategy.metrics()
    assert shares["fedspine_arm_r0.5_k2"] == pytest.approx(np.mean(np.array(chosen) == best))


def test_cost_and_bytes_depend_on_the_arm(tmp_path):
    fed, strategy = _client(tmp_path)
    batch = fed.trainer.cfg.batch_size
    server = SimpleNamespace(trainer=fed.trainer, num_samples=lambda client: batch)
    flops = {arm: strategy.task_flops(server, _task(strategy, fed.trainer.initial, *arm, steps=10))
             for arm in strategy.arms}
    assert flops[(0.5, 2)] < flops[(0.0, 2)] < flops[(0.0, 4)]
    assert flops[(0.0, 2)] > 10 * fed.flops_per_step  # the full model's step, plus the adapters
    short = SimpleNamespace(trainer=fed.trainer, num_samples=lambda client: batch // 2)  # half a batch: half the cost
    task = _task(strategy, fed.trainer.initial, 0.5, 2, steps=10)
    assert strategy.task_flops(short, task) == pytest.approx(flops[(0.5, 2)] * (batch // 2) / batch)
    ups = {arm: strategy.transfer_bytes(server, _task(strategy, fed.trainer.initial, *arm))[1] for arm in strategy.arms}
    assert ups[(0.5, 2)] < ups[(0.0, 2)] < ups[(0.0, 4)]
    assert strategy.transfer_bytes(server, _task(strategy, fed.trainer.initial, 0.5, 2))[0] == 4 * 2 * 2 * (
        4 * 32 + 2 * 48)  # down: full-dimension rank-2 adapters of q, k, v, o, fc1, fc2 in 2 blocks


# --------------------------------------------------------------------------- end to end
def test_run_experiment_on_text_is_deterministic_and_reports_devices(tmp_path):
    runs, summaries = [], []
    for name in ("a", "b"):
        summary = run_experiment(validate(spine_config(tmp_path)), tmp_path / name, show_progress=False)
        lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for line in lines:
            line.pop("wall_time_s")
        runs.append((summary["final_perplexity"], lines))
        summaries.append(summary)
    assert runs[0] == runs[1]
    # summary.json: every client's choices, one per aggregated update (no deadline, no dropout), and its final model
    report = summaries[0]["strategy_summary"]
    assert [s["strategy_summary"]["choices"] for s in summaries] == [report["choices"]] * 2  # deterministic
    assert [len(c) for c in report["choices"]] == summaries[0]["participation"]
    choices = sorted((c for cs in report["choices"] for c in cs), key=lambda c: c["t"])
    first = next(c for c in choices if c["gain"] > 0)  # the first positive rate sets the scale: reward 1 - 1/e
    assert first["reward"] == pytest.approx(1 - np.exp(-1))
    assert all(0 <= c["reward"] < 1 and c["version"] < 3 and (c["ratio"], c["rank"]) in [(0.0, 2), (0.0, 4), (0.5, 2), (0.5, 4)]
               for c in choices)
    # d 16, 4 heads of 4, d_ff 32, 2 layers, context 16, tied: 256*16 + 16*16 + 2*16 + 2*2224 = 8832 parameters;
    # half pruned (2 heads, 16 channels): per layer 64 + 3*(16*8 + 8) + (8*16 + 16) + 2*(16*16 + 16) = 1160 -> 6704
    for device, history in zip(report["devices"], report["choices"]):
        if history:
            assert (device["ratio"], device["rank"]) == (history[-1]["ratio"], history[-1]["rank"])
            assert device["params"] == {0.0: 8832, 0.5: 6704}[device["ratio"]] and device["memory_bytes"] > 0
        else:
            assert device["params"] == 8832 and device["ratio"] is None and device["memory_bytes"] is None
        assert device["latency_s"] > 0
    last = runs[0][1][-1]
    assert last["perplexity"] < 256 and sum(v for k, v in last.items() if k.startswith("fedspine_arm_")) == pytest.approx(1)
    fed = build_federation(validate(spine_config(tmp_path)))
    strategy = fed.strategy()
    sim = run_rounds(fed.simulator(strategy), 2)
    report = strategy.device_report(sim, repeats=1)
    assert len(report) == 4 and all(r["params"] > 0 and r["latency_s"] > 0 for r in report)
    trained = [r for r in report if r["arms"]]
    assert trained and all(r["ratio"] == r["arms"][-1][0] for r in trained)


# --------------------------------------------------------------------------- a fixed arm, the larger base, the benchmark
def test_a_fixed_arm_is_trained_where_it_fits_else_the_next_smaller_model_of_its_rank(tmp_path):
    fed, strategy = _client(tmp_path, ratios=[0.0, 0.25, 0.5], ranks=[2, 4], arm=[0.0, 4])
    # arms: (0,2) (0,4) (0.25,2) (0.25,4) (0.5,2) (0.5,4)
    every = np.ones(6, dtype=bool)
    assert strategy.fixed_arm(every) == 1  # (0, 4) itself
    assert strategy.fixed_arm(np.array([0, 0, 1, 1, 1, 1], dtype=bool)) == 3  # (0.25, 4): the next smaller model
    assert strategy.fixed_arm(np.array([0, 0, 0, 0, 1, 1], dtype=bool)) == 5  # (0.5, 4)
    memory = strategy.arm_memory()
    assert strategy.fixed_arm(np.array([0, 0, 0, 0, 1, 0], dtype=bool)) == 4  # no rank-4 arm fits: the one that does
    low = SimpleNamespace(client_id=0, tier="low", memory_bytes=float(memory[5]))
    server = SimpleNamespace(trainer=fed.trainer, profiles=[low], rng=np.random.default_rng(0))
    assert [strategy.configure(server, 0)["options"]["arm"] for _ in range(3)] == [5, 5, 5]  # no bandit
    assert strategy.metrics()["fedspine_arm_r0.5_k4"] == 1.0
    for bad in ([0.3, 4], [0.0, 3], [0.0, 4.5], [0.5]):
        with pytest.raises(ValueError, match="arm must be"):
            FedSpine(ratios=[0.0, 0.5], ranks=[2, 4], arm=bad)


def test_the_larger_example_base_has_the_documented_size_and_memory_tiers():
    from pathlib import Path

    from hetfl.config import load_config
    from hetfl.models.pruning import param_count

    raw = load_config(Path(__file__).resolve().parents[1] / "examples" / "fedspine_text_1m.yaml").model_dump()
    raw["model"]["pretrained"] = False  # its size only: no pretraining here
    fed = build_federation(validate(raw))
    assert param_count(fed.trainer.model) == 1_093_376  # docs/benchmarks.md and the example's header
    strategy = fed.strategy()
    for tier, ratios in (("low", {0.5}), ("mid", {0.25, 0.5}), ("high", {0.0, 0.25, 0.5})):
        profile = next(p for p in fed.profiles if p.tier.split("/")[0] == tier)
        fits = {ratio for (ratio, _), ok in zip(strategy.arms, strategy.feasible(profile)) if ok}
        assert fits == ratios, tier


def _benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fedspine.py"
    spec = importlib.util.spec_from_file_location("fedspine_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_compares_at_the_lowest_perplexity_every_method_reaches():
    bench = _benchmark()
    assert bench.time_to([[0, 10.0], [50, 9.0], [90, 8.0]], 9.0) == 50 and bench.time_to([[0, 10.0]], 9.0) is None
    # seed 0: best perplexities 8.0 (fedlora), 8.5 (fedspine), 9.0 (fixed): every method reaches 9.0
    results = {
        "fedspine": [{"seed": 0, "base_perplexity": 10.0, "curve": [[0, 10.0], [20, 9.0], [40, 8.5]]}],
        "fixed 0.5,4": [{"seed": 0, "base_perplexity": 10.0, "curve": [[0, 10.0], [10, 9.5], [30, 9.0]]}],
        "fedlora r4": [{"seed": 0, "base_perplexity": 10.0, "curve": [[0, 10.0], [60, 9.0], [120, 8.0]]}],
    }
    bench.equal_perplexity(results)
    assert [runs[0]["time_to_common_s"] for runs in results.values()] == [20, 30, 60]
    assert [runs[0]["speedup"] for runs in results.values()] == [3.0, 2.0, 1.0]  # 60/20, 60/30, 60/60
    # a method that never gets below the base: no common target, no speed-up
    results["fixed 0.5,4"][0]["curve"] = [[0, 10.0], [10, 11.0]]
    bench.equal_perplexity(results)
    assert all(runs[0]["common_target"] is None and runs[0]["speedup"] is None for runs in results.values())
    assert bench.mean_std([1.0, 3.0]) == "2.00 ± 1.41" and bench.mean_std([2.0, None]) == "2.00 (1/2)"
    assert bench.mean_std([None]) == "—"
