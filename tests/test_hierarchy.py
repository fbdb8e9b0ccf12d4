"""Hierarchical aggregation in the simulator (``aggregation.hierarchy``, hetfl.engine.hierarchy), worked by hand."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import make_simulator, profile, run_rounds, write_config
from hetfl.engine.hierarchy import Hierarchy
from hetfl.strategies.checks import shared_mean
from hetfl.engine.server_time import ServerTime
from hetfl.errors import ConfigError
from hetfl.strategies import FedAvg, FedBuff, FedProx
from hetfl.strategies.base import Task, Update
from test_cli import assert_one_line_error, cli, read_metrics


class Recorded(FedAvg):
    """FedAvg that records when each update reaches the strategy."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen: list[tuple[float, int]] = []

    def on_update(self, server, update):
        self.seen.append((server.now, update.task.task_id))
        super().on_update(server, update)


def _update(task_id: int, version: int, start: torch.Tensor, params: list[float], n: int) -> Update:
    task = Task(task_id=task_id, client_id=task_id, version=version, params=start, steps=1, dispatched_at=0.0)
    return Update(task=task, params=torch.tensor(params, dtype=torch.float32), n_samples=n, steps=1, loss=0.5,
                  arrived_at=0.0, stats={"n_labels": 2.0})


def test_two_leaves_of_two_clients_give_the_flat_weighted_mean_by_hand():
    # w = 0. Leaf A: [1, 2] (1 sample), [3, 6] (3): mean (1x[1,2] + 3x[3,6]) / 4 = [2.5, 5].
    # Leaf B: [4, 0] (2), [0, 4] (2): mean [2, 2].
    # Flat: (1x[1,2] + 3x[3,6] + 2x[4,0] + 2x[0,4]) / 8 = [18, 28] / 8 = [2.25, 3.5].
    # Over what the leaves forward: (1 + 3) x [2.5, 5] + (2 + 2) x [2, 2] = [18, 28], / 8: the same.
    w = torch.zeros(2)
    a = shared_mean([_update(1, 0, w, [3, 6], 3), _update(0, 0, w, [1, 2], 1)])
    b = shared_mean([_update(2, 0, w, [4, 0], 2), _update(3, 0, w, [0, 4], 2)])
    assert [u.task.task_id for u in a] == [0, 1]  # task order
    assert [u.params.tolist() for u in a] == [[2.5, 5.0]] * 2 and [u.n_samples for u in a] == [1, 3]
    assert [u.params.tolist() for u in b] == [[2.0, 2.0]] * 2 and a[0].params is a[1].params  # one tensor a group
    updates = a + b
    n = torch.tensor([float(u.n_samples) for u in updates])
    mean = (n @ torch.stack([u.params for u in updates])) / n.sum()
    assert mean.tolist() == [2.25, 3.5]
    # the root merges each group once: 2 groups x 2 parameters x 2 FLOPs
    assert FedAvg().server_flops(SimpleNamespace(params=w), updates) == 8.0


def test_a_group_of_two_versions_forwards_one_mean_per_version():
    # versions 0 (w0 = 0) and 1 (w1 = [1, 1]): [2, 2] (1 sample) and [4, 4] (3) of version 0 -> [3.5, 3.5];
    # [3, 1] of version 1 alone keeps its own model.
    w0, w1 = torch.zeros(2), torch.ones(2)
    out = shared_mean([_update(0, 0, w0, [2, 2], 1), _update(1, 1, w1, [3, 1], 1), _update(2, 0, w0, [4, 4], 3)])
    assert [u.params.tolist() for u in out] == [[3.5, 3.5], [3.0, 1.0], [3.5, 3.5]]
    assert out[0].params is out[2].params and out[1].params is not out[0].params


def _timeline(**hierarchy) -> tuple[Recorded, object]:
    # 4 clients; logreg 4 -> 3 = 15 parameters, 60 bytes a model; links of 600 B/s: 0.1 s down, 0.1 s up;
    # 2 steps of 1e6 FLOPs at 1e6, 5e5, 2e6, 2.5e5 FLOP/s: 2, 4, 1, 8 s.
    profiles = [profile(c, flops=f, bw=600.0) for c, f in enumerate([1e6, 5e5, 2e6, 2.5e5])]
    strategy = Recorded(clients_per_round=4)
    sim = make_simulator(strategy, [8, 8, 8, 8], profiles)
    sim.state.hierarchy = Hierarchy(**hierarchy)
    run_rounds(sim, 1)
    return strategy, sim


