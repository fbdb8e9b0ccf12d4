"""The virtual-clock simulator: runs a strategy against simulated heterogeneous devices.

How a task flows:

1. The strategy calls :meth:`Simulator.dispatch`. The simulator prices the task with the client's
   device profile (download + compute + upload seconds, with jitter), cuts it, with partial work
   (``finish_by``, ``strategy.partial_work``), to the local steps that arrive by then at those very
   speeds, decides whether the client
   will lose it (dropout, or going offline before the end), and schedules one event: ``arrival``
   at the end, or ``failure`` at the moment it is lost. Nothing is trained yet.
2. The main loop pops events in simulated-time order (ties: first scheduled, first delivered).
3. An ``arrival`` runs the real local training, lazily, only now, and hands the update to the
   strategy. A task the strategy cancelled (say, after a round deadline) is never trained.
   With ``training.vectorize`` the first arrival that needs training also trains, in one batched
   :func:`~hetfl.training.vectorized.train_many` call, every other in-flight task that will arrive, is
   plain local training (:meth:`Strategy.local_training`) and has the same architecture and options;
   their results wait in a cache until their own arrival (see :class:`~hetfl.engine.backends.InProcess`).
   Where the client halves run is the simulator's ``backend`` (:mod:`hetfl.engine.backends`): in this
   process at the arrival, or on Ray workers from the dispatch on; the run is the same.
4. The strategy aggregates and calls :meth:`Simulator.commit`; the simulator's observer evaluates,
   logs and decides whether to stop. Checkpoints are taken between events, when state is whole.

Along the way the simulator counts, in O(1) per event, what the staleness and fairness metrics
need (:class:`~hetfl.engine.core.Counters`): the staleness of every aggregated update at its commit,
aggregated updates and dispatched tasks per client, and the simulated seconds each client spent with a task.
:meth:`Simulator.fairness` turns them into the numbers of an evaluation record (``docs/metrics.md``).
That bookkeeping (tasks counted and priced, updates built, aggregations committed, busy time) is the
:class:`~hetfl.engine.core.EngineCore` the simulator holds, as the deployment server holds one.

Simulated time (what a deployment would take) is ``now``; wall time is measured by the caller.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from hetfl.compression import compress_upload
from hetfl.data.skew import LabelDrift
from hetfl.devices import DeviceProfile, DeviceTable, TaskTiming, steps_in_time, task_timing
from hetfl.devices.byzantine import Byzantine
from hetfl.engine.backends import Backend, InProcess
from hetfl.engine.clock import Event, EventQueue
from hetfl.engine.core import Counters, EngineCore, EngineState, HoldsEngineCore
from hetfl.engine.hierarchy import Hierarchy
from hetfl.engine.server_time import ServerTime
from hetfl.engine.store import ClientStates, ParamStore, memory_budget
from hetfl.models.cost import batch_share
from hetfl.results.fairness import fastest, idle_fractions
from hetfl.strategies.base import ClientData, Strategy, Task, Update, client_report
from hetfl.training import LocalTrainer
from hetfl.training.device import personal_half


class ClientPool:
    """The clients' local training data: one tensor pair, and every client's sample indices into it.

    The indices of all clients are one concatenated int64 tensor, client ``c``'s being
    ``index[offsets[c]:offsets[c + 1]]`` (sorted, as the partitioner made them): two arrays, however
    many clients, instead of a tensor object per client. ``train_indices`` (client ``c``'s index
    tensor, as a read-only sequence) is kept for code that reads it.

    Parameters
    ----------
    x, y : torch.Tensor
        Every sample's features and label.
    train_indices : sequence of array-like
        Client ``c``'s sample indices into ``x`` and ``y``.
    n_classes : int, default 0
        Number of classes; 0: the largest label + 1.
    drift : LabelDrift, optional
        Concept drift: some clients' labels change at a simulated time.
    unlabelled_indices : sequence of array-like, optional
        Client ``c``'s unlabelled samples (``data.labelled_fraction``): ``data`` gives their features as
        ``ClientData.x_unlabelled`` and never indexes ``y`` with them.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        train_indices: Sequence[Any],
        n_classes: int = 0,
        drift: LabelDrift | None = None,
        unlabelled_indices: Sequence[Any] = (),
    ) -> None:
        self.x, self.y = x, y
        self.index, self.offsets = _concatenated(train_indices)
        self.unlabelled = _concatenated(unlabelled_indices) if len(unlabelled_indices) else None
        self.n_classes = n_classes or (int(y.max()) + 1 if y.numel() else 1)
        self.drift = drift

    @property
    def n_clients(self) -> int:
        return len(self.offsets) - 1

    def indices(self, client_id: int) -> torch.Tensor:
        """Client ``client_id``'s sample indices (a view into the concatenated index)."""
        return self.index[self.offsets[client_id] : self.offsets[client_id + 1]]

    @property
    def train_indices(self) -> Sequence[torch.Tensor]:
        """Every client's index tensor, as a read-only sequence (views; nothing is copied)."""
        return _IndexView(self)

    def data(self, client_id: int, t: float = 0.0) -> ClientData:
        """Client ``client_id``'s training data at simulated time ``t`` (its labels after a drift, once drifted)."""
        idx = self.indices(client_id)
        y = self.y[idx]
        if self.drift is not None:
            y = self.drift.labels(client_id, y, t)
        if self.unlabelled is None:
            return ClientData(client_id, self.x[idx], y)
        index, offsets = self.unlabelled
        return ClientData(client_id, self.x[idx], y, self.x[index[offsets[client_id] : offsets[client_id + 1]]])

    def to(self, device: torch.device) -> "ClientPool":
        """This pool with every sample on ``device`` (``training.device``), moved once for all clients: each task then
        indexes its client's rows there. Itself if they are there already; the indices stay on the CPU."""
        if self.x.device == device and self.y.device == device:
            return self
        pool = copy.copy(self)
        pool.x, pool.y = self.x.to(device), self.y.to(device)
        return pool

    def n_samples(self, client_id: int) -> int:
        return int(self.offsets[client_id + 1] - self.offsets[client_id])

    def sample_counts(self) -> np.ndarray:
        """Every client's number of training samples."""
        return np.diff(self.offsets)


