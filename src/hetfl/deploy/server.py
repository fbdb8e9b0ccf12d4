"""The deployment server: the simulator's strategies on the wall clock, with real clients over gRPC.

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
(:func:`hetfl.deploy.validate.check_update`: shape, dtype, finite values, norm bound) before the strategy
sees it. A rejected update is logged, counted (``rejected``) and reported to the strategy as a failed task,
so rounds go on. A client silent for ``deploy.heartbeat_timeout_s`` loses its task the same way.

State. :class:`DeployState` is what a checkpoint holds (global model, strategy, version, counters, the
strategy's timers, tasks in flight, what clients reported); it is saved atomically after every aggregation.
A restarted server loads it, waits for ``min_clients`` to rejoin, and reports the tasks that were in flight
as failed, so the strategy dispatches them again; nothing aggregated is lost.

Evaluation, ``metrics.jsonl``, ``summary.json`` and checkpoints are the simulator's (:class:`hetfl.engine.run.Run`).
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import os
import queue
import secrets
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# gRPC's C core logs its own errors to stderr; hetfl reports them as one line each (GRPC_VERBOSITY=debug shows them)
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # noqa: E402
import numpy as np
import torch
import yaml

from hetfl.config import ExperimentConfig, dump_config, load_config
from hetfl.deploy import federation_pb2 as pb
from hetfl.deploy import federation_pb2_grpc as pb_grpc
from hetfl.deploy import wire
from hetfl.deploy.tokens import TokenTable, load_tokens, read_pem
from hetfl.deploy.validate import check_update
from hetfl.devices import DeviceProfile
from hetfl.devices.table import DeviceTable
from hetfl.engine.simulator import Counters, task_seed
from hetfl.errors import ConfigError, DivergedError, HetflError
from hetfl.results.fairness import fastest, idle_fractions
from hetfl.strategies.base import Strategy, Task, Update

log = logging.getLogger("hetfl.server")

TICK_S = 0.25  # the engine wakes at least this often to check timers and silent clients
RECONNECT_POLL_S = 1.0  # next_available_time() while a known client is disconnected
FINISH_GRACE_S = 3.0  # after the run ends, how long clients get to hear so before the server exits


@dataclass
class Timer:
    """A strategy's timer (the handle ``set_timer`` returns)."""

    at: float
    tag: str
    cancelled: bool = False


@dataclass
class DeployState:
    """Everything that changes during a deployed run: what a checkpoint holds."""

    params: torch.Tensor
    strategy: Strategy
    counters: Counters
    server_rng: np.random.Generator
    version: int = 0
    elapsed: float = 0.0  # wall seconds of the run when the state was saved
    started: bool = False
    timers: list[tuple[float, int, Timer]] = field(default_factory=list)  # a heap
    timer_seq: int = 0
    busy: dict[int, Task] = field(default_factory=dict)  # client -> its task in flight
    n_samples: dict[int, int] = field(default_factory=dict)  # as each client reported at its first join
    client_stats: dict[int, dict[str, float]] = field(default_factory=dict)  # label entropy, labels present
    profiles: list[DeviceProfile] = field(default_factory=list)  # as measured
    measured: dict[int, dict[str, float]] = field(default_factory=dict)  # step_s, down_Bps, up_Bps, hostname...
    rejected: int = 0
    timed_out: int = 0
    client_state: Any = None  # the simulator's per-client state store; in a deployment it stays on each client


@dataclass
class Connection:
    """A joined client, as the handlers see it (not checkpointed: clients rejoin after a restart)."""

    client_id: int
    session: str
    last_seen: float
    outbox: queue.Queue = field(default_factory=queue.Queue)
    alive: bool = False  # connected: set by the engine when the client asks for work, cleared when it goes silent
    public_key: bytes = b""


@dataclass
class ServerOptions:
    """How the server listens and what it enforces (the config's ``deploy`` section plus command-line flags)."""

    address: str
    tokens: TokenTable
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_client_ca: bytes | None = None  # mutual TLS: clients must present a certificate signed by it
    min_clients: int = 1


