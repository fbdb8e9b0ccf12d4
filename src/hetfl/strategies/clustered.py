"""FL+HC: FedAvg, then one hierarchical clustering of client updates, then FedAvg per cluster (arXiv:2004.11791).

Briggs, Fan and Andras, "Federated learning with hierarchical clustering of local updates to improve
training on non-IID data", IJCNN 2020 (arXiv:2004.11791), the one-shot variant. ("Adaptive Personalization
in Federated Learning for Highly Non-i.i.d. Data", hierarchical clustering with meta-learning, is
:mod:`hetfl.strategies.hcmeta`.)

1. ``warmup_rounds`` rounds of FedAvg; the server keeps each client's latest update
   Delta_i = w_i - w (its trained model minus the global model it started from).
2. After the last warm-up aggregation, agglomerative clustering of those updates with cosine distance
   d(i, j) = 1 - <Delta_i, Delta_j> / (|Delta_i| |Delta_j|) and the chosen linkage, cut at
   ``distance_threshold`` or into ``n_clusters`` clusters. Every cluster model starts from the global
   model of that moment.
3. From then on each cluster is its own FedAvg: a member trains its cluster's model and the cluster
   model becomes the sample-weighted mean of its members' models in the round (unchanged if none came).

Deviations forced by partial participation: Briggs et al. cluster updates all computed from one
global model in a dedicated round; here each client's latest warm-up update is used (clients that
never took part in the warm-up are not clustered). Such a client, met after the clustering, trains
the global model; its update assigns it to the cluster whose mean normalised warm-up update is most
cosine-similar, and counts in that cluster's average only if that cluster's model is what it trained.

Variants change three hooks and keep the rest: ``ready`` (when to cluster; OCFL: the updates' temperature),
``labels`` (how; OCFL: HDBSCAN) and ``cluster_step`` (a cluster's new model; HC-meta: Reptile's step).

The engine's global model is the model of the largest cluster (most member samples; ties: lower
index). Other clusters' members receive their model as ``Task.payload["model"]`` (counted in bytes;
the engine also sends the global model with every task, so their download is two models).
``personal_params`` is the client's cluster model (None, the global model, for unclustered clients).

Buffers (BatchNorm's running statistics, the first entries of the flat vector) are part of each cluster's
model and averaged with it; nothing is kept per client. The clustering compares the parameters' changes only
(the buffers' changes are statistics of the data, not directions of training).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update, buffer_entries
from hetfl.strategies.rounds import RoundStrategy, weighted_mean
from hetfl.strategies.selection import Selection


def cosine_distances(updates: torch.Tensor) -> np.ndarray:
    """d(i, j) = 1 - <u_i, u_j> / (|u_i| |u_j|) between the rows of ``updates`` (float64, symmetric, zero diagonal,
    in [0, 2]). A zero row has cosine similarity 0 with everything (distance 1)."""
    unit = updates.double() / updates.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    dist = (1.0 - unit @ unit.T).clamp(0.0, 2.0).numpy()
    dist = (dist + dist.T) / 2
    np.fill_diagonal(dist, 0.0)
    return dist


def cosine_clusters(
    updates: torch.Tensor, *, distance_threshold: float | None = None, n_clusters: int | None = None,
    method: str = "average",
) -> list[int]:
    """Agglomerative clustering of the rows of ``updates`` with cosine distance; labels 0.. in order of first row.

    Give exactly one of ``distance_threshold`` (merge while the linkage distance is at most it) and
    ``n_clusters``. A zero row has cosine similarity 0 with everything (distance 1).
    """
    if (distance_threshold is None) == (n_clusters is None):
        raise ValueError("give exactly one of distance_threshold and n_clusters")
    from scipy.cluster import hierarchy  # here, not at the top: kept out of every hetfl process's start-up
    from scipy.spatial.distance import squareform

    m = updates.shape[0]
    if m < 2:
        return [0] * m
    tree = hierarchy.linkage(squareform(cosine_distances(updates), checks=False), method=method)
    if n_clusters is not None:
        raw = hierarchy.fcluster(tree, t=n_clusters, criterion="maxclust")
    else:
        raw = hierarchy.fcluster(tree, t=distance_threshold, criterion="distance")
    relabel: dict[int, int] = {}
    return [relabel.setdefault(int(r), len(relabel)) for r in raw]


class FLHC(RoundStrategy):
    """FedAvg with a one-shot hierarchical clustering of client updates (FL+HC).

    Parameters
    ----------
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    warmup_rounds : int, default 5
        Aggregations (rounds with at least one update) of plain FedAvg before the clients are clustered.
    distance_threshold : float or None, default 0.8
        Cosine distance (in [0, 2]) at which the dendrogram is cut; ignored when ``n_clusters`` is set.
    n_clusters : int or None, default None
        Cut the dendrogram into this many clusters instead of at a distance.
    linkage : {"average", "complete", "single"}, default "average"
        Linkage criterion of the agglomerative clustering.
    """

    name = "flhc"
    personalised = True

    def __init__(
        self,
        *,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
        warmup_rounds: int = 5,
        distance_threshold: float | None = 0.8,
        n_clusters: int | None = None,
        linkage: Literal["average", "complete", "single"] = "average",
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection)
        if warmup_rounds < 1:
            raise ValueError("warmup_rounds must be at least 1 (the clustering needs updates)")
        if n_clusters is not None and n_clusters < 1:
            raise ValueError("n_clusters must be at least 1 (or None to cut at distance_threshold)")
        if n_clusters is None and (distance_threshold is None or distance_threshold <= 0):
            raise ValueError("distance_threshold must be positive (or set n_clusters)")
        self.warmup_rounds = warmup_rounds
        self.distance_threshold = None if n_clusters is not None else distance_threshold
        self.n_clusters = n_clusters
        self.linkage = linkage
        self.rounds = 0
        self.latest: dict[int, torch.Tensor] = {}  # client -> its latest warm-up update (freed once clustered)
        self.cluster_of: dict[int, int] = {}
        self.models: list[torch.Tensor] = []  # empty until the clustering
        self.centroids: torch.Tensor | None = None  # mean normalised warm-up update per cluster
        self.global_cluster = 0
        self._n: dict[int, int] = {}

    @property
    def clustered(self) -> bool:
        return bool(self.models)

    # -- server ----------------------------------------------------------------------------
    def configure(self, server: Server, client_id: int) -> dict[str, Any]:
        c = self.cluster_of.get(client_id)
        if c is None:
            return {}
        payload = {} if c == self.global_cluster else {"model": self.models[c]}
        return {"payload": payload, "options": {"cluster": c}}

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        self.rounds += 1
        for u in updates:
            self._n[u.client_id] = u.n_samples
        # updates are clustered by their parameters (the buffers, in front, are statistics of the data)
        nb = buffer_entries(server)
        if not self.clustered:
            for u in updates:
                self.latest[u.client_id] = u.delta[nb:]
            new = weighted_mean(updates)
            if self.ready(server, updates):
                self.cluster(new)
                return self.models[self.global_cluster]
            return new
        models = list(self.models)
        members: dict[int, list[Update]] = {}
        for u in updates:
            trained = u.task.options.get("cluster")
            if trained is None:  # a client first met after the clustering: it trained the global model
                trained = self.global_cluster
                self.cluster_of[u.client_id] = self.nearest(u.delta[nb:])
            if self.cluster_of[u.client_id] == trained:
                members.setdefault(int(trained), []).append(u)
        for c, ups in members.items():
            models[c] = self.cluster_step(models[c], ups)
        self.models = models
        self.global_cluster = self.largest_cluster()
        return models[self.global_cluster]

    # -- what a variant changes (OCFL: when and how to cluster; HC-meta: the step within a cluster) --------------
    def ready(self, server: Server, updates: list[Update]) -> bool:
        """Whether to cluster after this warm-up aggregation: once ``warmup_rounds`` aggregations have been made."""
        return self.rounds >= self.warmup_rounds

    def labels(self, deltas: torch.Tensor) -> list[int]:
        """Cluster labels 0.. of the rows of ``deltas`` (one client's latest warm-up update each)."""
        return cosine_clusters(deltas, distance_threshold=self.distance_threshold, n_clusters=self.n_clusters,
                               method=self.linkage)

    def cluster_step(self, model: torch.Tensor, updates: list[Update]) -> torch.Tensor:
        """A cluster's new model from its members' updates of the round: their sample-weighted mean."""
        return weighted_mean(updates)

    def cluster(self, params: torch.Tensor) -> None:
        """Cluster the clients by their latest warm-up updates; every cluster model starts at ``params``."""
        clients = sorted(self.latest)
        deltas = torch.stack([self.latest[c] for c in clients])
        labels = self.labels(deltas)
        self.cluster_of = dict(zip(clients, labels))
        k = max(labels) + 1
        unit = deltas / deltas.norm(dim=1, keepdim=True).clamp_min(1e-12)
        index = torch.tensor(labels)
        self.centroids = torch.stack([unit[index == c].mean(0) for c in range(k)])
        self.models = [params] * k
        self.latest = {}
        self.global_cluster = self.largest_cluster()

    def nearest(self, delta: torch.Tensor) -> int:
        """The cluster whose mean normalised warm-up update is most cosine-similar to ``delta``."""
        assert self.centroids is not None
        sim = (self.centroids @ delta) / (self.centroids.norm(dim=1).clamp_min(1e-12) * delta.norm().clamp_min(1e-12))
        return int(sim.argmax())

    def largest_cluster(self) -> int:
        size = [0] * len(self.models)
        for client, c in self.cluster_of.items():
            size[c] += self._n.get(client, 1)
        return max(range(len(size)), key=lambda c: (size[c], -c))

    def metrics(self) -> dict[str, float]:
        """``clusters``: clusters formed (0 during the warm-up)."""
        return {"clusters": float(len(self.models))}

    # -- client ----------------------------------------------------------------------------
    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        start = task.payload.get("model", task.params)
        result = trainer.train(start, data.x, data.y, steps=task.steps, seed=seed)
        return ClientResult(result.params, result.steps, result.loss)

    def personal_params(self, trainer, params: torch.Tensor, data: ClientData, state: dict[str, Any],
                        seed: int) -> torch.Tensor | None:
        c = self.cluster_of.get(data.client_id)
        return None if c is None else self.models[c]
