"""Asynchronous training on the event-driven interface: keep ``concurrency`` clients busy, act on each arrival.

Subclasses say what an arrival does to the global model (:meth:`AsyncStrategy.receive`); the
bookkeeping of who is training lives here once: whenever a client returns or loses its task, idle
online clients are drawn uniformly at random until ``concurrency`` tasks are in flight again, and
if nobody is online the strategy wakes itself when the next client comes back.

Updates computed on an old model can first be refreshed by a
:class:`~hetfl.strategies.recovery.StaleRecovery` (``recovery`` parameter), so every asynchronous
algorithm gets stale-update recovery without writing it again.
"""

from __future__ import annotations

import math
from typing import Any

from hetfl.strategies.base import Server, Strategy, Task, Update
from hetfl.strategies.recovery import RecoveryConfig, StaleRecovery


class AsyncStrategy(Strategy):
    """Base of the asynchronous algorithms.

    Parameters
    ----------
    concurrency : int, default 10
        Tasks in flight at any moment (fewer while fewer clients are online and idle).
    recovery : RecoveryConfig or None
        Refresh stale updates by gradient inversion before they are used (see
        :mod:`hetfl.strategies.recovery`); None uses them as they are.
    """

    def __init__(self, *, concurrency: int = 10, recovery: RecoveryConfig | None = None) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.concurrency = concurrency
        self.recovery = StaleRecovery(recovery) if recovery is not None else None
        self._in_flight: set[int] = set()
        self._retry: Any = None

    # -- what an algorithm changes --------------------------------------------------------
    def receive(self, server: Server, update: Update) -> None:
        """Use one arrived update (commit when the algorithm aggregates)."""
        raise NotImplementedError

    def configure(self, server: Server, client_id: int) -> dict[str, Any]:
        """Keyword arguments for ``server.dispatch`` (steps, payload, options) for one client."""
        return {}

    # -- bookkeeping -------------------------------------------------------------------------
    def start(self, server: Server) -> None:
        if self.recovery is not None:
            self.recovery.check_trainer(server.trainer.model, server.trainer.cfg.optimizer)
        self._fill(server)

    def on_update(self, server: Server, update: Update) -> None:
        self._in_flight.discard(update.task.task_id)
        if self.recovery is not None:
            before = self.recovery.flops
            update = self.recovery.recover(server, update)
            server.server_work(self.recovery.flops - before)  # the inversion is the server's work
        self.receive(server, update)
        self._fill(server)

    def on_failure(self, server: Server, task: Task) -> None:
        self._in_flight.discard(task.task_id)
        self._fill(server)

    def on_timer(self, server: Server, tag: str) -> None:
        if tag == "retry":
            self._retry = None
            self._fill(server)

    def on_proceed(self, server: Server) -> None:
        self._fill(server)

    def check_training(self, optimizer: str, momentum: float) -> None:
        if self.recovery is not None:
            self.recovery.check_training(optimizer)

    def check_model(self, model_name: str) -> None:
        if self.recovery is not None:
            self.recovery.check_model(model_name)

    def metrics(self) -> dict[str, float]:
        return self.recovery.metrics() if self.recovery is not None else {}

    def _fill(self, server: Server) -> None:
        """Dispatch to idle online clients, drawn uniformly, until ``concurrency`` tasks are in flight."""
        if server.stopping:
            return
        free = self.concurrency - len(self._in_flight)
        if free <= 0:
            return
        available = server.available()
        if available:
            chosen = server.rng.choice(available, size=min(free, len(available)), replace=False)
            for client in sorted(int(c) for c in chosen):
                task = server.dispatch(client, **self.configure(server, client))
                self._in_flight.add(task.task_id)
        if len(self._in_flight) < self.concurrency and self._retry is None:
            wake = server.next_available_time()
            if math.isfinite(wake) and wake > server.now:
                self._retry = server.set_timer(wake, "retry")
