"""Ditto: every client keeps a personal model pulled towards the global one; the global model is FedAvg's.

Li, Hu, Beirami and Smith, "Ditto: Fair and Robust Federated Learning Through Personalization",
ICML 2021 (arXiv:2012.04221), Algorithm 1. Client k solves

    min_{v_k}  h_k(v_k; w) = F_k(v_k) + (lambda / 2) ||v_k - w||^2

next to the global problem min_w sum_k p_k F_k(w). In a task that starts from the global model w^t,
client k

    (a) trains w_k from w^t for ``steps`` SGD steps on F_k (as in FedAvg) and sends w_k back;
    (b) takes ``personal_steps`` steps on its personal model, anchored at the w^t it received,
            v_k <- v_k - eta (grad F_k(v_k) + lambda (v_k - w^t)),
        with v_k kept in the client's state (v_k = w^t the first time).

The server aggregates the w_k exactly as FedAvg, w <- w + eta_s sum_k p_k (w_k - w), p_k = n_k / sum_j n_j.
``lambda = 0`` makes v_k plain local training; lambda -> infinity keeps v_k at w^t. Evaluation scores each
client with its v_k (the global model for a client that never trained).

The anchor differs from the point (b) starts from, whereas ``LocalTrainer.train``'s ``prox_mu`` anchors
at the start point; the exact gradient is recovered with a constant correction:
``lambda (v - v_start) + lambda (v_start - w^t) = lambda (v - w^t)``.

Both w_k and v_k are whole flat vectors, buffers included (BatchNorm's running statistics): v_k's stay on
the client with it, w_k's are averaged with the parameters. The proximal term pulls only the parameters (the
trainer leaves buffer entries of its gradient terms unused).

Cost: a task trains ``steps + personal_steps`` steps, and ``compute_steps`` says so, so the engine
times (and counts in ``trained_steps``) both trainings: 2x FedAvg's compute with the default
``personal_steps``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hetfl.strategies.base import ClientData, ClientResult, Task
from hetfl.strategies.fedavg import FedAvg
from hetfl.strategies.selection import Selection


class Ditto(FedAvg):
    """FedAvg for the global model plus a proximally regularised personal model on every client.

    Parameters
    ----------
    lam : float, default 1.0
        The paper's lambda, weight of (lambda/2)||v_k - w||^2. The paper tunes it per client from
        {0.05, ..., 2} on local validation data and falls back to a fixed lambda = 1 outside strong
        attacks; 1.0 is that fixed value. 0 gives purely local personal models.
    personal_steps : int or None, default None
        Steps of the personal update per task; None: the task's ``steps`` (the paper's s = local iterations).
    clients_per_round, deadline_s, selection, server_lr
        As for :class:`~hetfl.strategies.fedavg.FedAvg`.
    """

    name = "ditto"
    personalised = True

    def __init__(
        self,
        *,
        lam: float = 1.0,
        personal_steps: int | None = None,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
        server_lr: float = 1.0,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection, server_lr=server_lr)
        if lam < 0:
            raise ValueError("lam must be non-negative (0: purely local personal models)")
        if personal_steps is not None and personal_steps < 0:
            raise ValueError("personal_steps must be non-negative (or None for the task's steps)")
        self.lam = lam
        self.personal_steps = personal_steps

    def compute_steps(self, steps: int) -> int:
        return steps + (steps if self.personal_steps is None else self.personal_steps)

    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        w = task.params
        result = trainer.train(w, data.x, data.y, steps=task.steps, seed=seed, **task.options)  # (a): FedAvg's
        v = state.get("v")
        if v is None:
            v = w
        steps = task.steps if self.personal_steps is None else self.personal_steps
        personal_seed = int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])  # its own batch order
        correction = self.lam * (v - w) if self.lam else None  # with prox_mu = lam: lam (v' - w)
        personal = trainer.train(v, data.x, data.y, steps=steps, seed=personal_seed, prox_mu=self.lam,
                                 correction=correction)
        state["v"] = personal.params
        return ClientResult(result.params, result.steps, result.loss)

    def personal_params(
        self, trainer, params: torch.Tensor, data: ClientData, state: dict[str, Any], seed: int
    ) -> torch.Tensor | None:
        return state.get("v")
