"""FedStale and FedVARP: rounds that also reuse the last (stale) updates of absent clients.

Rodio & Neglia, "FedStale: leveraging stale client updates in federated learning", arXiv:2405.04171.
Jhunjhunwala et al., "FedVARP: Tackling the Variance Due to Partial Client Participation in
Federated Learning", UAI 2022 (arXiv:2207.14130).

The server remembers y_j, the latest model change Delta_j = w_j - w of every client j (zero until
the client first takes part). A round with participants S, out of N clients, steps by

    v = sum_{i in S} p_i Delta_i + beta * ( sum_{j=1}^{N} q_j y_j - sum_{i in S} p_i y_i )
    w <- w + eta_s * v,    then y_i <- Delta_i for every i in S

with q_j = n_j / sum_{k=1}^{N} n_k (client j's share of all training samples) and
p_i = n_i / sum_{k in S} n_k (FedAvg's weights over the round's participants).

- beta = 0: FedAvg (fresh updates only).
- beta = 1: FedVARP: v = sum_j q_j y_j + sum_{i in S} p_i (Delta_i - y_i); with equal sample counts,
  v = (1/N) sum_j y_j + (1/|S|) sum_{i in S} (Delta_i - y_i) (FedVARP, Algorithm 1).
- 0 < beta < 1: FedStale, the convex combination of the two.

The papers weight a participant by q_i / pi_i, with pi_i its probability of taking part. Under
uniform sampling of K out of N clients with equal sample counts and every update arriving, that is
1/K = p_i. We use p_i, the weights hetfl's FedAvg uses, so that beta = 0 is exactly FedAvg and the
weights still sum to one in rounds that lose clients to deadlines or dropouts (pi_i is not known
under availability windows or non-uniform selections).

A round in which no update arrived leaves the model unchanged, as in FedAvg.

Unlike FedAvg's, this aggregation is not a function of the round's weighted mean alone: the server stores each
participant's own Delta_i. So neither algorithm claims ``linear_aggregation``, and a deployment refuses
``deploy.secure_aggregation`` for them (the server would see only the round's mean, and store it as every
participant's change).

Memory: the server keeps one model-sized tensor per client that has taken part at least once. On the
simulator they live in its per-client store (``server.client_store``, table ``fedstale/y``), under the
run's memory budget (``training.state_memory_mb``): the least recently updated spill to disk, with the
same values. The stale sum is taken over :data:`STALE_CHUNK` clients at a time, in the order clients
first took part, so it never gathers more than that many tensors at once (with at most that many clients,
it is one matrix-vector product, as it always was).
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch

from hetfl.strategies.base import Server, Update
from hetfl.strategies.fedavg import FedAvg
from hetfl.strategies.rounds import federation_shares, sample_weights
from hetfl.strategies.selection import Selection

STALE_CHUNK = 4096
"""Clients' stored updates gathered at a time for the stale sum."""


class FedStale(FedAvg):
    """Fresh updates of the participants, stale updates of the others, mixed by ``beta``.

    Parameters
    ----------
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    server_lr : float, default 1.0
        eta_s, the server step on v.
    beta : float, default 0.5
        Weight of the stale updates, in [0, 1]: 0 is FedAvg, 1 is FedVARP. The paper gives no single
        best value: stale updates help more with more heterogeneous data and less with more
        heterogeneous participation, so 0.5, halfway between the two, is a neutral start to tune from.
    """

    name = "fedstale"
    # Not FedAvg's: y_i <- Delta_i needs each participant's own change, and under secure aggregation every one
    # of them would become the cohort's mean (so deploy.secure_aggregation refuses FedStale and FedVARP).
    linear_aggregation = False

    def __init__(
        self,
        *,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
        server_lr: float = 1.0,
        beta: float = 0.5,
    ) -> None:
        super().__init__(
            clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection, server_lr=server_lr
        )
        if not 0 <= beta <= 1:
            raise ValueError(f"beta must be in [0, 1] (0 is FedAvg, 1 is FedVARP), got {beta}")
        self.beta = beta
        self.memory: MutableMapping[int, torch.Tensor] = {}  # client -> y_j, its latest model change

    def start(self, server: Server) -> None:
        store = getattr(server, "client_store", None)  # the engine's per-client store, under its memory budget
        if store is not None:
            table = store.table("fedstale/y")
            if table is not self.memory:
                table.update(self.memory)  # entries set before the run (if any) move along
                self.memory = table
        super().start(server)

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        p = sample_weights(updates)
        fresh = torch.stack([u.delta for u in updates])
        zero = torch.zeros_like(server.params)
        old = torch.stack([self.memory.get(u.client_id, zero) for u in updates])
        v = fresh.T @ p + self.beta * (self.stale_mean(server) - old.T @ p)
        for u, delta in zip(updates, fresh):
            self.memory[u.client_id] = delta
        return self.server_step(server, fresh.T @ p, self.server_lr * v)

    def stale_mean(self, server: Server) -> torch.Tensor:
        """sum_j q_j y_j over all N clients (y_j = 0 for clients never seen), q_j = n_j / sum_k n_k."""
        if not self.memory:
            return torch.zeros_like(server.params)
        shares = federation_shares(server)
        peek = getattr(self.memory, "peek", self.memory.__getitem__)  # a sweep: leave the store's recency alone
        clients = list(self.memory)
        total = None
        for i in range(0, len(clients), STALE_CHUNK):
            chunk = clients[i : i + STALE_CHUNK]
            q = torch.tensor([shares[c] for c in chunk], dtype=torch.float32)
            part = torch.stack([peek(c) for c in chunk]).T @ q
            total = part if total is None else total + part
        return total


class FedVARP(FedStale):
    """FedVARP: FedStale with beta = 1 (stale and fresh updates count equally).

    Parameters
    ----------
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    server_lr : float, default 1.0
        eta_s, the server step on v.
    """

    name = "fedvarp"

    def __init__(
        self,
        *,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
        server_lr: float = 1.0,
    ) -> None:
        super().__init__(
            clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection,
            server_lr=server_lr, beta=1.0,
        )
