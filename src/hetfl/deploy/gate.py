"""The server's gate: who may call, how many calls at once, and for how long (a gRPC server interceptor).

Every call passes the gate before its handler reads anything the client sent:

- **Authentication from metadata.** Join carries its token in the call's metadata (``hetfl-token-bin``), every
  other call the session its Join returned (``hetfl-session``). A call without them, with an unknown or revoked
  token, or with a session the server does not know, is refused at once, before its request (SendUpdate's
  stream) is read: it holds no handler thread.
- **Failed joins are rate-limited** per network address (the peer's host: clients behind one NAT share it): an
  address with ``deploy.max_failed_joins`` failed joins in the last minute has its joins refused
  (``RESOURCE_EXHAUSTED``) before its token is looked at, until the minute is over. Its refusals are logged
  once per minute, not once each.
- **Concurrency is bounded**: at most ``deploy.max_calls_per_peer`` calls open from one address, and
  :data:`MAX_CALLS_PER_SESSION` for one session (an honest client has at most three: a poll or an upload, and a
  heartbeat).
- **Every call has a deadline**: ``deploy.call_timeout_s``, plus ``deploy.poll_s`` for a long poll, plus the bytes
  the call moves at ``deploy.min_transfer_Bps`` (:meth:`Gate.expect`). A watchdog thread cancels a call that runs
  past it, which frees its handler thread.

gRPC Python reads a unary request inside a handler thread before the handler runs, so a client that opens a call
and never sends its request would hold that thread however the handler checks. The gate therefore serves every
method as a request-streaming one: its wrapper runs at once, checks, and reads the single request itself, under
the call's deadline.

Aggregators (``hetfl aggregator``, :mod:`hetfl.deploy.aggregator`) carry their own token (``hetfl-aggregator-bin``,
the token file's ``aggregators``) on SendAggregate, which has no session, and on the joins they relay, whose
client token is checked as any other's; a bad aggregator token counts as a failed join. An aggregator's own gate
has no token table (``tokens=None``): it admits a join unchecked, for its handler relays it to the server, which
checks the token; every other call needs a session the aggregator relayed.

The handlers learn what the gate established (the client id and session of the call) from :func:`current`.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from hetfl.deploy.tokens import TokenTable

log = logging.getLogger("hetfl.server")

TOKEN_KEY = "hetfl-token-bin"  # binary metadata: a token may hold any characters
SESSION_KEY = "hetfl-session"
INSTANCE_KEY = "hetfl-instance"  # a random id per client process: a rejoin of the same process proves itself with it
AGGREGATOR_KEY = "hetfl-aggregator-bin"  # an aggregator's token (binary metadata, as a client's)
MAX_CALLS_PER_SESSION = 6
FAILED_JOIN_WINDOW_S = 60.0
MAX_TRACKED_ADDRESSES = 10_000  # failed-join records kept at most (the oldest go first)


@dataclass(frozen=True)
class Limits:
    """The gate's bounds (the config's ``deploy`` section)."""

    call_timeout_s: float = 60.0
    poll_s: float = 10.0
    min_transfer_Bps: float = 10_000.0
    max_calls_per_peer: int = 64
    max_failed_joins: int = 20

    @classmethod
    def of(cls, deploy: Any) -> "Limits":
        """The bounds of a config's ``deploy`` section (an object, or a mapping of the keys it sets)."""
        get = deploy.get if isinstance(deploy, dict) else lambda key, default: getattr(deploy, key, default)
        return cls(**{f.name: get(f.name, f.default) for f in dataclasses.fields(cls)})

    def deadline_s(self, method: str, nbytes: int = 0) -> float:
        """Seconds a call of ``method`` moving ``nbytes`` may take."""
        return self.call_timeout_s + (self.poll_s if method == "GetTask" else 0.0) + nbytes / self.min_transfer_Bps


@dataclass(eq=False)
class Call:
    """One admitted call, as the handlers and the watchdog see it."""

    method: str
    peer: str
    host: str
    context: Any
    started: float
    deadline: float
    client: int | None = None
    session: str | None = None
    instance: str = ""
    aggregator: str | None = None  # the aggregator's name: a SendAggregate, or a join it relayed
    expected: int = 0  # bytes the call moves, as far as the handler has said (Gate.expect)
    done: bool = False
    cancelled: bool = False

    def who(self) -> str:
        return f"client {self.client}" if self.client is not None else self.peer


