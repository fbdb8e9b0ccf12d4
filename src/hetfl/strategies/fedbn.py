"""FedBN: FedAvg whose normalisation layers stay on each client.

Li, Jiang, Zhang, Kamp and Dou, "FedBN: Federated Learning on Non-IID Features via Local Batch
Normalization", ICLR 2021 (arXiv:2102.07623). Clients whose inputs differ in distribution (feature shift:
scanners, cameras, styles) share every weight of the model except the batch-normalisation layers': each
client keeps its own BatchNorm scale and shift (``weight``, ``bias``) and running statistics
(``running_mean``, ``running_var``), which normalise its own features. In the authors' code every
``state_dict`` key of a BatchNorm layer (named ``bn``) is left out of the average; here the layers are found
by type, so any model's BatchNorm layers count, whatever they are called.

With ``L`` the entries of the flat vector that belong to the normalisation layers (their parameters and
running statistics, :meth:`~hetfl.training.local.LocalTrainer.entries`) and ``S`` the rest, client ``i``
starts a task from ``w[S]`` (the global shared part) and its own ``l_i`` (the global model's ``w[L]`` the first
time), trains the whole model as FedAvg does, keeps its new ``l_i`` in its ``state``, and the server sets, with
p_i = n_i / sum_j n_j over the round's updates,

    w[S] <- sum_i p_i w_i[S]          (FedAvg over the shared part)

A client scores (``personal_params``) with ``w[S]`` and its own ``l_i`` (the global model before its first task).

The global model's normalisation entries ``w[L]`` (``global_norm``), a choice of hetfl's; the paper's clients
never use them once they have trained:

- ``mean`` (default): the sample-weighted mean of the round's clients' ``l_i``, ``w[L] <- sum_i p_i l_i`` (for
  the running variances that is the mean of the variances, not the variance of the pooled data). It is what a
  client starts its first task from, and what the global score (``accuracy``) uses, so that the global model is
  the FedAvg of the whole model. For it each upload also carries the client's ``l_i`` (a few numbers per
  channel), and a client's first download carries ``w[L]``.
- ``initial``: ``w[L]`` stays as the model was initialised, as the authors' server model does (it never averages
  the ``bn`` keys): normalisation entries never leave a client, a first task starts from the initialisation
  (which the client can build itself from the config's seed), and the global score is that of the shared part
  with untrained normalisation: use ``personal_*``.

Bytes (``transfer_bytes``): the shared part both ways, plus, under ``mean``, the normalisation entries up with
every update and down to a client the server has no update from yet (it has none of its own).

What is not federated: BatchNorm's integer ``num_batches_tracked`` (:mod:`hetfl.training.local`); a layer with
``momentum=None`` divides by it, so its running averages are not per client then.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from hetfl.errors import ConfigError
from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update
from hetfl.strategies.rounds import RoundStrategy, weighted_mean
from hetfl.strategies.selection import Selection

NORM_LAYERS: dict[str, tuple[type[nn.Module], ...]] = {
    "batchnorm": (nn.modules.batchnorm._BatchNorm,),  # BatchNorm1d/2d/3d, SyncBatchNorm, their lazy forms
    "all": (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm,
            *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())),
}


def norm_entries(trainer, layers: str = "batchnorm") -> torch.Tensor:
    """The indices into ``trainer``'s flat vector of its normalisation layers' parameters and running statistics
    (``layers``: ``batchnorm``, or ``all`` normalisation layers), ascending."""
    cache = trainer.__dict__.setdefault("_norm_entries", {})  # on the trainer: one architecture, fixed layout
    if layers not in cache:
        kinds = NORM_LAYERS[layers]
        found = [trainer.entries(m) for m in trainer.model.modules() if isinstance(m, kinds)]
        cache[layers] = torch.cat(found).sort().values if found else torch.zeros(0, dtype=torch.long)
    return cache[layers]


class FedBN(RoundStrategy):
    """FedBN: FedAvg, with each client's normalisation layers kept local (Li et al., arXiv:2102.07623).

    Parameters
    ----------
    layers : {"batchnorm", "all"}, default "batchnorm"
        Which layers stay on the clients: BatchNorm (``nn.BatchNorm1d/2d/3d``), as in the paper; or every
        normalisation layer (also ``GroupNorm``, ``LayerNorm``, ``InstanceNorm*``, ``RMSNorm``).
    global_norm : {"mean", "initial"}, default "mean"
        The global model's normalisation entries: the sample-weighted mean of the clients' (uploaded with each
        update), or the initialisation, which never changes (nothing of the layers travels); see the module
        docstring.
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "fedbn"
    personalised = True

    def __init__(
        self,
        *,
        layers: Literal["batchnorm", "all"] = "batchnorm",
        global_norm: Literal["mean", "initial"] = "mean",
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection)
        if layers not in NORM_LAYERS:
            raise ValueError(f"layers must be one of {', '.join(NORM_LAYERS)}; got {layers!r}")
        if global_norm not in ("mean", "initial"):
            raise ValueError(f"global_norm must be 'mean' or 'initial'; got {global_norm!r}")
        self.layers = layers
        self.global_norm = global_norm
        self.trained: set[int] = set()  # clients the server has an update from: they hold their own entries

    def check_model(self, model_name: str) -> None:
        if model_name in ("logreg", "mlp", "cnn", "cnn1d", "tinylm"):
            raise ConfigError(
                f"model.name: fedbn keeps the BatchNorm layers on each client, and the built-in {model_name} has none; "
                "use resnet or a model of your own with nn.BatchNorm1d/2d/3d layers (model.name: package.module:Class)"
            )

    def check_models(self, trainers) -> None:
        for trainer in trainers:
            if not norm_entries(trainer, self.layers).numel():
                which = "BatchNorm layers" if self.layers == "batchnorm" else "normalisation layers"
                raise ConfigError(
                    f"{trainer.key}: fedbn keeps the {which} on each client, and {trainer.label} has none; use a model "
                    f"with nn.BatchNorm1d/2d/3d layers{'' if self.layers == 'all' else ' (or strategy.params.layers: all)'}"
                )

    # -- the client half ------------------------------------------------------------------------
    def with_own_norm(self, trainer, params: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """``params`` with its normalisation entries replaced by the client's own (``params`` if it has none)."""
        if "norm" not in state:
            return params
        mixed = params.clone()
        mixed[norm_entries(trainer, self.layers)] = state["norm"]
        return mixed

    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        local = norm_entries(trainer, self.layers)
        start = self.with_own_norm(trainer, task.params, state)
        result = trainer.train(start, data.x, data.y, steps=task.steps, seed=seed)
        state["norm"] = result.params[local].clone()
        upload = result.params
        if self.global_norm == "initial":  # the entries never leave the client: send back what was received
            upload = upload.clone()
            upload[local] = task.params[local]
        return ClientResult(upload, result.steps, result.loss)

    def personal_params(self, trainer, params: torch.Tensor, data: ClientData, state: dict[str, Any], seed: int):
        return None if "norm" not in state else self.with_own_norm(trainer, params, state)

    # -- the server half ------------------------------------------------------------------------
    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        new = weighted_mean(updates)
        if self.global_norm == "initial":
            local = norm_entries(server.trainer, self.layers)
            new[local] = server.params[local]
        self.trained.update(u.client_id for u in updates)
        return new

    def transfer_bytes(self, server: Server, task: Task) -> tuple[int, int]:
        size = server.params.element_size()
        n_norm = int(norm_entries(server.trainer, self.layers).numel())
        shared = (server.params.numel() - n_norm) * size
        norm = n_norm * size if self.global_norm == "mean" else 0
        down = shared + (0 if task.client_id in self.trained else norm)
        return down, shared + norm

    def describe_transfer(self, trainer) -> str:
        n_norm = int(norm_entries(trainer, self.layers).numel())
        shared = (trainer.numel - n_norm) * trainer.flat.element_size()
        return f"{shared / 1e3:.1f} kB a transfer (the {n_norm:,} normalisation entries stay on the clients)"
