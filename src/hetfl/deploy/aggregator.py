"""``hetfl aggregator``: a leaf aggregator between clients and a ``hetfl server`` (hierarchical, event-driven aggregation).

Paper: Shixiong Qi, K. K. Ramakrishnan, Myungjin Lee, "LIFL: A Lightweight, Event-driven Serverless Platform for
Federated Learning" (MLSys 2024, arXiv 2405.10968).

From the paper: clients' updates go to leaf aggregators placed close to them, which aggregate and pass the result up
to a top aggregator, so the top one merges a few partial aggregates instead of every update (hierarchical
aggregation, which the paper notes is commonly used to speed up FL at scale). Aggregation is event-driven: an
aggregator is invoked by the arrival of an update and folds it in eagerly, instead of waiting for the whole round
before it starts. The number of aggregators follows the load (serverless scaling, with aggregators reused rather than
started cold), and placement is locality-aware, with shared memory between aggregators on one node and eBPF sidecars
instead of a message broker.

Our choices: one process per leaf (``hetfl aggregator --parent HOST:PORT``), placed by whoever starts it near its
clients; how many there are is the operator's choice (no autoscaling, no shared memory: processes on a network). The
top aggregator is the server's strategy itself. A leaf keeps, per model version, a running sample-weighted sum in
float64 (:class:`PreAggregate`: each update is folded in as it arrives) and forwards the mean with each member's task
id, weight, steps, loss, statistics and timings (``SendAggregate``) when it holds ``--fan-in`` updates of that version,
when every task it relayed for that version is back (or no longer wanted), or ``--flush-s`` seconds after the first
one it held, whichever comes first. The server hands its strategy, for every member, the update
:func:`hetfl.strategies.checks.secure_updates` makes of the group, which is exact only for a strategy whose
aggregation depends on the updates through their weighted mean (``Strategy.linear_aggregation``: FedAvg, FedProx);
the server refuses aggregators with any other strategy, and with secure aggregation.

The leaf relays the clients' control calls (Join, GetTask, Heartbeat) to the server with the clients' own credentials
(the server keeps the only token table) and its own aggregator token (``hetfl-aggregator-bin``); clients need no
change (``hetfl client --server AGGREGATOR:PORT``). Each client's upload ends at the leaf: it authenticates the
client's session before reading (its own :class:`~hetfl.deploy.gate.Gate`, with the server's deadlines and bounds),
bounds the upload by the task's model size, checks the update as the server would (shape, dtype, finite values, no
payload, finite statistics, steps and loss) and weights it by the sample count the server sent with the task. The
client's SendUpdate is answered with the server's verdict on the aggregate that carried it, so heartbeats go on
meanwhile.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
import yaml

from hetfl.config import DeployConfig, UpdateNormConfig
from hetfl.deploy import federation_pb2 as pb
from hetfl.deploy import federation_pb2_grpc as pb_grpc
from hetfl.deploy import gate, wire
from hetfl.deploy.channel import open_channel, tls_problem
from hetfl.deploy.validate import NormBound, change_norm, check_report, check_stats, check_update
from hetfl.errors import HetflError

log = logging.getLogger("hetfl.aggregator")

RELAYED_KEYS = (gate.TOKEN_KEY, gate.SESSION_KEY, gate.INSTANCE_KEY)  # a client's credentials, passed on as they came
TICK_S = 0.05  # how often held groups are checked for their flush
FINISH_GRACE_S = 15.0  # after the server ended the run, how long the aggregator waits for its clients to hear it
UPLOAD_MARGIN = 2.0  # an upload may be this many times its task's model bytes (plus a chunk), as at the server


@dataclass
class Group:
    """The updates of one model version held by the aggregator: their running sample-weighted sum."""

    version: int
    total: torch.Tensor  # sum of n_k * w_k, float64
    weight: int = 0  # sum of n_k
    members: list[pb.Member] = field(default_factory=list)
    replies: list[futures.Future] = field(default_factory=list)
    first_at: float = 0.0
    dtype: torch.dtype = torch.float32

    def mean(self) -> torch.Tensor:
        """The sample-weighted mean of the members' params, taken in float64, in the models' dtype."""
        return (self.total / self.weight).to(self.dtype)


class PreAggregate:
    """Eager pre-aggregation: each update is folded into its version's running weighted sum as it arrives."""

    def __init__(self) -> None:
        self.groups: dict[int, Group] = {}

    def add(self, version: int, params: torch.Tensor, weight: int, member: pb.Member,
            reply: futures.Future | None = None, now: float = 0.0) -> Group:
        group = self.groups.get(version)
        if group is None:
            group = self.groups[version] = Group(version, torch.zeros(params.shape, dtype=torch.float64), first_at=now,
                                                 dtype=params.dtype)
        group.total += weight * params.double()
        group.weight += weight
        group.members.append(member)
        if reply is not None:
            group.replies.append(reply)
        return group

    def take(self, version: int) -> Group | None:
        return self.groups.pop(version, None)


