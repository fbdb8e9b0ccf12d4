"""Where the time goes (download, compute, upload, waiting, aggregation), worked by hand on tiny federations."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest

from hetfl.config import validate
from hetfl.deploy.engine import measured_timing
from hetfl.devices import NETWORK_TIERS, TaskTiming, steps_in_time
from hetfl.engine.core import Counters
from hetfl.engine.run import run_experiment
from hetfl.engine.server_time import ServerTime
from hetfl.results.report import render_report
from hetfl.strategies import FedAvg

from conftest import make_simulator, profile, run_rounds

# logreg 4 -> 3: 15 parameters, 60 bytes each way at 1e5 B/s with 0.01 s latency: each transfer 0.0106 s.
TRANSFER_S = 60 / 1e5 + 0.01


def test_two_rounds_by_hand():
    # client 0: 2 steps of 1e6 FLOPs at 1e6 FLOP/s = 2 s; client 1 at 4e6 FLOP/s = 0.5 s. A round lasts
    # 2 x 0.0106 + 2 = 2.0212 s; client 1 is idle for 2.0212 - 0.5212 = 1.5 s of each, client 0 never.
    profiles = [profile(0, flops=1e6, latency=0.01), profile(1, flops=4e6, latency=0.01)]
    sim = run_rounds(make_simulator(FedAvg(clients_per_round=2), [8, 8], profiles), 2)
    got = sim.time_breakdown()
    assert got == pytest.approx({
        "time_wait_s": 0.0, "time_download_s": 4 * TRANSFER_S, "time_compute_s": 2 * (2.0 + 0.5),
        "time_upload_s": 4 * TRANSFER_S, "time_idle_s": 2 * 1.5,
    })
    # every client-second is in exactly one phase: 2 clients x 2 rounds x 2.0212 s
    assert sum(got.values()) == pytest.approx(2 * sim.now)
    per_client = sim.client_time()
    assert per_client["compute"] == pytest.approx([4.0, 1.0]) and per_client["idle"] == pytest.approx([0.0, 3.0])
    assert per_client["download"] == pytest.approx([2 * TRANSFER_S] * 2)


def test_the_wait_for_a_slow_server_link_is_its_own_phase():
    # the server sends at 100 B/s, one download at a time: each 60-byte model takes 0.6 s, and the second client
    # waits 0.6 s for the first. Compute 2 s, upload 0.0006 s (no latency). Client 0 is back at 2.6006, the round
    # ends at 3.2006: client 0 idles 0.6 s; client 1's wait is not idle, it has a task.
    sim = make_simulator(FedAvg(clients_per_round=2), [8, 8], [profile(0), profile(1)])
    sim.state.server_time = ServerTime(up_Bps=100.0, concurrency=1)
    run_rounds(sim, 1)
    assert sim.time_breakdown() == pytest.approx({
        "time_wait_s": 0.6, "time_download_s": 1.2, "time_compute_s": 4.0, "time_upload_s": 2 * 60 / 1e5,
        "time_idle_s": 0.6,
    })
    assert sim.client_time()["wait"] == pytest.approx([0.0, 0.6])


def test_the_aggregation_is_the_servers_busy_time():
    # a commit of two updates costs 2 x 15 x 2 = 60 FLOPs: 1 s at 60 FLOP/s. Round 2's downloads wait for it, so
    # each client waits 1 s in round 2 (its task counts it), and nobody is idle while the server aggregates.
    profiles = [profile(0, latency=0.01), profile(1, latency=0.01)]
    sim = make_simulator(FedAvg(clients_per_round=2), [8, 8], profiles)
    sim.state.server_time = ServerTime(flops=60.0)
    run_rounds(sim, 2)
    got = sim.time_breakdown()
    assert got["time_wait_s"] == pytest.approx(2 * 1.0)
    assert got["time_compute_s"] == pytest.approx(4 * 2.0) and got["time_idle_s"] == pytest.approx(0.0)
    assert sim.engine_metrics()["server_busy_s"] == pytest.approx(2.0)


def test_partial_work_keeps_the_wait():
    timing = TaskTiming(download_s=0.5, compute_s=10.0, upload_s=0.5, wait_s=1.0)  # 10 steps of 1 s
    assert timing.total_s == 12.0
    assert steps_in_time(timing, 10, 4.0) == 2  # floor((4 - 1 - 0.5 - 0.5) / 1)
    cut = timing.cut(2, 10)
    assert (cut.wait_s, cut.download_s, cut.compute_s, cut.upload_s) == (1.0, 0.5, 2.0, 0.5)


def test_a_deployed_tasks_time_from_its_timestamps():
    # round trip 10 s; the client streamed the task in 1.5 s and trained 6 s: the upload is the other 2.5 s
    assert measured_timing(10.0, 1.5, 6.0) == TaskTiming(1.5, 6.0, 2.5)
    # what a client reports is clipped to the round trip the server measured; nonsense counts as 0
    assert measured_timing(2.0, 1.5, 6.0) == TaskTiming(1.5, 0.5, 0.0)
    assert measured_timing(3.0, 0.0, math.inf) == TaskTiming(0.0, 0.0, 3.0)
    assert measured_timing(3.0, -1.0, math.nan) == TaskTiming(0.0, 0.0, 3.0)


def test_measured_link_presets_keep_the_papers_uplink_ratios():
    # Hayek et al. (arXiv 2504.04678): the 5G uplink took 33.3x Ethernet's time and 17.8x WiFi's
    up = {name: NETWORK_TIERS[f"{name}_measured"].up_mbps for name in ("5g", "wifi", "ethernet")}
    assert up["ethernet"] / up["5g"] == pytest.approx(33.3, rel=1e-3)
    assert up["wifi"] / up["5g"] == pytest.approx(17.8, rel=1e-3)


def test_a_run_writes_the_breakdown_and_its_plot(tmp_path):
    # free server, clients always online: every client-second since the start is in one phase or idle (the tasks
    # in flight at the end started at the last commit, when the run stops)
    cfg = validate({
        "name": "bd", "rounds": 3, "data": {"dataset": "digits", "n_clients": 4}, "model": {"name": "logreg"},
        "strategy": {"name": "fedavg", "clients_per_round": 2}, "training": {"local_steps": 2, "batch_size": 8},
        "devices": {"network": {"tiers": {"5g_measured": 1, "wifi_measured": 1, "ethernet_measured": 1}}},
    })
    summary = run_experiment(cfg, tmp_path / "run", show_progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    keys = ("time_wait_s", "time_download_s", "time_compute_s", "time_upload_s", "time_idle_s")
    assert sum(last[k] for k in keys) == pytest.approx(4 * last["sim_time_s"])
    assert all(b[k] >= a[k] for a, b in zip(lines, lines[1:]) for k in keys)  # sums since the start
    per_client = summary["client_time_s"]
    assert np.sum(per_client["compute"]) == pytest.approx(last["time_compute_s"])
    assert np.sum(per_client["idle"]) == pytest.approx(last["time_idle_s"])
    render_report(tmp_path / "run")
    assert (tmp_path / "run" / "time_breakdown.png").stat().st_size > 0


def test_an_older_checkpoints_counters_start_the_breakdown_at_zero():
    old = Counters.for_clients(3)
    del old.__dict__["phase_s"]  # as pickled by a hetfl without the breakdown
    resumed = pickle.loads(pickle.dumps(old))
    resumed.count_timing(2, TaskTiming(1.0, 2.0, 3.0, wait_s=0.5))
    assert resumed.phase_s.tolist() == [[0.0] * 4, [0.0] * 4, [0.5, 1.0, 2.0, 3.0]]
