"""Model-heterogeneous FL: every client keeps a whole model of its own architecture, and only a small,
architecture-independent part travels.

Clients may train different architectures (a model zoo, ``model.zoo``); what they share must not
depend on the backbone. Every model of the zoo ends in a linear classifier head on a representation
of width ``model.feature_dim`` (:mod:`hetfl.models.zoo`), so the shared part is one of: nothing (the
local-only baseline), the head (LG-FedAvg), class prototypes of the representation (FedProto,
FedGH), or an adapter on the representation (pFedLoRA-style). The server's ``params`` are that part,
not a model, so ``global_model`` is False: the engine scores each client's own model on its own test
split (``accuracy`` pools them; ``docs/metrics.md``).

A client's own model lives in its ``state["model"]``; before its first task it is its architecture's
initial model (``trainer.initial``: every client of one architecture starts from the same draw). It is the
whole flat vector, buffers included (BatchNorm's running statistics), so every client keeps its own.

What lies on the representation is found by the head protocol (:mod:`hetfl.models.zoo`): a model of one's
own needs a ``head`` attribute, an ``nn.Linear`` whose parameters are the last of the model's; the
algorithms here that share something on it refuse a model without one in one line (``local`` takes any).

This module holds the common base, :class:`OwnModels`, and the two simplest members:

- ``local``: local training only, nothing shared: the baseline every method must beat.
- ``lgfedavg``: Liang et al., "Think Locally, Act Globally: Federated Learning with Local and Global
  Representations" (arXiv:2001.01523). Each client keeps its body (its local representation) and the
  head is federated: a task starts from the client's own body and the global head, trains the whole
  model, and sends the head back; the server sets the head to the sample-weighted mean
  ``sum_i p_i head_i`` (p_i = n_i / sum_j n_j over the round's updates). A client uses its own body
  with the current global head.
"""

from __future__ import annotations

from typing import Any

import torch

from hetfl.errors import ConfigError
from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update
from hetfl.strategies.rounds import RoundStrategy, weighted_mean


class OwnModels(RoundStrategy):
    """Rounds in which each client trains a model of its own; subclasses say what is shared.

    Parameters
    ----------
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    personalised = True
    global_model = False
    model_heterogeneous = True
    shares_representation = True  # the shared part is shaped by the representation width: one width for the zoo

    def check_models(self, trainers) -> None:
        if not self.shares_representation:
            return
        for t in trainers:
            t.require_head(self.name)
            t.reference.require_head(self.name)  # the server's part is shaped by the reference architecture's
        widths = sorted({t.head.in_features for t in trainers})
        if len(widths) > 1:
            raise ConfigError(
                f"model.feature_dim: {self.name} shares what lies on the representation, whose width differs across "
                f"model.zoo ({', '.join(map(str, widths))}); set model.feature_dim to give every architecture one width"
            )

    @staticmethod
    def own_model(trainer, state: dict[str, Any]) -> torch.Tensor:
        """The client's own model: kept in its state, its architecture's initial model before the first task."""
        model = state.get("model")
        return trainer.initial if model is None else model

    def train_for_prototypes(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int,
                             regularizer=None) -> ClientResult:
        """Train the client's own model (with ``regularizer`` added to its loss), keep it, and report its class
        prototypes and counts (:func:`pack_prototypes`): the client half of FedProto and FedSA."""
        result = trainer.train(self.own_model(trainer, state), data.x, data.y, steps=task.steps, seed=seed,
                               regularizer=regularizer)
        state["model"] = result.params
        local = class_prototypes(trainer, result.params, data, trainer.head.out_features)
        return ClientResult(pack_prototypes(*local), result.steps, result.loss)

    @staticmethod
    def with_head(trainer, model: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """``model`` with its classifier head (weight, then bias, as in the flat vector) replaced by ``head``."""
        mixed = model.clone()
        mixed[trainer.head_slice] = head
        return mixed

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        """The sample-weighted mean of what the clients sent (override for another rule)."""
        return weighted_mean(updates)


class LocalOnly(OwnModels):
    """Local training only: every client trains its own model and nothing is shared.

    The server holds an empty tensor, so no bytes travel; rounds still pace who trains when.

    Parameters
    ----------
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "local"
    shares_representation = False

    def initial_params(self, trainer) -> torch.Tensor:
        return torch.zeros(0)

    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        result = trainer.train(self.own_model(trainer, state), data.x, data.y, steps=task.steps, seed=seed)
        state["model"] = result.params
        return ClientResult(torch.zeros(0), result.steps, result.loss)

    def personal_params(self, trainer, params: torch.Tensor, data: ClientData, state: dict[str, Any], seed: int):
        return self.own_model(trainer, state)

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        return server.params


