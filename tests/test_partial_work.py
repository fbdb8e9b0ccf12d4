"""Partial work of stragglers (``strategy.partial_work``, FedProx's gamma-inexact solutions), worked by hand.

Every federation here is logreg 4 -> 3 (15 parameters: 60 bytes each way), ``flops_per_step`` 1e6 and 10 local
steps a task, so a client of F FLOP/s takes 1e6 / F seconds a step, and a transfer at 1e5 B/s with 0.01 s latency
takes 60 / 1e5 + 0.01 = 0.0106 s.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from conftest import make_simulator, profile, run_rounds
from hetfl.cli import main
from hetfl.config import StrategyConfig, TrainingConfig, validate
from hetfl.deploy.tokens import write_tokens
from hetfl.devices import TaskTiming, steps_in_time, task_timing
from hetfl.engine import Simulator
from hetfl.engine.simulator import task_seed
from hetfl.errors import ConfigError
from hetfl.results.variant import variant_label
from hetfl.strategies import FedAvg, FedProx, build_strategy

TEN_STEPS = TrainingConfig(local_steps=10, batch_size=4, lr=0.1, vectorize="off")
TRANSFER = 60 / 1e5 + 0.01


class Recording(FedAvg):
    """FedAvg that keeps every update it is handed."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen = []

    def on_update(self, server, update) -> None:
        self.seen.append(update)
        super().on_update(server, update)


def partial(strategy):
    strategy.partial_work = True  # what build_strategy does for strategy.partial_work: true
    return strategy


# --------------------------------------------------------------------------- the arithmetic
def test_steps_in_time_by_hand():
    timing = TaskTiming(download_s=0.5, compute_s=10.0, upload_s=0.5)  # 10 steps of 1 s
    assert steps_in_time(timing, 10, 4.0) == 3  # floor((4 - 1) / 1)
    assert steps_in_time(timing, 10, 3.99) == 2
    assert steps_in_time(timing, 10, 11.0) == 10  # all fit: never more than asked
    assert steps_in_time(timing, 10, 1.5) == 0  # the transfers fit, no step does
    assert steps_in_time(timing, 10, 0.9) == 0  # not even the transfers
    cut = timing.cut(3, 10)
    assert (cut.download_s, cut.compute_s, cut.upload_s) == (0.5, 3.0, 0.5)


def test_a_straggler_trains_the_steps_that_fit_and_arrives_before_the_deadline():
    # client 0: 1 s a step, full task 10.0212 s; deadline 4 s: floor((4 - 0.0212) / 1) = 3 steps, back at 3.0212 s.
    # client 1: 0.1 s a step, full task 1.0212 s: untouched. The round closes at the last arrival, 3.0212 s.
    profiles = [profile(0, flops=1e6, latency=0.01), profile(1, flops=1e7, latency=0.01)]
    strategy = partial(Recording(clients_per_round=2, deadline_s=4.0))
    sim = run_rounds(make_simulator(strategy, [8, 8], profiles, training=TEN_STEPS), 1)
    slow, fast = sorted(strategy.seen, key=lambda u: u.client_id)
    assert (slow.steps, slow.task.steps, slow.task.steps_asked) == (3, 3, 10)
    assert slow.arrived_at == pytest.approx(2 * TRANSFER + 3.0)
    assert (fast.steps, fast.task.steps_asked) == (10, None)
    assert fast.arrived_at == pytest.approx(2 * TRANSFER + 1.0)
    assert slow.task.flops == 3e6 and fast.task.flops == 10e6  # charged for what it did
    c = sim.counters
    assert (c.updates, c.dropped, c.trained_steps, c.trained_flops) == (2, 0, 13, 13e6)
    assert (c.partial, c.partial_work) == (1, pytest.approx(0.3))
    assert sim.now == pytest.approx(2 * TRANSFER + 3.0)


def test_a_client_that_cannot_do_one_step_is_dropped_as_without_partial_work():
    # client 1: 10 s a step (deadline 4 s); client 2: a 6 s download (60 B at 10 B/s). Both dropped at t = 4, untrained.
    profiles = [profile(0, flops=1e7), profile(1, flops=1e5), profile(2, flops=1e7, bw=10.0)]
    results = []
    for on in (False, True):
        strategy = Recording(clients_per_round=3, deadline_s=4.0)
        strategy.partial_work = on
        sim = run_rounds(make_simulator(strategy, [8, 8, 8], profiles, training=TEN_STEPS), 2)
        c = sim.counters
        assert (c.updates, c.dropped, c.cancelled, c.trained_steps, c.partial) == (2, 4, 4, 20, 0)
        assert sim.now == pytest.approx(8.0)
        results.append(sim.params)
    assert torch.equal(*results)


