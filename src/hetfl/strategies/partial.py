"""Personalisation by sharing part of the model: FedPer and FedRep (LG-FedAvg, which shares the head
and so also works across architectures, is in :mod:`hetfl.strategies.hetero`).

Every model these algorithms train ends in a linear classifier, the *head* (the head protocol of
:mod:`hetfl.models.zoo`; ``trainer.head_slice``, the tail of the flat vector); the parameters before it are the
*body* (the representation), and the model's floating-point buffers (BatchNorm's running statistics) come
first in the flat vector. One part is federated, the other stays on each client, in its ``state``:

- FedPer: Arivazhagan et al., "Federated Learning with Personalization Layers" (arXiv:1912.00818).
  The body is federated, each client keeps its own head. A task starts from the global body and the
  client's own head (the global head the first time) and trains all of it.
- FedRep: Collins et al., "Exploiting Shared Representations for Personalized Federated Learning",
  ICML 2021 (arXiv:2102.07078), Algorithm 1. Like FedPer, but a task first trains the head alone
  (``head_steps`` steps, body frozen), then the body alone (the task's steps, head frozen).

Buffers stay on the client with its private part (``state["buffers"]``, as FedBN keeps normalisation
statistics local): they are statistics of the client's own activations. In FedRep they move with the body,
in the body phase (the head phase's forward passes move them too; they are put back with the body).

The server, over a round's updates with p_i = n_i / sum_j n_j, sets the shared part to

    shared <- sum_i p_i shared_i                       (FedAvg over the shared part)

and, a choice of hetfl's rather than the papers' (whose private parts never leave the client), the
private part (and the buffers) of the global vector to the same weighted mean of the clients' private parts.
No client that has trained ever uses it (it starts from its own), but it gives a first-time client a trained
start instead of the random initialisation, and it makes the global-model metrics (``accuracy``,
``client_acc_mean``) those of a trained model. The whole update is therefore the sample-weighted mean
of the returned models; what makes the algorithms personal is where clients start and what they use:
``personal_params`` is the global shared part with the client's own private part and buffers (None before the
client has trained: the global model).

Bytes: only the shared part needs to travel, but the engine counts the whole model both ways (and
the private part of the update is what the server's mean above uses).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from hetfl.errors import ConfigError
from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update
from hetfl.strategies.rounds import RoundStrategy, weighted_mean
from hetfl.strategies.selection import Selection


class PartialSharing(RoundStrategy):
    """Rounds in which one part of the model (``private``: "head" here; "body" works too), and the model's buffers,
    stay on each client.

    Parameters
    ----------
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    private: ClassVar[str] = "head"
    personalised = True

    def check_model(self, model_name: str) -> None:
        if model_name == "logreg":
            raise ConfigError(
                f"model.name: {self.name} splits the model into a body and a classifier head, and logreg is the "
                "head alone; use mlp or cnn"
            )

    def check_models(self, trainers) -> None:
        for trainer in trainers:
            trainer.require_head(self.name)
            if trainer.body_slice.start == trainer.body_slice.stop:
                raise ConfigError(
                    f"{trainer.key}: {self.name} splits the model into a body and a classifier head, and "
                    f"{trainer.label} is the head alone (no parameters before it); use a model with a body"
                )

    def private_slice(self, trainer) -> slice:
        """Where the private parameters (the head, or the body) lie in the flat vector; the buffers, in front of
        them, are the client's too (:meth:`kept`)."""
        return trainer.head_slice if self.private == "head" else trainer.body_slice

    def kept(self, trainer) -> dict[str, slice]:
        """What the client keeps in its state, by state key: its private part, and its buffers if the model has any."""
        parts = {self.private: self.private_slice(trainer)}
        if trainer.n_buffers:
            parts["buffers"] = trainer.buffer_slice
        return parts

    def with_own_part(self, trainer, params: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """``params`` with its private part and buffers replaced by the client's own (``params`` itself if it has
        none)."""
        if self.private not in state:
            return params
        mixed = params.clone()
        for key, part in self.kept(trainer).items():
            if key in state:
                mixed[part] = state[key]
        return mixed

    def local_train(self, trainer, start: torch.Tensor, task: Task, data: ClientData, seed: int) -> ClientResult:
        """Training from ``start``: all parameters together (FedPer, LG-FedAvg)."""
        result = trainer.train(start, data.x, data.y, steps=task.steps, seed=seed)
        return ClientResult(result.params, result.steps, result.loss)

    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        result = self.local_train(trainer, self.with_own_part(trainer, task.params, state), task, data, seed)
        for key, part in self.kept(trainer).items():
            state[key] = result.params[part].clone()
        return result

    def personal_params(self, trainer, params: torch.Tensor, data: ClientData, state: dict[str, Any], seed: int):
        return None if self.private not in state else self.with_own_part(trainer, params, state)

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        return weighted_mean(updates)


class FedPer(PartialSharing):
    """FedPer: federated body, a head of its own on each client (Arivazhagan et al., arXiv:1912.00818).

    Kept per client (``state``): the head (``"head"``) and the model's buffers (``"buffers"``, BatchNorm's
    running statistics), if it has any.

    Parameters
    ----------
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "fedper"
    private = "head"


class FedRep(PartialSharing):
    """FedRep: the head alone, then the body alone, each task (Collins et al., arXiv:2102.07078).

    A task runs ``head_steps`` steps on the head with the body frozen, from the global body and the
    client's own head, then the task's steps on the body with the head frozen (its gradient is
    zeroed by the trainer's ``grad_mask``). The frozen part is put back exactly after each phase, so
    weight decay does not move it either.

    Kept per client (``state``): the head (``"head"``) and the model's buffers (``"buffers"``), which move with
    the body, in the body phase.

    The engine times and counts both phases (``compute_steps``: the task's steps + ``head_steps``).

    Parameters
    ----------
    head_steps : int, default 10
        Optimiser steps on the head (body frozen) before the body phase. The paper gives the
        low-dimensional head many local updates for every update of the representation.
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "fedrep"
    private = "head"

    def __init__(
        self,
        *,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
        head_steps: int = 10,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection)
        if head_steps < 0:
            raise ValueError("head_steps must be at least 0")
        self.head_steps = head_steps

    def compute_steps(self, steps: int) -> int:
        return steps + self.head_steps

    def configure(self, server: Server, client_id: int) -> dict[str, Any]:
        return {"options": {"head_steps": self.head_steps}}

    def local_train(self, trainer, start: torch.Tensor, task: Task, data: ClientData, seed: int) -> ClientResult:
        head, body, buffers = trainer.head_slice, trainer.body_slice, trainer.buffer_slice
        head_only = torch.zeros_like(start)
        head_only[head] = 1.0
        head_steps = int(task.options.get("head_steps", self.head_steps))
        params = start.clone()
        if head_steps:
            phase = trainer.train(start, data.x, data.y, steps=head_steps, seed=seed, grad_mask=head_only)
            params[head] = phase.params[head]  # body and buffers exactly as they came
        phase = trainer.train(params, data.x, data.y, steps=task.steps, seed=seed + 1, grad_mask=1.0 - head_only)
        params[body] = phase.params[body]  # head exactly as the head phase left it
        params[buffers] = phase.params[buffers]  # the statistics of the body phase's representation
        return ClientResult(params, phase.steps, phase.loss, stats={"head_steps": float(head_steps)})