class SharedHead(OwnModels):
    """Rounds in which the server holds one classifier head and every client trains its own body under it.

    A task starts from the client's own model with its head replaced by the global one and trains all
    of it; a client uses its own body with the current global head. Subclasses say what is sent back
    and how the head is updated (LG-FedAvg: the heads, averaged; FedGH: prototypes, a head trained on them).
    """

    def check_models(self, trainers) -> None:
        super().check_models(trainers)
        for t in trainers:
            if t.head_slice.start == t.n_buffers:
                raise ConfigError(
                    f"{t.key}: {self.name} keeps a body on each client and shares the classifier head, and "
                    f"{t.label} is the head alone (as logreg is without model.feature_dim); use mlp or cnn, or set "
                    "model.feature_dim"
                )

    def initial_params(self, trainer) -> torch.Tensor:
        return trainer.initial[trainer.head_slice].clone()

    def train_under_head(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int):
        """Train the client's own model from its body and the global head ``task.params``; keep the result."""
        start = self.with_head(trainer, self.own_model(trainer, state), task.params)
        result = trainer.train(start, data.x, data.y, steps=task.steps, seed=seed)
        state["model"] = result.params
        return result

    def personal_params(self, trainer, params: torch.Tensor, data: ClientData, state: dict[str, Any], seed: int):
        return self.with_head(trainer, self.own_model(trainer, state), params)


class LGFedAvg(SharedHead):
    """LG-FedAvg: each client keeps its body, the head is federated (Liang et al., arXiv:2001.01523).

    Works across architectures that share the representation width (``model.feature_dim``). Only the
    head travels, both ways.

    Parameters
    ----------
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "lgfedavg"

    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        result = self.train_under_head(trainer, task, data, state, seed)
        return ClientResult(result.params[trainer.head_slice].clone(), result.steps, result.loss)


def class_prototypes(trainer, params: torch.Tensor, data: ClientData, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean representation of ``data`` under the model ``params``: ``(prototypes, counts)``.

    ``prototypes[j]`` is (1/|D_j|) sum over the samples of class j of the head's input (FedProto's
    C_i^(j), eq. 1); ``counts[j] = |D_j|``; a class the client does not hold has count 0 and a zero row. The model
    is in ``eval`` mode (BatchNorm uses its running statistics).
    """
    return prototypes_of(representations(trainer, params, data.x), data.y, n_classes)


def representations(trainer, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The head's input for every sample of ``x`` under the model ``params``, in ``eval`` mode, without gradients."""
    with torch.no_grad():
        trainer.load(params)
        features, _ = trainer.features(x)
    return features


def prototypes_of(features: torch.Tensor, y: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class means of ``features`` and the class counts (:func:`class_prototypes` on given representations)."""
    counts = torch.bincount(y, minlength=n_classes).float()
    sums = torch.zeros(n_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, y, features)
    return sums / counts.clamp(min=1).unsqueeze(1), counts


def pack_prototypes(prototypes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """One flat vector ``[prototypes (C x d, row-major), counts (C)]``: what travels."""
    return torch.cat([prototypes.reshape(-1), counts])


def unpack_prototypes(flat: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pack_prototypes`."""
    return flat[:-n_classes].reshape(n_classes, -1), flat[-n_classes:]


def prototype_mean(updates: list[Update], n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class j, the sample-weighted mean of the clients' prototypes: sum_i (|D_ij| / N_j) C_i^(j), with
    N_j = sum_i |D_ij| over the clients that hold class j; and N_j. A class nobody holds gets a zero row, N_j = 0."""
    protos, counts = zip(*(unpack_prototypes(u.params, n_classes) for u in updates))
    counts_t = torch.stack(counts)  # (clients, C)
    total = counts_t.sum(0)
    weighted = (torch.stack(protos) * counts_t.unsqueeze(2)).sum(0)  # (C, d)
    return weighted / total.clamp(min=1).unsqueeze(1), total
