"""FedCompass: local-step assignment, arrival groups and aggregation, worked out by hand."""

import dataclasses
import heapq
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import make_simulator, profile, run_rounds
from hetfl.config import StrategyConfig
from hetfl.errors import ConfigError
from hetfl.strategies import FedCompass, Task, Update, build_strategy
from hetfl.strategies.fedcompass import Group, plan_steps


# ---------------------------------------------------------------------------- the scheduler, alone
def test_plan_steps_for_three_clients_of_known_speed():
    # Q_max = 100, Q_min = 20. Group 0 expects its clients at t=200 and waits until t=250; its
    # member A runs 1 s a step. Three clients ask for work at t=120:
    g0 = Group(0, expected=200.0, latest=250.0, members={0})
    speeds = {0: 1.0}
    # B, 1.2 s/step: floor((200 - 120) / 1.2) = floor(66.7) = 66 steps, within [20, 100]: joins group 0
    assert plan_steps(120.0, 1.2, [g0], speeds, q_min=20, q_max=100) == (g0, 66)
    # C, 5 s/step: floor(80 / 5) = 16 < Q_min: cannot join. New group aimed at A's next arrival if
    # group 0 closes at its latest time: 250 + 1.0 * 100 = 350 -> floor((350 - 120) / 5) = 46 steps
    assert plan_steps(120.0, 5.0, [g0], speeds, q_min=20, q_max=100) == (None, 46)
    # D, 0.5 s/step: floor(80 / 0.5) = 160 > Q_max, and floor(230 / 0.5) = 460 > Q_max: a new group of Q_max
    assert plan_steps(120.0, 0.5, [g0], speeds, q_min=20, q_max=100) == (None, 100)
    # nobody has a group yet: Q_max
    assert plan_steps(0.0, 3.0, [], {}, q_min=20, q_max=100) == (None, 100)


def test_plan_steps_prefers_the_group_that_gives_the_most_steps_and_lifts_to_q_min():
    early = Group(0, expected=30.0, latest=40.0, members={0})
    late = Group(1, expected=60.0, latest=90.0, members={1})
    speeds = {0: 1.0, 1: 2.0}
    # speed 1 at t=0: 30 steps for `early`, 60 for `late`: both within [10, 100], the larger wins
    assert plan_steps(0.0, 1.0, [early, late], speeds, q_min=10, q_max=100) == (late, 60)
    # speed 50 at t=0: joins nothing (0 and 1 steps); aims at early's fastest next arrival (40 + 100 = 140
    # -> 2 steps) or late's (90 + 200 = 290 -> 5 steps): 5, lifted to Q_min = 10
    assert plan_steps(0.0, 50.0, [early, late], speeds, q_min=10, q_max=100) == (None, 10)


# ---------------------------------------------------------------------------- on the simulator
def _three_clients(**params):
    # 1e6 FLOPs a step: A 1 s/step, B 1.25 s/step, C 5 s/step; no network time
    profiles = [profile(0, flops=1e6, bw=math.inf), profile(1, flops=0.8e6, bw=math.inf),
                profile(2, flops=0.2e6, bw=math.inf)]
    strategy = FedCompass(max_steps=10, q=0.2, lam=1.5, **params)
    sim = make_simulator(strategy, [8, 8, 8], profiles)
    log = []
    dispatch = sim.dispatch

    def spy(client, **kwargs):
        task = dispatch(client, **kwargs)
        log.append((sim.now, client, task.steps))
        return task

    sim.dispatch = spy
    return sim, strategy, log


