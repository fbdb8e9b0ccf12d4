"""The deployment server's engine: the simulator's strategies on the wall clock, with real clients over gRPC.

The deployment server is three modules: this one (:class:`DeployServer`, its state and its engine events),
:mod:`hetfl.deploy.servicer` (the gRPC handlers, which hand what arrives to the engine) and
:mod:`hetfl.deploy.command` (``hetfl server``: the run folder, the federation, logging, ``devices.json``).

:class:`DeployServer` implements :class:`hetfl.strategies.base.Server` as the simulator does, so a strategy
runs here unchanged. Time is wall seconds since the run started (continuing after a restart); timers are
real; ``available()`` is the clients connected and without a task.

Threads. gRPC handler threads never touch the strategy: a join, an arriving update, a lost task become
events on one queue, and a single engine thread (the one that called :meth:`DeployServer.serve`) takes
them in order, fires due timers, checks who has gone silent, and calls the strategy's hooks. So strategies
need no locks, exactly as in the simulator. What handlers and the engine share (connections, tasks ready
to be streamed) is guarded by ``self.lock``.

A task's life: ``dispatch`` encodes it (header and chunks) and leaves it in its client's outbox; the client's
long poll (GetTask) streams it; the client trains, heartbeats meanwhile, and streams its update back
(SendUpdate). The handler decodes it and hands it to the engine, which checks it
(:mod:`hetfl.deploy.validate`: shape, dtype, finite values, the payload the strategy declares, finite
statistics, the norm bound of ``deploy.update_norm``) before the strategy sees it, with the weight of the
sample count the client claimed, bounded by the count registered with its token and ``deploy.max_samples``.
A rejected update is logged, counted (``rejected``) and reported to the strategy as a failed task, so rounds go
on; so is an update on which the strategy's ``on_update`` raised (its state is restored: :meth:`DeployServer._call`).
A client silent for ``deploy.heartbeat_timeout_s`` loses its task the same way, and a task past its time limit
(``deploy.task_timeout_s``, measured from the client's pace by default) too, its client benched for a while.

State. :class:`DeployState` is what a checkpoint holds (global model, strategy, version, counters, the
strategy's timers, tasks in flight, what clients reported); it is saved atomically after every aggregation.
A restarted server loads it, waits for ``min_clients`` to rejoin (the strategy does not run meanwhile), and sends
the tasks that were in flight again to their clients as they were (failing only those whose client is not back):
nothing aggregated is lost and no aggregation is left short. SIGINT and SIGTERM stop it at the next engine step
with the state saved; only a run that ended tells its clients to exit.

Evaluation, ``metrics.jsonl``, ``summary.json`` and checkpoints are the simulator's (:class:`hetfl.engine.run.Run`).
"""


from __future__ import annotations

import dataclasses
import io
import itertools
import json
import logging
import math
import os
import pickle
import queue
import signal
import statistics
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field, replace
from typing import Any

# gRPC's C core logs its own errors to stderr; hetfl reports them as one line each (GRPC_VERBOSITY=debug shows them)
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # noqa: E402
import numpy as np
import torch
import yaml

from hetfl.config import ExperimentConfig
from hetfl.deploy import federation_pb2 as pb
from hetfl.deploy import federation_pb2_grpc as pb_grpc
from hetfl.deploy import gate, wire
from hetfl.deploy.servicer import Connection, FederationServicer
from hetfl.deploy.tokens import TokenTable
from hetfl.deploy.validate import (
    NormBound, bounded_samples, change_norm, check_payload, check_report, check_stats, check_update,
)
from hetfl.devices import DeviceProfile, TaskTiming
from hetfl.engine.clock import Event, EventQueue
from hetfl.engine.core import Counters, EngineCore, EngineState, HoldsEngineCore
from hetfl.engine.simulator import task_seed
from hetfl.errors import DivergedError, HetflError
from hetfl.results.fairness import fastest, idle_fractions
from hetfl.strategies.base import Strategy, Task, Update

log = logging.getLogger("hetfl.server")

TICK_S = 0.25  # the engine wakes at least this often to check timers and silent clients
RECONNECT_POLL_S = 1.0  # next_available_time() while a known client is disconnected
FINISH_GRACE_S = 3.0  # after the run ends, how long clients get to hear so before the server exits
PACE_WINDOW = 5  # round trips per client whose median sets its expected task time (deploy.task_timeout_s auto)
MAX_TIMEOUT_DOUBLINGS = 4  # a client's auto task timeout doubles after each timeout in a row, at most this often
OUTLIER_CLAIM = 10.0  # a claimed sample count this many times the others' median, with nothing to bound it, is logged


