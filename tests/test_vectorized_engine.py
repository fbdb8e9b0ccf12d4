"""Batched local training in the engine (``training.vectorize``): the same runs as one task at a time."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from conftest import make_simulator, profile, run_rounds
from hetfl.config import StrategyConfig, TrainingConfig
from hetfl.strategies import build_strategy
from test_runs_end_to_end import HARSH, assert_same_run, hetfl, read_summary, write_config


def harsh_profiles(seed: int, n: int = 8) -> list:
    """tests/test_simulator.py's harsh heterogeneity: dropouts, offline windows, mixed speeds."""
    rng = np.random.default_rng(seed)
    profiles = []
    for i in range(n):
        start = float(rng.uniform(0, 3))
        windows = ((0.0, start), (start + float(rng.uniform(0.5, 2)), math.inf)) if i % 3 == 0 else None
        profiles.append(profile(i, flops=float(rng.choice([2e5, 1e6, 5e6])), dropout=0.15, windows=windows))
    return profiles


def simulate(name: str, vectorize: str, *, seed: int = 0, rounds: int = 12, params=None, **training):
    strategy = build_strategy(StrategyConfig(name=name, clients_per_round=4, deadline_s=4.0, params=params or {}))
    cfg = TrainingConfig(local_steps=2, batch_size=4, lr=0.1, vectorize=vectorize, **training)
    sim = make_simulator(strategy, [6] * 8, harsh_profiles(seed), training=cfg, seed=seed, model="mlp")
    return run_rounds(sim, rounds)


def assert_same_counters(a, b) -> None:
    for f in dataclasses.fields(a):
        if f.name == "wasted_steps":  # batched work for tasks then cancelled: only the batched path has any
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y, f.name


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedbuff"])
@pytest.mark.parametrize("seed", [0, 1])
def test_batched_run_equals_sequential_run_under_harsh_heterogeneity(name, seed):
    params = {"mu": 0.1} if name == "fedprox" else {"concurrency": 6, "buffer_size": 2} if name == "fedbuff" else {}
    off = simulate(name, "off", seed=seed, params=params)
    on = simulate(name, "on", seed=seed, params=params)
    assert on.batches and max(on.batches) > 1, "tasks were trained together"
    assert not off.batches
    assert torch.allclose(on.params, off.params, atol=1e-5, rtol=1e-4)
    assert on.now == off.now and on.version == off.version
    assert_same_counters(on.counters, off.counters)
    c = on.counters
    assert c.failed > 0 and (c.cancelled > 0 or name == "fedbuff"), "the scenario exercises losses and deadlines"
    assert c.trained_steps == 2 * c.arrived  # only arrived tasks count, trained in a batch or not


def test_a_lost_task_is_never_trained_and_a_cancelled_one_is_counted_as_wasted():
    sim = simulate("fedavg", "on", seed=0)
    batched = sum(sim.batches)
    # a batch trains arrivals only (a task that will be lost is known at dispatch); what was trained is an
    # arrived task, a cancelled one (wasted), or one still in flight
    assert batched <= sim.counters.arrived + sim.counters.cancelled + len(sim.state.busy)
    assert sim.counters.wasted_steps % 2 == 0 and sim.counters.wasted_steps <= 2 * sim.counters.cancelled


def test_a_strategy_whose_client_half_is_not_plain_training_is_not_batched():
    on = simulate("ditto", "on")
    off = simulate("ditto", "off")
    assert not on.batches
    assert torch.equal(on.params, off.params)
    assert_same_counters(on.counters, off.counters)


def test_the_local_training_hook():
    task = type("T", (), {"options": {"prox_mu": 0.3}})()
    assert build_strategy(StrategyConfig(name="fedprox", params={"mu": 0.3})).local_training(task) == {"prox_mu": 0.3}
    assert build_strategy(StrategyConfig(name="fedbuff")).local_training(task) == {"prox_mu": 0.3}
    for name in ("ditto", "scaffold", "fednova"):  # they override client_train
        assert build_strategy(StrategyConfig(name=name)).local_training(task) is None
    odd = type("T", (), {"options": {"regularizer": print}})()
    assert build_strategy(StrategyConfig(name="fedavg")).local_training(odd) is None


def test_auto_trains_a_small_round_one_by_one_and_a_large_group_together():
    assert not simulate("fedavg", "auto", rounds=3).batches  # 4 clients a round < vectorize_min_tasks
    assert simulate("fedavg", "auto", rounds=3, vectorize_min_tasks=2).batches
    assert not simulate("fedavg", "auto", rounds=3, vectorize_min_tasks=2, vectorize_max_params=10).batches


@pytest.mark.parametrize("algorithm", ["fedavg", "fedbuff"])
def test_resumed_batched_run_equals_straight_run(tmp_path, capsys, algorithm):
    # the cache of results trained ahead is not checkpointed: a resumed run retrains them, to the same numbers
    config = write_config(tmp_path, strategy__name=algorithm, training__vectorize="on", **HARSH)
    assert hetfl("run", config, "--out", tmp_path / "straight", "--quiet", "--set", "rounds=10") == 0
    assert hetfl("run", config, "--out", tmp_path / "resumed", "--quiet") == 0
    assert hetfl("run", "--resume", tmp_path / "resumed", "--quiet", "--set", "rounds=10") == 0
    assert read_summary(tmp_path / "resumed")["rounds"] == 10
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    assert hetfl("run", config, "--out", tmp_path / "off", "--quiet", "--set", "rounds=10",
                 "--set", "training.vectorize=off") == 0
    off, on = read_summary(tmp_path / "off"), read_summary(tmp_path / "straight")
    for key in ("sim_time_s", "bytes_up", "bytes_down", "rounds", "failed_tasks", "dropped"):
        assert off[key] == on[key], key
    assert off["final_accuracy"] == pytest.approx(on["final_accuracy"], abs=1e-6)
