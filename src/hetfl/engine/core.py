"""What both engines share: the virtual-clock :class:`~hetfl.engine.simulator.Simulator` and the wall-clock
:class:`~hetfl.deploy.engine.DeployServer` each hold an :class:`EngineCore` and delegate to it.

- :class:`Counters`: what the run has done so far (bytes, updates, tasks, staleness, participation, busy time,
  and where the arrived tasks' time went: waiting for the server, download, compute, upload);
- :class:`EngineState`: what every checkpoint holds (global model, strategy, counters, version); each engine's
  state (``SimState``, ``DeployState``) adds its own;
- :class:`EngineCore`: the bookkeeping on it: a new task counted and priced (:meth:`EngineCore.new_task`), an
  :class:`~hetfl.strategies.base.Update` built from an arrival (:meth:`EngineCore.make_update`), an aggregation
  committed (:meth:`EngineCore.commit`: the finite check, the counters, the new version, the run's callback),
  busy time and the staleness and fairness numbers of an evaluation record;
- :class:`Engine`: what a run (:class:`hetfl.engine.run.Run`) asks of the engine it evaluates, logs and
  checkpoints.

Where and when things happen (events on a virtual clock, or gRPC and wall time) stays each engine's own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch

from hetfl.errors import DivergedError
from hetfl.devices.profiles import TaskTiming
from hetfl.results.fairness import jain_index, mean_or_none, staleness_stats
from hetfl.strategies.base import Server, Strategy, Task, Update


def _zeros(dtype: type = np.int64) -> np.ndarray:
    return np.zeros(0, dtype=dtype)


@dataclass
class Counters:
    """What the run has done so far; the per-client arrays are sized by :meth:`for_clients`."""

    bytes_up: int = 0
    bytes_down: int = 0
    updates: int = 0  # client updates aggregated
    dropped: int = 0  # updates a strategy gave up on (late, lost)
    failed: int = 0  # tasks lost by clients (dropout, offline)
    cancelled: int = 0  # tasks the strategy gave up on before they arrived (never trained)
    arrived: int = 0  # tasks whose update reached the server (trained)
    tasks: int = 0  # tasks dispatched
    trained_steps: int = 0  # local steps actually computed
    trained_flops: float = 0.0  # FLOPs of those steps, each at its client's architecture
    wasted_steps: int = 0  # steps trained ahead in a batch for tasks then cancelled (not in trained_steps)
    partial: int = 0  # arrived tasks cut to their deadline (partial work, Task.steps_asked)
    partial_work: float = 0.0  # the sum, over those, of steps trained / steps asked
    staleness: dict[int, int] = field(default_factory=dict)  # staleness at commit -> aggregated updates
    staleness_window: dict[int, int] = field(default_factory=dict)  # the same, since the last evaluation
    participation: np.ndarray = field(default_factory=_zeros)  # aggregated updates per client
    dispatched: np.ndarray = field(default_factory=_zeros)  # tasks dispatched per client
    busy_s: np.ndarray = field(default_factory=lambda: _zeros(np.float64))  # seconds of finished tasks per client
    # seconds of the arrived tasks per client and phase (PHASES: wait for the server, download, compute, upload)
    phase_s: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))

    PHASES = ("wait", "download", "compute", "upload")

    @classmethod
    def for_clients(cls, n_clients: int) -> "Counters":
        return cls(
            participation=np.zeros(n_clients, dtype=np.int64),
            dispatched=np.zeros(n_clients, dtype=np.int64),
            busy_s=np.zeros(n_clients, dtype=np.float64),
            phase_s=np.zeros((n_clients, len(cls.PHASES)), dtype=np.float64),
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A checkpoint of an older hetfl has no ``phase_s``: the breakdown starts from zero at the resume."""
        state.setdefault("phase_s", np.zeros((len(state["busy_s"]), len(self.PHASES))))
        self.__dict__.update(state)

    def count_timing(self, client_id: int, timing: TaskTiming) -> None:
        """An arrived task of ``client_id`` took ``timing``: its seconds go to the client's phases."""
        self.phase_s[client_id] += (timing.wait_s, timing.download_s, timing.compute_s, timing.upload_s)

    def time_breakdown(self, idle_s: np.ndarray) -> dict[str, float]:
        """Where the time went so far (``docs/metrics.md``): the arrived tasks' seconds of each phase summed over the
        clients (``time_wait_s``, ``time_download_s``, ``time_compute_s``, ``time_upload_s``), and ``time_idle_s``,
        the clients' seconds without a task (``idle_s``, one per client, from the engine)."""
        sums = self.phase_s.sum(axis=0)
        out = {f"time_{phase}_s": float(sums[i]) for i, phase in enumerate(self.PHASES)}
        out["time_idle_s"] = float(np.clip(idle_s, 0.0, None).sum())
        return out

    def client_time(self, idle_s: np.ndarray) -> dict[str, list[float]]:
        """The same per client (``summary.json``'s ``client_time_s``): each phase's seconds, then ``idle``."""
        out = {phase: self.phase_s[:, i].tolist() for i, phase in enumerate(self.PHASES)}
        out["idle"] = np.clip(idle_s, 0.0, None).tolist()
        return out

    def new_task(
        self, client_id: int, version: int, params: torch.Tensor, steps: int, now: float,
        payload: dict[str, torch.Tensor] | None, options: dict[str, Any] | None,
    ) -> Task:
        """A task for ``client_id`` from the server's model ``params`` (version ``version``), counted as
        dispatched; tasks are numbered in dispatch order (the number seeds the client's training)."""
        task = Task(
            task_id=self.tasks, client_id=client_id, version=version, params=params, steps=steps,
            dispatched_at=now, payload=payload or {}, options=options or {},
        )
        self.tasks += 1
        self.dispatched[client_id] += 1
        return task

    def count_commit(self, version: int, updates: list[Update], dropped: int) -> None:
        """An aggregation of ``updates`` into the model after ``version`` (their staleness is counted
        against it), giving up on ``dropped``."""
        for update in updates:
            staleness = version - update.task.version
            self.staleness[staleness] = self.staleness.get(staleness, 0) + 1
            self.staleness_window[staleness] = self.staleness_window.get(staleness, 0) + 1
            self.participation[update.task.client_id] += 1
        self.updates += len(updates)
        self.dropped += dropped

    def fairness(self, idle: np.ndarray, fast: np.ndarray, *, window: bool = True) -> dict[str, Any]:
        """The staleness and fairness numbers of an evaluation record (``docs/metrics.md``), given each client's
        ``idle`` fraction of its online time and the ``fast`` clients' ids.

        Staleness is over the updates aggregated since the previous call with ``window=True`` (which
        starts a new window); with ``window=False`` over the whole run, and the window is untouched.
        """
        stale = staleness_stats(self.take_staleness_window() if window else self.staleness)
        return {
            "staleness_mean": stale["mean"],
            "staleness_p90": stale["p90"],
            "staleness_max": stale["max"],
            "participation_jain": jain_index(self.participation),
            "participated_frac": float(np.count_nonzero(self.participation)) / len(self.participation),
            "idle_fast_frac": mean_or_none(idle[fast]),
            "idle_frac": mean_or_none(idle),
        }

    def take_staleness_window(self) -> dict[int, int]:
        """The staleness histogram since the last call (or the start), and a fresh window."""
        window, self.staleness_window = self.staleness_window, {}
        return window


