"""The deployment server's gRPC handlers: they talk to the engine (:class:`~hetfl.deploy.engine.DeployServer`)
through its event queue, never to the strategy.

A join, an arriving update and a lost task become events the engine thread takes in order; what the handlers and the
engine share (connections, tasks ready to be streamed) is guarded by the engine's ``lock``.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import secrets
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from hetfl.deploy import federation_pb2 as pb
from hetfl.deploy import federation_pb2_grpc as pb_grpc
from hetfl.deploy import gate, wire
from hetfl.strategies.base import Task

if TYPE_CHECKING:
    from hetfl.deploy.engine import DeployServer

log = logging.getLogger("hetfl.server")

STOPPING = "the server is stopping without ending the run (interrupted, or it failed); a restarted server resumes it"
UPLOAD_MARGIN = 2.0  # an upload may be this many times its task's expected bytes (plus a chunk), no more


@dataclass
class Connection:
    """A joined client, as the handlers see it (not checkpointed: clients rejoin after a restart)."""

    client_id: int
    session: str
    last_seen: float
    outbox: queue.Queue = field(default_factory=queue.Queue)
    alive: bool = False  # connected: set by the engine when the client asks for work, cleared when it goes silent
    public_key: bytes = b""
    peer: str = ""  # gRPC's peer string of its join (ipv4:HOST:PORT)
    instance: str = ""  # the client process's random id (gate.INSTANCE_KEY): its own rejoin replaces this session
    via: str = ""  # the aggregator it joined through (its name), "" when it joined directly


class FederationServicer(pb_grpc.FederationServicer):
    """The gRPC handlers: they talk to the engine through its queue, never to the strategy.

    Every call has passed the gate (:mod:`hetfl.deploy.gate`) before its handler runs: a join's token and any
    other call's session were checked from the call's metadata, before a byte of its request was read;
    :func:`gate.current` says which client the call is from."""

    def __init__(self, server: DeployServer) -> None:
        self.s = server
        self._refusals: dict[int, tuple[float, int]] = {}  # client -> (when its in-use refusal was logged, since)

    def _client(self, session: str | None, context: grpc.ServicerContext) -> Connection:
        """The connection of the call's session (the gate's, from the metadata; ``session`` only without a gate)."""
        s = self.s
        call = gate.current()
        if call is not None and call.session is not None:
            session = call.session
        with s.lock:
            client = s.sessions.get(session) if session else None
            conn = s.conns.get(client) if client is not None else None
            if conn is not None and conn.session == session:
                conn.last_seen = time.monotonic()
                return conn
        context.abort(grpc.StatusCode.NOT_FOUND, "unknown session (the server restarted or the client joined again): join again")
        raise AssertionError  # abort raises

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        s = self.s
        call = gate.current()
        via = (call.aggregator or "") if call is not None else ""
        if call is not None and call.client is not None:
            client, instance = call.client, call.instance  # the gate checked the token in the call's metadata
        else:  # no gate (a test driving the servicer directly): the token in the request
            client, reason = s.options.tokens.identify(request.token)
            instance = ""
            if client is None:
                log.warning("refused a join from %s: %s", context.peer(), reason)
                context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{reason}: the server refused it")
        peer = context.peer()
        if request.device.n_samples < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the client reports no training samples")
        if s.finished.is_set():
            if s.run_over is None:  # interrupted or failed: the run is not over, a restarted server resumes it
                context.abort(grpc.StatusCode.UNAVAILABLE, STOPPING)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the run is over")
        session = secrets.token_hex(16)
        now = time.monotonic()
        with s.lock:
            old = s.conns.get(client)
            same_process = old is not None and bool(instance) and old.instance == instance
            in_use = old is not None and not same_process and now - old.last_seen < s.deploy.heartbeat_timeout_s
            if not in_use:
                if old is not None:
                    s.sessions.pop(old.session, None)
                s.conns[client] = Connection(client, session, now, public_key=bytes(request.device.public_key),
                                             peer=peer, instance=instance, via=via)
                s.sessions[session] = client
        if in_use:
            self._refuse_in_use(client, peer, old, now, context)
        s.events.put(("join", client, request.device, request.device.hostname or peer))
        setup = dict(s._setup, architecture=int(s.models.of_client[client]))
        return pb.JoinReply(client_id=client, session=session, config_yaml=s._config_yaml, setup_json=json.dumps(setup))

    def _refuse_in_use(self, client: int, peer: str, old: Connection, now: float, context: grpc.ServicerContext) -> None:
        """A second process with a client's token, while the first is alive: refused (logged once per timeout)."""
        timeout = self.s.deploy.heartbeat_timeout_s
        logged, unlogged = self._refusals.get(client, (-math.inf, 0))
        if now - logged > timeout:
            more = f" ({unlogged} more since the last line)" if unlogged else ""
            log.warning("client %d: refused a second session for its token from %s: its session from %s is alive "
                        "(seen %.1f s ago); two processes cannot share a token%s", client, peer, old.peer or "?",
                        now - old.last_seen, more)
            self._refusals[client] = (now, 0)
        else:
            self._refusals[client] = (logged, unlogged + 1)
        context.abort(grpc.StatusCode.ALREADY_EXISTS,
                      f"client {client}'s token is in use by a live session (from {old.peer or '?'}, seen "
                      f"{now - old.last_seen:.1f} s ago): two processes cannot share a token; a client that restarted "
                      f"gets in once that session has been silent for heartbeat_timeout_s ({timeout:g} s)")

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
                with s.lock:
                    conn.alive = False
                if s.run_over is None:  # interrupted or failed: the run is not over, the client keeps retrying
                    context.abort(grpc.StatusCode.UNAVAILABLE, STOPPING)
                yield pb.Chunk(task=pb.TaskHeader(kind=pb.TaskHeader.FINISHED, message=f"run over ({s.run_over})"))
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
            if s.gate is not None:  # the call's deadline grows with the bytes it streams (deploy.min_transfer_Bps)
                s.gate.expect(sum(len(c.data) for c in stream))
            for chunk in stream:
                yield chunk
                conn.last_seen = time.monotonic()  # a slow download is not silence
            return
        yield pb.Chunk(task=pb.TaskHeader(kind=pb.TaskHeader.NONE))

    def SendUpdate(self, request_iterator, context: grpc.ServicerContext) -> pb.Ack:
        s = self.s
        conn = self._client(None, context)  # the session is the call's metadata: checked before the stream is read
        try:
            first = next(request_iterator)
        except StopIteration:
            return pb.Ack(accepted=False, reason="empty stream")
        if first.WhichOneof("part") != "update":
            return pb.Ack(accepted=False, reason="the stream must begin with an UpdateHeader")
        header = first.update
        conn.last_seen = time.monotonic()
        task = s.state.busy.get(conn.client_id)
        if not header.unmask_share and (task is None or task.task_id != header.task_id):
            # nothing to read: the engine would drop it (a task id is never reused)
            reason = f"task {header.task_id} is no longer wanted (cancelled, timed out, or from before a restart)"
            log.info("client %d: update for task %d ignored: %s", conn.client_id, header.task_id, reason)
            return pb.Ack(accepted=False, reason=reason)
        cap = self._upload_cap(task)
        try:
            tensors, metas, nbytes = wire.collect(header.tensors, self._arriving(request_iterator, conn), max_bytes=cap,
                                                  on_header=s.gate.expect if s.gate is not None else None)
        except wire.WireError as err:
            s.events.put(("lost", conn.client_id, header.task_id, f"malformed update: {err}"))
            return pb.Ack(accepted=False, reason=str(err))
        except grpc.RpcError:  # the stream broke off, or ran past its deadline (the gate cancelled it)
            call = gate.current()
            why = "it ran past its deadline" if call is not None and call.cancelled else "the stream broke off"
            s.events.put(("lost", conn.client_id, header.task_id, f"its upload did not complete: {why}"))
            raise
        conn.last_seen = time.monotonic()
        return self._answer(("update", conn.client_id, header, tensors, metas, nbytes), context)

    def _answer(self, event: tuple, context: grpc.ServicerContext) -> pb.Ack:
        """Hand ``event`` to the engine and wait for its verdict (while the engine runs and the caller listens)."""
        s = self.s
        reply: futures.Future = futures.Future()
        s.events.put((*event, reply))
        while True:
            try:
                accepted, reason = reply.result(timeout=0.5)
                return pb.Ack(accepted=accepted, reason=reason)
            except futures.TimeoutError:
                if s.finished.is_set():  # the engine has stopped: nobody will look at it
                    return pb.Ack(accepted=False, reason="the run is over")
                if not context.is_active():  # cancelled: nobody waits for the answer
                    return pb.Ack(accepted=False, reason="cancelled")

    def SendAggregate(self, request_iterator, context: grpc.ServicerContext) -> pb.Ack:
        """An aggregator's pre-aggregate (:mod:`hetfl.deploy.aggregator`; the gate checked its token): its header, then
        the weighted mean's bytes, at most what the model holds; the engine checks the members (``_on_aggregate``).
        An aggregate without members is the aggregator's hello: accepted."""
        s = self.s
        call = gate.current()
        name = call.aggregator if call is not None else None
        if name is None:  # no gate (a test driving the servicer directly)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no aggregator token: the server refused it")
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "aggregate":
            return pb.Ack(accepted=False, reason="the stream must begin with an AggregateHeader")
        header = first.aggregate
        if not header.members:
            log.info("aggregator %s connected from %s", name, context.peer())
            return pb.Ack(accepted=True)
        try:
            tensors, _, nbytes = wire.collect(header.tensors, request_iterator, max_bytes=self._upload_cap(None),
                                              on_header=s.gate.expect if s.gate is not None else None)
        except wire.WireError as err:
            tensors, nbytes = None, 0
            header = _malformed(header, f"malformed aggregate: {err}")
        return self._answer(("aggregate", name, header, tensors, nbytes), context)

    def _upload_cap(self, task: Task | None) -> int:
        """The most bytes an upload for ``task`` may announce: its model and payload (at least float32 each), or
        what the strategy says it uploads, times UPLOAD_MARGIN, plus a chunk. A secure-aggregation share without a
        task in flight is a vector of the model's size."""
        s = self.s
        tensors = [task.params, *task.payload.values()] if task is not None else [s.state.params]
        expected = sum(t.numel() * max(4, t.element_size()) for t in tensors)
        if task is not None:
            expected = max(expected, int(task.bytes_up or 0))
        return int(UPLOAD_MARGIN * expected) + s.deploy.chunk_bytes

    @staticmethod
    def _arriving(stream, conn: Connection):
        """The chunks of an upload; each one shows its client is alive (a slow upload is not silence)."""
        for chunk in stream:
            conn.last_seen = time.monotonic()
            yield chunk

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        conn = self._client(request.session, context)
        task = self.s.state.busy.get(conn.client_id)
        return pb.HeartbeatReply(task_wanted=task is not None and task.task_id == request.task_id)



def _malformed(header: pb.AggregateHeader, reason: str) -> pb.AggregateHeader:
    """``header`` with every member marked rejected for ``reason`` (the engine fails their tasks, if they are its)."""
    out = pb.AggregateHeader(version=header.version)
    out.members.extend(pb.Member(task_id=m.task_id, client_id=m.client_id, rejected=reason) for m in header.members)
    return out