def test_a_tiny_timeline_by_hand():
    # fan_in 2: tasks 0, 1 (clients 0, 1) go to leaf 0, which starts with task 0; task 2 needs ceil(3/2) = 2 leaves,
    # so leaf 1 starts and takes tasks 2 and 3. Arrivals at the leaves (0.1 + compute + 0.1): client 2 at 1.2,
    # client 0 at 2.2, client 1 at 4.2, client 3 at 8.2. A leaf aggregates 30 FLOPs an update at 30 FLOP/s (1 s).
    # A forward carries 60 bytes of model + 2 members x 6 scalars x 8 bytes = 156 bytes; at 156 B/s, 1 s.
    # Leaf 0: 2.2-3.2, 4.2-5.2, holds 2 = fan_in: forward reaches the server at 6.2.
    # Leaf 1: 1.2-2.2, 8.2-9.2: forward at 10.2, the round's commit (FedAvg waits for all four).
    strategy, sim = _timeline(fan_in=2, flops=30.0, up_Bps=156.0)
    assert strategy.seen == [(pytest.approx(6.2), 0), (pytest.approx(6.2), 1), (pytest.approx(10.2), 2),
                             (pytest.approx(10.2), 3)]
    assert sim.now == pytest.approx(10.2)
    metrics = sim.engine_metrics()
    assert metrics["forwards"] == 2 and metrics["root_bytes_in"] == 312
    assert metrics["leaves_started"] == 2 and metrics["leaves_peak"] == 2
    assert metrics["leaf_busy_s"] == pytest.approx(4.0) and metrics["leaf_flops"] == 120.0
    assert metrics["server_flops"] == 2 * 15 * 2  # two groups, not four updates
    # both leaves retired when their last update left (the run stopped before a second round)
    assert not sim.state.hierarchy.leaves and not sim.state.hierarchy.of_task


def test_cold_start_and_the_links_delay_the_forwards_by_hand():
    # cold start 5 s: both leaves start at t=0 and aggregate from t=5. Leaf 0: client 0 (arrived 2.2) at 5-6,
    # client 1 (4.2) at 6-7, forward 7 + 1 = 8. Leaf 1: client 2 (1.2) at 5-6, client 3 (8.2) at 8.2-9.2, forward 10.2.
    strategy, sim = _timeline(fan_in=2, flops=30.0, up_Bps=156.0, cold_start_s=5.0)
    assert [t for t, _ in strategy.seen] == pytest.approx([8.0, 8.0, 10.2, 10.2]) and sim.now == pytest.approx(10.2)
    # The leaves receive at 300 B/s: an upload takes max(0.1, 60 / 300) = 0.2 s, every arrival 0.1 s later (2.3,
    # 4.3, 1.3, 8.3). The server receives at 78 B/s, slower than the leaves' 156: a forward takes 156 / 78 = 2 s.
    # Leaf 0: 5-6, 6-7, forward at 9. Leaf 1: 5-6, 8.3-9.3, forward at 11.3.
    profiles = [profile(c, flops=f, bw=600.0) for c, f in enumerate([1e6, 5e5, 2e6, 2.5e5])]
    strategy = Recorded(clients_per_round=4)
    sim = make_simulator(strategy, [8, 8, 8, 8], profiles)
    sim.state.server_time = ServerTime(down_Bps=78.0)
    sim.state.hierarchy = Hierarchy(fan_in=2, flops=30.0, up_Bps=156.0, down_Bps=300.0, cold_start_s=5.0)
    run_rounds(sim, 1)
    assert [t for t, _ in strategy.seen] == pytest.approx([9.0, 9.0, 11.3, 11.3])


def test_max_leaves_balances_the_tasks_and_forwards_every_fan_in_updates():
    # max_leaves 1, fan_in 2: one leaf serves all four tasks and forwards each pair as it completes: clients 2 and
    # 0 (arrived 1.2, 2.2; free leaf) at 2.2, clients 1 and 3 at 8.2.
    strategy, sim = _timeline(fan_in=2, max_leaves=1)
    assert strategy.seen == [(pytest.approx(2.2), 0), (pytest.approx(2.2), 2), (pytest.approx(8.2), 1),
                             (pytest.approx(8.2), 3)]
    assert sim.engine_metrics()["leaves_peak"] == 1


def _pair(strategy_cls, hierarchy, rounds=3, **kw):
    profiles = [profile(c, flops=1e6 * (1 + c % 3)) for c in range(6)]
    sim = make_simulator(strategy_cls(clients_per_round=5, **kw), [6, 9, 12, 7, 10, 8], profiles, jitter=0.2)
    sim.state.hierarchy = hierarchy
    return run_rounds(sim, rounds)