def test_the_steps_come_from_the_draws_that_time_the_task():
    # with jitter, each task's steps and arrival are those of the timing drawn at its dispatch, from the device stream
    profiles = [profile(c, flops=f, latency=0.01) for c, f in enumerate([1e6, 2e6, 4e6, 1e7])]
    strategy = partial(Recording(clients_per_round=4, deadline_s=3.0))
    sim = run_rounds(make_simulator(strategy, [8] * 4, profiles, training=TEN_STEPS, jitter=0.3, seed=7), 3)
    rng = np.random.default_rng([7, 2])  # the simulator's device stream (nothing else draws from it here)
    arrivals = {u.task.task_id: u for u in strategy.seen}
    assert sim.counters.tasks == 12 and sim.counters.partial > 0
    for task_id in range(sim.counters.tasks):
        client = task_id % 4  # every round dispatches clients 0..3 in order
        timing = task_timing(profiles[client], flops=10e6, bytes_down=60, bytes_up=60, jitter=0.3, rng=rng)
        steps = steps_in_time(timing, 10, 3.0)
        if steps == 0:
            assert task_id not in arrivals
            continue
        update = arrivals[task_id]
        assert update.steps == steps and update.task.flops == steps * 1e6
        assert update.arrived_at - update.task.dispatched_at == pytest.approx(timing.cut(steps, 10).total_s)
        assert update.arrived_at <= update.task.dispatched_at + 3.0


def test_without_partial_work_a_run_is_unchanged_and_a_wide_deadline_cuts_nothing():
    profiles = [profile(c, flops=f, latency=0.01) for c, f in enumerate([1e6, 3e6, 1e7])]

    def run(deadline, on):
        strategy = FedProx(mu=0.1, clients_per_round=3, deadline_s=deadline)
        strategy.partial_work = on
        return run_rounds(make_simulator(strategy, [8] * 3, profiles, training=TEN_STEPS, jitter=0.2, seed=3), 4)

    off, wide = run(100.0, False), run(100.0, True)  # everybody finishes in time: partial work changes nothing
    assert torch.equal(off.params, wide.params) and off.now == wide.now and wide.counters.partial == 0
    tight_off, tight_on = run(4.0, False), run(4.0, True)
    assert tight_off.counters.partial == 0 and tight_off.counters.dropped > 0
    assert tight_on.counters.partial > 0 and tight_on.counters.dropped < tight_off.counters.dropped


# --------------------------------------------------------------------------- what is aggregated
def test_fedprox_mu_0_with_partial_work_averages_the_straggler_fedavg_drops_it():
    # one round, clients 0 (3 of 10 steps fit) and 1 (all 10); sizes 8 and 24.
    # FedAvg, straggler dropped: the new model is client 1's.  FedProx mu = 0 with partial work: the sample-weighted
    # mean (8 w_0 + 24 w_1) / 32 of client 0's 3-step model and client 1's 10-step model.
    profiles = [profile(0, flops=1e6, latency=0.01), profile(1, flops=1e7, latency=0.01)]
    dropping = run_rounds(make_simulator(FedAvg(clients_per_round=2, deadline_s=4.0), [8, 24], profiles,
                                         training=TEN_STEPS), 1)
    prox = run_rounds(make_simulator(partial(FedProx(mu=0.0, clients_per_round=2, deadline_s=4.0)), [8, 24], profiles,
                                     training=TEN_STEPS), 1)
    start, pool, trainer = prox.trainer.initial, prox.pool, prox.trainer

    def trained(client, steps):  # task ids follow the dispatch order: client 0 task 0, client 1 task 1
        data = pool.data(client)
        return trainer.train(start, data.x, data.y, steps=steps, seed=task_seed(0, client)).params

    w0, w1 = trained(0, 3), trained(1, 10)
    assert torch.allclose(dropping.params, w1, atol=1e-6)
    assert torch.allclose(prox.params, (8 * w0 + 24 * w1) / 32, atol=1e-6)
    assert dropping.counters.dropped == 1 and prox.counters.dropped == 0


def test_batched_training_trains_each_task_its_own_steps():
    profiles = [profile(c, flops=f, latency=0.01) for c, f in enumerate([1e6, 2e6, 5e6, 1e7])]
    runs = []
    for vectorize in ("off", "on"):
        cfg = TrainingConfig(local_steps=10, batch_size=4, lr=0.1, vectorize=vectorize)
        strategy = partial(FedProx(mu=0.5, clients_per_round=4, deadline_s=3.0))
        runs.append(run_rounds(make_simulator(strategy, [8] * 4, profiles, training=cfg, jitter=0.2), 3))
    off, on = runs
    assert on.batches and on.counters.partial > 0
    assert torch.allclose(off.params, on.params, atol=1e-5)
    assert off.counters.trained_steps == on.counters.trained_steps