def test_clients_of_different_speeds_end_up_arriving_together():
    sim, strategy, log = _three_clients()
    arrivals = []
    original = strategy.on_update
    strategy.on_update = lambda server, u: (arrivals.append((server.now, u.client_id)), original(server, u))
    run_rounds(sim, 9)
    # t=0: every client's first task runs Q_max = 10 steps (speed unknown).
    # t=10: A back (1 s/step), applied alone (v1); new group g0 {A}: 10 steps, expected 20, latest 25.
    # t=12.5: B back (1.25 s/step), applied alone (v2); joins g0: floor((20 - 12.5) / 1.25) = 6 steps.
    # t=20: A and B back: g0 aggregated (v3); fastest first: A opens g1 (10 steps, expected 30), B joins
    #       it with floor(10 / 1.25) = 8 steps.   t=30: g1 (v4), the same again: g2 expected 40;
    # t=40: g2 (v5) -> g3 expected 50, latest 55.
    # t=50: C back first (its arrival was scheduled at t=0), applied alone (v6). Joining g3 gives 0
    #       steps < Q_min = 2; a new group aimed at A's next arrival after g3's latest time:
    #       55 + 1 * 10 = 65 -> floor((65 - 50) / 5) = 3 steps, g4 expected 65.
    #       Then A and B: g3 (v7). A: g4 would need floor(15 / 1) = 15 > Q_max steps, so a new group
    #       g5 of 10 steps (expected 60); B joins g5 with floor(10 / 1.25) = 8.
    # t=60: g5 (v8). Now A joins g4 with floor(5 / 1) = 5 steps and B with floor(5 / 1.25) = 4.
    # t=65: A, B and C arrive together: one aggregation of all three (v9).
    assert log == [
        (0, 0, 10), (0, 1, 10), (0, 2, 10),
        (10, 0, 10), (12.5, 1, 6),
        (20, 0, 10), (20, 1, 8),
        (30, 0, 10), (30, 1, 8),
        (40, 0, 10), (40, 1, 8),
        (50, 2, 3), (50, 0, 10), (50, 1, 8),
        (60, 0, 5), (60, 1, 4),
    ]
    assert arrivals[-3:] == [(65, 2), (65, 0), (65, 1)]
    assert sim.version == 9 and sim.now == 65
    assert strategy.speed == {0: 1.0, 1: 1.25, 2: 5.0}
    assert strategy.metrics()["compass_groups"] == 6  # g0 .. g5


class FakeServer:
    def __init__(self, params, version=0, n_clients=2):
        self.params = torch.tensor(params, dtype=torch.float32)
        self.version, self.n_clients, self.committed = version, n_clients, []

    def commit(self, params, updates, dropped=0):
        self.params = params
        self.committed.append(updates)


def _update(client, start, end, version=0, steps=1):
    task = Task(task_id=client, client_id=client, version=version, params=torch.tensor(start), steps=steps,
                dispatched_at=0.0)
    return Update(task=task, params=torch.tensor(end), n_samples=1, steps=steps, loss=0.0, arrived_at=0.0)


def test_aggregation_mixes_models_with_staleness_weighted_coefficients():
    # N = 2, uniform p = 1/2, alpha = 0.9: alpha_i = 0.45 each when fresh
    # w = (1, 0), w_1 = (2, 2), w_2 = (0, 4): 0.1 * (1, 0) + 0.45 * (2, 2) + 0.45 * (0, 4) = (1.0, 2.7)
    s = FakeServer([1.0, 0.0], version=1)
    fc = FedCompass(weighting="uniform")
    fc._weights = [0.5, 0.5]
    fc._aggregate(s, [_update(0, [1.0, 0.0], [2.0, 2.0], version=1), _update(1, [1.0, 0.0], [0.0, 4.0], version=1)])
    assert torch.allclose(s.params, torch.tensor([1.0, 2.7]))
    # polynomial s(tau) = (1 + tau)^-1 and the second update one aggregation old: alpha_2 = 0.45 / 2 = 0.225
    # (1 - 0.675) * (1, 0) + 0.45 * (2, 2) + 0.225 * (0, 4) = (1.225, 1.8)
    s = FakeServer([1.0, 0.0], version=1)
    fc = FedCompass(weighting="uniform", staleness="polynomial", staleness_a=1.0)
    fc._weights = [0.5, 0.5]
    fc._aggregate(s, [_update(0, [1.0, 0.0], [2.0, 2.0], version=1), _update(1, [5.0, 5.0], [0.0, 4.0], version=0)])
    assert torch.allclose(s.params, torch.tensor([1.225, 1.8]))


def test_group_weighting_shares_alpha_among_the_aggregated_clients():
    # N = 4 clients with 1, 1, 3, 3 samples; clients 0 and 2 aggregate: p = (1, 3) / 4, alpha = 0.8
    # w = 0, w_0 = 4, w_2 = 8: (1 - 0.8) * 0 + 0.8 * (0.25 * 4 + 0.75 * 8) = 0.8 * 7 = 5.6
    # (with samples weighting over all 8 samples: alpha_i = 0.8 * (1/8, 3/8): 0.4 + 2.4 = 2.8)
    for weighting, expected in (("group", 5.6), ("samples", 2.8)):
        s = FakeServer([0.0], version=0, n_clients=4)
        s.num_samples = lambda c: [1, 1, 3, 3][c]
        fc = FedCompass(weighting=weighting, alpha=0.8)
        fc._weights = [n / 8 for n in (1, 1, 3, 3)]
        fc._aggregate(s, [_update(0, [0.0], [4.0]), _update(2, [0.0], [8.0])])
        assert torch.allclose(s.params, torch.tensor([expected])), weighting