class DeployServer:
    """Runs ``strategy`` with real clients; implements :class:`hetfl.strategies.base.Server`."""

    def __init__(self, cfg: ExperimentConfig, fed: Any, strategy: Strategy, options: ServerOptions) -> None:
        self.cfg, self.fed, self.options = cfg, fed, options
        self.deploy = cfg.deploy
        self.trainer = fed.trainer
        self.models = fed.models
        self.seed = cfg.seed
        n = cfg.data.n_clients
        median = cfg.devices.compute.median_flops
        self.state = DeployState(
            params=strategy.initial_params(fed.trainer),
            strategy=strategy,
            counters=Counters.for_clients(n),
            server_rng=np.random.default_rng([cfg.seed, 1]),
            profiles=[DeviceProfile(c, 1.0, median, math.inf, math.inf, 0.0, tier="not joined") for c in range(n)],
        )
        self.on_commit: Any = None
        self.checkpoint_due = False
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
        # what the file and --set gave (defaults are the client's own): a short message, and no default-only keys
        self._config_yaml = yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True), sort_keys=False)
        self.secagg = None
        if self.deploy.secure_aggregation:
            from hetfl.deploy.secure import SecureRounds

            self.secagg = SecureRounds(self)

    # ------------------------------------------------------------------ the Server protocol
    @property
    def now(self) -> float:
        return self._now

    @property
    def version(self) -> int:
        return self.state.version

    @property
    def params(self) -> torch.Tensor:
        return self.state.params

    @property
    def rng(self) -> np.random.Generator:
        return self.state.server_rng

    @property
    def strategy(self) -> Strategy:
        return self.state.strategy

    @property
    def counters(self) -> Counters:
        return self.state.counters

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
        return self.models.flops(client_id)

    def num_samples(self, client_id: int) -> int:
        return self.state.n_samples.get(client_id) or self.fed.pool.n_samples(client_id)

    def default_steps(self, client_id: int) -> int:
        return self.models.trainer(client_id).steps_for(self.num_samples(client_id))

    def task_seed(self, task_id: int) -> int:
        return task_seed(self.seed, task_id)

    def available(self) -> list[int]:
        with self.lock:
            alive = [c for c, conn in self.conns.items() if conn.alive]
        return sorted(c for c in alive if c not in self.state.busy)

    def next_available_time(self) -> float:
        """Soon, while a client the tokens know is disconnected (it may come back); never, otherwise."""
        with self.lock:
            alive = {c for c, conn in self.conns.items() if conn.alive}
        return self.now + RECONNECT_POLL_S if self.options.tokens.clients - alive else math.inf

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
        steps = self.default_steps(client_id) if steps is None else steps
        task = st.counters.new_task(client_id, st.version, st.params, steps, self.now, payload, options)
        task.bytes_up = st.strategy.transfer_bytes(self, task)[1]
        task.flops = st.strategy.task_flops(self, task)
        st.busy[client_id] = task
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

    def set_timer(self, at: float, tag: str) -> Timer:
        st = self.state
        timer = Timer(max(at, self.now), tag)
        heapq.heappush(st.timers, (timer.at, st.timer_seq, timer))
        st.timer_seq += 1
        return timer

    def cancel_timer(self, handle: Timer) -> None:
        handle.cancelled = True

    def commit(self, params: torch.Tensor, updates: list[Update], *, dropped: int = 0) -> None:
        if not torch.isfinite(params).all():
            raise DivergedError(
                f"the global model became non-finite at aggregation {self.version + 1}; "
                "lower training.lr or the strategy's server_lr, or bound updates with deploy.max_update_norm"
            )
        st = self.state
        st.counters.count_commit(st.version, updates, dropped)
        st.params = params
        st.version += 1
        self.checkpoint_due = True
        log.info("aggregation %d: %d update(s)%s", st.version, len(updates), f", {dropped} dropped" if dropped else "")
        if self.on_commit is not None:
            self.on_commit(self)

    # ------------------------------------------------------------------ what Run asks of an engine
    def engine_metrics(self) -> dict[str, Any]:
        with self.lock:
            connected = sum(conn.alive for conn in self.conns.values())
        steps = [m["step_s"] for m in self.state.measured.values() if m.get("step_s")]
        return {
            "rejected": self.state.rejected,
            "timed_out": self.state.timed_out,
            "clients_connected": connected,
            "step_s_mean": float(np.mean(steps)) if steps else None,
        }

    def busy_time(self) -> np.ndarray:
        busy = self.state.counters.busy_s.copy()
        for client, task in self.state.busy.items():
            busy[client] += self.now - task.dispatched_at
        return busy

    def fairness(self, *, window: bool = True) -> dict[str, Any]:
        # online time: a deployment does not know when a device was reachable but idle; the run's duration is it
        idle = idle_fractions(self.busy_time(), np.full(self.n_clients, self.now))
        return self.state.counters.fairness(idle, fastest([p.flops for p in self.profiles]), window=window)

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
            secagg_json=json.dumps(secagg) if secagg else "",
        )
        return list(wire.chunks(pb.Chunk(task=header), blobs, self.deploy.chunk_bytes))

    def send_control(self, client_id: int, header: pb.TaskHeader) -> None:
        """Queue a message without tensors (secure aggregation's unmasking request) for a client's next poll."""
        key = -1 - self.state.timer_seq  # negative ids never collide with task ids
        self.state.timer_seq += 1
        with self.lock:
            self.outgoing[key] = [pb.Chunk(task=header)]
            conn = self.conns.get(client_id)
        if conn is not None:
            conn.outbox.put(key)

    def _forget(self, task: Task) -> None:
        """``task`` is over (arrived, failed or cancelled): free its client, drop its unsent stream."""
        st = self.state
        del st.busy[task.client_id]
        st.counters.busy_s[task.client_id] += self.now - task.dispatched_at
        with self.lock:
            self.outgoing.pop(task.task_id, None)
            self.handed_out.discard(task.task_id)

    def fail(self, task: Task, reason: str, *, timed_out: bool = False, rejected: bool = False) -> None:
        """``task`` is lost: log why and tell the strategy (the round or group goes on without it)."""
        if self.state.busy.get(task.client_id) is not task:
            return
        self._forget(task)
        self.state.counters.failed += 1
        self.state.timed_out += timed_out
        self.state.rejected += rejected
        if rejected:
            log.warning("client %d: update for task %d rejected: %s", task.client_id, task.task_id, reason)
        else:
            log.warning("client %d lost task %d: %s", task.client_id, task.task_id, reason)
        if self.secagg is not None:
            self.secagg.failed(task)
        self.state.strategy.on_failure(self, task)

    def reject(self, task: Task, reason: str) -> None:
        """``task``'s update failed validation: logged, counted in ``rejected``, never aggregated; the task is lost."""
        self.fail(task, reason, rejected=True)

    # ------------------------------------------------------------------ engine events
    def _on_join(self, client_id: int, report: pb.DeviceReport, hostname: str) -> None:
        st = self.state
        task = st.busy.get(client_id)
        if task is not None:
            self.fail(task, "the client joined again without it (it restarted or lost the connection)")
        if client_id not in st.n_samples:
            st.n_samples[client_id] = int(report.n_samples)
        elif st.n_samples[client_id] != report.n_samples:
            log.warning("client %d now reports %d samples (had %d); weights keep the first figure",
                        client_id, report.n_samples, st.n_samples[client_id])
        st.client_stats[client_id] = _stats(report.stats_json)
        st.measured.setdefault(client_id, {})["hostname"] = hostname
        profile = st.profiles[client_id]
        if profile.tier == "not joined":
            st.profiles[client_id] = replace(profile, tier="joined")
        log.info("client %d joined from %s with %d samples", client_id, hostname or "?", report.n_samples)

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
        self._measure(client_id, task, header, nbytes)
        params = tensors.get("params")
        if self.secagg is not None:
            return self.secagg.on_masked(task, header, params)
        if params is None:
            reason = "the update carries no parameters"
        else:
            if metas["params"].get("delta") and params.shape == task.params.shape:
                params = task.params + params.to(task.params.dtype)
            reason = check_update(params, reference=task.params, max_norm=self.deploy.max_update_norm)
        if reason is None:  # the parameters were checked above; the payload now
            bad = [k for k, t in tensors.items() if k != "params" and t.is_floating_point() and not torch.isfinite(t).all()]
            reason = f"non-finite values in {bad[0]}" if bad else None
        if reason is None and (header.steps < 1 or not math.isfinite(header.loss)):
            reason = f"it reports {header.steps} local steps and loss {header.loss}"  # FedNova divides by steps
        if reason is not None:
            self.reject(task, reason)
            return False, reason
        self._forget(task)
        stats = _stats(header.stats_json)
        update = Update(
            task=task, params=params, n_samples=self.num_samples(client_id), steps=int(header.steps),
            loss=float(header.loss), arrived_at=self.now,
            payload={k.removeprefix("payload:"): v for k, v in tensors.items() if k.startswith("payload:")},
            stats={**st.client_stats.get(client_id, {}), **stats}, arrived_version=st.version,
        )
        st.counters.trained_steps += st.strategy.compute_steps(update.steps)
        st.counters.trained_flops += task.flops
        st.strategy.on_update(self, update)
        return True, ""

    def _measure(self, client_id: int, task: Task, header: pb.UpdateHeader, nbytes: int) -> None:
        """Record what the client measured: seconds per step, its link's rates; its profile follows them."""
        st = self.state
        m = st.measured.setdefault(client_id, {})
        if header.step_s > 0:
            m["step_s"] = float(header.step_s)
        if header.download_s > 0 and header.download_bytes > 0:
            m["down_Bps"] = header.download_bytes / header.download_s
        if header.upload_Bps > 0:
            m["up_Bps"] = float(header.upload_Bps)
        m["round_trip_s"] = self.now - task.dispatched_at
        m["updates"] = m.get("updates", 0) + 1
        profile = st.profiles[client_id]
        flops = self.step_flops(client_id) / m["step_s"] if m.get("step_s") else profile.flops
        st.profiles[client_id] = replace(
            profile, flops=flops, speed=flops / self.cfg.devices.compute.median_flops,
            down_Bps=m.get("down_Bps", profile.down_Bps), up_Bps=m.get("up_Bps", profile.up_Bps), tier="measured",
        )

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
            if task is not None:
                self.fail(task, f"no heartbeat for {quiet:.1f} s", timed_out=True)
        limit = self.deploy.task_timeout_s
        if limit is not None:
            for task in list(self.state.busy.values()):
                if self.now - task.dispatched_at > limit:
                    self.fail(task, f"not returned within task_timeout_s {limit:g}", timed_out=True)

    def _fire_timers(self) -> None:
        timers = self.state.timers
        while timers and timers[0][0] <= self.now and not self.stopping:
            _, _, timer = heapq.heappop(timers)
            if not timer.cancelled:
                self.state.strategy.on_timer(self, timer.tag)

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "join":
            self._on_join(*event[1:])
        elif kind == "update":
            *args, reply = event[1:]
            try:
                reply.set_result(self._on_update(*args))
            except BaseException as err:
                reply.set_result((False, "the server failed to process the update"))
                raise err
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
        """Listen, wait for ``min_clients``, run the strategy until the run stops; the run's status."""
        self.run = run
        run.log = HeldLog(run.log)
        self._t0 = time.monotonic() - self.state.elapsed
        self._tick()
        self._listen()
        status = "completed"
        try:
            self._wait_for_clients()
            if self._resumed:
                lost = sorted(self.state.busy.values(), key=lambda t: t.task_id)
                for task in lost:
                    self.fail(task, "in flight when the server stopped")
                if not self.state.busy and not any(not t.cancelled for _, _, t in self.state.timers):
                    self.state.strategy.start(self)  # nothing pending: begin again from the restored model
            elif not self.state.started:
                self.state.started = True
                self.state.strategy.start(self)
            self._seal()
            if self.state.version >= self.cfg.rounds:
                self.stop("rounds")
            idle_since = None
            while not self.stopping:
                self._tick()
                wait = TICK_S
                if self.state.timers:
                    wait = max(0.0, min(wait, self.state.timers[0][0] - self.now))
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
                pending = self.state.busy or any(not t.cancelled for _, _, t in self.state.timers)
                if pending or event is not None:
                    idle_since = None
                elif idle_since is None:
                    idle_since = self.now
                elif self.now - idle_since > 2 * self.deploy.heartbeat_timeout_s + self.deploy.poll_s:
                    self.stop("stalled")  # nothing in flight, no timer: the strategy waits for nothing
            if self.stop_reason == "stalled":
                status = "stalled"
        except KeyboardInterrupt:
            status = "interrupted"
            log.warning("interrupted: saving the state")
        finally:
            self.finished.set()
            self._drain()
        self._tick()
        return status

    def _drain(self) -> None:
        """Answer what arrived after the run stopped (updates are not used any more)."""
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            if event[0] == "update":
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

    def _wait_for_clients(self) -> None:
        need = self.options.min_clients
        log.info("waiting for %d client(s) at %s", need, self.options.address)
        while True:
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
                if event[0] == "update":  # an update from before a restart: its task is gone
                    event[-1].set_result((False, "the server restarted; the task is void"))
                else:
                    self._handle(event)
            self._check_liveness()

    def _listen(self) -> None:
        opts = [("grpc.max_receive_message_length", self.deploy.chunk_bytes + (1 << 20)),
                ("grpc.max_send_message_length", self.deploy.chunk_bytes + (1 << 20)),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),  # clients' keepalive pings
                ("grpc.keepalive_permit_without_calls", 1)]
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=max(16, 3 * self.n_clients + 4)), options=opts)
        pb_grpc.add_FederationServicer_to_server(_Servicer(self), server)
        o = self.options
        try:
            if o.tls_cert is not None:
                creds = grpc.ssl_server_credentials(
                    [(o.tls_key, o.tls_cert)], root_certificates=o.tls_client_ca,
                    require_client_auth=o.tls_client_ca is not None,
                )
                port = server.add_secure_port(o.address, creds)
            else:
                port = server.add_insecure_port(o.address)
        except RuntimeError:
            raise HetflError(f"--address {o.address}: cannot listen there (in use, or not an address of this machine; "
                             "GRPC_VERBOSITY=debug says more)") from None
        if port == 0:
            raise HetflError(f"--address {o.address}: cannot listen there (in use, or not an address of this machine)")
        server.start()
        self._grpc = server
        log.info("listening on %s (%s)", o.address, "TLS" + (", client certificates required" if o.tls_client_ca else "")
                 if o.tls_cert is not None else "plaintext: use --tls-cert/--tls-key beyond a trusted network")


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