@pytest.mark.serial
def test_the_ray_backend_trains_the_same_partial_work():
    ray = pytest.importorskip("ray", reason="the Ray backend needs ray (pip install hetfl[ray])")
    from hetfl.engine.backends import RayBackend, start_ray

    started = start_ray(None, 2, 1, None)  # a local Ray of 2 CPUs, as hetfl starts one (a node timing out: once more)
    try:
        runs = []
        for backend in (None, RayBackend()):
            sim = make_simulator(partial(FedProx(mu=0.5, clients_per_round=4, deadline_s=3.0)), [8] * 4,
                                 [profile(c, flops=f, latency=0.01) for c, f in enumerate([1e6, 2e6, 5e6, 1e7])],
                                 training=TEN_STEPS, jitter=0.2)
            if backend is not None:
                sim = Simulator(strategy=sim.strategy, trainer=sim.trainer, pool=sim.pool, profiles=sim.profiles,
                                flops_per_step=1e6, seed=0, jitter=0.2, backend=backend)
            try:
                runs.append(run_rounds(sim, 3))
            finally:
                sim.close()
    finally:
        if started:
            ray.shutdown()
    local, remote = runs
    assert local.counters.partial > 0
    assert torch.equal(local.params, remote.params) and local.now == remote.now
    assert (local.counters.trained_steps, local.counters.partial) == (remote.counters.trained_steps,
                                                                     remote.counters.partial)


# --------------------------------------------------------------------------- the configuration
def test_partial_work_needs_a_round_strategy_with_a_deadline():
    with pytest.raises(ValueError, match="strategy.partial_work: set strategy.deadline_s"):
        StrategyConfig(name="fedprox", partial_work=True)
    with pytest.raises(ConfigError, match="strategy.partial_work: fedbuff does not run rounds"):
        build_strategy(StrategyConfig(name="fedbuff", partial_work=True, deadline_s=5.0))
    assert build_strategy(StrategyConfig(name="fedprox", partial_work=True, deadline_s=5.0)).partial_work
    assert not build_strategy(StrategyConfig(name="fedprox", deadline_s=5.0)).partial_work
    assert validate({"strategy": {"partial_work": True, "deadline_s": 2.0}}).strategy.partial_work
    strategy = {"name": "fedprox", "params": {"mu": 1.0}, "deadline_s": 2.0}
    assert variant_label({**strategy, "partial_work": True}) == "fedprox(mu=1)+partial"  # how reports tell the runs apart
    assert variant_label({**strategy, "partial_work": False}) == "fedprox(mu=1)"


def test_the_cli_says_so_in_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset": "digits", "n_clients": 3},
                                      "strategy": {"name": "fedprox", "partial_work": True}}))
    assert main(["run", str(config), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "strategy.partial_work: set strategy.deadline_s" in err
    # a deployed server cannot size a client's steps to the deadline: refused
    config.write_text(yaml.safe_dump({"data": {"dataset": "digits", "n_clients": 3},
                                      "strategy": {"name": "fedprox", "partial_work": True, "deadline_s": 5.0}}))
    write_tokens(tmp_path / "t.yaml", 3)
    assert main(["server", str(config), "--out", str(tmp_path / "o"), "--tokens", str(tmp_path / "t.yaml")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "strategy.partial_work: simulated only" in err


def test_a_run_reports_its_partial_updates_and_resumes_as_it_runs(tmp_path, capsys):
    import json

    from test_runs_end_to_end import assert_same_run

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "rounds": 2, "seed": 0, "checkpoint_every": 1,
        "data": {"dataset": "digits", "n_clients": 4},
        "devices": {"compute": {"distribution": "tiers", "median_flops": 1e7, "tiers": {"fast": 100.0, "slow": 1.0},
                                "tier_weights": {"fast": 1, "slow": 1}},
                    "network": {"tiers": {"ethernet": 1.0}}},
        "training": {"local_steps": 20, "batch_size": 8},
        "strategy": {"name": "fedprox", "clients_per_round": 4, "partial_work": True, "deadline_s": 0.1},
    }))
    # one step of logreg 64 -> 10 at batch 8 costs ~2.3e5 FLOPs: 0.023 s on a slow device, 20 steps 0.45 s; the fast tier
    # takes 5 ms. A 0.1 s deadline lets the fast ones finish and cuts the slow ones to a few steps.
    assert main(["run", str(config), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    lines = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert summary["partial_updates"] > 0 and 0 < summary["partial_work_mean"] < 1
    assert lines[-1]["partial_updates"] == summary["partial_updates"] and lines[0]["partial_updates"] == 0
    assert summary["dropped"] == 0
    # a checkpoint holds the next round's tasks in flight, cut: a resumed run trains them as the straight one does
    assert main(["run", str(config), "--out", str(tmp_path / "straight"), "--quiet", "--set", "rounds=4"]) == 0
    assert main(["run", "--resume", str(tmp_path / "o"), "--quiet", "--set", "rounds=4"]) == 0
    assert_same_run(tmp_path / "straight", tmp_path / "o")
