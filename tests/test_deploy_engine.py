"""The deployment server's engine in-process, without gRPC: what it does with one client's bad message.

A :class:`DeployServer` is built for the digits federation of the deployment tests and its engine methods are
called directly, as the engine thread calls them: ``_on_join``, ``_on_update`` with the tensors a handler decoded,
``_check_liveness`` with the clock moved on. The real processes over gRPC are in tests/test_deploy.py; here are the
rules that need exact numbers: payload declarations, the rollback of a strategy that raises, the weight of a claimed
sample count, the adaptive norm bound, and the automatic task timeout.
"""

from __future__ import annotations

import logging
import math
import time

import pytest
import torch

from hetfl.config import UpdateNormConfig, load_config
from hetfl.deploy import engine as engine_module
from hetfl.deploy import federation_pb2 as pb
from hetfl.deploy.engine import DeployServer, ServerOptions
from hetfl.deploy.servicer import Connection
from hetfl.deploy.tokens import TokenTable
from hetfl.deploy.validate import NormBound, bounded_samples, check_payload
from hetfl.engine.run import build_federation
from hetfl.strategies.fedavg import FedAvg
from test_deploy_support import N_CLIENTS, write_config


class _FrozenClock:
    """The engine's ``time`` module with ``monotonic`` frozen: only :func:`_advance` moves the engine's clock, so the
    paces and time limits these tests work out by hand hold exactly on a loaded machine."""

    def __init__(self) -> None:
        self.t = time.monotonic()

    def monotonic(self) -> float:
        return self.t

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.fixture(autouse=True)
def _frozen_engine_clock(monkeypatch):
    monkeypatch.setattr(engine_module, "time", _FrozenClock())


def _engine(tmp_path, *, registered: dict[int, int] | None = None, claims: dict[int, int] | None = None,
            strategy=None, **changes) -> DeployServer:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = load_config(write_config(tmp_path, **changes))
    fed = build_federation(cfg)
    table = TokenTable({f"token-of-client-{c:04d}": c for c in range(N_CLIENTS)}, samples=dict(registered or {}))
    server = DeployServer(cfg, fed, strategy or fed.strategy(), ServerOptions("127.0.0.1:0", table, min_clients=N_CLIENTS))
    for c in range(N_CLIENTS):
        server.conns[c] = Connection(c, f"session-{c}", time.monotonic(), alive=True)
        claim = (claims or {}).get(c, fed.pool.n_samples(c))
        server._on_join(c, pb.DeviceReport(n_samples=claim), f"host-{c}")
    server._tick()
    server.state.started = True
    server.state.strategy.start(server)
    return server


def _send(server: DeployServer, client: int, *, delta: float = 0.01, payload: dict | None = None, stats: str = "{}",
          steps: int | None = None, n_samples: int = 0) -> tuple[bool, str]:
    """Client ``client`` returns its task: the start model plus ``delta`` everywhere, with ``payload`` (by name)."""
    task = server.state.busy[client]
    tensors = {"params": task.params + delta, **{f"payload:{k}": v for k, v in (payload or {}).items()}}
    header = pb.UpdateHeader(task_id=task.task_id, steps=steps or task.steps, loss=0.5,
                             n_samples=n_samples or server.state.n_samples[client],
                             stats_json=stats)
    return server._on_update(client, header, tensors, {"params": {}}, 0)


def _delta_c(server: DeployServer) -> torch.Tensor:
    return torch.zeros_like(server.params)


def test_scaffold_rejects_a_payload_of_the_wrong_shape_or_none_and_its_round_goes_on(tmp_path, caplog):
    server = _engine(tmp_path, strategy__name="scaffold")
    n = server.params.numel()
    assert server.strategy.expected_payload(server, server.state.busy[0]) == {"delta_c": ((n,), torch.float32)}
    with caplog.at_level(logging.WARNING, logger="hetfl.server"):
        assert _send(server, 0, payload={"delta_c": torch.zeros(7)}) == (False, f"payload delta_c: shape (7,) != expected ({n},)")
        assert _send(server, 1) == (False, "payload delta_c is missing")
        assert _send(server, 2, payload={"delta_c": _delta_c(server), "extra": torch.zeros(3)})[1].startswith(
            "payload extra is not one the strategy expects (it expects: delta_c)")
        bad = _delta_c(server)
        bad[3] = math.inf
        assert _send(server, 3, payload={"delta_c": bad}) == (False, "payload delta_c: 1 non-finite value")
        assert _send(server, 4, payload={"delta_c": _delta_c(server)}) == (True, "")
    assert server.version == 1 and server.state.rejected == 4  # the round closed on client 4's update alone
    assert server.counters.updates == 1
    assert f"client 0: update for task 0 rejected: payload delta_c: shape (7,) != expected ({n},)" in caplog.text
    # FedAvg declares no payload: one sent is refused the same way
    plain = _engine(tmp_path / "fedavg")
    assert _send(plain, 0, payload={"delta_c": torch.zeros(7)})[1] == "payload delta_c is not one the strategy expects (it expects: none)"
    assert check_payload({}, {}) is None