def test_normalised_aggregation_by_hand():
    # alpha_i = 0.45; client 1 ran 2 steps and moved +2, client 2 ran 4 steps and moved -4 (per step: +1, -1)
    # Q_eff = (0.45 * 2 + 0.45 * 4) / 0.9 = 3; w <- w + 3 * (0.45 * 2/2 + 0.45 * (-4)/4) = w + 0
    s = FakeServer([1.0], version=0)
    fc = FedCompass(weighting="uniform", normalize=True)
    fc._weights = [0.5, 0.5]
    fc._aggregate(s, [_update(0, [1.0], [3.0], steps=2), _update(1, [1.0], [-3.0], steps=4)])
    assert torch.allclose(s.params, torch.tensor([1.0]))
    # unnormalised mixing of the same models: 0.1 * 1 + 0.45 * 3 + 0.45 * (-3) = 0.1
    s = FakeServer([1.0], version=0)
    fc = FedCompass(weighting="uniform")
    fc._weights = [0.5, 0.5]
    fc._aggregate(s, [_update(0, [1.0], [3.0], steps=2), _update(1, [1.0], [-3.0], steps=4)])
    assert torch.allclose(s.params, torch.tensor([0.1]))


def test_a_member_that_misses_its_group_is_buffered_into_the_next_aggregation():
    sim, strategy, _ = _three_clients()
    run_rounds(sim, 4)  # t=30: A and B were just sent off in group g2 (expected 40, latest 45)
    sim.profiles[1] = dataclasses.replace(sim.profiles[1], flops=0.08e6)  # B slows down 10x: 12.5 s/step
    aggregated = []
    commit = sim.commit
    sim.commit = lambda params, updates, dropped=0: (aggregated.append([u.client_id for u in updates]),
                                                     commit(params, updates, dropped=dropped))
    run_rounds(sim, 6)
    # t=40: A back, B is not (8 steps now take 100 s). t=45, g2's latest time: A alone is aggregated
    # (v5), A goes on. t=50: C's first update (v6). B arrives at t=130, after its group: buffered...
    assert aggregated[0] == [0]
    run_rounds(sim, 40)
    late = strategy.metrics()["compass_late_updates"]
    assert late >= 1
    # ... and merged into the next group aggregation, together with that group's own members
    merged = [ids for ids in aggregated if 1 in ids and len(ids) > 1]
    assert merged and merged[0][-1] == 1


def test_learns_on_a_tiny_federation_and_is_configurable():
    sim, strategy, _ = _three_clients(alpha=0.9)
    x, y = sim.pool.x, sim.pool.y
    before = torch.nn.functional.cross_entropy(sim.trainer.predict(sim.params, x), y)
    run_rounds(sim, 20)
    after = torch.nn.functional.cross_entropy(sim.trainer.predict(sim.params, x), y)
    assert after < 0.8 * before
    built = build_strategy(StrategyConfig(name="fedcompass", params={"max_steps": 50, "q": 0.1, "lam": 2.0}))
    assert (built.max_steps, built.q, built.lam) == (50, 0.1, 2.0)
    for lam in (0.5, math.inf, math.nan):  # below 1 a group's own members are late; at infinity it never closes
        with pytest.raises(ConfigError, match="strategy.params: fedcompass: lam must be a finite number of at least 1"):
            build_strategy(StrategyConfig(name="fedcompass", params={"lam": lam}))
    assert build_strategy(StrategyConfig(name="fedcompass", params={"lam": 1})).lam == 1
    with pytest.raises(ConfigError, match="strategy.params.weighting"):
        build_strategy(StrategyConfig(name="fedcompass", params={"weighting": "by-size"}))


# ---------------------------------------------------------------------------- the reference's edge cases (issue 14)
def _timeline(step_s, *, latency=None, until=None, **params):
    """FedCompass on clients of fixed seconds per step (and latency each way), no jitter, no bandwidth limit;
    every aggregation recorded: its time ``t``, ``tasks`` [(client, task id)], ``dropped``, ``updates``, and the
    global model ``before`` and ``after`` it."""
    latency = latency or [0.0] * len(step_s)
    profiles = [profile(i, flops=1e6 / s, bw=math.inf, latency=lat) for i, (s, lat) in enumerate(zip(step_s, latency))]
    strategy = FedCompass(**params)
    sim = make_simulator(strategy, [8] * len(step_s), profiles)
    sim.max_sim_time_s = until
    commits = []
    commit = sim.commit

    def spy(params, updates, dropped=0):
        before = sim.params
        commits.append(SimpleNamespace(
            t=sim.now, tasks=[(u.client_id, u.task.task_id) for u in updates], dropped=dropped, updates=updates,
            before=before, after=params,
        ))
        commit(params, updates, dropped=dropped)

    sim.commit = spy
    return sim, strategy, commits


