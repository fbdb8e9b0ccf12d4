"""Device profiles, availability windows, task timing and traces."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from rich.console import Console

from hetfl.config import DevicesConfig
from hetfl.devices import (
    NETWORK_TIERS,
    DeviceProfile,
    build_profiles,
    describe_profiles,
    load_trace,
    save_trace,
    task_timing,
)
from hetfl.errors import ConfigError, DataError


def devices(**sections) -> DevicesConfig:
    return DevicesConfig.model_validate(sections)


def profile(**fields) -> DeviceProfile:
    base = dict(client_id=0, speed=1.0, flops=1e9, down_Bps=1e6, up_Bps=0.5e6, latency_s=0.05)
    return DeviceProfile(**(base | fields))


# --------------------------------------------------------------------------- task timing
def test_task_timing_without_jitter_is_exact_and_draws_nothing():
    # 1e9 FLOP/s, 8 Mbit/s down (1e6 B/s), 4 Mbit/s up (0.5e6 B/s), 50 ms latency
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    timing = task_timing(profile(), flops=2e9, bytes_down=1_000_000, bytes_up=1_000_000, jitter=0.0, rng=rng)
    assert timing.compute_s == 2.0
    assert timing.download_s == 1.0 + 0.05
    assert timing.upload_s == 2.0 + 0.05
    assert timing.total_s == pytest.approx(5.1)
    assert rng.bit_generator.state == state


def test_task_timing_from_network_tier_units():
    wifi = NETWORK_TIERS["wifi"]  # 50 Mbit/s down = 6.25e6 B/s, 15 ms
    cfg = devices(compute={"distribution": "constant", "median_flops": 4e9}, network={"tiers": {"wifi": 1}})
    (p,) = build_profiles(cfg, 1, np.random.default_rng(0))
    timing = task_timing(p, flops=1e9, bytes_down=6_250_000, bytes_up=0, jitter=0.0, rng=np.random.default_rng(0))
    assert (wifi.down_mbps, wifi.latency_ms) == (50.0, 15.0)
    assert timing.compute_s == 0.25
    assert timing.download_s == pytest.approx(1.015)
    assert timing.upload_s == pytest.approx(0.015)


def test_task_timing_jitter_has_mean_one_and_is_seeded():
    def draws(seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        p = profile(latency_s=0.0)
        rows = []
        for _ in range(20_000):
            t = task_timing(p, flops=1e9, bytes_down=1_000_000, bytes_up=500_000, jitter=0.3, rng=rng)
            rows.append((t.download_s, t.compute_s, t.upload_s))
        return np.array(rows)  # every exact time is 1.0 s

    a = draws(1)
    assert np.all(a > 0)
    assert a.mean(axis=0) == pytest.approx([1.0, 1.0, 1.0], abs=0.015)
    assert np.std(np.log(a), axis=0) == pytest.approx([0.3, 0.3, 0.3], abs=0.01)
    assert abs(np.corrcoef(a[:, 0], a[:, 1])[0, 1]) < 0.05  # independent factors
    assert np.array_equal(a, draws(1))
    assert not np.array_equal(a, draws(2))


# --------------------------------------------------------------------------- availability windows
def test_online_windows_boundaries():
    p = profile(windows=((10.0, 20.0), (30.0, 40.0)))
    assert [p.is_online(t) for t in (0, 9.999, 10, 19.999, 20, 25, 30, 39.9, 40, 1e9)] == [
        False, False, True, True, False, False, True, True, False, False,
    ]
    assert p.next_online(0) == 10
    assert p.next_online(10) == 10
    assert p.next_online(15) == 15
    assert p.next_online(20) == 30  # end is exclusive
    assert p.next_online(40) == math.inf  # after the last window
    assert p.online_until(10) == 20
    assert p.online_until(35) == 40
    assert p.online_until(25) == 25  # offline: no online time left
    assert p.online_fraction(50) == pytest.approx(0.4)


def test_open_ended_and_always_online():
    p = profile(windows=((0.0, 10.0), (50.0, math.inf)))
    assert p.next_online(10) == 50
    assert p.is_online(1e12)
    assert p.online_until(60) == math.inf
    always = profile()
    assert always.is_online(123.0) and always.next_online(123.0) == 123.0
    assert always.online_until(5.0) == math.inf
    assert always.online_fraction(100) == 1.0


# --------------------------------------------------------------------------- drawing profiles
def test_lognormal_speeds_have_median_one():
    cfg = devices(compute={"distribution": "lognormal", "sigma": 0.5, "median_flops": 3e9})
    profiles = build_profiles(cfg, 1000, np.random.default_rng(0))
    speeds = np.array([p.speed for p in profiles])
    assert np.median(speeds) == pytest.approx(1.0, abs=0.1)
    assert np.std(np.log(speeds)) == pytest.approx(0.5, abs=0.05)
    assert all(p.flops == p.speed * 3e9 for p in profiles)
    assert [p.client_id for p in profiles] == list(range(1000))
    assert all(p.windows is None and p.dropout == 0.0 for p in profiles)


def test_pareto_has_heavy_tail_of_slow_devices():
    cfg = devices(compute={"distribution": "pareto", "pareto_shape": 1.5})
    speeds = np.array([p.speed for p in build_profiles(cfg, 1000, np.random.default_rng(0))])
    assert np.median(speeds) == pytest.approx(1.0, abs=0.15)
    assert speeds.max() / speeds.min() > 10
    assert speeds.max() <= 2 ** (1 / 1.5)  # the fast side is bounded
    assert speeds.min() >= 1e-3
    assert np.mean(speeds < 0.1) > 0.01  # a real tail: X > 15.9 has probability 15.9**-1.5 = 1.6%


def test_constant_speed():
    profiles = build_profiles(devices(compute={"distribution": "constant"}), 5, np.random.default_rng(0))
    assert {p.speed for p in profiles} == {1.0}
    assert all(p.tier.startswith("constant/") for p in profiles)


def test_compute_tiers_follow_weights():
    cfg = devices(
        compute={"distribution": "tiers", "tiers": {"low": 0.25, "mid": 1.0, "high": 4.0}, "tier_weights": {"low": 0.7, "mid": 0.3}},
        network={"tiers": {"3g": 1.0}},
    )
    profiles = build_profiles(cfg, 2000, np.random.default_rng(0))
    compute = [p.tier.split("/")[0] for p in profiles]
    assert compute.count("low") / 2000 == pytest.approx(0.7, abs=0.04)
    assert "high" not in compute
    assert all(p.speed == {"low": 0.25, "mid": 1.0}[c] for p, c in zip(profiles, compute))
    # every client on 3g: 2 / 0.5 Mbit/s, 150 ms
    assert {(p.down_Bps, p.up_Bps, p.latency_s) for p in profiles} == {(250_000.0, 62_500.0, 0.15)}
    assert {p.tier for p in profiles} == {"low/3g", "mid/3g"}


def test_compute_tiers_equal_weights_by_default():
    cfg = devices(compute={"distribution": "tiers"})  # low, mid, high
    tiers = [p.tier.split("/")[0] for p in build_profiles(cfg, 3000, np.random.default_rng(0))]
    for name in ("low", "mid", "high"):
        assert tiers.count(name) / 3000 == pytest.approx(1 / 3, abs=0.04)


def test_network_tiers_follow_weights():
    cfg = devices(network={"tiers": {"4g": 0.2, "ethernet": 0.8}})
    nets = [p.tier.split("/")[1] for p in build_profiles(cfg, 2000, np.random.default_rng(0))]
    assert nets.count("ethernet") / 2000 == pytest.approx(0.8, abs=0.04)
    assert set(nets) == {"4g", "ethernet"}


def test_bad_tier_names_are_config_errors_at_the_config_boundary():
    from hetfl.config import validate

    cases = [
        ({"network": {"tiers": {"6g": 1.0}}}, r"devices.network.tiers: unknown tier '6g'.*3g, 4g, 5g, wifi, ethernet"),
        ({"compute": {"distribution": "tiers", "tier_weights": {"ultra": 1}}}, r"devices.compute.tier_weights: unknown tier 'ultra'"),
        ({"network": {"tiers": {"4g": 0.0}}}, "devices.network.tiers: weights"),
        ({"compute": {"tiers": {"low": 0.0}}}, "devices.compute.tiers: speed of tier 'low'"),
        ({"compute": {"distribution": "tiers", "tiers": {}}}, "devices.compute.tiers: at least one tier"),
        ({"network": {"tiers": {}}}, "devices.network.tiers: weights"),
    ]
    for raw, message in cases:
        with pytest.raises(ConfigError, match=message):
            validate({"devices": raw})


def test_same_seed_same_profiles():
    cfg = devices(compute={"distribution": "pareto"}, availability={"kind": "markov", "horizon_s": 20_000}, dropout=0.1)
    a = build_profiles(cfg, 50, np.random.default_rng(7))
    assert a == build_profiles(cfg, 50, np.random.default_rng(7))
    assert a != build_profiles(cfg, 50, np.random.default_rng(8))
    assert {p.dropout for p in a} == {0.1}


def test_markov_availability_share_and_windows():
    on, off, horizon = 100.0, 300.0, 100_000.0
    cfg = devices(availability={"kind": "markov", "mean_online_s": on, "mean_offline_s": off, "horizon_s": horizon})
    profiles = build_profiles(cfg, 200, np.random.default_rng(0))
    share = np.mean([p.online_fraction(horizon) for p in profiles])
    assert share == pytest.approx(on / (on + off), abs=0.01)
    for p in profiles:
        starts, ends = zip(*p.windows)
        assert all(s < e for s, e in p.windows)
        assert all(e < s for e, s in zip(ends[:-1], starts[1:]))  # sorted, disjoint
        assert starts[0] >= 0 and starts[-1] <= horizon
        assert ends[-1] == math.inf  # online forever after the horizon
        assert p.is_online(horizon + 1.0)


def test_markov_starts_online_with_stationary_probability():
    cfg = devices(availability={"kind": "markov", "mean_online_s": 100.0, "mean_offline_s": 300.0, "horizon_s": 1.0})
    profiles = build_profiles(cfg, 4000, np.random.default_rng(0))
    assert np.mean([p.is_online(0.0) for p in profiles]) == pytest.approx(0.25, abs=0.025)
    assert np.mean([p.is_online(0.5) for p in profiles]) == pytest.approx(0.25, abs=0.025)


def test_describe_profiles_table():
    cfg = devices(compute={"distribution": "tiers"}, availability={"kind": "markov", "horizon_s": 50_000})
    profiles = build_profiles(cfg, 60, np.random.default_rng(0))
    console = Console(record=True, width=200)
    console.print(describe_profiles(profiles))
    text = console.export_text()
    assert "60 devices" in text and "mid/wifi" in text and "all" in text
    assert "online" in text and "spread" in text


# --------------------------------------------------------------------------- traces
def test_trace_round_trip(tmp_path):
    cfg = devices(availability={"kind": "markov", "horizon_s": 30_000}, dropout=0.05)
    profiles = list(build_profiles(cfg, 30, np.random.default_rng(3)))  # a DeviceTable; a list to append to
    odd = DeviceProfile(
        client_id=30, speed=0.1 + 0.2, flops=123456789.123, down_Bps=0.1 * 125_000, up_Bps=33.3 * 125_000,
        latency_s=0.0123, windows=((1e-05, 0.5), (7.0, math.inf)), dropout=0.0, tier="x, y",
    )
    profiles.append(odd)
    for name in ("devices.csv", "devices.json"):
        save_trace(profiles, tmp_path / name)
        assert load_trace(tmp_path / name, len(profiles), 2e9) == profiles
    assert json.loads((tmp_path / "devices.json").read_text())[30]["availability"] == [[1e-05, 0.5], [7.0, None]]


def test_hand_written_csv_trace(tmp_path):
    path = tmp_path / "devices.csv"
    path.write_text(
        "client_id,speed,bandwidth_mbps,latency_ms,flops,dropout,tier,availability,notes\n"
        "7,2.0,8,100,,,,,fast one\n"
        "3,0.5,16,20,5e8,0.25,old,0-3600;7200-9000,\n"
        "5,1.0,80,10,,,,100-inf,\n"
    )
    a, b = load_trace(path, 2, 1e9)  # the first two by id: 3 and 5
    assert (a.client_id, a.speed, a.flops, a.dropout, a.tier) == (3, 0.5, 5e8, 0.25, "old")
    assert (a.down_Bps, a.up_Bps, a.latency_s) == (2e6, 2e6, 0.02)
    assert a.windows == ((0.0, 3600.0), (7200.0, 9000.0))
    assert (b.client_id, b.flops, b.windows) == (5, 1e9, ((100.0, math.inf),))
    assert len(load_trace(path, None, 1e9)) == 3


def test_build_profiles_from_trace(tmp_path):
    path = tmp_path / "devices.json"
    path.write_text(json.dumps([
        {"client_id": 10, "speed": 1.0, "down_mbps": 8, "up_mbps": 8, "latency_ms": 0},
        {"client_id": 20, "speed": 2.0, "down_mbps": 8, "up_mbps": 8, "latency_ms": 0, "dropout": 0.5},
        {"client_id": 30, "speed": 3.0, "down_mbps": 8, "up_mbps": 8, "latency_ms": 0, "availability": [[0, 60]]},
    ]))
    cfg = devices(trace=str(path), dropout=0.1, compute={"median_flops": 1e9})
    profiles = build_profiles(cfg, 3, np.random.default_rng(0))
    assert [p.client_id for p in profiles] == [0, 1, 2]  # client i gets the i-th device by id
    assert [p.flops for p in profiles] == [1e9, 2e9, 3e9]
    assert [p.dropout for p in profiles] == [0.1, 0.5, 0.1]
    assert profiles[2].windows == ((0.0, 60.0),)
    with pytest.raises(DataError, match=f"^trace {path} has 3 clients; data.n_clients is 4$"):
        build_profiles(cfg, 4, np.random.default_rng(0))


HEADER = "client_id,speed,down_mbps,up_mbps,latency_ms,availability\n"


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("devices.csv", "client_id,speed,down_mbps,latency_ms\n0,1,1,1\n", "missing column 'up_mbps'"),
        ("devices.csv", "", "empty"),
        ("devices.csv", HEADER + "0,fast,1,1,1,\n", r"line 2 \(client 0\): column 'speed': 'fast' is not a number"),
        ("devices.csv", HEADER + "0,1,1,1,1,\n1,-2,1,1,1,\n", r"line 3 \(client 1\): column 'speed': must be positive"),
        ("devices.csv", HEADER + "0,1,,1,1,\n", "column 'down_mbps': is empty"),
        ("devices.csv", HEADER + "x,1,1,1,1,\n", "column 'client_id': 'x' is not a non-negative integer"),
        ("devices.csv", HEADER + "0,1,1,1,1,0-100;50-200\n", "column 'availability': intervals overlap"),
        ("devices.csv", HEADER + "0,1,1,1,1,300-400;0-100\n", "column 'availability': intervals are not sorted"),
        ("devices.csv", HEADER + "0,1,1,1,1,100-50\n", "column 'availability': interval 100-50"),
        ("devices.csv", HEADER + "0,1,1,1,1,soon\n", "column 'availability': 'soon' is not a start-end interval"),
        ("devices.csv", HEADER + "0,1,1,1,-5,\n", "column 'latency_ms': must not be negative"),
        ("devices.csv", HEADER + "0,1,1,1,1,\n0,1,1,1,1,\n", "client 0 appears twice"),
        ("devices.csv", "client_id,speed,bandwidth_mbps,latency_ms,dropout\n0,1,1,1,1.5\n", "column 'dropout': must be in"),
        ("devices.json", "[{", "not valid JSON"),
        ("devices.json", '{"client_id": 0}', "expected a JSON list"),
        ("devices.json", '[{"client_id": 0, "speed": 1, "bandwidth_mbps": 1}]', "entry 1: missing key 'latency_ms'"),
        ("devices.json", '[{"client_id": 0, "speed": true, "bandwidth_mbps": 1, "latency_ms": 1}]', "column 'speed': True is not a number"),
        ("devices.json", '[{"client_id": 0, "speed": 1, "bandwidth_mbps": 1, "latency_ms": 1, "availability": [[0, 5, 9]]}]', "is not a \\[start, end\\] pair"),
        ("devices.txt", "", "expected a .csv or .json file"),
    ],
)
def test_bad_traces_are_data_errors(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=expected) as err:
        load_trace(path, 1, 1e9)
    assert name in str(err.value)


def test_missing_trace_file(tmp_path):
    with pytest.raises(DataError, match="devices.csv: file not found"):
        load_trace(tmp_path / "devices.csv", 1, 1e9)
