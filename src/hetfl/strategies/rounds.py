"""Synchronous rounds on the event-driven interface: sample, dispatch, wait (until a deadline), aggregate.

Subclasses say what to send (:meth:`RoundStrategy.configure`) and how to combine what came back
(:meth:`RoundStrategy.aggregate`); the round bookkeeping lives here once.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hetfl.config import AggregatorConfig, PrivacyConfig
from hetfl.strategies.base import Server, Strategy, Task, Update
from hetfl.strategies.robust import Aggregation
from hetfl.strategies.selection import RandomSelection, Selection


def sample_weights(updates: list[Update]) -> torch.Tensor:
    """p_i = n_i / sum_j n_j over the updates of a round."""
    n = torch.tensor([u.n_samples for u in updates], dtype=torch.float32)
    return n / n.sum()


def weighted_mean(updates: list[Update]) -> torch.Tensor:
    """sum_i p_i w_i: the sample-weighted mean of the updates' models."""
    return torch.stack([u.params for u in updates]).T @ sample_weights(updates)


def federation_shares(server: Server) -> list[float]:
    """q_c = n_c / sum_k n_k: each client's share of all training samples in the federation."""
    n = [server.num_samples(c) for c in range(server.n_clients)]
    total = sum(n)
    return [k / total for k in n]


def weighted_delta(updates: list[Update], weights: torch.Tensor) -> torch.Tensor:
    """sum_i p_i * delta_i."""
    return torch.stack([u.delta for u in updates]).T @ weights


class RoundStrategy(Strategy):
    """Round-based server: each round selects ``clients_per_round`` available clients.

    Parameters
    ----------
    clients_per_round : int
        Clients sampled per round (fewer if fewer are online).
    deadline_s : float or None
        Round deadline in simulated seconds after dispatch; updates not back by then are dropped
        (their clients are told to stop, so their work is never computed). None waits for all.
    selection : Selection, optional
        Which clients a round takes (:mod:`hetfl.strategies.selection`); uniform sampling by default.

    ``partial_work`` (``strategy.partial_work``, set on the built strategy; False by default): with a deadline, each
    task is dispatched with ``finish_by`` the deadline, so a client too slow for all its local steps trains (and is
    charged and timed for) the steps that arrive by then, FedProx's gamma-inexact solution (Li et al.,
    arXiv:1812.06127), instead of being dropped; the update is aggregated as any other. A client that cannot do one
    step in time is dropped as without it.
    """

    partial_work: bool = False

    def __init__(
        self, *, clients_per_round: int = 10, deadline_s: float | None = None, selection: Selection | None = None
    ) -> None:
        if clients_per_round < 1:
            raise ValueError("clients_per_round must be at least 1")
        if deadline_s is not None and deadline_s <= 0:
            raise ValueError("deadline_s must be positive (or None for no deadline)")
        self.clients_per_round = clients_per_round
        self.deadline_s = deadline_s
        self.selection = selection or RandomSelection()
        self._pending: dict[int, Task] = {}
        self._received: list[Update] = []
        self._dropped = 0
        self._deadline: Any = None
        self.aggregation = Aggregation()  # the plain weighted mean; see use_aggregator

    def use_aggregator(self, aggregator: AggregatorConfig | None, privacy: PrivacyConfig | None) -> None:
        """Combine changes by ``strategy.aggregator`` and ``strategy.privacy`` (:mod:`hetfl.strategies.robust`)
        in :meth:`combined_delta`. Called by the algorithms whose aggregation is a mean of changes (they take
        ``aggregator`` and ``privacy`` constructor parameters); the others keep the mean and refuse the keys."""
        self.aggregation = Aggregation(
            aggregator, privacy, cohort=self.clients_per_round, cohort_key="strategy.clients_per_round",
            uniform_sampling=type(self.selection) is RandomSelection,
        )
        if not self.aggregation.linear:
            self.linear_aggregation = False  # the server needs each update, not just their sum

    # -- the two things an algorithm changes ------------------------------------------------
    def configure(self, server: Server, client_id: int) -> dict[str, Any]:
        """Keyword arguments for ``server.dispatch`` (steps, payload, options) for one client."""
        return {}

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        raise NotImplementedError

    def combined_delta(self, server: Server, updates: list[Update]) -> torch.Tensor:
        """sum_i p_i delta_i with p_i = n_i / sum_j n_j (:func:`weighted_delta`), or what the configured robust
        rule or DP-FedAvg makes of the changes (:class:`~hetfl.strategies.robust.Aggregation`)."""
        return self.aggregation.delta(server, torch.stack([u.delta for u in updates]), sample_weights(updates))

    def metrics(self) -> dict[str, Any]:
        return self.aggregation.metrics()

    def summary(self, server: Server) -> dict[str, Any]:
        return self.aggregation.summary()

    def select(self, server: Server, available: list[int]) -> list[int]:
        """The round's clients, chosen by ``self.selection`` (sorted, so the dispatch order is reproducible)."""
        return self.selection.select(server, available, min(self.clients_per_round, len(available)))

    # -- round bookkeeping -----------------------------------------------------------------
    def start(self, server: Server) -> None:
        self._begin_round(server)

    def _begin_round(self, server: Server) -> None:
        if server.stopping:
            return
        available = server.available()
        if not available:
            wake = server.next_available_time()
            if math.isfinite(wake):
                server.set_timer(wake, "retry")
            return  # nobody will ever come back: the engine sees an empty queue and stops
        deadline = None if self.deadline_s is None else server.now + self.deadline_s
        finish = {"finish_by": deadline} if self.partial_work and deadline is not None else {}
        for client in self.select(server, available):
            task = server.dispatch(client, **self.configure(server, client), **finish)
            self._pending[task.task_id] = task
        self._received, self._dropped = [], 0
        if deadline is not None:
            self._deadline = server.set_timer(deadline, "deadline")

    def on_update(self, server: Server, update: Update) -> None:
        if self._pending.pop(update.task.task_id, None) is None:
            return  # not part of the current round
        self.selection.observe(server, update)
        self._received.append(update)
        if not self._pending:
            self._close_round(server)

    def on_failure(self, server: Server, task: Task) -> None:
        if self._pending.pop(task.task_id, None) is None:
            return
        self.selection.observe_failure(server, task)
        self._dropped += 1
        if not self._pending:
            self._close_round(server)

    def on_timer(self, server: Server, tag: str) -> None:
        if tag == "retry":
            self._begin_round(server)
        elif tag == "deadline":
            self._deadline = None
            for task in self._pending.values():
                server.cancel(task)
                self.selection.observe_failure(server, task)
            self._dropped += len(self._pending)
            self._pending.clear()
            self._close_round(server)

    def _close_round(self, server: Server) -> None:
        if self._deadline is not None:
            server.cancel_timer(self._deadline)
            self._deadline = None
        updates = self._received
        params = self.aggregate(server, updates) if updates else server.params
        server.commit(params, updates, dropped=self._dropped)
        self._begin_round(server)