@dataclass
class EngineState:
    """What every engine's checkpoint holds: the global model, the strategy (with everything it keeps), what the
    run has done so far and the number of aggregations. ``SimState`` and ``DeployState`` add their own fields."""

    params: torch.Tensor
    strategy: Strategy
    counters: Counters = field(default_factory=Counters)  # the engine sizes it for its clients
    version: int = 0


class EngineCore:
    """The bookkeeping both engines share, on their state (an :class:`EngineState`).

    Parameters
    ----------
    server : Server
        The engine that holds this core: what the strategy is handed (its ``transfer_bytes`` and ``task_flops``
        are asked about the engine's tasks) and what ``on_commit`` is called with.
    state : EngineState
        The engine's state; a resumed run replaces it with its checkpoint's (assign :attr:`state`).
    diverged_advice : str
        What the :class:`~hetfl.errors.DivergedError` of a non-finite global model suggests changing.
    commit_log : logging.Logger, optional
        Where each aggregation is logged (``aggregation N: K update(s)``, before ``on_commit``); None: nowhere.
    """

    def __init__(
        self, server: Server, state: EngineState, *, diverged_advice: str, commit_log: logging.Logger | None = None
    ) -> None:
        self.server, self.state = server, state
        self.diverged_advice, self.commit_log = diverged_advice, commit_log
        self.on_commit: Callable[[Any], None] | None = None  # the run's: evaluates, logs, decides whether to stop
        self.checkpoint_due = False  # an aggregation was committed since the last checkpoint

    @property
    def params(self) -> torch.Tensor:
        return self.state.params

    @property
    def version(self) -> int:
        return self.state.version

    @property
    def strategy(self) -> Strategy:
        return self.state.strategy

    @property
    def counters(self) -> Counters:
        return self.state.counters

    def new_task(
        self, client_id: int, steps: int | None, payload: dict[str, torch.Tensor] | None,
        options: dict[str, Any] | None,
    ) -> tuple[Task, int]:
        """A task for ``client_id`` from the current model, dispatched now: counted (:meth:`Counters.new_task`),
        with what its upload carries and what it computes (the strategy's ``transfer_bytes`` and ``task_flops``);
        ``steps`` None: the engine's ``default_steps`` for the client. Returns it and the bytes its download carries
        as the strategy counts them."""
        st = self.state
        steps = self.server.default_steps(client_id) if steps is None else steps
        task = st.counters.new_task(client_id, st.version, st.params, steps, self.server.now, payload, options)
        bytes_down, bytes_up = st.strategy.transfer_bytes(self.server, task)
        task.bytes_up = bytes_up
        task.flops = st.strategy.task_flops(self.server, task)
        return task, bytes_down

    def cut(self, task: Task, steps: int) -> None:
        """Partial work: ``task`` trains only ``steps`` of its steps, the most that arrive before its deadline;
        ``task.steps_asked`` keeps what it was asked, and its FLOPs are the strategy's ``task_flops`` of ``steps``."""
        task.steps_asked, task.steps = task.steps, steps
        task.flops = self.state.strategy.task_flops(self.server, task)

    def task_over(self, task: Task) -> None:
        """``task`` is over now (arrived, failed or cancelled): its seconds count in its client's busy time."""
        self.state.counters.busy_s[task.client_id] += self.server.now - task.dispatched_at

    def make_update(
        self, task: Task, params: torch.Tensor, *, n_samples: int, steps: int, loss: float,
        payload: dict[str, torch.Tensor] | None = None, stats: dict[str, float] | None = None,
    ) -> Update:
        """What ``task``'s client returned, arriving now, at the current version."""
        return Update(
            task=task, params=params, n_samples=n_samples, steps=steps, loss=loss, arrived_at=self.server.now,
            payload=payload if payload is not None else {}, stats=stats if stats is not None else {},
            arrived_version=self.state.version,
        )

    def commit(self, params: torch.Tensor, updates: list[Update], dropped: int = 0) -> None:
        """Aggregate ``updates`` into ``params``, the new global model (one more version), giving up on ``dropped``;
        then the run's ``on_commit``. A non-finite model raises :class:`~hetfl.errors.DivergedError` and changes
        nothing."""
        if not torch.isfinite(params).all():
            raise DivergedError(
                f"the global model became non-finite at aggregation {self.version + 1}; {self.diverged_advice}"
            )
        st = self.state
        st.counters.count_commit(st.version, updates, dropped)
        self.server.server_work(st.strategy.server_flops(self.server, updates))  # the aggregation's own cost
        st.params = params
        st.version += 1
        self.checkpoint_due = True
        if self.commit_log is not None:
            self.commit_log.info("aggregation %d: %d update(s)%s", st.version, len(updates),
                                 f", {dropped} dropped" if dropped else "")
        if self.on_commit is not None:
            self.on_commit(self.server)

    def busy_time(self, in_flight: Iterable[Task]) -> np.ndarray:
        """Seconds each client has spent with a task until now: its finished tasks', and those ``in_flight``."""
        busy = self.state.counters.busy_s.copy()
        now = self.server.now
        for task in in_flight:
            busy[task.client_id] += now - task.dispatched_at
        return busy

    def idle_time(self, in_flight: Iterable[Task], online_s: np.ndarray) -> np.ndarray:
        """Seconds each client has been without a task: of its ``online_s`` seconds, those not busy."""
        return np.clip(online_s - self.busy_time(in_flight), 0.0, None)

    def fairness(self, idle: np.ndarray, fast: np.ndarray, *, window: bool = True) -> dict[str, Any]:
        """The staleness and fairness numbers of an evaluation record (:meth:`Counters.fairness`)."""
        return self.state.counters.fairness(idle, fast, window=window)