@dataclass
class Relayed:
    """A task the aggregator relayed to its client: what it needs to check and weight the update."""

    task_id: int
    client_id: int
    version: int
    weight: int
    reference: torch.Tensor  # the model the task started from
    held: bool = False


@dataclass
class AggregatorOptions:
    parent: str
    address: str
    token: str  # this aggregator's token (the server's token file, 'aggregators')
    tls_ca: bytes | None = None  # the server's CA (TLS to the parent)
    tls_cert: bytes | None = None  # this aggregator's certificate and key for its own listener (clients use TLS)
    tls_key: bytes | None = None
    parent_cert: bytes | None = None  # mutual TLS to the parent
    parent_key: bytes | None = None
    fan_in: int = 0  # forward once this many updates of a version are held (0: no count limit)
    flush_s: float = 5.0
    chunk_bytes: int = wire.DEFAULT_CHUNK_BYTES
    give_up_after_s: float = 600.0


class Aggregator(pb_grpc.FederationServicer):
    """The leaf's gRPC handlers (clients call them) and its forwarding to the parent (module docstring)."""

    def __init__(self, options: AggregatorOptions) -> None:
        self.o = options
        self.channel = open_channel(options.parent, options.tls_ca, options.parent_key, options.parent_cert)
        self.parent = pb_grpc.FederationStub(self.channel)
        self.lock = threading.Lock()
        self.sessions: dict[str, int] = {}  # session -> client, from the joins relayed
        self.tasks: dict[int, Relayed] = {}
        self.pool = PreAggregate()
        self.wake = threading.Event()
        self.finished_at: float | None = None
        self.told: set[int] = set()  # clients told that the run is over
        self.parent_ok_at = time.monotonic()
        self.stats = {"updates_in": 0, "bytes_in": 0, "aggregates_out": 0, "bytes_out": 0}
        self.gate = gate.Gate(None, self._session_client, gate.Limits())
        self.norm_bound = NormBound(UpdateNormConfig())  # the server's deploy.update_norm once a client joined
        self.norm_history: dict[int, list[float]] = {}  # the adaptive bound's recent scores, as the server keeps them
        self._grpc: grpc.Server | None = None
        self.port = 0

    # ------------------------------------------------------------------ relaying
    def _session_client(self, session: str) -> int | None:
        with self.lock:
            return self.sessions.get(session)

    def _metadata(self, context: grpc.ServicerContext | None) -> list[tuple[str, Any]]:
        """The client's credentials as they came, and this aggregator's token."""
        passed = [(k, v) for k, v in (context.invocation_metadata() if context is not None else ()) if k in RELAYED_KEYS]
        return [*passed, (gate.AGGREGATOR_KEY, self.o.token.encode())]

    @staticmethod
    def _timeout(context: grpc.ServicerContext) -> float:
        left = context.time_remaining()
        return left if left is not None and left < 3600 else 60.0

    def _relay(self, call: Any, request: Any, context: grpc.ServicerContext) -> Any:
        """``call(request)`` at the parent with the client's credentials; its error is the client's."""
        try:
            reply = call(request, metadata=self._metadata(context), timeout=self._timeout(context))
        except grpc.RpcError as err:
            context.abort(err.code(), err.details() or err.code().name)
        self.parent_ok_at = time.monotonic()
        return reply

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        reply = self._relay(self.parent.Join, request, context)
        with self.lock:
            for session, client in [(s, c) for s, c in self.sessions.items() if c == reply.client_id]:
                del self.sessions[session]  # its old session ends with the new join, as at the server
            self.sessions[reply.session] = reply.client_id
            for task in [t for t in self.tasks.values() if t.client_id == reply.client_id and not t.held]:
                del self.tasks[task.task_id]  # it joined again without it
        deploy = (yaml.safe_load(reply.config_yaml) or {}).get("deploy") or {}
        self.gate.limits = gate.Limits.of(deploy if isinstance(deploy, dict) else {})  # the server's deadlines
        self.norm_bound = self.bound_of(deploy)
        return reply

    @staticmethod
    def bound_of(deploy: Any) -> NormBound:
        """The server's norm bound (``deploy.update_norm``, ``deploy.max_update_norm`` of the config it sends at a
        join), which this aggregator applies to each update it reads: the server sees only their mean."""
        try:
            cfg = DeployConfig.model_validate(deploy if isinstance(deploy, dict) else {})
        except ValueError:
            cfg = DeployConfig()
        return NormBound(cfg.update_norm, cfg.max_update_norm)

    def bounded(self, params: torch.Tensor, reference: torch.Tensor, steps: int) -> str | None:
        """Why an update's change is too large for the norm bound (None: within it, and remembered by the adaptive
        bound's history, as the server does for the updates it reads)."""
        norm = change_norm(params, reference)
        with self.lock:
            reason = self.norm_bound.check(norm, steps, params.numel(), self.norm_history)
            if reason is None:
                self.norm_bound.accepted(norm, steps, params.numel(), self.norm_history)
        return reason

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        reply = self._relay(self.parent.Heartbeat, request, context)
        if not reply.task_wanted:
            self._drop(request.task_id)
        return reply

    def GetTask(self, request: pb.TaskRequest, context: grpc.ServicerContext):
        call = gate.current()
        client = call.client if call is not None else None
        with self.lock:  # a client that asks for work has no task in flight (any it had is lost)
            for task in [t for t in self.tasks.values() if t.client_id == client and not t.held]:
                del self.tasks[task.task_id]
        self.wake.set()
        try:
            stream = self.parent.GetTask(request, metadata=self._metadata(context), timeout=self._timeout(context))
            context.add_callback(stream.cancel)
            header, data = None, bytearray()
            for chunk in stream:
                part = chunk.WhichOneof("part")
                if part == "task":
                    header = chunk.task
                    self.gate.expect(sum(int(t.nbytes) for t in header.tensors))  # its deadline grows with the bytes
                elif part == "data" and header is not None and header.kind == pb.TaskHeader.TRAIN:
                    data += chunk.data
                yield chunk
        except grpc.RpcError as err:
            context.abort(err.code(), err.details() or err.code().name)
        self.parent_ok_at = time.monotonic()
        if header is None or client is None:
            return
        if header.kind == pb.TaskHeader.TRAIN:
            self._relayed(client, header, data)
        elif header.kind == pb.TaskHeader.FINISHED:
            with self.lock:
                self.told.add(client)
                self.finished_at = self.finished_at or time.monotonic()

    def _relayed(self, client: int, header: pb.TaskHeader, data: bytearray) -> None:
        """Remember a TRAIN task passed to ``client``: its start model (the reference of its update) and weight."""
        offset = 0
        for spec in header.tensors:
            if spec.name == "params":
                reference, _ = wire.decode_tensor(spec, memoryview(data)[offset: offset + spec.nbytes])
                break
            offset += spec.nbytes
        else:
            return
        with self.lock:
            self.tasks[header.task_id] = Relayed(header.task_id, client, header.version, int(header.weight), reference)

    def _drop(self, task_id: int) -> None:
        """The server no longer wants ``task_id``: not awaited any more (a held update still goes, and is ignored)."""
        with self.lock:
            task = self.tasks.get(task_id)
            if task is not None and not task.held:
                del self.tasks[task_id]
        self.wake.set()

    # ------------------------------------------------------------------ updates
    def SendUpdate(self, request_iterator, context: grpc.ServicerContext) -> pb.Ack:
        call = gate.current()
        client = call.client if call is not None else None
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "update":
            return pb.Ack(accepted=False, reason="the stream must begin with an UpdateHeader")
        header = first.update
        if header.unmask_share:
            return pb.Ack(accepted=False, reason="secure aggregation does not pass through an aggregator")
        with self.lock:
            task = self.tasks.get(header.task_id)
        if task is None or task.client_id != client or task.held:
            return pb.Ack(accepted=False, reason=f"task {header.task_id} is no longer wanted (cancelled, timed out, or "
                          "not relayed by this aggregator)")  # nothing read
        cap = int(UPLOAD_MARGIN * task.reference.numel() * max(4, task.reference.element_size())) + self.o.chunk_bytes
        try:
            tensors, metas, nbytes = wire.collect(header.tensors, request_iterator, max_bytes=cap, on_header=self.gate.expect)
            reason = None
        except wire.WireError as err:
            tensors, metas, nbytes, reason = {}, {}, 0, f"malformed update: {err}"
        params = tensors.get("params")
        if reason is None:
            reason = _check(task, header, tensors, metas)
        if reason is None and metas["params"].get("delta"):
            params = task.reference + params.to(task.reference.dtype)
        if reason is None:
            reason = self.bounded(params, task.reference, int(header.steps))
        member = pb.Member(task_id=task.task_id, client_id=client, n_samples=task.weight, steps=header.steps,
                           loss=header.loss, stats_json=header.stats_json, train_s=header.train_s, step_s=header.step_s,
                           download_s=header.download_s, download_bytes=header.download_bytes,
                           upload_Bps=header.upload_Bps)
        reply: futures.Future = futures.Future()
        with self.lock:
            self.stats["updates_in"] += 1
            self.stats["bytes_in"] += nbytes
            task.held = True
            if reason is not None:  # told to the server at once: it fails the task
                member.rejected = reason
                group = Group(task.version, torch.zeros(0, dtype=torch.float64), members=[member])
            else:
                group = None
                self.pool.add(task.version, params, task.weight, member, reply, time.monotonic())
        if group is not None:
            self._forward(group)
            return pb.Ack(accepted=False, reason=reason)
        self.wake.set()
        while True:
            try:
                accepted, why = reply.result(timeout=0.5)
                return pb.Ack(accepted=accepted, reason=why)
            except futures.TimeoutError:
                if not context.is_active():
                    return pb.Ack(accepted=False, reason="cancelled")

    def _due(self, now: float) -> list[Group]:
        """The held groups to forward now: ``--fan-in`` reached, nothing more awaited for their version, or held
        ``--flush-s``."""
        with self.lock:
            out = []
            for version, group in list(self.pool.groups.items()):
                awaited = any(t.version == version and not t.held for t in self.tasks.values())
                if ((self.o.fan_in and len(group.members) >= self.o.fan_in) or not awaited
                        or now - group.first_at >= self.o.flush_s):
                    out.append(self.pool.take(version))
            return out

    def _forward(self, group: Group) -> None:
        """Send ``group`` to the parent (the weighted mean, unless every member was rejected) and give each member's
        client the parent's verdict."""
        header = pb.AggregateHeader(version=group.version, members=group.members)
        blobs = []
        if group.weight > 0:
            spec, blob = wire.encode_tensor("params", group.mean())
            header.tensors.append(spec)
            blobs.append(blob)
        nbytes = sum(len(b) for b in blobs)
        try:
            ack = self.parent.SendAggregate(wire.chunks(pb.Chunk(aggregate=header), blobs, self.o.chunk_bytes),
                                            metadata=self._metadata(None), timeout=60.0 + nbytes / 10_000)
            verdict = (ack.accepted, ack.reason)
            self.parent_ok_at = time.monotonic()
        except grpc.RpcError as err:
            verdict = (False, f"the server did not take the aggregate: {err.details() or err.code().name}")
        with self.lock:
            self.stats["aggregates_out"] += 1
            self.stats["bytes_out"] += nbytes
            for m in group.members:
                self.tasks.pop(m.task_id, None)
        for reply in group.replies:
            reply.set_result(verdict)
        log.info("forwarded %d update(s) of version %d (%d bytes): %s", len(group.members), group.version, nbytes,
                 "accepted" if verdict[0] else verdict[1])

    # ------------------------------------------------------------------ the process
    def hello(self) -> None:
        """Check this aggregator's token with the parent (an aggregate without members) before taking clients; retry
        while the parent is unreachable, up to ``give_up_after_s``."""
        from hetfl.deploy.client import TRANSIENT, Backoff

        backoff, since = Backoff(), time.monotonic()
        while True:
            try:
                self._ping(raising=True)
                return
            except grpc.RpcError as err:
                code, detail = err.code(), err.details() or err.code().name
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise HetflError(f"the server at {self.o.parent} refused this aggregator: {detail} (its token must be "
                                 "in the server's token file under 'aggregators')")
            if code == grpc.StatusCode.UNAVAILABLE:
                problem = tls_problem(detail, self.o.parent, self.o.tls_ca)
                if problem is not None:
                    raise HetflError(problem.replace("this client", "this aggregator"))
            if code not in TRANSIENT:
                raise HetflError(f"the server at {self.o.parent} answered {code.name}: {detail}")
            if time.monotonic() - since > self.o.give_up_after_s:
                raise HetflError(f"cannot reach the hetfl server at {self.o.parent} for {time.monotonic() - since:.0f} s "
                                 f"({detail}); check --parent, that the server runs, and --tls-ca")
            time.sleep(backoff.next())

    def _ping(self, *, raising: bool = False) -> None:
        """An aggregate without members (the server checks the token and answers): ``parent_ok_at`` moves if it
        answers; its error is raised with ``raising``, else ignored."""
        try:
            self.parent.SendAggregate(iter([pb.Chunk(aggregate=pb.AggregateHeader())]), metadata=self._metadata(None),
                                      timeout=10.0)
            self.parent_ok_at = time.monotonic()
        except grpc.RpcError:
            if raising:
                raise

    def bind(self) -> int:
        from hetfl.deploy.engine import listen

        o = self.o
        self._grpc, self.port = listen(self.gate, self, o.address, workers=256, chunk_bytes=o.chunk_bytes,
                                       tls=(o.tls_cert, o.tls_key, None))
        return self.port

    def serve(self) -> int:
        """Serve clients until the server has ended the run (and its clients heard so, or FINISH_GRACE_S passed);
        0, or a one-line error when the parent stays unreachable for ``give_up_after_s``."""
        port = self.bind()
        self._grpc.start()
        host = self.o.address.rsplit(":", 1)[0]
        log.info("aggregator listening on %s:%d (%s), forwarding to %s", host, port,
                 "TLS" if self.o.tls_cert is not None else "plaintext", self.o.parent)
        try:
            while True:
                self.wake.wait(TICK_S)
                self.wake.clear()
                now = time.monotonic()
                for group in self._due(now):
                    self._forward(group)
                with self.lock:
                    done = self.finished_at is not None and (
                        set(self.sessions.values()) <= self.told or now - self.finished_at > FINISH_GRACE_S)
                if done:
                    log.info("the server ended the run: %s", json.dumps(self.stats))
                    return 0
                if now - self.parent_ok_at > min(self.o.give_up_after_s, 30.0):
                    self._ping()  # nothing relayed for a while: is the parent there?
                if now - self.parent_ok_at > self.o.give_up_after_s:
                    raise HetflError(f"the server at {self.o.parent} has not answered for {now - self.parent_ok_at:.0f} s "
                                     "(--give-up-after); stopping")
        finally:
            self._grpc.stop(grace=1.0).wait(2.0)
            self.gate.close()
            self.channel.close()


