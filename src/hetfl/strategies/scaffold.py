"""SCAFFOLD: control variates correct each client's drift towards its own optimum.

Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020 (arXiv:1910.06378), Algorithm 1 with option II.

The server keeps a control variate c, each client its own c_i (zero at first). A client runs
K SGD steps of y <- y - eta_l (g(y) - c_i + c), then

    c_i+ = c_i - c + (x - y) / (K eta_l)
    sends  Delta y = y - x  and  Delta c = c_i+ - c_i

and the server, over the sampled set S of N clients,

    x <- x + eta_g * mean_S(Delta y)
    c <- c + (|S| / N) * mean_S(Delta c)

Both directions carry two model-sized tensors, which the byte counts include.
"""

from __future__ import annotations

from typing import Any

import torch

from hetfl.errors import ConfigError
from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update
from hetfl.strategies.rounds import RoundStrategy
from hetfl.strategies.selection import Selection


class Scaffold(RoundStrategy):
    """Stochastic controlled averaging (clients must use plain SGD).

    Parameters
    ----------
    server_lr : float, default 1.0
        Global step size eta_g.
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "scaffold"
    upload_copies = 2

    def __init__(
        self,
        *,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
        server_lr: float = 1.0,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection)
        if server_lr <= 0:
            raise ValueError("server_lr must be positive")
        self.server_lr = server_lr
        self.c: torch.Tensor | None = None

    def check_training(self, optimizer: str, momentum: float) -> None:
        if optimizer != "sgd" or momentum != 0:
            raise ConfigError("training.optimizer: scaffold needs plain SGD (training.optimizer=sgd, training.momentum=0)")

    def configure(self, server: Server, client_id: int) -> dict[str, Any]:
        if self.c is None:
            self.c = torch.zeros_like(server.params)
        return {"payload": {"c": self.c}}

    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        c = task.payload["c"]
        c_i = state.get("c_i")
        if c_i is None:
            c_i = torch.zeros_like(c)
        result = trainer.train(task.params, data.x, data.y, steps=task.steps, seed=seed, correction=c - c_i)
        c_i_new = c_i - c + (task.params - result.params) / (result.steps * trainer.cfg.lr)
        state["c_i"] = c_i_new
        return ClientResult(result.params, result.steps, result.loss, payload={"delta_c": c_i_new - c_i})

    def expected_payload(self, server: Server, task: Task) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"delta_c": (tuple(task.params.shape), task.params.dtype)}  # Delta c_i: one tensor of the model's size

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        assert self.c is not None
        delta_y = torch.stack([u.delta for u in updates]).mean(0)
        delta_c = torch.stack([u.payload["delta_c"] for u in updates]).mean(0)
        self.c = self.c + (len(updates) / server.n_clients) * delta_c
        return server.params + self.server_lr * delta_y