def _stats(text: str) -> dict[str, float]:
    """A client's JSON statistics (label entropy, ...) as floats; nothing if they are malformed."""
    try:
        return {k: float(v) for k, v in json.loads(text or "{}").items()}
    except (ValueError, TypeError, AttributeError):
        return {}


def _last_logged_round(path: Path) -> int | None:
    from hetfl.results.metrics import read_metrics

    records = read_metrics(path) if path.is_file() else []
    return records[-1]["round"] if records else None


class _Servicer(pb_grpc.FederationServicer):
    """The gRPC handlers: they talk to the engine through its queue, never to the strategy."""

    def __init__(self, server: DeployServer) -> None:
        self.s = server

    def _client(self, session: str, context: grpc.ServicerContext) -> Connection:
        s = self.s
        with s.lock:
            client = s.sessions.get(session)
            conn = s.conns.get(client) if client is not None else None
            if conn is not None and conn.session == session:
                conn.last_seen = time.monotonic()
                return conn
        context.abort(grpc.StatusCode.NOT_FOUND, "unknown session (the server restarted or the client joined again): join again")
        raise AssertionError  # abort raises

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        s = self.s
        client, reason = s.options.tokens.identify(request.token)
        peer = context.peer()
        if client is None:
            log.warning("refused a join from %s: %s", peer, reason)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{reason}: the server refused it")
        if request.device.n_samples < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the client reports no training samples")
        if s.finished.is_set():
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the run is over")
        session = secrets.token_hex(16)
        with s.lock:
            old = s.conns.get(client)
            if old is not None:
                s.sessions.pop(old.session, None)
            s.conns[client] = Connection(client, session, time.monotonic(), public_key=bytes(request.device.public_key))
            s.sessions[session] = client
        s.events.put(("join", client, request.device, request.device.hostname or peer))
        setup = dict(s._setup, architecture=int(s.models.of_client[client]))
        return pb.JoinReply(client_id=client, session=session, config_yaml=s._config_yaml, setup_json=json.dumps(setup))

    def GetTask(self, request: pb.TaskRequest, context: grpc.ServicerContext):
        s = self.s
        conn = self._client(request.session, context)
        if not conn.alive:
            s.events.put(("ready", conn))
        task = s.state.busy.get(conn.client_id)
        with s.lock:
            lost = task is not None and task.task_id in s.handed_out
        if lost:
            s.events.put(("lost", conn.client_id, task.task_id, "the client asked for work while holding it (its stream broke)"))
        deadline = time.monotonic() + s.deploy.poll_s
        while context.is_active() and time.monotonic() < deadline:
            if s.finished.is_set():
                yield pb.Chunk(task=pb.TaskHeader(kind=pb.TaskHeader.FINISHED, message=f"run over ({s.stop_reason})"))
                with s.lock:
                    conn.alive = False
                return
            try:
                key = conn.outbox.get(timeout=0.5)
            except queue.Empty:
                conn.last_seen = time.monotonic()
                continue
            with s.lock:
                stream = s.outgoing.pop(key, None)
                if stream is not None and key >= 0:
                    s.handed_out.add(key)
            if stream is None:
                continue  # cancelled before the client asked
            yield from stream
            conn.last_seen = time.monotonic()
            return
        yield pb.Chunk(task=pb.TaskHeader(kind=pb.TaskHeader.NONE))

    def SendUpdate(self, request_iterator, context: grpc.ServicerContext) -> pb.Ack:
        s = self.s
        try:
            first = next(request_iterator)
        except StopIteration:
            return pb.Ack(accepted=False, reason="empty stream")
        if first.WhichOneof("part") != "update":
            return pb.Ack(accepted=False, reason="the stream must begin with an UpdateHeader")
        header = first.update
        conn = self._client(header.session, context)
        try:
            tensors, metas, nbytes = wire.collect(header.tensors, request_iterator)
        except wire.WireError as err:
            s.events.put(("lost", conn.client_id, header.task_id, f"malformed update: {err}"))
            return pb.Ack(accepted=False, reason=str(err))
        reply: futures.Future = futures.Future()
        s.events.put(("update", conn.client_id, header, tensors, metas, nbytes, reply))
        conn.last_seen = time.monotonic()
        while True:
            try:
                accepted, reason = reply.result(timeout=0.5)
                return pb.Ack(accepted=accepted, reason=reason)
            except futures.TimeoutError:
                if s.finished.is_set():  # the engine has stopped: nobody will look at it
                    return pb.Ack(accepted=False, reason="the run is over")

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        conn = self._client(request.session, context)
        task = self.s.state.busy.get(conn.client_id)
        return pb.HeartbeatReply(task_wanted=task is not None and task.task_id == request.task_id)


