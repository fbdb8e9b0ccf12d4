"""FedCompass: semi-asynchronous FL with a computing-power-aware scheduler.

Li et al., "FedCompass: Efficient Cross-Silo Federated Learning on Heterogeneous Client Devices
using a Computing Power Aware Scheduler", ICLR 2024 (arXiv:2309.14675).

The server learns how long each client takes per local step and gives every client the number of
local steps Q_i in [Q_min, Q_max] (Q_min = q * Q_max) that makes clients of similar speed arrive
together, as an *arrival group*, so their models are aggregated together and are hardly stale,
while nobody waits for stragglers.

Speed. After each task, sample = (arrival - dispatch) / Q_i seconds per step (communication
included); the estimate is the first sample, then speed <- (1 - m) speed + m sample.

Assignment of a client with speed v at time t (after its update was used):

1. *Join*: for every open group g with expected arrival T_g, Q = floor((T_g - t) / v). Among groups
   with Q_min <= Q <= Q_max, join the one giving the most steps.
2. *New group*: otherwise, aim at the moment the fastest member of an open group g (speed v_g)
   would next arrive if g were aggregated at its latest time L_g: Q = floor((L_g + Q_max v_g - t) / v),
   the largest such Q <= Q_max over groups (Q_max if none), raised to Q_min. The new group expects
   T = t + Q v and waits until its latest time L = t + lambda Q v.

Aggregation. A group is aggregated once all its members arrived, or at its latest time L with
whatever arrived by then: an arrival at L itself is on time (the deadline first takes the arrivals of
its own instant, so with lambda = 1 and no jitter a group's creator, due exactly at L, makes it). A
group nobody reached by L aggregates nothing, and its members' updates will be late. A late update is
buffered and joins the next group aggregation, and its client is assigned at once; an aggregation uses
only each client's newest update (a client's buffered late update is dropped when its next update is in
the same aggregation), so no client appears twice and the alphas below sum to at most alpha. With
staleness tau_i (aggregations since client i's model) and weights p_i (the client's share of all
training samples, or 1/N as in the reference implementation):

    alpha_i = alpha * s(tau_i) * p_i
    w <- (1 - sum_i alpha_i) w + sum_i alpha_i w_i

With ``normalize`` (FedNova-style, for different step counts) the changes Delta_i = w_i - w_start,i
are divided by Q_i and rescaled by Q_eff = sum_i alpha_i Q_i / sum_i alpha_i:

    w <- w + Q_eff * sum_i alpha_i Delta_i / Q_i

Weights over all N clients make each aggregation a step of about alpha * (group size) / N: right
for the paper's cross-silo federations of a handful of clients, small with a hundred. ``weighting:
group`` (not in the paper) shares alpha among the aggregation's own clients instead,
p_i = n_i / sum_{j in aggregation} n_j, so that a fresh group moves the model as FedAvg with server
step alpha would.

Before a client's first arrival its speed is unknown: the first task of every client runs Q_max
steps, and its update is applied on its own (as FedAsync would) before the client is assigned.

The reference is the authors' scheduler, APPFL's ``CompassScheduler`` (``appfl/scheduler/compass_scheduler.py``);
checked event by event against its rule on clients of fixed speeds, hetfl aggregates the same clients at the
same times (two open groups that give a joining client the same number of steps: the newer one, as the
reference's loop over its groups leaves it), but for one case: virtual time makes "at L" one simulated instant,
so an arrival a rounding error after L is late.

APPFL's older ``SchedulerCompass`` (``appfl/algorithm/legacy/scheduler_compass.py``) counted an arrival at L as
late and let a client join a group with up to 1.2 Q_max steps; hetfl follows the current scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from hetfl.strategies.base import Server, Strategy, Task, Update
from hetfl.strategies.rounds import federation_shares
from hetfl.strategies.staleness import StalenessKind, check_staleness, staleness_weight


@dataclass
class Group:
    """An arrival group: clients expected back together at ``expected``, waited for until ``latest``."""

    group_id: int
    expected: float
    latest: float
    members: set[int] = field(default_factory=set)  # clients still training for this group
    arrived: list[Update] = field(default_factory=list)
    timer: Any = None
    due: bool = False  # its deadline fired: it closes once the arrivals of that same instant are in


def plan_steps(
    now: float, speed: float, groups: list[Group], speeds: dict[int, float], *, q_min: int, q_max: int
) -> tuple[Group | None, int]:
    """Where a client of ``speed`` s/step goes at ``now``: (group to join or None for a new group, its steps).

    ``groups`` are the open groups; ``speeds`` the estimates of their members (arrived or not).
    """
    best: Group | None = None
    best_q = -1
    for g in groups:
        q = math.floor((g.expected - now) / speed)
        if q_min <= q <= q_max and q >= best_q:  # a tie: the newer group, as the reference scheduler
            best, best_q = g, q
    if best is not None:
        return best, best_q
    target_q = -1
    for g in groups:
        if g.latest <= now:
            continue
        fastest = min(speeds[c] for c in [*g.members, *(u.client_id for u in g.arrived)])
        q = math.floor((g.latest + fastest * q_max - now) / speed)
        if q <= q_max:
            target_q = max(target_q, q)
    return None, q_max if target_q < 0 else max(target_q, q_min)


def newest_per_client(arrived: list[Update], buffer: list[Update]) -> list[Update]:
    """What one group aggregation uses: the group's ``arrived`` updates, then the late ``buffer`` (both in the
    order they arrived), keeping only the newest update of each client.

    A client whose update came too late for its group is sent straight back to work, so its next update can
    reach the same aggregation as the late one; only the newer counts (the reference scheduler keys both
    buffers by client, and the group's entry wins). So no client appears twice and the mixing weights
    alpha_i sum to at most alpha.
    """
    newest = {u.client_id: u for u in [*buffer, *arrived]}  # later arrivals overwrite: a group's are the newest
    return [u for u in [*arrived, *buffer] if newest[u.client_id] is u]


class FedCompass(Strategy):
    """Semi-asynchronous FL: computing-power-aware local steps and arrival groups.

    Every online client always has a task (cross-silo: all clients take part).

    Parameters
    ----------
    max_steps : int or None, default None
        Q_max, the most local steps a task runs; None: ``training.local_steps`` (or epochs) of the config.
    q : float, default 0.2
        Q_min = max(1, floor(q * Q_max)), the fewest local steps a task runs.
    lam : float, default 1.5
        Latest-time factor lambda, finite and at least 1: a group waits until lambda times its expected
        duration (below 1 even the client that opened it would be late; at infinity it never closes without
        all its members).
    speed_momentum : float, default 0.9
        Weight m of the newest per-step time in the speed estimate.
    alpha : float, default 0.9
        Mixing rate.
    weighting : {"samples", "uniform", "group"}, default "samples"
        p_i: the client's share of all training samples; 1/N (the reference implementation's); or
        the client's share of the aggregation's samples (not in the paper; see above).
    staleness : {"constant", "polynomial", "hinge"}, default "constant"
        s(tau), see :mod:`hetfl.strategies.staleness`; ``staleness_a``, ``staleness_b`` its parameters.
    normalize : bool, default False
        FedNova-style normalisation of changes from different step counts.
    """

    name = "fedcompass"

    def __init__(
        self,
        *,
        max_steps: int | None = None,
        q: float = 0.2,
        lam: float = 1.5,
        speed_momentum: float = 0.9,
        alpha: float = 0.9,
        weighting: Literal["samples", "uniform", "group"] = "samples",
        staleness: StalenessKind = "constant",
        staleness_a: float = 0.5,
        staleness_b: int = 4,
        normalize: bool = False,
    ) -> None:
        if max_steps is not None and max_steps < 1:
            raise ValueError("max_steps must be at least 1 (or None for the config's local steps)")
        if not 0 < q <= 1:
            raise ValueError("q must lie in (0, 1]: Q_min = q * Q_max")
        if not (math.isfinite(lam) and lam >= 1):  # also refuses nan and inf
            raise ValueError(
                f"lam must be a finite number of at least 1, got {lam} (a group waits until lam times its expected "
                "duration: below 1 its own members arrive after its deadline, at infinity it never closes without them)"
            )
        if not 0 < speed_momentum <= 1:
            raise ValueError("speed_momentum must lie in (0, 1]")
        if not 0 < alpha <= 1:
            raise ValueError("alpha must lie in (0, 1]")
        if weighting not in ("samples", "uniform", "group"):
            raise ValueError("weighting must be 'samples', 'uniform' or 'group'")
        check_staleness(staleness, staleness_a, staleness_b)
        self.max_steps, self.q, self.lam = max_steps, q, lam
        self.speed_momentum, self.alpha, self.weighting = speed_momentum, alpha, weighting
        self.staleness, self.staleness_a, self.staleness_b = staleness, staleness_a, staleness_b
        self.normalize = normalize
        self.speed: dict[int, float] = {}  # seconds per local step, per client
        self.groups: dict[int, Group] = {}  # open groups, by id
        self.group_of: dict[int, int | None] = {}  # task id -> group id (None: the first, ungrouped task)
        self.buffer: list[Update] = []  # arrived after their group was aggregated
        self.waiting: set[int] = set()  # clients to assign once they are online
        self._next_group = 0
        self._retry: Any = None
        self._weights: list[float] = []
        self.stats = {"groups": 0, "group_aggregations": 0, "grouped_updates": 0, "late_updates": 0}

    # -- limits ------------------------------------------------------------------------------
    def q_max(self, server: Server, client: int) -> int:
        return self.max_steps if self.max_steps is not None else server.default_steps(client)

    def q_min(self, q_max: int) -> int:
        return max(1, math.floor(self.q * q_max))

    # -- events ------------------------------------------------------------------------------
    def start(self, server: Server) -> None:
        shares = federation_shares(server)
        self._weights = shares if self.weighting != "uniform" else [1 / server.n_clients] * server.n_clients
        self.waiting = set(range(server.n_clients))
        for client in server.available():  # first tasks: Q_max steps, no group yet
            self.waiting.discard(client)
            self._dispatch(server, client, self.q_max(server, client), None)
        self._retry_later(server)

    def on_update(self, server: Server, update: Update) -> None:
        task = update.task
        self._observe_speed(task.client_id, (server.now - task.dispatched_at) / task.steps)
        group_id = self.group_of.pop(task.task_id)
        group = self.groups.get(group_id) if group_id is not None else None
        if group_id is None:  # first task: applied alone, like FedAsync
            self._aggregate(server, [update])
            self._assign(server, [task.client_id])
        elif group is None or task.client_id not in group.members or server.now > group.latest:
            # late: its group was aggregated without it (or closed with nobody in time); an arrival at the
            # group's latest time itself is on time
            self.buffer.append(update)
            self.stats["late_updates"] += 1
            self._assign(server, [task.client_id])
        else:
            group.members.discard(task.client_id)
            group.arrived.append(update)
            if not group.members:
                self._close(server, group)

    def on_failure(self, server: Server, task: Task) -> None:
        group_id = self.group_of.pop(task.task_id)
        group = self.groups.get(group_id) if group_id is not None else None
        if group is not None and task.client_id in group.members:
            group.members.discard(task.client_id)
            if not group.members:
                self._close(server, group)
        self._assign(server, [task.client_id])

    def on_timer(self, server: Server, tag: str) -> None:
        if tag == "retry":
            self._retry = None
            self._assign(server, sorted(self.waiting))
        elif tag.startswith("group "):
            group = self.groups.get(int(tag.split()[1]))
            if group is None:
                return
            if not group.due:  # at its latest time: first take the arrivals of this same instant, which count
                group.due = True  # as on time (they were scheduled before this new timer, so they come first)
                group.timer = server.set_timer(server.now, tag)
                return
            group.timer = None
            self._close(server, group)

    def held_updates(self) -> int:
        return len(self.buffer) + sum(len(g.arrived) for g in self.groups.values())

    def metrics(self) -> dict[str, float]:
        s = self.stats
        mean = s["grouped_updates"] / s["group_aggregations"] if s["group_aggregations"] else 0.0
        return {
            "compass_groups": float(s["groups"]),
            "compass_group_size_mean": mean,
            "compass_late_updates": float(s["late_updates"]),
        }

    # -- scheduling --------------------------------------------------------------------------
    def _observe_speed(self, client: int, sample: float) -> None:
        old = self.speed.get(client)
        m = self.speed_momentum
        self.speed[client] = sample if old is None else (1 - m) * old + m * sample

    def _close(self, server: Server, group: Group) -> None:
        """Aggregate what the group received (with the late buffer) and send its arrived clients back to work."""
        del self.groups[group.group_id]
        if group.timer is not None:
            server.cancel_timer(group.timer)
        if not group.arrived:
            return  # nobody made it by its latest time: the members still training are late and will be buffered
        updates = newest_per_client(group.arrived, self.buffer)
        self._aggregate(server, updates, dropped=len(group.arrived) + len(self.buffer) - len(updates))
        self.stats["group_aggregations"] += 1
        self.stats["grouped_updates"] += len(group.arrived)
        self.buffer = []
        arrived = sorted((u.client_id for u in group.arrived), key=lambda c: (self.speed[c], c))
        self._assign(server, arrived)  # fastest first, as the reference scheduler does

    def on_proceed(self, server: Server) -> None:
        self._assign(server, sorted(self.waiting))

    def _assign(self, server: Server, clients: list[int]) -> None:
        if server.stopping:  # held back until the run proceeds
            self.waiting.update(clients)
            return
        online = set(server.available())
        for client in clients:
            if client not in online:
                self.waiting.add(client)
                continue
            self.waiting.discard(client)
            q_max = self.q_max(server, client)
            if client not in self.speed:  # never came back yet (its first task was lost): speed unknown
                self._dispatch(server, client, q_max, None)
                continue
            open_groups = [g for g in self.groups.values() if g.latest > server.now]
            group, steps = plan_steps(
                server.now, self.speed[client], open_groups, self.speed,
                q_min=self.q_min(q_max), q_max=q_max,
            )
            if group is None:
                duration = steps * self.speed[client]
                group = Group(self._next_group, server.now + duration, server.now + self.lam * duration)
                group.timer = server.set_timer(group.latest, f"group {group.group_id}")
                self.groups[group.group_id] = group
                self._next_group += 1
                self.stats["groups"] += 1
            group.members.add(client)
            self._dispatch(server, client, steps, group.group_id)
        self._retry_later(server)

    def _dispatch(self, server: Server, client: int, steps: int, group_id: int | None) -> None:
        task = server.dispatch(client, steps=steps)
        self.group_of[task.task_id] = group_id

    def _retry_later(self, server: Server) -> None:
        if self.waiting and self._retry is None and not server.stopping:
            wake = server.next_available_time()
            if math.isfinite(wake) and wake > server.now:
                self._retry = server.set_timer(wake, "retry")

    # -- aggregation -------------------------------------------------------------------------
    def _aggregate(self, server: Server, updates: list[Update], *, dropped: int = 0) -> None:
        p = torch.tensor([self._weights[u.client_id] for u in updates], dtype=torch.float32)
        if self.weighting == "group":
            p = p / p.sum()
        s = torch.tensor([
            staleness_weight(server.version - u.task.version, self.staleness, self.staleness_a, self.staleness_b)
            for u in updates
        ], dtype=torch.float32)
        alphas = self.alpha * s * p
        if self.normalize:
            steps = torch.tensor([float(u.steps) for u in updates])
            q_eff = float((alphas * steps).sum() / alphas.sum())
            deltas = torch.stack([u.delta for u in updates]).T
            params = server.params + q_eff * (deltas @ (alphas / steps))
        else:
            models = torch.stack([u.params for u in updates]).T
            params = (1 - float(alphas.sum())) * server.params + models @ alphas
        server.commit(params, updates, dropped=dropped)