def _check(task: Relayed, header: pb.UpdateHeader, tensors: dict, metas: dict) -> str | None:
    """An update as the server checks it (:mod:`hetfl.deploy.validate`); None when it may join the mean."""
    params = tensors.get("params")
    if params is None:
        return "the update carries no parameters"
    if set(tensors) != {"params"}:
        return "it carries tensors besides 'params' (an aggregator forwards a strategy without payload)"
    if metas["params"].get("delta") and params.shape == task.reference.shape:
        params = task.reference + params.to(task.reference.dtype)
    reason = check_update(params, reference=task.reference, max_norm=None)
    if reason is None:
        try:
            stats = {k: float(v) for k, v in json.loads(header.stats_json or "{}").items()}
        except (ValueError, TypeError, AttributeError):
            return "its statistics are not a JSON object of numbers"
        reason = check_stats(stats)
    return reason or check_report(header.steps, header.loss)


def aggregator_command(
    *, parent: str, address: str, token: str | None, token_file: str | None, tls_ca: str | None = None,
    tls_cert: str | None = None, tls_key: str | None = None, parent_cert: str | None = None,
    parent_key: str | None = None, fan_in: int = 0, flush_s: float = 5.0, give_up_after_s: float = 600.0,
    chunk_bytes: int = wire.DEFAULT_CHUNK_BYTES, quiet: bool = False,
) -> int:
    """``hetfl aggregator``: relay clients to ``parent`` and pre-aggregate their updates until the run is over."""
    from hetfl.deploy.tokens import check_address, check_client_tls, check_server_tls, read_pem, read_token_file

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if (token is None) == (token_file is None):
        raise HetflError("give the aggregator's token with --token TOKEN or --token-file FILE (one of them; the "
                         "server's token file lists it under 'aggregators')")
    if token_file is not None:
        token = read_token_file(token_file)
    check_address(address)
    check_address(parent, "--parent")
    if fan_in < 0:
        raise HetflError(f"--fan-in {fan_in}: the updates to hold before forwarding, at least 1 (0: no count limit)")
    if not 0 < flush_s < math.inf:
        raise HetflError(f"--flush-s {flush_s}: seconds an update may be held, a positive number")
    if (tls_cert is None) != (tls_key is None):
        raise HetflError("--tls-cert and --tls-key go together (the aggregator's certificate and key, for its clients)")
    if (parent_cert is None) != (parent_key is None):
        raise HetflError("--parent-cert and --parent-key go together (mutual TLS with the server)")
    check_server_tls(tls_cert, tls_key)
    check_client_tls(tls_ca, parent_cert, parent_key)
    options = AggregatorOptions(
        parent=parent, address=address, token=token, tls_ca=read_pem(tls_ca, "--tls-ca"),
        tls_cert=read_pem(tls_cert, "--tls-cert"), tls_key=read_pem(tls_key, "--tls-key"),
        parent_cert=read_pem(parent_cert, "--parent-cert"), parent_key=read_pem(parent_key, "--parent-key"),
        fan_in=fan_in, flush_s=flush_s, chunk_bytes=chunk_bytes, give_up_after_s=give_up_after_s,
    )
    aggregator = Aggregator(options)
    aggregator.hello()
    return aggregator.serve()