def _concatenated(parts: Sequence[Any]) -> tuple[torch.Tensor, np.ndarray]:
    """Every client's index array as one int64 tensor, and the offsets of client ``c``'s: ``[offsets[c], offsets[c+1])``."""
    arrays = [np.asarray(t, dtype=np.int64).reshape(-1) for t in parts]
    sizes = np.array([len(p) for p in arrays], dtype=np.int64)
    index = torch.from_numpy(np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64))
    return index, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


class _IndexView(Sequence):
    """``pool.train_indices``: client ``c``'s index tensor at ``[c]``."""

    def __init__(self, pool: ClientPool) -> None:
        self.pool = pool

    def __len__(self) -> int:
        return self.pool.n_clients

    def __getitem__(self, c: Any) -> Any:
        if isinstance(c, slice):
            return [self.pool.indices(i) for i in range(*c.indices(len(self)))]
        if not -len(self) <= c < len(self):
            raise IndexError(f"client {c} out of range for {len(self)} clients")
        return self.pool.indices(c % len(self))


@dataclass
class ClientModels:
    """Which architecture each client trains: one trainer per architecture, and what a step of it costs.

    ``of_client[c]`` indexes ``trainers`` and ``flops_per_step``. With one architecture every client
    shares the one trainer (the usual case); a model zoo (``model.zoo``) gives several.
    """

    trainers: list[LocalTrainer]
    flops_per_step: list[float]
    of_client: np.ndarray

    @classmethod
    def single(cls, trainer: LocalTrainer, flops_per_step: float, n_clients: int) -> "ClientModels":
        return cls([trainer], [flops_per_step], np.zeros(n_clients, dtype=np.int64))

    @property
    def heterogeneous(self) -> bool:
        """True when clients train more than one architecture."""
        return len(np.unique(self.of_client)) > 1

    def trainer(self, client_id: int) -> LocalTrainer:
        return self.trainers[self.of_client[client_id]]

    def flops(self, client_id: int, n_samples: int | None = None) -> float:
        """FLOPs of one local step of ``client_id``'s architecture: ``flops_per_step`` is priced for a full batch of
        ``training.batch_size``; a client with fewer samples trains on batches of all it has (``LocalTrainer.batches``)
        and is charged for those."""
        return self.flops_per_step[self.of_client[client_id]] * batch_share(self.trainer(client_id).cfg.batch_size,
                                                                            n_samples)