def test_a_late_update_and_the_clients_next_one_in_one_aggregation_keep_only_the_newer():
    # A: 1 s/step. B: 1 s/step and 2.5 s latency each way (5 s a task). Q_max = 10, Q_min = 2, lambda = 1.25,
    # speed = the last sample (momentum 1), p = 1/2 (uniform, N = 2), alpha = 0.9: alpha_i = 0.45.
    sim, strategy, commits = _timeline([1.0, 1.0], latency=[0.0, 2.5], max_steps=10, q=0.2, lam=1.25,
                                       speed_momentum=1.0, weighting="uniform")
    run_rounds(sim, 4)
    # t=0    A (task 0) and B (task 1): Q_max = 10 steps.
    # t=10   A back: 1 s/step; applied alone (v1). New group g0: 10 steps, expected 20, latest 10 + 1.25 * 10 = 22.5.
    # t=15   B back: 15 s / 10 = 1.5 s/step; applied alone (v2). Joins g0: floor((20 - 15) / 1.5) = 3 steps
    #        (task 3), which really take 2.5 + 3 + 2.5 = 8 s: back at 23, after g0's latest time.
    # t=20   A back (task 2), in g0.
    # t=22.5 g0's latest time: A alone (v3). A: new group g1, 10 steps (task 4), expected 32.5, latest 35.
    # t=23   B back, late: task 3 is buffered. B: 8 s / 3 = 2.667 s/step; joins g1 with
    #        floor((32.5 - 23) / 2.667) = 3 steps (task 5): back at 31, in time.
    # t=31   B back (task 5), in g1.   t=32.5  A back (task 4): g1 is complete (v4).
    # v4 would use B's late task 3 and its task 5: alphas summing to 3 * 0.45 = 1.35, the current model weighted
    # -0.35. Only B's newer update counts, as in the reference scheduler; task 3 is dropped.
    assert [(c.t, c.tasks, c.dropped) for c in commits] == [
        (10, [(0, 0)], 0), (15, [(1, 1)], 0), (22.5, [(0, 2)], 0), (32.5, [(1, 5), (0, 4)], 1),
    ]
    v4 = commits[-1]
    b5, a4 = (u.params for u in v4.updates)
    assert torch.allclose(v4.after, 0.1 * v4.before + 0.45 * b5 + 0.45 * a4)  # weights 0.1 + 0.45 + 0.45 = 1
    assert sim.counters.dropped == 1 and sim.counters.updates == 5 and strategy.held_updates() == 0
    assert strategy.metrics()["compass_late_updates"] == 1


def test_with_lambda_one_an_arrival_at_the_deadline_is_on_time():
    # A: 1 s/step, B: 2 s/step; Q_max = 10, Q_min = 2, lambda = 1 (a group's latest time is its expected time),
    # no jitter: every group's creator arrives exactly at its deadline. Until t = 40:
    sim, strategy, commits = _timeline([1.0, 2.0], max_steps=10, q=0.2, lam=1.0, until=40.0)
    sim.proceed()
    while sim.step():
        pass
    # t=0   A, B: 10 steps.
    # t=10  A back (1 s/step): alone (v1). New group g0: 10 steps, expected = latest = 20.
    # t=20  B back (2 s/step): alone (v2). g0 would give it floor(0 / 2) = 0 < Q_min steps; no group ends after
    #       now, so a new group g1 of Q_max: 10 steps, expected = latest = 40.
    # t=20  g0's deadline, then A's arrival at that same instant: on time, g0 is complete (v3). A: g1 would need
    #       floor(20 / 1) = 20 > Q_max steps; aiming at B's next arrival after g1, 40 + 2 * 10 = 60, needs 40 > Q_max:
    #       a new group g2 of Q_max steps, expected = latest = 30.
    # t=30  A back at g2's deadline: on time (v4); A joins g1 with floor((40 - 30) / 1) = 10 steps.
    # t=40  B and A back at g1's deadline: on time, g1 complete (v5).
    # (Before: each deadline fired first, deleted its empty group and made the arrival of that instant late:
    # only v1 and v2 in 40 s, A's updates piling up in the buffer.)
    assert [(c.t, c.tasks) for c in commits] == [
        (10, [(0, 0)]), (20, [(1, 1)]), (20, [(0, 2)]), (30, [(0, 4)]), (40, [(1, 3), (0, 5)]),
    ]
    assert strategy.metrics()["compass_late_updates"] == 0
    reference = reference_aggregations([1.0, 2.0], q_max=10, q_min=2, lam=1.0, momentum=0.9, until=40.0)
    assert [(c.t, sorted({u.client_id for u in c.updates})) for c in commits] == reference


