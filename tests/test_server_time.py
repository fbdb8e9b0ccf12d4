"""The server's own cost (``server:``, hetfl.engine.server_time), worked by hand on tiny federations."""

from __future__ import annotations

import json

import pytest

from hetfl.config import ServerConfig, validate
from hetfl.devices import TaskTiming
from hetfl.engine import Simulator
from hetfl.engine.run import build_federation, run_experiment
from hetfl.engine.server_time import MBPS, ServerTime
from hetfl.strategies import FedAvg

from conftest import make_simulator, profile, run_rounds


def test_work_queues_one_piece_after_another():
    # 100 FLOP/s: 200 FLOPs asked at t=1 end at 3; 100 more asked at t=2 wait for them and end at 4; at t=10 the
    # server is idle again, so 50 FLOPs end at 10.5. Busy 2 + 1 + 0.5 = 3.5 s for 350 FLOPs.
    server = ServerTime(flops=100.0)
    assert server.work(1.0, 200.0) == pytest.approx(3.0)
    assert server.work(2.0, 100.0) == pytest.approx(4.0)
    assert server.work(10.0, 50.0) == pytest.approx(10.5)
    assert server.busy_s == pytest.approx(3.5) and server.work_flops == pytest.approx(350.0)


def test_a_free_server_counts_its_work_but_changes_no_timing():
    server = ServerTime()
    timing = TaskTiming(1.0, 2.0, 3.0)
    assert server.work(5.0, 1e9) == 5.0 and server.busy_s == 0.0 and server.work_flops == 1e9
    assert server.timing(7.0, timing, 10**9, 10**9) is timing


def test_downloads_share_the_server_link_and_queue_beyond_its_concurrency():
    # up 800 B/s shared by 2 slots: 400 B/s each. Four 400-byte downloads asked at t=0, each client's own link
    # taking 0.1 s: each takes max(0.1, 400/400) = 1 s; the first two at once, the next two after them (t=1 to 2).
    # Uploads: down 100 B/s over 2 slots, 50 B/s a share: 100 bytes take max(0.2, 100/50) = 2 s, unqueued.
    server = ServerTime(up_Bps=800.0, down_Bps=100.0, concurrency=2)
    client = TaskTiming(0.1, 5.0, 0.2)
    got = [server.timing(0.0, client, 400, 100) for _ in range(4)]
    assert [t.download_s for t in got] == pytest.approx([1.0] * 4)  # each takes 1 s ...
    assert [t.wait_s for t in got] == pytest.approx([0.0, 0.0, 1.0, 1.0])  # ... the last two after a 1 s wait
    assert all(t.compute_s == 5.0 and t.upload_s == pytest.approx(2.0) for t in got)
    # without concurrency every download has the whole link: 400/800 = 0.5 s, none waits
    server = ServerTime(up_Bps=800.0)
    assert [server.timing(0.0, client, 400, 100).download_s for _ in range(3)] == pytest.approx([0.5] * 3)


def test_a_busy_server_delays_the_next_dispatch_by_its_aggregation():
    # logreg 4 -> 3: 15 parameters, 60 bytes each way at 1e5 B/s with 0.01 s latency; 2 steps of 1e6 FLOPs at
    # 1e6 FLOP/s: a task takes 2 x (0.0006 + 0.01) + 2 = 2.0212 s. A commit of two updates costs the server
    # 2 x 15 x 2 = 60 FLOPs, 1 s at 60 FLOP/s, and the next round's downloads start when it is done:
    # round 1 ends at 2.0212, round 2 at 2.0212 + 1 + 2.0212, round 3 at 3 x 2.0212 + 2.
    profiles = [profile(0, latency=0.01), profile(1, latency=0.01)]
    sim = make_simulator(FedAvg(clients_per_round=2), [8, 8], profiles)
    sim.state.server_time = ServerTime(flops=60.0)
    task_s = 2 * (60 / 1e5 + 0.01) + 2.0
    run_rounds(sim, 1)
    assert sim.now == pytest.approx(task_s)
    run_rounds(sim, 3)
    assert sim.now == pytest.approx(3 * task_s + 2.0)
    assert sim.engine_metrics() == {"server_flops": pytest.approx(180.0), "server_busy_s": pytest.approx(3.0)}


def test_a_slow_server_link_serialises_the_round_downloads():
    # up 100 B/s, one download at a time: each 60-byte model takes 0.6 s; the second client's starts at 0.6.
    # Compute 2 s, upload 60/1e5 = 0.0006 s: the round ends when the second returns, at 1.2 + 2 + 0.0006.
    sim = make_simulator(FedAvg(clients_per_round=2), [8, 8], [profile(0), profile(1)])
    sim.state.server_time = ServerTime(up_Bps=100.0, concurrency=1)
    run_rounds(sim, 1)
    assert sim.now == pytest.approx(1.2 + 2.0 + 60 / 1e5)


def test_the_config_section_is_in_megabits_and_defaults_to_a_free_server():
    assert ServerTime.from_config(ServerConfig()).free
    server = ServerTime.from_config(ServerConfig(flops=1e9, up_mbps=8.0, down_mbps=16.0, concurrency=4))
    assert (server.flops, server.up_Bps, server.down_Bps, server.concurrency) == (1e9, 8 * MBPS, 16 * MBPS, 4)
    assert 8 * MBPS == 1e6


def test_a_run_charges_aggregations_and_evaluations_and_takes_longer(tmp_path):
    # digits, MLP 64: every evaluation runs the global model forward on the test samples, and every commit a
    # weighted mean of 4 updates; at 1e6 FLOP/s the server's work shows in the run's simulated time.
    base = {"name": "srv", "rounds": 3, "data": {"dataset": "digits", "n_clients": 8}, "model": {"name": "mlp", "hidden": [16]},
            "strategy": {"name": "fedavg", "clients_per_round": 4}, "training": {"local_steps": 2, "batch_size": 8}}
    free = run_experiment(validate(base), tmp_path / "free", show_progress=False)
    cfg = validate({**base, "server": {"flops": 1e6}})
    fed = build_federation(cfg)
    per_eval = fed.evaluation_flops(fed.strategy())
    n_params = fed.trainer.flat.numel()
    slow = run_experiment(cfg, tmp_path / "slow", show_progress=False)
    lines = [json.loads(line) for line in (tmp_path / "slow" / "metrics.jsonl").read_text().splitlines()]
    # 4 evaluations (rounds 0-3) and 3 commits of 4 updates
    expected = 4 * per_eval + 3 * 2 * n_params * 4
    assert lines[-1]["server_flops"] == pytest.approx(expected)
    assert lines[-1]["server_busy_s"] == pytest.approx(expected / 1e6)
    # the last commit's and the last evaluation's work delay nothing; the rest delays the dispatches after it
    delay = (expected - per_eval - 2 * n_params * 4) / 1e6
    assert slow["sim_time_s"] == pytest.approx(free["sim_time_s"] + delay, rel=1e-6)
    free_lines = [json.loads(line) for line in (tmp_path / "free" / "metrics.jsonl").read_text().splitlines()]
    assert free_lines[-1]["server_busy_s"] == 0.0 and free_lines[-1]["server_flops"] == pytest.approx(expected)


def test_simulator_defaults_to_a_free_server():
    sim = make_simulator(FedAvg(clients_per_round=2), [8, 8], [profile(0), profile(1)])
    assert isinstance(sim, Simulator) and sim.server_time.free