@pytest.mark.parametrize("strategy_cls,kw", [(FedAvg, {}), (FedProx, {"mu": 0.1})])
def test_a_run_with_a_hierarchy_gives_the_flat_runs_models(strategy_cls, kw):
    flat = _pair(strategy_cls, None, **kw)
    tree = _pair(strategy_cls, Hierarchy(fan_in=2), **kw)
    assert tree.version == flat.version == 3
    assert torch.allclose(tree.params, flat.params, atol=1e-6)
    assert tree.counters.updates == flat.counters.updates == 15
    assert tree.engine_metrics()["forwards"] == 9  # 3 rounds of groups of 2, 2 and 1


def test_a_deadline_drops_the_updates_held_at_a_leaf():
    # deadline 3 s: client 2 (1.2) and client 0 (2.2) reached leaf 1 and leaf 0, whose other tasks are still in
    # flight, so neither forwarded; the deadline gives up on all four and the round commits no update.
    profiles = [profile(c, flops=f, bw=600.0) for c, f in enumerate([1e6, 5e5, 2e6, 2.5e5])]
    strategy = Recorded(clients_per_round=4, deadline_s=3.0)
    sim = make_simulator(strategy, [8, 8, 8, 8], profiles)
    sim.state.hierarchy = Hierarchy(fan_in=2)
    run_rounds(sim, 1)
    assert strategy.seen == [] and sim.now == pytest.approx(3.0) and sim.counters.dropped == 4
    assert not sim.state.hierarchy.of_task and not sim.state.hierarchy.leaves


def test_a_resumed_run_is_the_same_run():
    def build():
        profiles = [profile(c, flops=1e6 * (1 + c % 3)) for c in range(6)]
        sim = make_simulator(FedAvg(clients_per_round=5), [6, 9, 12, 7, 10, 8], profiles, jitter=0.2)
        sim.state.hierarchy = Hierarchy(fan_in=2, flops=100.0, cold_start_s=0.5)
        return sim

    whole = run_rounds(build(), 3)
    half = build()
    half.proceed()
    while not half.state.hierarchy.leaves or not any(leaf.held for leaf in half.state.hierarchy.leaves.values()):
        half.step()  # until a leaf holds an update it has not forwarded
    blob = pickle.dumps(half.state)
    resumed = build()
    resumed.state = pickle.loads(blob)
    run_rounds(resumed, 3)
    assert torch.equal(resumed.params, whole.params) and resumed.now == whole.now
    assert resumed.engine_metrics() == whole.engine_metrics()


def test_a_strategy_that_needs_each_update_is_refused():
    profiles = [profile(c) for c in range(2)]
    with pytest.raises(ConfigError, match="aggregation.hierarchy: fedbuff"):
        sim = make_simulator(FedBuff(), [8, 8], profiles)
        Hierarchy.check_strategy(sim.strategy)


def test_hetfl_run_with_a_hierarchy_and_its_one_line_refusals(tmp_path, capsys):
    config = write_config(tmp_path, aggregation={"hierarchy": {"fan_in": 2, "flops": 1e6}})
    code, _, err = cli(capsys, "run", config, "--out", tmp_path / "run")
    assert code == 0, err
    last = read_metrics(tmp_path / "run")[-1]
    assert last["forwards"] >= 6 and last["leaves_peak"] == 2 and last["root_bytes_in"] > 0
    doc = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()
    assert not [key for key in last if f"`{key}`" not in doc], "define them in docs/metrics.md"
    code, _, err = cli(capsys, "run", config, "--out", tmp_path / "buff", "--set", "strategy.name=fedbuff")
    assert_one_line_error(code, err, "aggregation.hierarchy", "fedbuff", "fedavg")
    assert not (tmp_path / "buff" / "metrics.jsonl").exists()
    code, _, err = cli(capsys, "run", config, "--out", tmp_path / "zero", "--set", "aggregation.hierarchy.fan_in=0")
    assert_one_line_error(code, err, "aggregation.hierarchy.fan_in")
    code, _, err = cli(capsys, "run", config, "--out", tmp_path / "nofan", "--set", "aggregation.hierarchy.fan_in=null")
    assert_one_line_error(code, err, "aggregation.hierarchy", "flops", "fan_in")
    code, _, err = cli(capsys, "run", config, "--out", tmp_path / "robust", "--set",
                       "strategy.aggregator.rule=median")
    assert_one_line_error(code, err, "aggregation.hierarchy", "aggregator")
    code, _, err = cli(capsys, "run", config, "--out", tmp_path / "partial", "--set", "strategy.deadline_s=5",
                       "--set", "strategy.partial_work=true")
    assert_one_line_error(code, err, "aggregation.hierarchy", "strategy.partial_work")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"]