def test_with_lambda_one_four_clients_aggregate_as_often_as_the_reference_scheduler():
    # The case: four clients, lambda = 1, no jitter, 40 simulated seconds. The reference's rule gives 19
    # aggregations; hetfl made 4 (the four first updates, applied alone) before arrivals at a deadline counted.
    step_s = [0.5, 1.0, 2.0, 4.0]
    sim, strategy, commits = _timeline(step_s, max_steps=5, q=0.2, lam=1.0, until=40.0)
    sim.proceed()
    while sim.step():
        pass
    reference = reference_aggregations(step_s, q_max=5, q_min=1, lam=1.0, momentum=0.9, until=40.0)
    assert len(reference) == 19
    assert [(c.t, sorted({u.client_id for u in c.updates})) for c in commits] == reference  # event by event


def reference_aggregations(step_s, *, q_max, q_min, lam, momentum, until):
    """(time, sorted clients) of every aggregation up to ``until`` under the rule of APPFL's CompassScheduler
    (appfl/scheduler/compass_scheduler.py), re-implemented here from its description, for clients of fixed
    seconds per step and no communication time:

    - a client's first update is applied alone; afterwards it joins the open group whose expected time gives it
      the most steps within [Q_min, Q_max] (on a tie, the group created last), else opens a group aimed at the
      next arrival of the fastest member of a group still waiting (Q_max if none), lifted to Q_min;
    - an arrival at or before its group's latest time is on time; after it, it is buffered (one per client,
      the newest) and the client is assigned at once;
    - a group is aggregated, with the buffer (a client's group update replacing its buffered one), when its last
      member arrives or at its latest time if anyone arrived; then its clients are assigned, fastest first.
    Simultaneous events: arrivals in the order their tasks were sent, then deadlines.
    """
    n = len(step_s)
    speed, steps, sent, group_of = {}, dict.fromkeys(range(n), q_max), dict.fromkeys(range(n), 0.0), {}
    groups, buffered, out, queue, counter = {}, set(), [], [], [0, 0]  # counter: (events, groups)

    def push(t, kind, data):
        heapq.heappush(queue, (t, kind == "deadline", counter[0], kind, data))
        counter[0] += 1

    def assign(c, t):
        group, q = None, -1
        for g in groups.values():
            k = math.floor((g["expected"] - t) / speed[c])
            if q_min <= k <= q_max and k >= q:
                group, q = g, k
        if group is None:
            aims = [math.floor((g["latest"] + q_max * min(speed[m] for m in g["waiting"] | set(g["arrived"])) - t)
                               / speed[c])
                    for g in groups.values() if t < g["latest"]]
            aims = [k for k in aims if k <= q_max]
            q = max(max(aims), q_min) if aims and max(aims) >= 0 else q_max
            group = {"id": counter[1], "expected": t + q * speed[c], "latest": t + q * speed[c] * lam,
                     "waiting": set(), "arrived": []}
            groups[group["id"]] = group
            push(group["latest"], "deadline", group["id"])
            counter[1] += 1
        group["waiting"].add(c)
        group_of[c], steps[c], sent[c] = group["id"], q, t
        push(t + q * step_s[c], "arrival", c)

    def aggregate(g, t):
        out.append((t, sorted(buffered | set(g["arrived"]))))
        buffered.clear()
        g["expected"] = g["latest"] = 0.0  # done: whoever is still training for it is late
        for c in sorted(g["arrived"], key=lambda c: (speed[c], c)):
            assign(c, t)
        if not g["waiting"]:
            del groups[g["id"]]

    for c in range(n):
        push(q_max * step_s[c], "arrival", c)
    while queue and queue[0][0] <= until:
        t, _, _, kind, data = heapq.heappop(queue)
        if kind == "deadline":
            g = groups.get(data)
            if g is not None and g["arrived"] and g["latest"] > 0:
                aggregate(g, t)
            continue
        c = data
        sample = (t - sent[c]) / steps[c]
        speed[c] = sample if c not in speed else (1 - momentum) * speed[c] + momentum * sample
        if c not in group_of:
            out.append((t, [c]))
            assign(c, t)
            continue
        g = groups.get(group_of[c])
        g["waiting"].discard(c)
        if t > g["latest"]:
            if not g["waiting"]:
                del groups[g["id"]]
            buffered.add(c)
            assign(c, t)
        else:
            g["arrived"].append(c)
            if not g["waiting"]:
                aggregate(g, t)
    return out