# ---------------------------------------------------------------------------- the command
def serve_command(
    config: str, *, address: str, out: str, overrides: list[str] | None = None, tokens: str | None = None,
    tls_cert: str | None = None, tls_key: str | None = None, tls_client_ca: str | None = None,
    min_clients: int | None = None, fresh: bool = False, quiet: bool = False,
) -> dict[str, Any]:
    """``hetfl server``: run ``config`` with real clients at ``address``; results in ``out`` (resumed if it has a checkpoint)."""
    from hetfl.engine.run import CHECKPOINT, Run, _check_resumable_change, build_federation

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    cfg = load_config(config, overrides)
    if (tls_cert is None) != (tls_key is None):
        raise HetflError("--tls-cert and --tls-key go together (the server's certificate and its private key)")
    if tls_client_ca is not None and tls_cert is None:
        raise HetflError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
    cert, key, client_ca = read_pem(tls_cert, "--tls-cert"), read_pem(tls_key, "--tls-key"), read_pem(tls_client_ca, "--tls-client-ca")
    token_file = tokens or cfg.deploy.tokens
    if token_file is None:
        raise HetflError("no token file: give --tokens FILE or set deploy.tokens (hetfl tokens N --out FILE makes one)")
    table = load_tokens(token_file, cfg.data.n_clients)
    need = min_clients or cfg.deploy.min_clients or cfg.data.n_clients
    if need > len(table.clients):
        raise ConfigError(f"min_clients {need}: the token file {token_file} lets only {len(table.clients)} clients in")
    out_dir = Path(out)
    resume = (out_dir / CHECKPOINT).is_file() and not fresh
    if resume:  # the federation must be the checkpoint's: compare with the config the run was started with
        _check_resumable_change(load_config(out_dir / "config.yaml"), cfg)
    fed = build_federation(cfg)
    strategy = fed.strategy()
    if not strategy.global_model:
        raise ConfigError(
            f"strategy.name: {strategy.name} has no global model for the server to evaluate; "
            "deployment runs algorithms with a global model"
        )
    if cfg.deploy.secure_aggregation and not strategy.linear_aggregation:
        raise ConfigError(
            f"deploy.secure_aggregation: {strategy.name} does not aggregate by a weighted mean of the updates, "
            "which is all the server learns under secure aggregation; use fedavg or fedprox"
        )
    if cfg.deploy.secure_aggregation and _robust(cfg):
        raise ConfigError("deploy.secure_aggregation: a robust aggregator needs each update, which secure aggregation hides")
    privacy = getattr(cfg.strategy, "privacy", None)
    if cfg.deploy.secure_aggregation and privacy is not None and privacy.enabled:
        raise ConfigError("deploy.secure_aggregation: strategy.privacy clips each client's change at the server, which "
                          "secure aggregation hides; use one or the other")
    if cfg.deploy.secure_aggregation and cfg.deploy.max_update_norm is not None:
        raise ConfigError("deploy.secure_aggregation: deploy.max_update_norm bounds each update, which secure "
                          "aggregation hides (clients clip each entry to deploy.secagg_clip instead); use one or the other")
    server = DeployServer(cfg, fed, strategy, ServerOptions(address, table, cert, key, client_ca, need))
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        for stale in ("metrics.jsonl", "summary.json", CHECKPOINT):
            (out_dir / stale).unlink(missing_ok=True)
    (out_dir / "config.yaml").write_text(dump_config(cfg))
    _log_to_file(out_dir / "server.log")
    run = Run(cfg, out_dir, fed, strategy, resume=resume, engine=server)
    if resume:
        server._resumed = True
        log.info("resumed from %s at aggregation %d (%.1f s into the run)", out_dir / CHECKPOINT, server.version,
                 server.state.elapsed)
        if _last_logged_round(out_dir / "metrics.jsonl") != server.version and (
                server.version % cfg.evaluation.every == 0 or server.version >= cfg.rounds):
            run.evaluate()  # killed between the checkpoint and its metrics line: write it now
    status = "completed"
    try:
        status = server.serve(run)
    except DivergedError:
        server.finished.set()
        server.shutdown()
        run.finish("diverged")  # summary.json says so, as the simulator's does; the CLI prints the error
        raise
    finally:
        server.finished.set()
    if run.tracker.last.get("round") != server.version:
        run.evaluate()
    server.save()
    server.shutdown()
    _write_devices(out_dir / "devices.json", server)
    # summary.json's client_speed: the speeds measured here, not those of the (ignored) devices section
    run.fed = replace(run.fed, profiles=DeviceTable.from_profiles(server.profiles))
    return run.finish(status)


def _robust(cfg: ExperimentConfig) -> bool:
    aggregator = getattr(cfg.strategy, "aggregator", None)
    rule = getattr(aggregator, "rule", None) if aggregator is not None else None
    return rule not in (None, "mean")


def _log_to_file(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logging.getLogger("hetfl").addHandler(handler)


def _write_devices(path: Path, server: DeployServer) -> None:
    """What each client reported and was measured to do: ``devices.json`` in the run directory."""
    st = server.state
    rows = []
    for c in range(server.n_clients):
        p = st.profiles[c]
        rows.append({
            "client_id": c, "n_samples": st.n_samples.get(c), **st.measured.get(c, {}),
            "speed": p.speed if p.tier == "measured" else None, "participation": int(st.counters.participation[c]),
        })
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=2, default=float))
    os.replace(tmp, path)