class Fragile(FedAvg):
    """FedAvg that fails on an update carrying the statistic ``boom``: after it has taken the update into its round,
    dispatched a task and set a timer (all of which must be undone), or, with ``boom`` 2, in its aggregation."""

    name = "fragile"

    def on_update(self, server, update):
        super().on_update(server, update)
        if update.stats.get("boom") == 1:
            self.extra = server.set_timer(server.now + 100, "never")
            raise RuntimeError("boom\non two lines")

    def aggregate(self, server, updates):
        if any(u.stats.get("boom") == 2 for u in updates):
            raise ValueError("cannot aggregate this")
        return super().aggregate(server, updates)


def test_an_update_the_strategy_fails_on_is_rejected_and_its_state_restored(tmp_path, caplog):
    server = _engine(tmp_path, strategy=Fragile(clients_per_round=N_CLIENTS))
    strategy = server.strategy
    pending_before = dict(strategy._pending)
    timers_before = len(server.state.timers)  # live ones
    with caplog.at_level(logging.WARNING, logger="hetfl.server"):
        ok, reason = _send(server, 0, stats='{"boom": 1}')
    assert not ok and reason == "the strategy failed on it (RuntimeError: boom on two lines)"
    assert "\n" not in reason and "Traceback" not in caplog.text
    assert server.strategy is strategy and strategy._received == []  # restored in place, then told the task failed
    assert set(strategy._pending) == set(pending_before) - {0} and strategy._dropped == 1
    assert not hasattr(strategy, "extra")
    assert len(server.state.timers) == timers_before  # its timer withdrawn
    assert server.state.rejected == 1 and server.counters.trained_steps == 0
    for c in (1, 2):
        assert _send(server, c) == (True, "")
    # an exception in the aggregation, when the last update closes the round: that update is rejected, the round
    # closes without it
    assert _send(server, 3) == (True, "")
    ok, reason = _send(server, 4, stats='{"boom": 2}')
    assert not ok and reason == "the strategy failed on it (ValueError: cannot aggregate this)"
    assert server.version == 1 and server.counters.updates == 3 and server.state.rejected == 2
    assert len(server.state.busy) == N_CLIENTS  # the next round went out
    assert "strategy fragile: on_update raised ValueError: cannot aggregate this" in caplog.text


class Forgetful(FedAvg):
    """FedAvg with an alarm set at its start, which an update carrying the statistic ``boom`` cancels before it
    raises: the failed call's cancellation must be undone, so the alarm still fires."""

    name = "forgetful"

    def start(self, server):
        super().start(server)
        self.alarm, self.rang = server.set_timer(server.now + 1.0, "alarm"), []

    def on_timer(self, server, tag):
        if tag == "alarm":
            self.rang.append(server.now)
        else:
            super().on_timer(server, tag)

    def on_update(self, server, update):
        if update.stats.get("boom"):
            server.cancel_timer(self.alarm)
            raise RuntimeError("boom")
        super().on_update(server, update)


def test_a_timer_cancelled_by_a_hook_that_raises_is_revived_and_fires(tmp_path, caplog):
    server = _engine(tmp_path, strategy=Forgetful(clients_per_round=N_CLIENTS))
    alarm = server.strategy.alarm
    with caplog.at_level(logging.WARNING, logger="hetfl.server"):
        ok, reason = _send(server, 0, stats='{"boom": 1}')
    assert not ok and reason == "the strategy failed on it (RuntimeError: boom)"
    assert server.strategy.alarm is alarm and not alarm.cancelled and server.state.timers.peek() is alarm
    server._now = alarm.time + 0.5  # the clock moves past it
    server._fire_timers()
    assert server.strategy.rang == [alarm.time + 0.5] and server.state.timers.peek() is None