_current = threading.local()


def current() -> Call | None:
    """The call this handler thread serves (set by the gate)."""
    return getattr(_current, "call", None)


def host_of(peer: str) -> str:
    """The address part of a gRPC peer string: ``ipv4:10.0.0.9:51234`` -> ``10.0.0.9``, ``ipv6:[::1]:5`` -> ``[::1]``."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return rest.rsplit(":", 1)[0]
    return peer


def _text(raw: Any) -> str:
    """A token from binary metadata ("" if it is not UTF-8: no token matches it)."""
    try:
        return raw.decode() if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        return ""


def _metadata(pairs: Any) -> dict[str, Any]:
    return {key: value for key, value in (pairs or ())}


class Gate(grpc.ServerInterceptor):
    """Authentication, concurrency bounds, failed-join rate limits and deadlines for every call (module docstring).

    ``session_client`` maps a session to its client id (None: unknown)."""

    def __init__(self, tokens: TokenTable | None, session_client: Callable[[str], int | None], limits: Limits) -> None:
        self.tokens, self.session_client, self.limits = tokens, session_client, limits
        self.lock = threading.Lock()
        self.per_host: dict[str, int] = {}
        self.per_session: dict[str, int] = {}
        self.failed: dict[str, deque[float]] = {}  # address -> times of its failed joins in the window
        self.quiet_until: dict[str, tuple[float, int]] = {}  # address -> (end of its log silence, refusals not logged)
        self.watchdog = Watchdog()

    # ------------------------------------------------------------------ the interceptor
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        metadata = _metadata(handler_call_details.invocation_metadata)
        return self._wrap(method, metadata, handler)

    def _wrap(self, method: str, metadata: dict[str, Any], handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        unary_request = not handler.request_streaming
        inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream

        def first(requests, context, call: Call):
            if not unary_request:
                return requests
            try:
                return next(requests)
            except StopIteration:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: expected one request message")

        if handler.response_streaming:
            def behavior(requests, context):
                call = self.admit(method, metadata, context)
                try:
                    yield from inner(first(requests, context, call), context)
                finally:
                    self.release(call)

            return grpc.stream_stream_rpc_method_handler(
                behavior, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)

        def behavior(requests, context):
            call = self.admit(method, metadata, context)
            try:
                return inner(first(requests, context, call), context)
            finally:
                self.release(call)

        return grpc.stream_unary_rpc_method_handler(
            behavior, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    # ------------------------------------------------------------------ admission
    def admit(self, method: str, metadata: dict[str, Any], context: grpc.ServicerContext) -> Call:
        """Check the call; abort it (raising) if refused, else register it with its deadline and return it."""
        peer = context.peer()
        host = host_of(peer)
        now = time.monotonic()
        call = Call(method, peer, host, context, now, now + self.limits.deadline_s(method))
        if method == "Join":
            self._authenticate_join(call, metadata)
        elif method == "SendAggregate":
            self._check_failed_joins(call)
            self._authenticate_aggregator(call, metadata)
        else:
            session = metadata.get(SESSION_KEY)
            if not isinstance(session, str) or not session:
                self._refuse(context, grpc.StatusCode.UNAUTHENTICATED,
                             "the call carries no session (join first; a hetfl client older than the server?)")
            client = self.session_client(session)
            if client is None:
                self._refuse(context, grpc.StatusCode.NOT_FOUND,
                             "unknown session (the server restarted or the client joined again): join again")
            call.client, call.session = client, session
        instance = metadata.get(INSTANCE_KEY)
        call.instance = instance if isinstance(instance, str) else ""
        with self.lock:
            if self.per_host.get(host, 0) >= self.limits.max_calls_per_peer:
                busy = f"{host} has {self.limits.max_calls_per_peer} calls open (deploy.max_calls_per_peer)"
            elif call.session is not None and self.per_session.get(call.session, 0) >= MAX_CALLS_PER_SESSION:
                busy = f"this session has {MAX_CALLS_PER_SESSION} calls open"
            else:
                busy = None
                self.per_host[host] = self.per_host.get(host, 0) + 1
                if call.session is not None:
                    self.per_session[call.session] = self.per_session.get(call.session, 0) + 1
        if busy is not None:
            self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many calls at once: {busy}; retry later")
        context.add_callback(lambda: self.release(call))  # also when the call ends before its handler finishes
        _current.call = call
        self.watchdog.watch(call)
        return call

    def _authenticate_join(self, call: Call, metadata: dict[str, Any]) -> None:
        self._check_failed_joins(call)
        if AGGREGATOR_KEY in metadata:  # relayed by an aggregator: it must be one, and the client's token is checked too
            self._authenticate_aggregator(call, metadata)
        if self.tokens is None:
            return  # an aggregator's gate: the server checks the token of the join its handler relays
        raw = metadata.get(TOKEN_KEY)
        client, reason = (None, "no token in the call (a hetfl client older than the server?)") if raw is None else \
            self.tokens.identify(_text(raw))
        if client is None:
            self._failed_join(call.host)
            self._log_refusal(call.host, "refused a join from %s: %s", call.peer, reason)
            self._refuse(call.context, grpc.StatusCode.UNAUTHENTICATED, f"{reason}: the server refused it")
        call.client = client

    def _authenticate_aggregator(self, call: Call, metadata: dict[str, Any]) -> None:
        """The call's aggregator token (``hetfl-aggregator-bin``): its name in ``call.aggregator``, or refused."""
        raw = metadata.get(AGGREGATOR_KEY)
        if self.tokens is None:
            name, reason = None, "this process accepts no aggregators"
        elif raw is None:
            name, reason = None, "no aggregator token in the call"
        else:
            name, reason = self.tokens.identify_aggregator(_text(raw))
        if name is None:
            self._failed_join(call.host)
            self._log_refusal(call.host, "refused an aggregator from %s: %s", call.peer, reason)
            self._refuse(call.context, grpc.StatusCode.UNAUTHENTICATED, f"{reason}: the server refused it")
        call.aggregator = name

    def _check_failed_joins(self, call: Call) -> None:
        """Refuse a join (or an aggregator's call) from an address with too many failed ones in the last minute."""
        now = time.monotonic()
        with self.lock:
            times = self.failed.get(call.host)
            while times and now - times[0] > FAILED_JOIN_WINDOW_S:
                times.popleft()
            limited = times is not None and len(times) >= self.limits.max_failed_joins
            wait = FAILED_JOIN_WINDOW_S - (now - times[0]) if limited else 0.0
        if limited:
            self._log_refusal(call.host, "refused a join from %s: %d failed joins in the last %.0f s "
                              "(deploy.max_failed_joins %d)", call.peer, len(times), FAILED_JOIN_WINDOW_S,
                              self.limits.max_failed_joins)
            self._refuse(call.context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"too many failed joins from {call.host}; retry in {wait:.0f} s")

    def _failed_join(self, host: str) -> None:
        with self.lock:
            if host not in self.failed and len(self.failed) >= MAX_TRACKED_ADDRESSES:
                now = time.monotonic()
                for stale in [h for h, t in self.failed.items() if not t or now - t[-1] > FAILED_JOIN_WINDOW_S]:
                    del self.failed[stale]
                while len(self.failed) >= MAX_TRACKED_ADDRESSES:
                    del self.failed[next(iter(self.failed))]
            self.failed.setdefault(host, deque(maxlen=self.limits.max_failed_joins + 1)).append(time.monotonic())

    def _log_refusal(self, host: str, message: str, *args: Any) -> None:
        """Log a refused join; an address whose joins keep failing gets one line a minute, with a count."""
        now = time.monotonic()
        with self.lock:
            until, unlogged = self.quiet_until.get(host, (0.0, 0))
            if now < until:
                self.quiet_until[host] = (until, unlogged + 1)
                return
            times = self.failed.get(host)
            noisy = times is not None and len(times) >= max(3, self.limits.max_failed_joins // 2)
            self.quiet_until[host] = (now + FAILED_JOIN_WINDOW_S if noisy else 0.0, 0)
            if len(self.quiet_until) > MAX_TRACKED_ADDRESSES:
                self.quiet_until = {h: v for h, v in self.quiet_until.items() if v[0] > now}
        suffix = f" ({unlogged} more refused since the last line)" if unlogged else ""
        log.warning(message + "%s%s", *args, suffix,
                    "; logging its refusals once a minute" if noisy and not unlogged else "")

    @staticmethod
    def _refuse(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
        context.abort(code, details)

    def release(self, call: Call) -> None:
        with self.lock:
            if call.done:
                return
            call.done = True
            call.context = None  # a finished call keeps nothing of gRPC's alive
            left = self.per_host.get(call.host, 1) - 1
            if left > 0:
                self.per_host[call.host] = left
            else:
                self.per_host.pop(call.host, None)
            if call.session is not None:
                left = self.per_session.get(call.session, 1) - 1
                if left > 0:
                    self.per_session[call.session] = left
                else:
                    self.per_session.pop(call.session, None)
        if getattr(_current, "call", None) is call:
            _current.call = None

    # ------------------------------------------------------------------ deadlines
    def expect(self, nbytes: int) -> None:
        """The current call moves ``nbytes``: its deadline becomes call_timeout_s (+ poll_s) + nbytes / min rate."""
        call = current()
        if call is None or call.done:
            return
        call.expected = int(nbytes)
        self.watchdog.watch(call, call.started + self.limits.deadline_s(call.method, call.expected))

    def close(self) -> None:
        self.watchdog.stop()


class Watchdog:
    """One thread that cancels calls past their deadline (a heap of deadlines; a call's latest entry counts)."""

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, Call]] = []
        self.seq = 0
        self.cond = threading.Condition()
        self.stopped = False
        self.thread: threading.Thread | None = None
        self.on_cancel: Callable[[Call], None] = _log_cancel
        self.compacted = 0.0

    def watch(self, call: Call, deadline: float | None = None) -> None:
        with self.cond:
            if deadline is not None:
                call.deadline = deadline
            sooner = not self.heap or call.deadline < self.heap[0][0]
            heapq.heappush(self.heap, (call.deadline, self.seq, call))
            self.seq += 1
            if self.thread is None and not self.stopped:
                self.thread = threading.Thread(target=self._run, name="hetfl-watchdog", daemon=True)
                self.thread.start()
            elif sooner:  # the thread sleeps until the earliest deadline (at most a second): wake it only if earlier
                self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()

    def _run(self) -> None:
        while True:
            due: list[Call] = []
            with self.cond:
                if self.stopped:
                    return
                now = time.monotonic()
                if len(self.heap) > 256 and now - self.compacted > 1.0:  # drop finished calls (their entries wait
                    self.heap = [e for e in self.heap if not e[2].done and e[0] == e[2].deadline]  # for their deadline)
                    heapq.heapify(self.heap)
                    self.compacted = now
                while self.heap and (self.heap[0][2].done or self.heap[0][0] != self.heap[0][2].deadline):
                    heapq.heappop(self.heap)  # finished, or watched again with a later deadline
                while self.heap and self.heap[0][0] <= now:
                    _, _, call = heapq.heappop(self.heap)
                    if not call.done and call.deadline <= now:
                        due.append(call)
                if not due:
                    self.cond.wait(timeout=min(1.0, self.heap[0][0] - now) if self.heap else 1.0)
            for call in due:
                context = call.context
                if context is None:
                    continue  # finished meanwhile
                call.cancelled = True
                self.on_cancel(call)
                context.cancel()


def _log_cancel(call: Call) -> None:
    moved = f", {call.expected} bytes expected" if call.expected else ""
    log.warning("%s: %s cancelled after %.1f s, past its deadline (deploy.call_timeout_s%s%s)", call.who(), call.method,
                time.monotonic() - call.started, ", poll_s" if call.method == "GetTask" else "",
                f" + bytes at deploy.min_transfer_Bps{moved}" if call.expected else "")