class HoldsEngineCore:
    """What an engine answers from the :class:`EngineCore` it holds (``self.core``): its state (assigning it, as a
    resumed run does, replaces it whole), the run's ``on_commit`` callback, whether a checkpoint is due, and the
    :class:`~hetfl.strategies.base.Server` members that are the core's (version, params, strategy, counters).
    The :class:`~hetfl.engine.simulator.Simulator` and the :class:`~hetfl.deploy.engine.DeployServer` derive from
    it; everything about when and where things happen stays theirs."""

    core: EngineCore

    @property
    def state(self) -> Any:
        """Everything that changes during the run (a checkpoint's): the engine's ``SimState`` or ``DeployState``."""
        return self.core.state

    @state.setter
    def state(self, state: EngineState) -> None:
        self.core.state = state

    @property
    def on_commit(self) -> Callable[[Any], None] | None:
        """Called with the engine after each aggregation (the run's: evaluates, logs, decides whether to stop)."""
        return self.core.on_commit

    @on_commit.setter
    def on_commit(self, callback: Callable[[Any], None] | None) -> None:
        self.core.on_commit = callback

    @property
    def checkpoint_due(self) -> bool:
        """An aggregation was committed since the last checkpoint (cleared when one is saved)."""
        return self.core.checkpoint_due

    @checkpoint_due.setter
    def checkpoint_due(self, due: bool) -> None:
        self.core.checkpoint_due = due

    @property
    def version(self) -> int:
        return self.core.version

    @property
    def params(self) -> torch.Tensor:
        return self.core.params

    @property
    def strategy(self) -> Strategy:
        return self.core.strategy

    @property
    def counters(self) -> Counters:
        return self.core.counters