def test_a_claimed_sample_count_is_bounded_by_the_registered_count_and_max_samples(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hetfl.server"):
        server = _engine(tmp_path, registered={0: 300, 1: 300}, claims={0: 10**9, 1: 200, 2: 10**9, 3: 10**9},
                         deploy__max_samples=1000)
    assert [server.num_samples(c) for c in range(4)] == [300, 200, 1000, 1000]
    assert "client 0 claims 1000000000 samples at its join (registered 300; deploy.max_samples 1000): weighted as 300" in caplog.text
    assert "client 1 claims 200 samples at its join (registered 300; deploy.max_samples 1000): weighted as 200" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hetfl.server"):
        _send(server, 0, n_samples=10**9)  # the same claim again: logged once
        _send(server, 1, n_samples=250)  # a new claim: logged, the weight keeps the first
    assert "client 0 claims" not in caplog.text
    assert "client 1 claims 250 samples with its update (its first claim 200; registered 300" in caplog.text
    assert [u.n_samples for u in server.strategy._received] == [300, 200]
    assert bounded_samples(7, None, None) == 7 and bounded_samples(7, 5, None) == 5 and bounded_samples(7, None, 3) == 3


def test_a_claim_far_above_the_others_with_nothing_to_bound_it_is_logged(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hetfl.server"):
        server = _engine(tmp_path, claims={4: 10**9})
    assert server.num_samples(4) == 10**9  # nothing bounds it, but the operator is told
    assert "client 4 claims 1000000000 samples" in caplog.text and "nothing bounds its weight" in caplog.text


def test_the_adaptive_norm_bound():
    rule = NormBound(UpdateNormConfig(factor=10, window=4, warmup=3))
    history: dict[int, list[float]] = {}
    for norm in (1.0, 2.0):
        assert rule.check(norm, 4, 100, history) is None
        rule.accepted(norm, 4, 100, history)
    assert rule.check(1e6, 4, 100, history) is None  # warming up: two accepted, three needed
    rule.accepted(3.0, 4, 100, history)
    assert history == {100: [0.5, 1.0, 1.5]}  # norm / sqrt(steps)
    assert rule.limit(history, 100) == 10.0 and rule.limit(history, 50) is None  # another architecture: its own
    assert rule.check(20.0, 4, 100, history) is None and rule.check(20.0, 1, 100, history) is not None
    plus_255 = 255 * math.sqrt(2410)  # +255 in every entry of the test model
    reason = rule.check(plus_255, 20, 100, history)
    assert reason.startswith("update norm 1.252e+04 (2799 per sqrt(step), 20 steps) > 10, 10 x the median of the last 3")
    for norm in (4.0, 4.0, 4.0):
        rule.accepted(norm, 4, 100, history)
    assert history[100] == [1.5, 2.0, 2.0, 2.0]  # the last window only
    fixed = NormBound(UpdateNormConfig(rule="fixed"), 5.0)
    assert fixed.check(5.5, 1, 100, {}) == "update norm 5.5 > bound 5.0" and fixed.check(4.0, 1, 100, {}) is None
    off = NormBound(UpdateNormConfig(rule="off"))
    assert off.check(1e9, 1, 100, {100: [1.0] * 10}) is None
    assert NormBound(UpdateNormConfig(), secure=True).rule == "off"  # the default does not refuse secure aggregation


def test_the_norm_bound_is_adaptive_by_default_and_configurable(tmp_path):
    from hetfl.errors import ConfigError

    def deploy(**changes):
        return load_config(write_config(tmp_path, **{f"deploy__{k}": v for k, v in changes.items()})).deploy

    assert deploy().update_norm.rule == "adaptive" and deploy().task_timeout_s == "auto"
    assert deploy(max_update_norm=20).update_norm.rule == "fixed"  # today's key is the fixed rule
    assert deploy(update_norm={"rule": "off"}).update_norm.rule == "off"
    assert deploy(task_timeout_s=None).task_timeout_s == "off" and deploy(task_timeout_s=30).task_timeout_s == 30
    with pytest.raises(ConfigError, match="fixed needs deploy.max_update_norm"):
        deploy(update_norm={"rule": "fixed"})
    with pytest.raises(ConfigError, match="max_update_norm is a fixed bound"):
        deploy(max_update_norm=20, update_norm={"rule": "off"})


def test_a_plus_255_update_is_rejected_by_the_default_bound_and_honest_ones_are_not(tmp_path):
    server = _engine(tmp_path)
    for version in range(3):  # three rounds of honest updates of various sizes: none rejected
        for c in range(N_CLIENTS):
            assert _send(server, c, delta=0.002 * (1 + c + version)) == (True, "")
    assert server.version == 3 and server.state.rejected == 0
    ok, reason = _send(server, 0, delta=255.0)
    assert not ok and "(deploy.update_norm adaptive)" in reason
    assert server.state.rejected == 1


def _advance(server: DeployServer, seconds: float) -> None:
    server._t0 -= seconds
    server._tick()


def test_a_task_that_never_returns_times_out_and_its_client_is_benched(tmp_path, caplog):
    server = _engine(tmp_path, deploy__task_timeout_floor_s=5, deploy__task_timeout_factor=4)
    task = server.state.busy[4]
    limit, how = server.task_limit(task)
    assert limit == 5 and "nothing measured yet" in how
    _advance(server, 1.0)
    for c in range(4):
        assert _send(server, c) == (True, "")  # measured by the server: 1 s for 20 steps
    assert server.state.paces[0] == [pytest.approx(1.0 / 20, rel=0.05)]
    limit, how = server.task_limit(task)  # client 4 is not measured: the others' pace, 4 x 1 s, below the floor
    assert limit == 5 and "at the clients' pace" in how
    with caplog.at_level(logging.WARNING, logger="hetfl.server"):
        _advance(server, 3.9)
        server._check_liveness()
        assert server.state.busy.get(4) is task  # 4.9 s: not yet
        _advance(server, 0.2)
        server._check_liveness()
    assert f"client 4 lost task {task.task_id}: not returned within 5.0 s (task_timeout_s auto: 4 x 1.00 s expected" in caplog.text
    assert server.version == 1 and server.state.timed_out == 1 and server.state.strikes == {4: 1}
    assert sorted(server.state.busy) == [0, 1, 2, 3]  # the next round went to the others: client 4 is benched
    assert 4 not in server.available() and server.next_available_time() == pytest.approx(server.now + 5.0, abs=0.01)
    _advance(server, 5.1)
    assert server.available() == [4]
    second = server.dispatch(4)
    assert server.task_limit(second)[0] == 10  # doubled after a timeout in a row
    _advance(server, 2.0)
    assert _send(server, 4) == (True, "")
    assert server.state.strikes == {} and server.state.paces[4] == [pytest.approx(2.0 / 20, rel=0.05)]
    fixed = _engine(tmp_path / "fixed", deploy__task_timeout_s=3)
    assert fixed.task_limit(fixed.state.busy[0]) == (3.0, "task_timeout_s 3")
    off = _engine(tmp_path / "off", deploy__task_timeout_s="off")
    assert off.task_limit(off.state.busy[0]) == (None, "")


def test_a_strategy_whose_clients_send_back_a_part_has_it_checked_against_upload_reference(tmp_path):
    """FedConv's half-width clients return their sub-model (67 -> 35 numbers here is the hand-worked case of
    tests/test_fedconv.py; this MLP's is what upload_reference says): the server accepts that shape and no other."""
    server = _engine(tmp_path, model__hidden=[8], strategy__name="fedconv",
                     strategy__params={"ratios": [0.5], "public_samples": 0, "server_steps": 0})
    strategy = server.state.strategy
    task = server.state.busy[0]
    reference = strategy.upload_reference(server, task)
    assert reference.numel() < task.params.numel() and torch.equal(reference, task.payload["model"])
    header = pb.UpdateHeader(task_id=task.task_id, steps=task.steps, loss=0.5, n_samples=server.state.n_samples[0],
                             stats_json="{}")
    ok, reason = server._on_update(0, header, {"params": task.params + 0.01}, {"params": {}}, 0)  # the full model
    assert not ok and reason == f"shape {tuple(task.params.shape)} != expected {tuple(reference.shape)}"
    task = server.state.busy[1]
    header.task_id = task.task_id
    header.n_samples = server.state.n_samples[1]
    reference = strategy.upload_reference(server, task)
    ok, reason = server._on_update(1, header, {"params": reference + 0.01}, {"params": {}}, 0)
    assert (ok, reason) == (True, "")


def test_an_aggregate_whose_mean_moves_further_than_any_bounded_update_could_is_rejected(tmp_path):
    """deploy.max_update_norm 1: each member's change is at most 1, so their weighted mean's is too (triangle
    inequality); an aggregator that hands the server a mean 3 away (sqrt(n) x 3/sqrt(n)) is refused with its members."""
    server = _engine(tmp_path, deploy__max_update_norm=1.0)
    for c in range(4):
        server.conns[c].via = "rack-a"

    def aggregate(clients: list[int], shift: float) -> tuple[bool, str]:
        tasks = [server.state.busy[c] for c in clients]
        members = [pb.Member(task_id=t.task_id, client_id=t.client_id, n_samples=server.num_samples(t.client_id),
                             steps=t.steps, loss=0.5, stats_json="{}") for t in tasks]
        header = pb.AggregateHeader(version=tasks[0].version, members=members)
        n = tasks[0].params.numel()
        return server._on_aggregate("rack-a", header, {"params": tasks[0].params + shift / math.sqrt(n)}, 0)

    ok, reason = aggregate([0, 1], 3.0)  # the mean's change has norm 3 > 1
    assert not ok and reason.startswith("update norm 3.0 > bound 1.0")
    assert server.state.rejected == 2 and 0 not in server.state.busy and 1 not in server.state.busy
    assert aggregate([2, 3], 0.5) == (True, "")  # norm 0.5: within the bound