@dataclass
class DeployState(EngineState):
    """Everything that changes during a deployed run: what a checkpoint holds (the global model, strategy, counters
    and version of every engine's state, and the deployment's own)."""

    server_rng: np.random.Generator | None = None
    elapsed: float = 0.0  # wall seconds of the run when the state was saved
    started: bool = False
    timers: EventQueue = field(default_factory=EventQueue)  # the strategy's timers (events of kind "timer")
    busy: dict[int, Task] = field(default_factory=dict)  # client -> its task in flight
    n_samples: dict[int, int] = field(default_factory=dict)  # as each client reported at its first join
    client_stats: dict[int, dict[str, float]] = field(default_factory=dict)  # label entropy, labels present
    profiles: list[DeviceProfile] = field(default_factory=list)  # as measured
    measured: dict[int, dict[str, float]] = field(default_factory=dict)  # step_s, down_Bps, up_Bps, hostname...
    rejected: int = 0
    timed_out: int = 0
    uploads: int = field(default_factory=int)  # update messages received: clients' updates and aggregators' aggregates
    server_busy_s: float = 0.0  # wall seconds in the strategy's hooks (aggregation, and the evaluations they trigger)
    client_state: Any = None  # the simulator's per-client state store; in a deployment it stays on each client
    claims: dict[int, int] = field(default_factory=dict)  # the last sample count each client claimed that was logged
    norm_history: dict[int, list[float]] = field(default_factory=dict)  # deploy.update_norm adaptive: recent scores
    paces: dict[int, list[float]] = field(default_factory=dict)  # client -> recent round-trip seconds per local step
    strikes: dict[int, int] = field(default_factory=dict)  # client -> its tasks timed out in a row
    benched: dict[int, float] = field(default_factory=dict)  # client -> until when (run seconds) it gets no task

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A checkpoint of an older hetfl lacks the newer fields: they start empty."""
        for name, f in self.__dataclass_fields__.items():
            if name not in state and f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                state[name] = f.default_factory()  # type: ignore[misc]
        self.__dict__.update(state)


@dataclass
class ServerOptions:
    """How the server listens and what it enforces (the config's ``deploy`` section plus command-line flags)."""

    address: str
    tokens: TokenTable
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_client_ca: bytes | None = None  # mutual TLS: clients must present a certificate signed by it
    min_clients: int = 1


class DeployServer(HoldsEngineCore):
    """Runs ``strategy`` with real clients; implements :class:`hetfl.strategies.base.Server`.

    The bookkeeping it shares with the simulator (tasks counted and priced, updates built, aggregations committed,
    busy time, fairness) is its :class:`~hetfl.engine.core.EngineCore` (``core``), on its :class:`DeployState`."""

    def __init__(self, cfg: ExperimentConfig, fed: Any, strategy: Strategy, options: ServerOptions) -> None:
        self.cfg, self.fed, self.options = cfg, fed, options
        self.deploy = cfg.deploy
        self.trainer = fed.trainer
        self.models = fed.models
        self.seed = cfg.seed
        n = cfg.data.n_clients
        median = cfg.devices.compute.median_flops
        state = DeployState(
            params=strategy.initial_params(fed.trainer),
            strategy=strategy,
            counters=Counters.for_clients(n),
            server_rng=np.random.default_rng([cfg.seed, 1]),
            profiles=[DeviceProfile(c, 1.0, median, math.inf, math.inf, 0.0, tier="not joined") for c in range(n)],
        )
        # the global model, strategy, counters and version, and the bookkeeping on them the simulator shares
        self.core = EngineCore(self, state, commit_log=log, diverged_advice=(
            "lower training.lr or the strategy's server_lr, or bound updates with deploy.max_update_norm"))
        self.lock = threading.Lock()
        self.events: queue.Queue = queue.Queue()
        self.conns: dict[int, Connection] = {}
        self.sessions: dict[str, int] = {}
        self.outgoing: dict[int, list[pb.Chunk]] = {}  # task id -> its encoded stream, until a poll takes it
        self.handed_out: set[int] = set()  # task ids streamed to their client
        self.finished = threading.Event()
        self._stop_reason: str | None = None
        self._now = 0.0
        self._t0 = time.monotonic()
        self._resumed = False
        self._grpc: grpc.Server | None = None
        self._port = 0
        self.gate: gate.Gate | None = None  # made with the gRPC server (bind)
        self.run: Any = None
        setup = {
            "input_shape": list(fed.data.dataset.input_shape),
            "n_classes": int(fed.data.dataset.n_classes),
            "vocab_size": fed.data.dataset.vocab_size,
            "heartbeat_s": self.deploy.heartbeat_timeout_s / 4,
            "compression": self.deploy.compression,
            "topk_ratio": self.deploy.topk_ratio,
            "chunk_bytes": self.deploy.chunk_bytes,
        }
        self._setup = setup
        # what the file and --set gave (defaults are the client's own): a short message, and no default-only keys;
        # not the server's trackers (hetfl.results.tracking), which clients neither run nor need installed
        trackers = {"tracking": True, "code": {key: True for key in cfg.code if key.startswith("tracking.")}}
        self._config_yaml = yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True, exclude=trackers), sort_keys=False)
        self.secagg = None
        if self.deploy.secure_aggregation:
            from hetfl.deploy.secure import SecureRounds

            self.secagg = SecureRounds(self)
        self.norm_bound = NormBound(self.deploy.update_norm, self.deploy.max_update_norm,
                                    secure=self.deploy.secure_aggregation)
        self._journal: list[tuple] | None = None  # what the strategy asked of the server during a hook (_call)
        self._restored: set[int] = set()  # ids of the tasks a resumed run found in flight in its checkpoint
        self._waiting = False  # waiting for min_clients: the strategy does not run, restored tasks wait for their clients
        self._interrupted = threading.Event()  # SIGINT or SIGTERM: stop at the next engine step, save, keep clients
        self._warned: set[tuple[int, str]] = set()  # (client, what) warned about once
        self._snapshots = True  # False once the strategy could not be copied (its on_update is then not rolled back)
        self._control_keys = itertools.count(-1, -1)  # outgoing keys of messages without tensors (send_control)

    # ------------------------------------------------------------------ the Server protocol
    @property
    def now(self) -> float:
        return self._now

    @property
    def rng(self) -> np.random.Generator:
        return self.state.server_rng  # type: ignore[return-value]

    @property
    def profiles(self) -> list[DeviceProfile]:
        return self.state.profiles

    @property
    def n_clients(self) -> int:
        return self.cfg.data.n_clients

    @property
    def stopping(self) -> bool:
        return self._stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    def stop(self, reason: str) -> None:
        self._stop_reason = self._stop_reason or reason

    def step_flops(self, client_id: int) -> float:
        return self.models.flops(client_id, self.num_samples(client_id))

    def num_samples(self, client_id: int) -> int:
        """The client's weight: the sample count it first claimed, bounded by the count registered with its token and by
        ``deploy.max_samples`` (:func:`~hetfl.deploy.validate.bounded_samples`); the partition's before it joins."""
        claim = self.state.n_samples.get(client_id)
        if claim is None:
            return self.fed.pool.n_samples(client_id)
        return bounded_samples(claim, self._registered(client_id), self.deploy.max_samples)

    def _registered(self, client_id: int) -> int | None:
        return getattr(self.options.tokens, "samples", {}).get(client_id)

    def default_steps(self, client_id: int) -> int:
        return self.models.trainer(client_id).steps_for(self.num_samples(client_id))

    def task_seed(self, task_id: int) -> int:
        return task_seed(self.seed, task_id)

    def available(self) -> list[int]:
        """Connected clients without a task, except those benched after a timed-out task (:meth:`_check_liveness`)."""
        with self.lock:
            alive = [c for c, conn in self.conns.items() if conn.alive]
        benched = self.state.benched
        return sorted(c for c in alive if c not in self.state.busy and benched.get(c, -math.inf) <= self.now)

    def next_available_time(self) -> float:
        """Soon, while a client the tokens know is disconnected (it may come back); when the first benched client's
        bench ends; never, otherwise."""
        with self.lock:
            alive = {c for c, conn in self.conns.items() if conn.alive}
        wake = self.now + RECONNECT_POLL_S if self.options.tokens.clients - alive else math.inf
        ends = [until for c, until in self.state.benched.items() if c in alive and c not in self.state.busy and until > self.now]
        return min([wake, *ends])

    def dispatch(
        self,
        client_id: int,
        *,
        steps: int | None = None,
        payload: dict[str, torch.Tensor] | None = None,
        options: dict[str, Any] | None = None,
    ) -> Task:
        st = self.state
        if client_id in st.busy:
            raise RuntimeError(f"client {client_id} already has a task")
        with self.lock:
            conn = self.conns.get(client_id)
        if conn is None or not conn.alive:
            raise RuntimeError(f"client {client_id} is not connected")
        task, _ = self.core.new_task(client_id, steps, payload, options)  # the download is counted as encoded (_send)
        st.busy[client_id] = task
        if self._journal is not None:
            self._journal.append(("dispatch", task))
        if self.secagg is not None:
            self.secagg.join_cohort(task)  # sent once the engine step ends and its cohort is known (_seal)
        else:
            self._send(task, None)
        return task

    def _send(self, task: Task, secagg: dict | None) -> None:
        stream = self._encode_task(task, secagg)
        self.state.counters.bytes_down += sum(len(c.data) for c in stream)
        with self.lock:
            self.outgoing[task.task_id] = stream
            conn = self.conns.get(task.client_id)
        if conn is not None:
            conn.outbox.put(task.task_id)

    def _seal(self) -> None:
        """Secure aggregation: send the tasks this engine step dispatched, with their cohort's keys."""
        if self.secagg is not None:
            for task, header in self.secagg.seal():
                self._send(task, header)

    def cancel(self, task: Task) -> None:
        st = self.state
        if st.busy.get(task.client_id) is task:
            self._forget(task)
            st.counters.cancelled += 1
            if self.secagg is not None:
                self.secagg.failed(task)
            if self._journal is not None:
                self._journal.append(("cancel", task))

    def server_work(self, flops: float) -> None:
        """Nothing to charge: a deployed server's work takes the real time it takes (``server:`` is the simulator's)."""

    def set_timer(self, at: float, tag: str) -> Event:
        timer = self.state.timers.push(max(at, self.now), "timer", tag)
        if self._journal is not None:
            self._journal.append(("timer", timer))
        return timer

    def cancel_timer(self, handle: Event) -> None:
        if self._journal is not None:
            self._journal.append(("cancel_timer", handle, handle.cancelled))
        EventQueue.cancel(handle)  # it stays in the queue until it reaches the top: a failed hook's undo revives it

    def commit(self, params: torch.Tensor, updates: list[Update], *, dropped: int = 0) -> None:
        """The core's commit (:meth:`EngineCore.commit`), which logs the aggregation; a hook's call (:meth:`_call`)
        that committed is one whose version moved."""
        self.core.commit(params, updates, dropped)

    # ------------------------------------------------------------------ what Run asks of an engine
    def engine_metrics(self) -> dict[str, Any]:
        with self.lock:
            connected = sum(conn.alive for conn in self.conns.values())
        steps = [m["step_s"] for m in self.state.measured.values() if m.get("step_s")]
        return {
            "rejected": self.state.rejected,
            "timed_out": self.state.timed_out,
            "clients_connected": connected,
            "uploads_received": self.state.uploads,
            "step_s_mean": float(np.mean(steps)) if steps else None,
            "server_busy_s": self.state.server_busy_s,
        }

    def busy_time(self) -> np.ndarray:
        """Wall seconds each client has spent with a task since the run began (tasks in flight included)."""
        return self.core.busy_time(self.state.busy.values())

    def idle_time(self) -> np.ndarray:
        """Wall seconds each client has been without a task (the run's duration counts as online, as in fairness)."""
        return self.core.idle_time(self.state.busy.values(), np.full(self.n_clients, self.now))

    def time_breakdown(self) -> dict[str, float]:
        """Where the time went so far, measured (:meth:`_measure`; :meth:`~hetfl.engine.core.Counters.time_breakdown`)."""
        return self.counters.time_breakdown(self.idle_time())

    def client_time(self) -> dict[str, list[float]]:
        """The same per client (:meth:`~hetfl.engine.core.Counters.client_time`)."""
        return self.counters.client_time(self.idle_time())

    def fairness(self, *, window: bool = True) -> dict[str, Any]:
        # online time: a deployment does not know when a device was reachable but idle; the run's duration is it
        idle = idle_fractions(self.busy_time(), np.full(self.n_clients, self.now))
        return self.core.fairness(idle, fastest([p.flops for p in self.profiles]), window=window)

    def personal_model(self, client_id: int) -> None:
        return None  # a client's own state stays on the client: the server scores the global model

    # ------------------------------------------------------------------ tasks on the wire
    def _encode_task(self, task: Task, secagg: dict | None) -> list[pb.Chunk]:
        scalars, tensor_options = wire.split_options(task.options)
        tensors = {"params": task.params}
        tensors.update({f"payload:{k}": v for k, v in task.payload.items()})
        tensors.update({f"option:{k}": v for k, v in tensor_options.items()})
        specs, blobs = [], []
        for name, tensor in tensors.items():
            spec, data = wire.encode_tensor(name, tensor)
            specs.append(spec)
            blobs.append(data)
        header = pb.TaskHeader(
            kind=pb.TaskHeader.TRAIN, task_id=task.task_id, version=task.version, steps=task.steps,
            seed=self.task_seed(task.task_id), options_json=json.dumps(scalars), tensors=specs,
            secagg_json=json.dumps(secagg) if secagg else "", weight=self.num_samples(task.client_id),
        )
        return list(wire.chunks(pb.Chunk(task=header), blobs, self.deploy.chunk_bytes))

    def send_control(self, client_id: int, header: pb.TaskHeader) -> None:
        """Queue a message without tensors (secure aggregation's unmasking request) for a client's next poll."""
        key = next(self._control_keys)  # negative ids never collide with task ids
        with self.lock:
            self.outgoing[key] = [pb.Chunk(task=header)]
            conn = self.conns.get(client_id)
        if conn is not None:
            conn.outbox.put(key)

    def _forget(self, task: Task) -> None:
        """``task`` is over (arrived, failed or cancelled): free its client, drop its unsent stream."""
        st = self.state
        del st.busy[task.client_id]
        self.core.task_over(task)
        with self.lock:
            self.outgoing.pop(task.task_id, None)
            self.handed_out.discard(task.task_id)

    def fail(self, task: Task, reason: str, *, timed_out: bool = False, rejected: bool = False) -> None:
        """``task`` is lost: log why and tell the strategy (the round or group goes on without it)."""
        if self.state.busy.get(task.client_id) is not task:
            return
        self._forget(task)
        self._lost(task, reason, timed_out=timed_out, rejected=rejected)

    def _lost(self, task: Task, reason: str, *, timed_out: bool = False, rejected: bool = False) -> None:
        """A task already forgotten is lost: counted, logged, reported to the strategy (``on_failure``)."""
        st = self.state
        st.counters.failed += 1
        st.timed_out += timed_out
        st.rejected += rejected
        if rejected:
            log.warning("client %d: update for task %d rejected: %s", task.client_id, task.task_id, reason)
        else:
            log.warning("client %d lost task %d: %s", task.client_id, task.task_id, reason)
        if self.secagg is not None:
            self.secagg.failed(task)
        self._call("on_failure", task, context=f"task {task.task_id} of client {task.client_id}")

    def reject(self, task: Task, reason: str) -> None:
        """``task``'s update failed validation: logged, counted in ``rejected``, never aggregated; the task is lost."""
        self.fail(task, reason, rejected=True)

    # ------------------------------------------------------------------ calling the strategy
    def _call(self, hook: str, *args: Any, context: str, transactional: bool = False) -> tuple[str | None, bool]:
        """``strategy.<hook>(self, *args)``, which never stops the server: ``(None, committed)`` when it returned,
        ``(the exception in one line, committed)`` when it raised; ``committed``: it committed an aggregation.

        Transactional (``on_update``): the strategy's attributes are copied first (containers copied; tensors,
        modules, tasks and timers shared, so a hook must not change a tensor in place before it may raise) and what it
        asks of the server is journaled. If it raises before committing, the copy is restored, the tasks it dispatched
        are withdrawn, the timers it set cancelled and those it cancelled revived, and the tasks it cancelled are
        reported to the restored strategy as failed: as if the call had not happened. After a commit nothing is undone
        (the aggregation is logged and checkpointed). Otherwise (``on_failure``, ``on_timer``) the exception is logged
        and the state is as the hook left it. :class:`DivergedError` (a non-finite global model) stops the run, except
        inside a transaction, where it only fails the update that caused it."""
        strategy = self.state.strategy
        if self._journal is not None:  # inside another hook's call (secure aggregation fails a task): that one guards
            getattr(strategy, hook)(self, *args)
            return None, False
        snapshot = None
        if transactional and self._snapshots:
            snapshot = _snapshot(strategy)
            if snapshot is None:
                self._snapshots = False
                log.warning("strategy %s cannot be copied (pickle): an update its on_update fails on is rejected, but "
                            "its state is kept as the hook left it", strategy.name)
        self._journal = journal = []
        version = self.state.version  # a call that moved it committed an aggregation
        started = time.perf_counter()
        try:
            getattr(strategy, hook)(self, *args)
            return None, self.state.version != version
        except DivergedError as err:
            if not transactional:
                raise
            error = _one_line(err)
        except Exception as err:  # noqa: BLE001 - a strategy's failure on one client's data must not stop the server
            error = _one_line(err)
        finally:
            self._journal = None
            self.state.server_busy_s += time.perf_counter() - started
        committed = self.state.version != version
        if transactional and snapshot is not None and not committed:
            _restore(strategy, snapshot)
            cancelled = self._undo(journal)
            log.error("strategy %s: %s raised %s (%s); its state was restored as before the call", strategy.name, hook,
                      error, context)
            for task in cancelled:  # already counted as cancelled; the restored strategy still waits for it
                self._call("on_failure", task, context=f"task {task.task_id} of client {task.client_id}, cancelled")
        else:
            log.error("strategy %s: %s raised %s (%s)%s; its state is as the hook left it", strategy.name, hook, error,
                      context, " after committing an aggregation" if committed else "")
        return error, committed

    def _undo(self, journal: list[tuple]) -> list[Task]:
        """Take back what a failed hook asked of the server (:meth:`_call`); the tasks it cancelled that remain."""
        st = self.state
        withdrawn, cancelled = set(), []
        for entry in reversed(journal):
            kind = entry[0]
            if kind == "dispatch":
                task = entry[1]
                withdrawn.add(task.task_id)
                if st.busy.get(task.client_id) is task:
                    self._forget(task)  # its stream is dropped; a client that took it already is told it is unwanted
                    st.counters.cancelled += 1
                    if self.secagg is not None:
                        self.secagg.failed(task)
            elif kind == "timer":
                EventQueue.cancel(entry[1])
            elif kind == "cancel_timer":
                entry[1].cancelled = entry[2]  # revived: a cancelled timer is still in the queue (no step ran since)
            elif kind == "cancel":
                cancelled.append(entry[1])
        return [t for t in reversed(cancelled) if t.task_id not in withdrawn]

    def _deliver(self, update: Update) -> tuple[bool, str]:
        """Hand a checked update to the strategy (``on_update``, transactional: :meth:`_call`). If the strategy raises
        before aggregating it, the update is rejected (the task reported lost to the restored strategy)."""
        st, task = self.state, update.task
        steps = st.strategy.compute_steps(update.steps)
        st.counters.trained_steps += steps
        st.counters.trained_flops += task.flops
        error, committed = self._call("on_update", update, transactional=True,
                                      context=f"update of client {task.client_id} for task {task.task_id}")
        if error is None or committed:
            return True, ""
        st.counters.trained_steps -= steps
        st.counters.trained_flops -= task.flops
        reason = f"the strategy failed on it ({error})"
        self._lost(task, reason, rejected=True)
        return False, reason

    # ------------------------------------------------------------------ engine events
    def _on_join(self, client_id: int, report: pb.DeviceReport, hostname: str) -> None:
        st = self.state
        task = st.busy.get(client_id)
        if task is not None and not (self._waiting and task.task_id in self._restored):
            self.fail(task, "the client joined again without it (it restarted or lost the connection)")
        self._note_claim(client_id, int(report.n_samples), "at its join")
        st.client_stats[client_id] = _stats(report.stats_json)
        st.measured.setdefault(client_id, {})["hostname"] = hostname
        profile = st.profiles[client_id]
        if profile.tier == "not joined":
            st.profiles[client_id] = replace(profile, tier="joined")
        log.info("client %d joined from %s with %d samples", client_id, hostname or "?", report.n_samples)

    def _note_claim(self, client_id: int, claim: int, where: str) -> None:
        """A sample count ``client_id`` claims. Its weight is its first claim bounded by the registered count and
        ``deploy.max_samples`` (:meth:`num_samples`); a claim that differs from its first or the registered count, or
        exceeds the cap, is logged once per change, and with nothing to bound it, a claim far above the others' too."""
        st = self.state
        first = st.n_samples.setdefault(client_id, claim)
        registered, cap = self._registered(client_id), self.deploy.max_samples
        odd = claim != first or (registered is not None and claim != registered) or (cap is not None and claim > cap)
        if odd and st.claims.get(client_id) != claim:
            st.claims[client_id] = claim
            known = [f"its first claim {first}"] if claim != first else []
            known += [f"registered {registered}"] if registered is not None else []
            known += [f"deploy.max_samples {cap}"] if cap is not None else []
            log.warning("client %d claims %d samples %s (%s): weighted as %d", client_id, claim, where,
                        "; ".join(known), self.num_samples(client_id))
        others = [n for c, n in st.n_samples.items() if c != client_id]
        if registered is None and cap is None and others and (client_id, "claim") not in self._warned:
            median = statistics.median(others)
            if claim > OUTLIER_CLAIM * median:
                self._warned.add((client_id, "claim"))
                log.warning("client %d claims %d samples, %.3g times the median of the other clients' claims (%g), and "
                            "nothing bounds its weight: register each client's count in the token file ('samples') or "
                            "set deploy.max_samples", client_id, claim, claim / median, median)

    def _on_ready(self, conn: Connection) -> None:
        """The client asks for work: it is connected (again) and may get tasks."""
        with self.lock:
            if self.conns.get(conn.client_id) is not conn or conn.alive:
                return
            conn.alive = True
            conn.last_seen = time.monotonic()
            connected = sum(c.alive for c in self.conns.values())
        log.info("client %d ready (%d connected)", conn.client_id, connected)

    def _on_update(self, client_id: int, header: pb.UpdateHeader, tensors: dict, metas: dict, nbytes: int) -> tuple[bool, str]:
        st = self.state
        if header.unmask_share:
            if self.secagg is None:
                return False, "secure aggregation is off"
            st.counters.bytes_up += nbytes
            return self.secagg.on_share(client_id, header, tensors)
        task = st.busy.get(client_id)
        if task is None or task.task_id != header.task_id:
            reason = f"task {header.task_id} is no longer wanted (cancelled, timed out, or from before a restart)"
            log.info("client %d: update for task %d ignored: %s", client_id, header.task_id, reason)
            return False, reason
        st.counters.bytes_up += nbytes
        st.counters.arrived += 1
        st.uploads += 1
        self._measure(client_id, task, header, nbytes)
        if header.n_samples > 0:
            self._note_claim(client_id, int(header.n_samples), "with its update")
        params = tensors.get("params")
        if self.secagg is not None:
            return self.secagg.on_masked(task, header, params)
        payload = {k.removeprefix("payload:"): v for k, v in tensors.items() if k.startswith("payload:")}
        other = sorted(k for k in tensors if k != "params" and not k.startswith("payload:"))
        if params is None:
            reason = "the update carries no parameters"
        else:
            reference = st.strategy.upload_reference(self, task)  # what the client sends a new value of
            if metas["params"].get("delta") and params.shape == reference.shape:
                params = reference + params.to(reference.dtype)
            reason = check_update(params, reference=reference, max_norm=None)
        if reason is None and other:
            reason = f"it carries a tensor '{other[0]}' (an update holds params and the strategy's payload only)"
        if reason is None:
            reason = self._check_payload(task, payload)
        stats = _stats(header.stats_json)
        if reason is None:
            reason = check_stats(stats)
        if reason is None:
            reason = check_report(header.steps, header.loss)
        norm = 0.0
        if reason is None:
            norm = change_norm(params, reference)
            reason = self.norm_bound.check(norm, task.steps, params.numel(), st.norm_history)
        if reason is not None:
            self.reject(task, reason)
            return False, reason
        self._forget(task)
        update = self.core.make_update(
            task, params, n_samples=self.num_samples(client_id), steps=int(header.steps), loss=float(header.loss),
            payload=payload, stats={**st.client_stats.get(client_id, {}), **stats},
        )
        accepted, reason = self._deliver(update)
        if accepted:
            self.norm_bound.accepted(norm, task.steps, params.numel(), st.norm_history)
            st.strikes.pop(client_id, None)
        return accepted, reason

    def _on_aggregate(self, name: str, header: pb.AggregateHeader, tensors: dict | None, nbytes: int) -> tuple[bool, str]:
        """Aggregator ``name``'s pre-aggregate of its members' updates (:mod:`hetfl.deploy.aggregator`).

        Every member must be a task in flight at a client that joined through ``name``, once; otherwise the whole
        aggregate is refused and those of its members that are ``name``'s fail (a member whose task is over, yet of a
        client of ``name``, is ignored, as a late update is). The mean must be finite and of the model's shape, its
        change within ``deploy.update_norm``'s bound (fixed: ``max_update_norm``; adaptive: the members' bound at their
        most local steps; by the triangle inequality a mean of bounded changes is bounded the same), every weight the
        one the task was sent with (:meth:`num_samples`), steps and losses sane. The strategy is then
        handed, for every member, the update :func:`~hetfl.strategies.checks.shared_mean` makes of the group (the
        mean as params, its own sample count, steps, loss and stats), all sharing one params tensor."""
        from hetfl.strategies.checks import shared_mean

        st, members, stale, seen = self.state, [], [], set()
        st.uploads += 1
        with self.lock:
            via = {c: conn.via for c, conn in self.conns.items()}
        bad = None
        for m in header.members:
            task = st.busy.get(m.client_id)
            if via.get(m.client_id) != name or m.task_id in seen:
                bad = bad or (f"aggregator {name} claims task {m.task_id} twice" if m.task_id in seen else
                              f"aggregator {name} claims task {m.task_id} of client {m.client_id}, which did not join "
                              "through it")
            elif task is None or task.task_id != m.task_id:
                stale.append(m.task_id)
            else:
                members.append((task, m))
            seen.add(m.task_id)
        if bad is not None:
            for task, _ in members:
                self.reject(task, bad)
            return False, bad
        if stale:
            log.info("aggregator %s: task(s) %s ignored: no longer wanted (cancelled, timed out, or from before a "
                     "restart)", name, ", ".join(map(str, stale)))
        refused = [(t, m) for t, m in members if m.rejected]
        for task, m in refused:
            self.reject(task, f"aggregator {name}: {m.rejected}")
        members = [(t, m) for t, m in members if not m.rejected]
        if not members:
            return False, refused[0][1].rejected if refused else "no update of it is wanted any more"
        params = (tensors or {}).get("params")
        reference = members[0][0].params
        reason = None
        if params is None or set(tensors) != {"params"}:
            reason = "an aggregate carries its members' weighted mean ('params') and nothing else"
        elif any(t.version != header.version for t, _ in members):
            reason = f"its members' tasks are not all of version {header.version}"
        if reason is None:
            reason = check_update(params, reference=reference, max_norm=None)
        if reason is None:  # a weighted mean's change is no longer than its longest member's: the members' bound holds
            steps = max(int(m.steps) for _, m in members)
            reason = self.norm_bound.check(change_norm(params, reference), steps, params.numel(), st.norm_history)
        for task, m in members:
            if reason is not None:
                break
            if m.n_samples != self.num_samples(task.client_id):
                reason = (f"it weights client {task.client_id} by {m.n_samples} samples, not the {self.num_samples(task.client_id)} "
                          "its task was sent with")
            elif (reported := check_report(m.steps, m.loss)) is not None:
                reason = f"{reported} for task {task.task_id}"
            else:
                reason = check_stats(_stats(m.stats_json))
        if reason is not None:
            for task, _ in members:
                self.reject(task, f"aggregate of {name} rejected: {reason}")
            return False, reason
        st.counters.bytes_up += nbytes  # once for the group: what the server received
        updates = []
        for task, m in members:
            st.counters.arrived += 1
            self._measure(task.client_id, task, m, 0)
            self._forget(task)
            stats = {**st.client_stats.get(task.client_id, {}), **_stats(m.stats_json)}
            updates.append(self.core.make_update(task, params, n_samples=int(m.n_samples), steps=int(m.steps),
                                                 loss=float(m.loss), stats=stats))
        updates = shared_mean(updates)  # one tensor: one merge for the root
        results = [self._deliver(u) for u in updates]
        refused = [r for ok, r in results if not ok]
        return not refused, refused[0] if refused else ""

    def _check_payload(self, task: Task, payload: dict[str, torch.Tensor]) -> str | None:
        """The update's payload against what the strategy declares (``Strategy.expected_payload``)."""
        try:
            expected = self.state.strategy.expected_payload(self, task)
        except Exception as err:  # noqa: BLE001 - a strategy's own code: its failure rejects this update only
            return f"the strategy's expected_payload raised {_one_line(err)}"
        return check_payload(payload, expected)

    def _measure(self, client_id: int, task: Task, header: pb.UpdateHeader, nbytes: int) -> None:
        """Record what the client measured: seconds per step, its link's rates; its profile follows them. And what the
        server measured: the task's round trip per local step (its pace, which sets its tasks' timeouts)."""
        st = self.state
        m = st.measured.setdefault(client_id, {})
        if 0 < header.step_s < math.inf:  # what the client reports: positive and finite, or ignored
            m["step_s"] = float(header.step_s)
        if 0 < header.download_s < math.inf and header.download_bytes > 0:
            m["down_Bps"] = header.download_bytes / header.download_s
        if 0 < header.upload_Bps < math.inf:
            m["up_Bps"] = float(header.upload_Bps)
        m["round_trip_s"] = self.now - task.dispatched_at
        st.counters.count_timing(client_id, measured_timing(m["round_trip_s"], header.download_s, header.train_s))
        m["updates"] = m.get("updates", 0) + 1
        paces = st.paces.setdefault(client_id, [])
        paces.append(m["round_trip_s"] / max(st.strategy.compute_steps(task.steps), 1))
        del paces[:-PACE_WINDOW]
        profile = st.profiles[client_id]
        flops = self.step_flops(client_id) / m["step_s"] if m.get("step_s") else profile.flops
        st.profiles[client_id] = replace(
            profile, flops=flops, speed=flops / self.cfg.devices.compute.median_flops,
            down_Bps=m.get("down_Bps", profile.down_Bps), up_Bps=m.get("up_Bps", profile.up_Bps), tier="measured",
        )

    def task_limit(self, task: Task) -> tuple[float | None, str]:
        """Seconds ``task`` may take from dispatch, and how that was set (``deploy.task_timeout_s``); None: no limit.

        auto: ``task_timeout_factor`` times the seconds it is expected to take, at least ``task_timeout_floor_s``,
        doubled for each of its client's tasks timed out in a row (at most 16 times), so a client that is slower than
        measured gets through in the end. Expected: the task's local steps (``Strategy.compute_steps``) times its
        client's pace, the median of its last round trips per local step as the server timed them (download, training
        and upload: nothing the client claims); a client not measured yet gets the median pace of the others; with
        nobody measured, the floor alone."""
        d, st = self.deploy, self.state
        setting = d.task_timeout_s
        if setting == "off" or setting is None:
            return None, ""
        if setting != "auto":
            return float(setting), f"task_timeout_s {float(setting):g}"
        own = st.paces.get(task.client_id)
        if own:
            pace, whose = statistics.median(own), "its"
        else:
            paces = [statistics.median(p) for p in st.paces.values() if p]
            pace, whose = (statistics.median(paces), "the clients'") if paces else (None, "")
        strikes = min(st.strikes.get(task.client_id, 0), MAX_TIMEOUT_DOUBLINGS)
        expected = pace * max(st.strategy.compute_steps(task.steps), 1) if pace is not None else 0.0
        limit = max(d.task_timeout_floor_s, d.task_timeout_factor * expected) * 2**strikes
        how = (f"task_timeout_s auto: {d.task_timeout_factor:g} x {expected:.2f} s expected at {whose} pace"
               if pace is not None else "task_timeout_s auto: nothing measured yet")
        how += f", at least task_timeout_floor_s {d.task_timeout_floor_s:g}"
        if strikes:
            how += f", doubled for {strikes} timeout(s) in a row"
        return limit, how

    def _check_liveness(self) -> None:
        timeout = self.deploy.heartbeat_timeout_s
        clock = time.monotonic()
        silent = []
        with self.lock:
            for conn in self.conns.values():
                if conn.alive and clock - conn.last_seen > timeout:
                    conn.alive = False
                    silent.append((conn.client_id, clock - conn.last_seen))
        for client, quiet in silent:
            log.warning("client %d silent for %.1f s (heartbeat_timeout_s %g): disconnected", client, quiet, timeout)
            task = self.state.busy.get(client)
            if task is not None and not self._waiting:  # while waiting, a restored task waits for its client
                self.fail(task, f"no heartbeat for {quiet:.1f} s", timed_out=True)
        if self._waiting:
            return
        st = self.state
        for task in list(st.busy.values()):
            limit, how = self.task_limit(task)
            if limit is None or self.now - task.dispatched_at <= limit or st.busy.get(task.client_id) is not task:
                continue
            client = task.client_id
            st.strikes[client] = st.strikes.get(client, 0) + 1
            st.benched[client] = self.now + limit  # out of the next dispatches: the strategy turns to other clients
            self.fail(task, f"not returned within {limit:.1f} s ({how}); no new task for it for {limit:.1f} s",
                      timed_out=True)

    def _fire_timers(self) -> None:
        """The strategy's timers that are due, in order (ties: first set, first fired), until the run stops."""
        timers = self.state.timers
        while not self.stopping:
            timer = timers.peek()
            if timer is None or timer.time > self.now:
                return
            timers.pop()
            self._call("on_timer", timer.data, context=f"timer '{timer.data}'")

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "join":
            self._on_join(*event[1:])
        elif kind == "update":
            *args, reply = event[1:]
            try:
                result = self._on_update(*args)
            except Exception as err:  # noqa: BLE001 - one client's message never stops the server
                if isinstance(err, DivergedError):
                    reply.set_result((False, "the run diverged"))
                    raise
                client, header = args[0], args[1]
                reason = f"the server failed to process it ({_one_line(err)})"
                log.error("client %d: update for task %d: %s", client, header.task_id, reason)
                task = self.state.busy.get(client)
                if task is not None and task.task_id == header.task_id:
                    self.reject(task, reason)
                result = (False, reason)
            except BaseException:
                reply.set_result((False, "the server failed to process the update"))
                raise
            reply.set_result(result)
        elif kind == "aggregate":
            *args, reply = event[1:]
            try:
                result = self._on_aggregate(*args)
            except DivergedError:
                reply.set_result((False, "the run diverged"))
                raise
            except Exception as err:  # noqa: BLE001 - one aggregator's message never stops the server
                reason = f"the server failed to process it ({_one_line(err)})"
                log.error("aggregator %s: aggregate of version %d: %s", args[0], args[1].version, reason)
                result = (False, reason)  # its members' tasks, if still in flight, time out as any silent task
            except BaseException:
                reply.set_result((False, "the server failed to process the aggregate"))
                raise
            reply.set_result(result)
        elif kind == "ready":
            self._on_ready(event[1])
        elif kind == "lost":
            client, task_id, reason = event[1:]
            task = self.state.busy.get(client)
            if task is not None and task.task_id == task_id:
                self.fail(task, reason, rejected=reason.startswith("malformed update"))

    def _tick(self) -> None:
        self._now = time.monotonic() - self._t0

    # ------------------------------------------------------------------ the loop
    def serve(self, run: Any) -> str:
        """Listen, wait for ``min_clients``, run the strategy until the run stops; the run's status.

        SIGINT and SIGTERM (in the main thread) stop it at the next engine step with status ``interrupted``: the
        caller saves the state, and the clients, told nothing, keep retrying until a restarted server resumes the run.
        A second signal interrupts at once."""
        self.run = run
        run.log = HeldLog(run.log)
        self._t0 = time.monotonic() - self.state.elapsed
        self._tick()
        self._listen()
        if self.secagg is not None and self.deploy.update_norm.rule == "adaptive":
            log.info("deploy.update_norm adaptive is off under secure aggregation: the server sees only each round's sum "
                     "(clients clip each entry to deploy.secagg_clip)")
        status = "completed"
        restore_signals = self._catch_signals()
        try:
            if self._resumed:
                self._restored = {task.task_id for task in self.state.busy.values()}
            self._waiting = True
            try:
                self._wait_for_clients()
            finally:
                self._waiting = False
            if not self._interrupted.is_set():
                if self._resumed:
                    self._resume_tasks()
                    if not self.state.busy and self.state.timers.peek() is None:
                        self.state.strategy.start(self)  # nothing pending: begin again from the restored model
                elif not self.state.started:
                    self.state.started = True
                    self.state.strategy.start(self)
                self._seal()
            if self.state.version >= self.cfg.rounds:
                self.stop("rounds")
            idle_since = None
            while not self.stopping and not self._interrupted.is_set():
                self._tick()
                wait = TICK_S
                timer = self.state.timers.peek()
                if timer is not None:
                    wait = max(0.0, min(wait, timer.time - self.now))
                try:
                    event = self.events.get(timeout=wait)
                except queue.Empty:
                    event = None
                self._tick()
                if event is not None:
                    self._handle(event)
                self._fire_timers()
                self._check_liveness()
                self._seal()
                if self.checkpoint_due:
                    self.save()
                if self.cfg.max_sim_time_s is not None and self.now > self.cfg.max_sim_time_s:
                    self.stop("time limit")
                pending = self.state.busy or self.state.timers.peek() is not None
                if pending or event is not None:
                    idle_since = None
                elif idle_since is None:
                    idle_since = self.now
                elif self.now - idle_since > 2 * self.deploy.heartbeat_timeout_s + self.deploy.poll_s:
                    self.stop("stalled")  # nothing in flight, no timer: the strategy waits for nothing
            if self._interrupted.is_set() and not self.stopping:
                status = "interrupted"
                log.warning("interrupted: saving the state; clients keep retrying until the server is started again")
            elif self.stop_reason == "stalled":
                status = "stalled"
        except KeyboardInterrupt:
            status = "interrupted"
            self._interrupted.set()
            log.warning("interrupted: saving the state")
        except DivergedError:
            self.stop("diverged")  # the run is over: clients are told so
            raise
        finally:
            restore_signals()
            self.finished.set()
            self._drain()
        self._tick()
        return status

    def _catch_signals(self) -> Any:
        """SIGINT and SIGTERM set ``_interrupted`` (a second one raises KeyboardInterrupt); returns what undoes it."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def interrupt(signum: int, frame: Any) -> None:
            if self._interrupted.is_set():
                raise KeyboardInterrupt
            self._interrupted.set()

        previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
        return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]

    @property
    def run_over(self) -> str | None:
        """Once the engine stopped: why the run ended (clients are told and exit), or None while it goes on, or when
        the server stopped without ending it (interrupted, or failed): its clients keep retrying then."""
        return self._stop_reason if self.finished.is_set() else None  # interrupted or failed: no stop reason

    def _resume_tasks(self) -> None:
        """A resumed run's tasks that its checkpoint had in flight (none other: those dispatched since are this
        server's). Each goes again to its client if that is connected, as it was (same task id, model, steps and
        seed: the update it brings is the one it would have brought), so no aggregation is left short; a task whose
        client has not come back, or of a secure-aggregation round (its masks are gone), is failed."""
        st = self.state
        with self.lock:
            alive = {c for c, conn in self.conns.items() if conn.alive}
        for task in sorted(st.busy.values(), key=lambda t: t.task_id):
            if task.task_id not in self._restored:
                continue
            if self.secagg is None and task.client_id in alive:
                task.dispatched_at = self.now
                with self.lock:
                    self.handed_out.discard(task.task_id)
                self._send(task, None)
                log.info("client %d: task %d sent again (in flight when the server stopped)", task.client_id, task.task_id)
            else:
                why = ("secure aggregation rounds do not survive a restart" if self.secagg is not None
                       else "its client has not come back")
                self.fail(task, f"in flight when the server stopped; {why}")
        self._restored.clear()

    def _drain(self) -> None:
        """Answer what arrived after the run stopped (updates are not used any more)."""
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            if event[0] in ("update", "aggregate"):
                event[-1].set_result((False, "the run is over"))

    def save(self) -> None:
        """Checkpoint, then write the evaluations made since the last one: a line in metrics.jsonl is never
        ahead of the checkpoint, so a crash at any moment loses no aggregation the log shows."""
        self.state.elapsed = self.now
        self.run.save_checkpoint()
        self.checkpoint_due = False
        if isinstance(self.run.log, HeldLog):
            self.run.log.flush()

    def shutdown(self) -> None:
        """Let connected clients hear that the run is over, then close the listener."""
        self.finished.set()
        deadline = time.monotonic() + max(FINISH_GRACE_S, self.deploy.poll_s + 1)
        while time.monotonic() < deadline:
            with self.lock:
                if not any(conn.alive for conn in self.conns.values()):
                    break
            time.sleep(0.1)
        if self._grpc is not None:
            self._grpc.stop(grace=1.0).wait(2.0)
        if self.gate is not None:
            self.gate.close()

    def _wait_for_clients(self) -> None:
        need = self.options.min_clients
        log.info("waiting for %d client(s) at %s", need, self.options.address)
        while not self._interrupted.is_set():
            with self.lock:
                connected = sum(conn.alive for conn in self.conns.values())
            if connected >= need:
                return
            try:
                event = self.events.get(timeout=TICK_S)
            except queue.Empty:
                event = None
            self._tick()
            if event is not None:
                if event[0] in ("update", "aggregate"):  # nothing was sent yet: an update is from before a restart
                    event[-1].set_result((False, "the server restarted; the task is void"))
                elif event[0] != "lost":  # the strategy does not run before the clients are there
                    self._handle(event)
            self._check_liveness()

    def bind(self) -> int:
        """Create the gRPC server behind its gate (:mod:`hetfl.deploy.gate`) and bind its port, refusing a port
        another process holds (no SO_REUSEPORT: two servers never split the clients); serves nothing yet
        (:meth:`_listen` starts it). The port bound (``--address HOST:0`` picks a free one)."""
        if self._grpc is not None:
            return self._port
        d = self.deploy
        self.gate = gate.Gate(self.options.tokens, self._session_client, gate.Limits.of(d))
        # an honest client holds at most two calls (a poll or an upload, and a heartbeat); the gate frees the rest
        o = self.options
        server, port = listen(self.gate, FederationServicer(self), o.address, workers=max(32, 3 * self.n_clients + 16),
                              chunk_bytes=d.chunk_bytes, tls=(o.tls_cert, o.tls_key, o.tls_client_ca))
        self._grpc, self._port = server, port
        return port

    def _session_client(self, session: str) -> int | None:
        with self.lock:
            return self.sessions.get(session)

    def _listen(self) -> None:
        port = self.bind()
        self._grpc.start()
        o = self.options
        host = o.address.rsplit(":", 1)[0] if not o.address.startswith("unix:") else o.address
        where = f"{host}:{port}" if not o.address.startswith("unix:") else o.address
        log.info("listening on %s (%s)", where, "TLS" + (", client certificates required" if o.tls_client_ca else "")
                 if o.tls_cert is not None else "plaintext: use --tls-cert/--tls-key beyond a trusted network")


def listen(gate_: gate.Gate, servicer: Any, address: str, *, workers: int, chunk_bytes: int,
           tls: tuple[bytes | None, bytes | None, bytes | None] = (None, None, None)) -> tuple[grpc.Server, int]:
    """A gRPC server for ``servicer`` behind ``gate_``, bound (not started) at ``address``, TLS when ``tls`` (certificate,
    key, client CA for mutual TLS) has a certificate; the port bound. A port another process holds is refused (no
    SO_REUSEPORT: two servers never split the clients): one line."""
    cert, key, client_ca = tls
    opts = [("grpc.max_receive_message_length", chunk_bytes + (1 << 20)),
            ("grpc.max_send_message_length", chunk_bytes + (1 << 20)),
            ("grpc.so_reuseport", 0),  # a second server on this port must fail to bind, not share it
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),  # clients' keepalive pings
            ("grpc.keepalive_permit_without_calls", 1)]
    pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hetfl-grpc")
    server = grpc.server(pool, interceptors=[gate_], options=opts)
    pb_grpc.add_FederationServicer_to_server(servicer, server)
    in_use = (f"--address {address}: cannot listen there (the port is in use, or the host is not an address of "
              "this machine; GRPC_VERBOSITY=debug says more)")
    try:
        if cert is not None:
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                                require_client_auth=client_ca is not None)
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:
        raise HetflError(in_use) from None
    if port == 0:
        raise HetflError(in_use)
    return server, port


class HeldLog:
    """The run's metrics log, holding each record until the checkpoint of its aggregation is on disk."""

    def __init__(self, log: Any) -> None:
        self.log, self.held = log, []

    def append(self, record: dict[str, Any]) -> None:
        self.held.append(record)

    def flush(self) -> None:
        for record in self.held:
            self.log.append(record)
        self.held = []

    def close(self) -> None:
        self.flush()
        self.log.close()