class Engine(Protocol):
    """What a run (:class:`hetfl.engine.run.Run`) asks of its engine, the simulator or the deployment server: the
    numbers it evaluates and logs, the callback at each aggregation, a stop, and the state its checkpoints hold.

    Optionally, ``client_store`` (a :class:`~hetfl.engine.store.ParamStore`), whose memory budget a resumed run sets.
    """

    state: Any  # an EngineState: what a checkpoint holds; a resumed run assigns its checkpoint's
    on_commit: Callable[[Any], None] | None  # called with the engine after each aggregation
    checkpoint_due: bool  # an aggregation was committed since the last checkpoint

    @property
    def now(self) -> float: ...

    @property
    def version(self) -> int: ...

    @property
    def params(self) -> torch.Tensor: ...

    @property
    def strategy(self) -> Strategy: ...

    @property
    def counters(self) -> Counters: ...

    @property
    def stop_reason(self) -> str | None: ...

    def stop(self, reason: str) -> None: ...

    def server_work(self, flops: float) -> None: ...  # the server's own work (an evaluation's): timed in the simulator

    def fairness(self, *, window: bool = True) -> dict[str, Any]: ...

    def time_breakdown(self) -> dict[str, float]: ...  # where the time went (Counters.time_breakdown)

    def client_time(self) -> dict[str, list[float]]: ...  # the same per client (Counters.client_time)

    def engine_metrics(self) -> dict[str, Any]: ...

    def personal_model(self, client_id: int) -> Any: ...
