"""FedGH: the server trains one generalised global head on the clients' class prototypes.

Yi et al., "FedGH: Heterogeneous Federated Learning with Generalized Global Header", ACM MM 2023
(arXiv:2303.13137). Each client keeps its own model (any architecture of the zoo with the common
representation width ``model.feature_dim``); the server keeps one classifier head H (weight W, C x d,
and bias b) for all of them.

Client i, each task: replace its head with the global H; train the whole model for the task's steps
with cross-entropy; keep the trained model; compute its class prototypes C_i^(j) (mean representation
of its samples of class j) and send them with the classes it holds.

Server: with the round's prototypes as a small labelled dataset {(C_i^(j), j)}, train the global head,

    H <- H - eta_s * grad_H (1/P) sum_(i,j) CE(W C_i^(j) + b, j)       (``server_steps`` full-batch steps)

over the P (client, class) pairs, starting from the current H, and send H back. A client uses its own
body with the current global head (it is what it would start its next task with).

What travels: the head down (C * (d + 1) floats), the prototypes and their counts up (the same size).
Server-side training takes no simulated time, like all server work in hetfl, and its FLOPs are not
counted in ``train_flops`` (they are tiny: P * C * d per step).

Kept per client: its whole model, buffers included (BatchNorm's running statistics). A model of one's own
needs a classifier head (the head protocol of :mod:`hetfl.models.zoo`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update
from hetfl.strategies.hetero import SharedHead, class_prototypes, pack_prototypes, unpack_prototypes
from hetfl.strategies.selection import Selection


def train_head(head: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, *, lr: float, steps: int) -> torch.Tensor:
    """``steps`` full-batch gradient steps of cross-entropy on (prototype, label) pairs, from the flat head
    ``[W (C x d) row-major, b (C)]``; returns the new flat head."""
    n_classes, d = head.numel() // (prototypes.shape[1] + 1), prototypes.shape[1]
    w = head[: n_classes * d].reshape(n_classes, d).clone().requires_grad_(True)
    b = head[n_classes * d :].clone().requires_grad_(True)
    opt = torch.optim.SGD([w, b], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(prototypes @ w.T + b, labels).backward()
        opt.step()
    return torch.cat([w.detach().reshape(-1), b.detach()])


class FedGH(SharedHead):
    """FedGH: a generalised global head trained by the server on uploaded prototypes (Yi et al., arXiv:2303.13137).

    Parameters
    ----------
    server_lr : float, default 0.1
        Step size of the server's head training.
    server_steps : int, default 10
        Full-batch gradient steps on the round's prototypes per aggregation.
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "fedgh"

    def __init__(
        self,
        *,
        server_lr: float = 0.1,
        server_steps: int = 10,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection)
        if server_lr <= 0:
            raise ValueError("server_lr must be positive")
        if server_steps < 1:
            raise ValueError("server_steps must be at least 1")
        self.server_lr = server_lr
        self.server_steps = server_steps

    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        result = self.train_under_head(trainer, task, data, state, seed)
        local = class_prototypes(trainer, result.params, data, trainer.head.out_features)
        return ClientResult(pack_prototypes(*local), result.steps, result.loss)

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        n_classes = server.trainer.head.out_features
        pairs = [unpack_prototypes(u.params, n_classes) for u in updates]
        prototypes = torch.cat([p[c > 0] for p, c in pairs])
        labels = torch.cat([torch.nonzero(c > 0).flatten() for _, c in pairs])
        return train_head(server.params, prototypes, labels, lr=self.server_lr, steps=self.server_steps)