def measured_timing(round_trip_s: float, download_s: float, train_s: float) -> TaskTiming:
    """A deployed task's time, from what the server and its client measured (the protocol as it is): the download
    and the training as the client reports them (each clipped to what is left of the round trip; not a positive
    finite number: 0), and the upload is the rest of the round trip from dispatch to arrival, so it also holds the
    client's wait before it fetched the task. The server's wait is not separate (0)."""
    def part(seconds: float, left: float) -> float:
        return min(float(seconds), left) if 0 < seconds < math.inf else 0.0

    left = max(round_trip_s, 0.0)
    download = part(download_s, left)
    compute = part(train_s, left - download)
    return TaskTiming(download, compute, left - download - compute)


def _one_line(err: BaseException, limit: int = 300) -> str:
    """An exception as one line: its type and message, whitespace collapsed, cut at ``limit`` characters."""
    text = " ".join(str(err).split())
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shared(obj: Any) -> bool:
    """What a strategy snapshot shares with the live strategy instead of copying (:func:`_snapshot`)."""
    from hetfl.training import LocalTrainer

    return isinstance(obj, (torch.Tensor, torch.nn.Module, Task, Event, LocalTrainer, DeployServer))


def _snapshot(strategy: Strategy) -> tuple[bytes, list] | None:
    """The strategy's attributes, pickled with their containers copied and tensors, modules, tasks, timers and trainers
    shared (kept by reference): cheap (no tensor is copied), and restorable in place (:func:`_restore`), so whoever holds
    the strategy object keeps it. None if something in it cannot be pickled."""
    shared: list = []

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> int | None:
            if _shared(obj):
                shared.append(obj)
                return len(shared) - 1
            return None

    buffer = io.BytesIO()
    try:
        Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(vars(strategy))
    except Exception:  # noqa: BLE001 - a lock, a generator, an open file...: no snapshot, no rollback
        return None
    return buffer.getvalue(), shared


def _restore(strategy: Strategy, snapshot: tuple[bytes, list]) -> None:
    data, shared = snapshot

    class Unpickler(pickle.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            return shared[pid]

    state = Unpickler(io.BytesIO(data)).load()
    vars(strategy).clear()
    vars(strategy).update(state)


def _stats(text: str) -> dict[str, float]:
    """A client's JSON statistics (label entropy, ...) as floats; nothing if they are malformed."""
    try:
        return {k: float(v) for k, v in json.loads(text or "{}").items()}
    except (ValueError, TypeError, AttributeError):
        return {}