@dataclass
class SimState(EngineState):
    """Everything that changes during a run: what a checkpoint holds (the global model, strategy, counters and
    version of every engine's state, and the simulator's own)."""

    queue: EventQueue = field(default_factory=EventQueue)
    busy: dict[int, Event] = field(default_factory=dict)  # client -> the event that ends its task
    client_state: ClientStates = field(default_factory=ClientStates)  # tensors in a ParamStore under a memory budget
    server_rng: np.random.Generator | None = None
    device_rng: np.random.Generator | None = None
    started: bool = False
    server_time: ServerTime | None = None  # the server's compute and download slots (None in older checkpoints)
    hierarchy: Hierarchy | None = None  # leaf aggregators (aggregation.hierarchy); None: clients upload to the server


class Simulator(HoldsEngineCore):
    """Drives ``strategy`` on a virtual clock; implements :class:`hetfl.strategies.base.Server`.

    Parameters
    ----------
    strategy : Strategy
        The algorithm.
    trainer : LocalTrainer
        The reference architecture: the server's model (``server.trainer``), and every client's
        unless ``models`` says otherwise.
    pool : ClientPool or SyntheticPool
        Clients' training data (``n_clients``, ``data(c, t)``, ``n_samples(c)``, ``sample_counts()``).
    profiles : sequence of DeviceProfile
        One per client; kept as a :class:`~hetfl.devices.DeviceTable` (``server.profiles[c]`` builds a profile).
    flops_per_step : float
        FLOPs of one local optimiser step of ``trainer``.
    models : ClientModels, optional
        Each client's architecture (a model zoo); only strategies with ``model_heterogeneous`` accept
        more than one. Default: every client trains ``trainer``.
    seed : int
        Seeds the server's sampling stream, the device stream and every task's batch order.
    jitter : float
        Per-task log-normal noise on compute and network time.
    on_commit : callable, optional
        Called as ``on_commit(sim)`` after each aggregation; evaluation and logging live there.
    max_sim_time_s : float, optional
        Events after this simulated time are not processed.
    vectorize : {"auto", "on", "off"}, optional
        Batch the local training of in-flight tasks (``training.vectorize``); default: ``trainer.cfg``'s,
        whose ``vectorize_min_tasks`` and ``vectorize_max_params`` also bound ``auto``. Only for the
        default backend.
    backend : Backend, optional
        Where client halves run (:mod:`hetfl.engine.backends`); default: :class:`~hetfl.engine.backends.InProcess`
        with ``vectorize``. Call :meth:`close` when done with a :class:`~hetfl.engine.backends.RayBackend`.
    byzantine : Byzantine, optional
        Simulated attackers (``devices.byzantine``, :mod:`hetfl.devices.byzantine`): their uploads are corrupted
        before the strategy sees them. Default: none.
    server_time : ServerTime, optional
        The server's own cost (``server:``, :mod:`hetfl.engine.server_time`). Default: a free server.
    hierarchy : Hierarchy, optional
        Leaf aggregators between the clients and the server (``aggregation.hierarchy``,
        :mod:`hetfl.engine.hierarchy`); the strategy must aggregate by a weighted mean. Default: none.

    Per-client tensors (client states, and what strategies keep per client through ``client_store``)
    live in a :class:`~hetfl.engine.store.ParamStore` whose memory budget is ``trainer.cfg``'s
    ``state_memory_mb`` (``training.state_memory_mb``; None: unlimited); beyond it they spill to disk.
    """

    def __init__(
        self,
        *,
        strategy: Strategy,
        trainer: LocalTrainer,
        pool: Any,
        profiles: Sequence[DeviceProfile],
        flops_per_step: float,
        seed: int,
        jitter: float = 0.0,
        initial_params: torch.Tensor | None = None,
        on_commit: Callable[["Simulator"], None] | None = None,
        max_sim_time_s: float | None = None,
        models: ClientModels | None = None,
        vectorize: str | None = None,
        backend: Backend | None = None,
        byzantine: Byzantine | None = None,
        server_time: ServerTime | None = None,
        hierarchy: Hierarchy | None = None,
    ) -> None:
        if len(profiles) != pool.n_clients:
            raise ValueError(f"{len(profiles)} device profiles for {pool.n_clients} clients")
        self.trainer, self.pool, self.profiles = trainer, pool, DeviceTable.from_profiles(profiles)
        self.models = models or ClientModels.single(trainer, flops_per_step, len(profiles))
        if self.models.heterogeneous and not strategy.model_heterogeneous:
            raise ValueError(f"{strategy.name} needs one architecture for every client; the clients have several")
        self.flops_per_step, self.seed, self.jitter = flops_per_step, seed, jitter
        self.max_sim_time_s = max_sim_time_s
        params = strategy.initial_params(trainer) if initial_params is None else initial_params.clone()
        memory_mb = getattr(trainer.cfg, "state_memory_mb", None)
        state = SimState(
            params=params,
            strategy=strategy,
            counters=Counters.for_clients(len(profiles)),
            server_rng=np.random.default_rng([seed, 1]),
            device_rng=np.random.default_rng([seed, 2]),
            client_state=ClientStates(ParamStore(memory_budget(memory_mb))),
            server_time=server_time or ServerTime(),
            hierarchy=hierarchy,
        )
        if hierarchy is not None:
            Hierarchy.check_strategy(strategy)
        # the global model, strategy, counters and version, and the bookkeeping on them the deployment server shares
        self.core = EngineCore(self, state, diverged_advice="lower training.lr or the strategy's server_lr")
        self.core.on_commit = on_commit
        self._stop_reason: str | None = None
        self.online_time = self.profiles.online_seconds  # derived from the profiles: not state
        cfg = trainer.cfg
        # where client halves run; not state (work started ahead is redone by a resumed run)
        self.backend = backend or InProcess(
            vectorize or getattr(cfg, "vectorize", "off"),
            min_tasks=getattr(cfg, "vectorize_min_tasks", 1), max_params=getattr(cfg, "vectorize_max_params", 0),
        )
        self.backend.bind(self)
        self.fast_clients = fastest(self.profiles.flops)
        self.byzantine = byzantine

    # ----------------------------------------------------------------- Server protocol
    @property
    def now(self) -> float:
        return self.state.queue.now

    @property
    def rng(self) -> np.random.Generator:
        return self.state.server_rng  # type: ignore[return-value]

    @property
    def n_clients(self) -> int:
        return len(self.profiles)

    @property
    def client_store(self) -> ParamStore:
        """Where per-client tensors live under the memory budget (client states; FedStale's memory)."""
        return self.state.client_state.store

    @property
    def client_states(self) -> ClientStates:
        """Each client's state between its tasks (SCAFFOLD's ``c_i``, Ditto's ``v``...), in :attr:`client_store`."""
        return self.state.client_state

    def in_flight(self) -> list[Event]:
        """The events that end the tasks in flight, one per busy client: its task's ``arrival``, or the ``failure``
        that loses it (the task is ``event.data``)."""
        return list(self.state.busy.values())

    def step_flops(self, client_id: int) -> float:
        """FLOPs of one local step of ``client_id``'s architecture on its batches."""
        return self.models.flops(client_id, self.num_samples(client_id))

    @property
    def shared_bytes(self) -> int:
        """Bytes of the server's parameters: what a download carries (besides a task's payload)."""
        params = self.state.params
        return params.numel() * params.element_size()

    @property
    def stopping(self) -> bool:
        return self._stop_reason is not None

    def stop(self, reason: str) -> None:
        """Ask the run to end after the current event (first reason wins)."""
        self._stop_reason = self._stop_reason or reason

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    def proceed(self) -> None:
        """Go on after a stop (say, with more rounds): clear it, and restart the strategy if nothing is in flight.

        Otherwise the strategy's ``on_proceed`` dispatches the work the stop held back.
        """
        self._stop_reason = None
        if self.state.started and not len(self.state.queue):
            self.state.strategy.start(self)
        elif self.state.started:
            self.state.strategy.on_proceed(self)

    def _idle(self) -> np.ndarray:
        """Whether each client is without a task."""
        idle = np.ones(self.n_clients, dtype=bool)
        busy = self.state.busy
        idle[np.fromiter(busy, dtype=np.int64, count=len(busy))] = False
        return idle

    def available(self) -> list[int]:
        """Clients online now and without a task, ascending (numpy masks over the device table)."""
        idle = self._idle()
        if not self.profiles.all_always:
            idle &= self.profiles.online_mask(self.now)
        return np.flatnonzero(idle).tolist()

    def next_available_time(self) -> float:
        """When the next client without a task is online: ``now`` if one is, inf if none ever will be."""
        if self.profiles.all_always:
            return self.now if len(self.state.busy) < self.n_clients else math.inf
        times = self.profiles.next_online(self.now)
        times[~self._idle()] = math.inf
        return float(times.min()) if len(times) else math.inf

    def num_samples(self, client_id: int) -> int:
        return self.pool.n_samples(client_id)

    def default_steps(self, client_id: int) -> int:
        return self.trainer.steps_for(self.pool.n_samples(client_id))

    def dispatch(
        self,
        client_id: int,
        *,
        steps: int | None = None,
        payload: dict[str, torch.Tensor] | None = None,
        options: dict[str, Any] | None = None,
        finish_by: float | None = None,
    ) -> Task:
        st = self.state
        if client_id in st.busy:
            raise RuntimeError(f"client {client_id} already has a task")
        profile = self.profiles[client_id]
        if not profile.is_online(self.now):
            raise RuntimeError(f"client {client_id} is offline at t={self.now:.1f}s")
        task, bytes_down = self.core.new_task(client_id, steps, payload, options)
        st.counters.bytes_down += bytes_down
        timing = task_timing(
            profile, flops=task.flops, bytes_down=bytes_down,
            bytes_up=task.bytes_up,
            jitter=self.jitter, rng=st.device_rng,
        )
        leaf = None if st.hierarchy is None else st.hierarchy.assign(self.now, task)
        # the upload goes to the task's leaf with a hierarchy, capped there; to the server without one
        timing = self.server_time.timing(self.now, timing, bytes_down, 0 if leaf is not None else task.bytes_up)
        if leaf is not None:
            timing = dataclasses.replace(timing, upload_s=leaf.time.upload_s(timing.upload_s, task.bytes_up))
        if finish_by is not None:
            timing = self._partial_work(task, timing, finish_by)
        task.timing = timing
        end = self.now + timing.total_s
        lost_at = math.inf
        if profile.dropout > 0 and st.device_rng.random() < profile.dropout:  # type: ignore[union-attr]
            lost_at = self.now + st.device_rng.random() * timing.total_s  # type: ignore[union-attr]
        lost_at = min(lost_at, profile.online_until(self.now))
        if lost_at < end:
            st.busy[client_id] = st.queue.push(lost_at, "failure", task)
        else:
            st.busy[client_id] = st.queue.push(end, "arrival", task)
            self.backend.start(task)  # a task that will be lost is never trained
        return task

    def _partial_work(self, task: Task, timing: TaskTiming, finish_by: float) -> TaskTiming:
        """``task`` cut to the steps that arrive by ``finish_by`` at the speed ``timing`` drew for it (so the steps
        and the time come from the same draws), and its timing; unchanged when every step fits, or none does (the
        deadline drops it as without partial work)."""
        steps = steps_in_time(timing, task.steps, finish_by - self.now)
        while steps >= 1 and self.now + timing.cut(steps, task.steps).total_s > finish_by:
            steps -= 1  # floating-point rounding at the edge: arrive by the deadline, never after
        if not 1 <= steps < task.steps:
            return timing
        timing = timing.cut(steps, task.steps)
        self.core.cut(task, steps)
        return timing

    def cancel(self, task: Task) -> None:
        event = self.state.busy.get(task.client_id)
        if event is not None and event.data is task:
            EventQueue.cancel(event)
            del self.state.busy[task.client_id]
            self.backend.forget(task)  # it will never arrive: drop the work it started (wasted work is counted)
            self.state.counters.cancelled += 1
            self.core.task_over(task)
        self._leaf_forgets(task)  # in flight to a leaf, or its update held there: dropped

    def _leaf_forgets(self, task: Task) -> None:
        """With a hierarchy, ``task``'s leaf no longer waits for it (it failed, or the strategy gave up on it)."""
        if self.state.hierarchy is not None:
            self.state.hierarchy.forget(self.state.queue, self.server_time, task)

    def server_work(self, flops: float) -> None:
        """Charge ``flops`` of the server's own work (aggregation, server-side training, evaluation): with
        ``server.flops`` set, later dispatches wait for it (:mod:`hetfl.engine.server_time`)."""
        self.server_time.work(self.now, flops)

    @property
    def server_time(self) -> ServerTime:
        """When the server's compute and download slots are free (:mod:`hetfl.engine.server_time`)."""
        st = self.state
        if st.server_time is None:  # a checkpoint written before hetfl charged the server: a free one
            st.server_time = ServerTime()
        return st.server_time

    def set_timer(self, at: float, tag: str) -> Event:
        return self.state.queue.push(max(at, self.now), "timer", tag)

    def cancel_timer(self, handle: Event) -> None:
        EventQueue.cancel(handle)

    def commit(self, params: torch.Tensor, updates: list[Update], *, dropped: int = 0) -> None:
        self.core.commit(params, updates, dropped)

    # ----------------------------------------------------------------- measurements
    def busy_time(self) -> np.ndarray:
        """Simulated seconds each client has spent with a task over ``[0, now]`` (tasks in flight included)."""
        return self.core.busy_time(event.data for event in self.state.busy.values())

    def idle_fractions(self) -> np.ndarray:
        """Per client, the share of its online time over ``[0, now]`` it spent without a task (nan: not online yet)."""
        return idle_fractions(self.busy_time(), self.online_time(self.now))

    def idle_time(self) -> np.ndarray:
        """Simulated seconds each client has been online without a task."""
        return self.core.idle_time((event.data for event in self.state.busy.values()), self.online_time(self.now))

    def time_breakdown(self) -> dict[str, float]:
        """Where the time went so far (:meth:`~hetfl.engine.core.Counters.time_breakdown`)."""
        return self.counters.time_breakdown(self.idle_time())

    def client_time(self) -> dict[str, list[float]]:
        """The same per client (:meth:`~hetfl.engine.core.Counters.client_time`)."""
        return self.counters.client_time(self.idle_time())

    def fairness(self, *, window: bool = True) -> dict[str, Any]:
        """The engine's staleness and fairness numbers for an evaluation record (:meth:`~hetfl.engine.core.Counters.fairness`)."""
        return self.core.fairness(self.idle_fractions(), self.fast_clients, window=window)

    def personal_model(self, client_id: int) -> tuple[LocalTrainer, torch.Tensor] | None:
        """The model ``client_id`` would use now, with its architecture's trainer (its strategy's
        ``personal_params``); None: the global model."""
        st = self.state
        seed = int(np.random.SeedSequence([self.seed, 5, client_id, st.version]).generate_state(1)[0])
        trainer = self.models.trainer(client_id)
        params = personal_half(
            st.strategy, trainer, st.params, self.pool.data(client_id, self.now), st.client_state.get(client_id, {}), seed
        )
        return None if params is None else (st.strategy.scorer(trainer), params)

    # ----------------------------------------------------------------- the main loop
    def task_seed(self, task_id: int) -> int:
        return task_seed(self.seed, task_id)

    def engine_metrics(self) -> dict[str, Any]:
        """What this engine adds to an evaluation record: the server's own work so far (``server:``; the deployment
        server adds rejected updates and connected clients instead)."""
        server = self.server_time
        out = {"server_flops": server.work_flops, "server_busy_s": server.busy_s}
        if self.state.hierarchy is not None:
            out.update(self.state.hierarchy.metrics())
        return out

    def step(self) -> bool:
        """Process one event; False when there is nothing left to do."""
        st = self.state
        if not st.started:
            st.started = True
            st.strategy.start(self)
            return True
        event = st.queue.peek()
        if event is None:
            self.stop("stalled")  # no event left: nobody can ever report again
            return False
        if self.max_sim_time_s is not None and event.time > self.max_sim_time_s:
            # left in the queue, so a run resumed with a later time limit delivers it
            st.queue.now = self.max_sim_time_s
            self.stop("time limit")
            return False
        st.queue.pop()
        if event.kind == "arrival":
            self._arrive(event.data)
        elif event.kind == "failure":
            task: Task = event.data
            del st.busy[task.client_id]
            self.backend.forget(task)
            st.counters.failed += 1
            self.core.task_over(task)
            self._leaf_forgets(task)
            st.strategy.on_failure(self, task)
        elif event.kind == "forward":  # a leaf's group reached the server: each member's update, in task order
            for update in event.data:
                st.strategy.on_update(self, update)
        else:
            st.strategy.on_timer(self, event.data)
        return not self.stopping

    def _arrive(self, task: Task) -> None:
        st = self.state
        del st.busy[task.client_id]
        self.core.task_over(task)
        data = self.pool.data(task.client_id, task.dispatched_at)  # the data the client held when it began
        state = st.client_state.load(task.client_id)  # materialised while the client is active
        result = self.backend.result(task, data, state)  # client_train's, which updates ``state``
        result = compress_upload(st.strategy, task, result, state, self.task_seed(task.task_id))  # as it is sent
        st.client_state.save(task.client_id, state)  # back into the store (an empty state costs nothing)
        steps = st.strategy.compute_steps(result.steps)
        st.counters.trained_steps += steps
        st.counters.trained_flops += task.flops
        st.counters.arrived += 1
        st.counters.bytes_up += task.bytes_up
        st.counters.count_timing(task.client_id, task.timing)
        if task.steps_asked:
            st.counters.partial += 1
            st.counters.partial_work += task.steps / task.steps_asked
        params = result.params
        if self.byzantine is not None:
            params = self.byzantine.returned(task.client_id, task.task_id, task.params, params)
        update = self.core.make_update(
            task, params, n_samples=data.n_samples, steps=result.steps, loss=result.loss, payload=result.payload,
            stats={**client_report(data, self.pool.n_classes), **result.stats},
        )
        if st.hierarchy is not None:  # to its leaf, which aggregates it and forwards its group later
            st.hierarchy.arrive(st.queue, self.server_time, update)
        else:
            st.strategy.on_update(self, update)

    # ----------------------------------------------------------------- the backend
    @property
    def batches(self) -> list[int]:
        """The size of every batched ``train_many`` call of the in-process backend (diagnostics)."""
        return self.backend.batches

    def close(self) -> None:
        """Release the backend's workers (a Ray cluster it started); the simulator is done."""
        self.backend.close()


def task_seed(seed: int, task_id: int) -> int:
    """The seed of task ``task_id``'s mini-batch order in a run seeded ``seed`` (the simulator's and a deployment's)."""
    return int(np.random.SeedSequence([seed, 3, task_id]).generate_state(1)[0])