def test_hetfl_run_resumed_mid_run_equals_the_straight_run(tmp_path, capsys):
    config = write_config(tmp_path, aggregation={"hierarchy": {"fan_in": 2, "flops": 1e5, "cold_start_s": 0.01}})
    assert cli(capsys, "run", config, "--out", tmp_path / "straight", "--quiet")[0] == 0
    assert cli(capsys, "run", config, "--out", tmp_path / "resumed", "--quiet", "--set", "rounds=2")[0] == 0
    assert cli(capsys, "run", "--resume", tmp_path / "resumed", "--quiet", "--set", "rounds=3")[0] == 0
    straight, resumed = read_metrics(tmp_path / "straight")[-1], read_metrics(tmp_path / "resumed")[-1]
    for key in ("accuracy", "sim_time_s", "forwards", "root_bytes_in", "leaf_busy_s", "leaves_started", "server_flops"):
        assert resumed[key] == straight[key], key


def test_compressed_uploads_are_decoded_at_the_leaves_and_give_the_flat_runs_model(tmp_path, capsys):
    # float16 uploads: each client's change is decoded where it arrives (the leaf); the leaves' means then give the
    # flat run's model (to float rounding), and the clients' bytes are the codec's either way
    flat = write_config(tmp_path, filename="flat.yaml", strategy={"name": "fedavg", "clients_per_round": 3,
                                                                  "compression": {"kind": "float16"}})
    assert cli(capsys, "run", flat, "--out", tmp_path / "flat", "--quiet")[0] == 0
    code, _, err = cli(capsys, "run", flat, "--out", tmp_path / "tree", "--quiet", "--set",
                       "aggregation.hierarchy.fan_in=2")
    assert code == 0, err
    a, b = read_metrics(tmp_path / "flat")[-1], read_metrics(tmp_path / "tree")[-1]
    assert b["accuracy"] == pytest.approx(a["accuracy"], abs=0.01) and b["bytes_up"] == a["bytes_up"]
    assert b["forwards"] == 6 and "forwards" not in a


def test_leaves_scale_with_the_tasks_in_flight_and_retire_when_idle():
    # fan_in 3: 7 tasks in flight need ceil(7/3) = 3 leaves, filled in turn (0,0,0,1,1,1,2); losing tasks 0-2
    # retires leaf 0, and the next task then opens leaf 3 (7 in flight again: 3 leaves needed, 2 open).
    from hetfl.engine.clock import EventQueue

    queue, root, tree = EventQueue(), ServerTime(), Hierarchy(fan_in=3)
    tasks = [Task(task_id=i, client_id=i, version=0, params=torch.zeros(2), steps=1, dispatched_at=0.0)
             for i in range(10)]
    assert [tree.assign(0.0, t).id for t in tasks[:7]] == [0, 0, 0, 1, 1, 1, 2]
    for t in tasks[:3]:
        tree.forget(queue, root, t)
    assert sorted(tree.leaves) == [1, 2] and tree.in_flight == 4
    assert [tree.assign(0.0, t).id for t in tasks[7:10]] == [2, 2, 3]
    assert tree.started == 4 and tree.peak == 3 and len(queue) == 0  # nothing held: nothing forwarded
    # a long run of assignments and losses keeps the load heap small (stale entries are dropped)
    for k in range(10, 2000):
        tree.forget(queue, root, tasks[-1])
        tasks.append(Task(task_id=k, client_id=k, version=0, params=torch.zeros(2), steps=1, dispatched_at=0.0))
        tree.assign(0.0, tasks[-1])
    assert len(tree._load) <= 4 * len(tree.leaves) + 65 and tree.in_flight == 7 and tree.started > 1000


def test_hetfl_server_refuses_the_simulated_hierarchy_in_one_line(tmp_path, capsys):
    """A deployment's leaves are hetfl aggregator processes: the simulator's key is refused, naming the way."""
    import yaml

    from hetfl.cli import main
    from hetfl.deploy.tokens import write_tokens

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset": "digits", "n_clients": 3}, "strategy": {"name": "fedavg"},
                                      "aggregation": {"hierarchy": {"fan_in": 2}}}))
    write_tokens(tmp_path / "t.yaml", 3)
    assert main(["server", str(config), "--out", str(tmp_path / "o"), "--tokens", str(tmp_path / "t.yaml")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "aggregation.hierarchy: simulated only" in err and "hetfl aggregator --parent" in err
