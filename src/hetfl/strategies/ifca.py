"""IFCA: the Iterative Federated Clustering Algorithm (Ghosh et al., arXiv:2006.04088).

Ghosh, Chung, Yin and Ramchandran, "An Efficient Framework for Clustered Federated Learning",
NeurIPS 2020 (arXiv:2006.04088), with model averaging.

The server keeps K cluster models theta_1..theta_K and sends all of them with every task. Client i
estimates its cluster as the model with the lowest loss on its own training data,

    j_i = argmin_j F_i(theta_j),

trains theta_{j_i} locally and returns the result with j_i. The server then replaces each cluster
model by the sample-weighted mean of the client models that chose it (a cluster nobody chose in a
round is unchanged):

    theta_j <- sum_{i: j_i = j} n_i theta_i / sum_{i: j_i = j} n_i

Initialisation: cluster 0 is the engine's initial model; cluster k >= 1 is a fresh draw of the
architecture's own initialisation (each layer's ``reset_parameters``) under torch seed
``(init_seed, k)``, so the K models differ as much as K independent initialisations do.

The engine's global model (what ``accuracy`` measures, and ``Task.params``) is the model of the
*largest* cluster: the one most training samples chose, counting each client by its latest choice
(ties: the lower index). The other K - 1 models travel as ``Task.payload`` (``cluster_<k>``), so a
task downloads exactly K models and the byte counts include them. ``personal_params`` is IFCA's
inference: the cluster model with the lowest loss on the client's training data.

Buffers (BatchNorm's running statistics) are part of each cluster model and averaged with it; nothing is
kept per client. Losses are measured with the model in ``eval`` mode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update
from hetfl.strategies.rounds import RoundStrategy, weighted_mean
from hetfl.strategies.selection import Selection


def fresh_initialisation(trainer: Any, seed: int) -> torch.Tensor:
    """The architecture's own initialisation drawn again under ``seed`` (flat: buffers, e.g. BatchNorm's running
    statistics reset, then parameters), leaving the trainer as it was (its buffers outside the flat vector too)."""
    saved = trainer.flat.clone()
    others = [b for b in trainer.model.buffers() if not b.is_floating_point()]  # num_batches_tracked: not federated
    kept = [b.clone() for b in others]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in trainer.model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    trainer.collect()
    fresh = trainer.flat.clone()
    trainer.load(saved)
    for b, value in zip(others, kept):
        b.copy_(value)
    return fresh


def cluster_losses(trainer: Any, models: list[torch.Tensor], data: ClientData) -> list[float]:
    """F_i(theta_j) for every cluster model: mean cross-entropy on the client's training data."""
    return [float(F.cross_entropy(trainer.predict(m, data.x), data.y)) for m in models]


class IFCA(RoundStrategy):
    """Clustered FL by loss-based cluster estimation on the client.

    Parameters
    ----------
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    n_clusters : int, default 2
        K, the number of cluster models.
    init_seed : int, default 0
        Seed of the initialisations of clusters 1..K-1 (cluster k uses torch seed ``1000 * init_seed + k``).
    """

    name = "ifca"
    personalised = True

    def __init__(
        self,
        *,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
        n_clusters: int = 2,
        init_seed: int = 0,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection)
        if n_clusters < 1:
            raise ValueError("n_clusters must be at least 1")
        self.n_clusters = n_clusters
        self.init_seed = init_seed
        self.models: list[torch.Tensor] | None = None  # theta_1..theta_K; models[global_cluster] is server.params
        self.global_cluster = 0
        self.assignment: dict[int, int] = {}  # client -> its latest cluster choice
        self._n: dict[int, int] = {}  # client -> training samples (from its updates)

    # -- server ----------------------------------------------------------------------------
    def start(self, server: Server) -> None:
        if self.models is None:  # start is called again after a stop with nothing in flight
            self.models = [server.params] + [
                fresh_initialisation(server.trainer, 1000 * self.init_seed + k) for k in range(1, self.n_clusters)
            ]
        super().start(server)

    def configure(self, server: Server, client_id: int) -> dict[str, Any]:
        assert self.models is not None
        g = self.global_cluster
        payload = {f"cluster_{k}": m for k, m in enumerate(self.models) if k != g}
        return {"payload": payload, "options": {"global_cluster": g, "n_clusters": self.n_clusters}}

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        assert self.models is not None
        models = list(self.models)
        for j in range(self.n_clusters):
            chose = [u for u in updates if int(u.stats["cluster"]) == j]
            if chose:
                models[j] = weighted_mean(chose)
        for u in updates:
            self.assignment[u.client_id] = int(u.stats["cluster"])
            self._n[u.client_id] = u.n_samples
        self.models = models
        self.global_cluster = self.largest_cluster()
        return models[self.global_cluster]

    def largest_cluster(self) -> int:
        """The cluster most training samples chose (each client counted by its latest choice; ties: lower index)."""
        size = [0] * self.n_clusters
        for client, j in self.assignment.items():
            size[j] += self._n.get(client, 1)
        return max(range(self.n_clusters), key=lambda j: (size[j], -j))

    def metrics(self) -> dict[str, float]:
        used = len(set(self.assignment.values()))
        return {"clusters_used": float(used), "global_cluster": float(self.global_cluster)}

    # -- client ----------------------------------------------------------------------------
    @staticmethod
    def received_models(task: Task) -> list[torch.Tensor]:
        """The K cluster models of a task, in cluster order (the global one is ``task.params``)."""
        g, k = int(task.options["global_cluster"]), int(task.options["n_clusters"])
        return [task.params if j == g else task.payload[f"cluster_{j}"] for j in range(k)]

    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        models = self.received_models(task)
        losses = cluster_losses(trainer, models, data)
        j = min(range(len(models)), key=lambda c: losses[c])
        result = trainer.train(models[j], data.x, data.y, steps=task.steps, seed=seed)
        return ClientResult(result.params, result.steps, result.loss, stats={"cluster": float(j)})

    def personal_params(self, trainer, params: torch.Tensor, data: ClientData, state: dict[str, Any],
                        seed: int) -> torch.Tensor | None:
        """IFCA's inference: the current cluster model with the lowest loss on the client's training data."""
        if self.models is None:
            return None
        losses = cluster_losses(trainer, self.models, data)
        return self.models[min(range(len(self.models)), key=lambda c: losses[c])]
