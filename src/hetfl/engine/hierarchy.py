"""Hierarchical, event-driven aggregation on the simulated clock (``aggregation.hierarchy``).

Qi, Ramakrishnan and Lee, "LIFL: A Lightweight, Event-driven Serverless Platform for Federated Learning",
MLSys 2024 (arXiv:2405.10968).

From the paper: clients send their updates to *leaf* aggregators, which aggregate each update eagerly, as it
arrives (event-driven, not in a batch at the end), and send what they aggregated on to a *top* aggregator that
makes the global model; aggregators are serverless functions started (and reused) as the number of arriving
updates grows, so that the aggregation is as parallel as the load needs and no more, a newly started one paying a
start-up delay; placement puts aggregators next to each other (shared memory) to cut transfers.

Our choices, in hetfl's terms:

- The root (LIFL's top aggregator) is the simulated server, ``server:`` (:class:`~hetfl.engine.server_time.ServerTime`).
  Each leaf is a small server of its own, timed by a ServerTime of ``aggregation.hierarchy``'s ``flops``,
  ``up_mbps``, ``down_mbps`` and ``concurrency``: the same timing model, not a second one.
- Scaling with load: when a task is dispatched it is assigned a leaf (its client uploads there). Leaves are started
  while fewer than ``ceil(tasks in flight / fan_in)`` are open (at most ``max_leaves``); the task goes to the open
  leaf with the fewest tasks in flight (ties: the lowest id). A leaf with nothing in flight and nothing held is
  retired at once (no keep-warm pool). A new leaf can aggregate only ``cold_start_s`` after it starts (its compute is
  busy until then; uploads that reach it earlier wait in its buffer).
- Downloads still come from the root (LIFL aggregates; it does not distribute the model); a client's upload is capped
  by its leaf's share of the leaf's receiving link instead of the root's (:meth:`ServerTime.upload_s`).
- Eager aggregation: at each arrival the engine builds the :class:`~hetfl.strategies.base.Update` as always, and
  the leaf charges a weighted add, 2 FLOPs a parameter, on its ServerTime. When the leaf holds ``fan_in`` updates, or
  has no task of its own still in flight, it forwards its group: an event at (its aggregation done + the transfer of
  one model per model version in the group plus 8 bytes per scalar a member reports: task id, samples, steps, loss
  and its stats) over the slower of the leaf's up link and the root's receiving share.
- What travels is exact only for a strategy whose aggregation uses the updates through their sample-weighted mean
  (``Strategy.linear_aggregation``): the group's mean per model version, as
  :func:`hetfl.strategies.checks.secure_updates` computes it. At the forward event the strategy's ``on_update`` gets,
  for each member in task order, an Update whose params are that mean (one tensor shared by the members of a
  version) and whose samples, steps, loss and stats are the member's own; a weighted mean over them is the flat one.
  The root's commit then counts one merge per group (``Strategy.server_flops`` counts distinct tensors).
- An update reaches the strategy at its group's forward, so a round deadline counts the leaf's aggregation and
  forward; ``strategy.partial_work`` (tasks cut to reach the server by the deadline) is refused with a hierarchy.
- A failed task: its leaf stops waiting for it. A task the strategy cancels (a round deadline) while its update sits
  at a leaf is dropped there; a group already sent carries its members' mean and is not unpicked (the strategy ignores
  the late member's own Update, as it would a late flat one).

The hierarchy's state (leaves, their clocks, the updates they hold) is part of the simulator's state and so of
every checkpoint.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any

from hetfl.engine.clock import EventQueue
from hetfl.engine.server_time import MBPS, ServerTime
from hetfl.errors import ConfigError
from hetfl.strategies.base import Strategy, Task, Update
from hetfl.strategies.checks import shared_mean

SCALAR_BYTES = 8  # a member's task id, sample count, steps, loss and each of its stats travel as 8-byte scalars


@dataclass
class Leaf:
    """One leaf aggregator: its clock and links, the tasks in flight it serves, the updates it holds."""

    id: int
    time: ServerTime
    tasks: set[int] = field(default_factory=set)  # ids of its tasks in flight
    held: list[Update] = field(default_factory=list)  # aggregated, not forwarded yet


@dataclass
class Hierarchy:
    """Leaf aggregators between the clients and the root (checkpointed with the simulator's state).

    Parameters
    ----------
    fan_in : int
        Updates a leaf aggregates before it forwards them; also the tasks in flight per leaf that start a new one.
    max_leaves : int or None
        Leaves open at once; None: as many as the load asks.
    flops, up_Bps, down_Bps, concurrency
        Each leaf's :class:`ServerTime` (None: free / unlimited).
    cold_start_s : float
        Seconds after its start before a leaf can aggregate.
    """

    fan_in: int
    max_leaves: int | None = None
    flops: float | None = None
    up_Bps: float | None = None
    down_Bps: float | None = None
    concurrency: int | None = None
    cold_start_s: float = 0.0
    leaves: dict[int, Leaf] = field(default_factory=dict)  # the open leaves, by id
    of_task: dict[int, int] = field(default_factory=dict)  # task id -> its leaf, until its update is forwarded
    in_flight: int = 0  # tasks in flight, all leaves together
    started: int = 0  # leaves started so far (the next one's id)
    peak: int = 0  # the most leaves open at once
    forwards: int = 0  # groups forwarded to the root
    root_bytes_in: int = 0  # bytes those forwards carried to the root
    busy_s: float = 0.0  # seconds of leaf aggregation, all leaves together
    work_flops: float = 0.0  # FLOPs of that aggregation
    _load: list[tuple[int, int]] = field(default_factory=list)  # (tasks in flight, leaf id); stale entries skipped

    def __post_init__(self) -> None:
        if self.fan_in < 1:
            raise ConfigError(f"aggregation.hierarchy.fan_in: {self.fan_in}; a leaf aggregates at least 1 update")

    @classmethod
    def from_config(cls, cfg: Any) -> "Hierarchy":
        """From an ``aggregation.hierarchy`` section (:class:`hetfl.config.HierarchyConfig`)."""
        mbps = lambda v: None if v is None else v * MBPS  # noqa: E731
        return cls(fan_in=cfg.fan_in, max_leaves=cfg.max_leaves, flops=cfg.flops, up_Bps=mbps(cfg.up_mbps),
                   down_Bps=mbps(cfg.down_mbps), concurrency=cfg.concurrency, cold_start_s=cfg.cold_start_s)

    @staticmethod
    def check_strategy(strategy: Strategy) -> None:
        """Refuse, in one line, a strategy whose aggregation is not the updates' sample-weighted mean."""
        if not strategy.linear_aggregation:
            raise ConfigError(
                f"aggregation.hierarchy: {strategy.name} does not aggregate by the sample-weighted mean of the "
                "updates, which is all a leaf forwards; use fedavg or fedprox (or a strategy with linear_aggregation), "
                "without a robust strategy.aggregator or strategy.privacy, or drop aggregation.hierarchy"
            )
        if getattr(strategy, "partial_work", False):
            raise ConfigError(
                "aggregation.hierarchy: strategy.partial_work cuts each task to reach the server by the deadline, but "
                "with leaves it reaches its leaf then, and the server only at the leaf's forward; use one or the other"
            )

    # ----------------------------------------------------------------- dispatch
    def assign(self, now: float, task: Task) -> Leaf:
        """The leaf that serves ``task``, dispatched at ``now``: leaves started to fit the load, then the open one
        with the fewest tasks in flight (ties: the lowest id)."""
        self.in_flight += 1
        needed = math.ceil(self.in_flight / self.fan_in)
        if self.max_leaves is not None:
            needed = min(needed, self.max_leaves)
        while len(self.leaves) < needed:
            leaf = Leaf(self.started, ServerTime(self.flops, self.up_Bps, self.down_Bps, self.concurrency,
                                                 free_at=now + self.cold_start_s))
            self.leaves[leaf.id] = leaf
            heapq.heappush(self._load, (0, leaf.id))
            self.started += 1
        self.peak = max(self.peak, len(self.leaves))
        if len(self._load) > 4 * len(self.leaves) + 64:  # mostly stale entries (retired leaves, old counts): rebuild
            self._load = [(len(leaf.tasks), leaf.id) for leaf in self.leaves.values()]
            heapq.heapify(self._load)
        while True:
            count, leaf_id = heapq.heappop(self._load)
            leaf = self.leaves.get(leaf_id)
            if leaf is not None and len(leaf.tasks) == count:
                break
        leaf.tasks.add(task.task_id)
        heapq.heappush(self._load, (count + 1, leaf_id))
        self.of_task[task.task_id] = leaf_id
        return leaf

    def _out(self, leaf: Leaf, task_id: int) -> None:
        """``task_id`` is no longer in flight at ``leaf``."""
        leaf.tasks.discard(task_id)
        self.in_flight -= 1
        heapq.heappush(self._load, (len(leaf.tasks), leaf.id))

    # ----------------------------------------------------------------- arrivals, losses, forwards
    def arrive(self, queue: EventQueue, root: ServerTime, update: Update) -> None:
        """``update`` reached its leaf now: aggregated eagerly; the group forwarded if it is complete."""
        leaf = self.leaves[self.of_task[update.task.task_id]]
        self._out(leaf, update.task.task_id)
        before = leaf.time.busy_s
        leaf.time.work(queue.now, 2.0 * update.params.numel())
        self.busy_s += leaf.time.busy_s - before
        self.work_flops += 2.0 * update.params.numel()
        leaf.held.append(update)
        if len(leaf.held) >= self.fan_in or not leaf.tasks:
            self._forward(queue, root, leaf)

    def forget(self, queue: EventQueue, root: ServerTime, task: Task) -> None:
        """``task`` is lost (failed) or cancelled: its leaf stops waiting for it, or drops its held update."""
        leaf_id = self.of_task.pop(task.task_id, None)
        leaf = None if leaf_id is None else self.leaves.get(leaf_id)
        if leaf is None:
            return  # not the hierarchy's, or already forwarded
        if task.task_id in leaf.tasks:
            self._out(leaf, task.task_id)
        else:
            leaf.held = [u for u in leaf.held if u.task.task_id != task.task_id]
        if not leaf.tasks:
            self._forward(queue, root, leaf)

    def _forward(self, queue: EventQueue, root: ServerTime, leaf: Leaf) -> None:
        """Send ``leaf``'s held group to the root (a ``forward`` event carrying the strategy's Updates); retire the
        leaf when nothing is left in flight there."""
        if leaf.held:
            group = shared_mean(leaf.held)
            for update in group:
                del self.of_task[update.task.task_id]
            model = group[0].params
            versions = len({u.task.version for u in group})
            scalars = sum(4 + len(u.stats) for u in group)
            size = versions * model.numel() * model.element_size() + SCALAR_BYTES * scalars
            leaf_s = 0.0 if self.up_Bps is None else size / self.up_Bps
            done = leaf.time.work(queue.now, 0.0)  # when its last aggregation is done
            queue.push(done + root.upload_s(leaf_s, size), "forward", group)
            self.forwards += 1
            self.root_bytes_in += size
            leaf.held = []
        if not leaf.tasks:
            del self.leaves[leaf.id]

    def metrics(self) -> dict[str, Any]:
        """What the hierarchy adds to an evaluation record (``docs/metrics.md``)."""
        return {
            "leaves": len(self.leaves), "leaves_started": self.started, "leaves_peak": self.peak,
            "forwards": self.forwards, "root_bytes_in": self.root_bytes_in, "leaf_busy_s": self.busy_s,
            "leaf_flops": self.work_flops,
        }

