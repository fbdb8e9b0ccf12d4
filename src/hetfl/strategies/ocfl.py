"""OCFL: one-shot clustering, triggered by the clients' update temperature (arXiv:2509.01587).

Zuziak, Pellungrini and Rinzivillo, "One-Shot Clustering for Federated Learning Under Clustering-Agnostic
Assumption" (arXiv:2509.01587; first version "One-Shot Clustering for Federated Learning", IEEE BigData 2024,
arXiv:2503.04231).

From the paper: FedAvg runs until the server detects, from the clients' gradients, that the federated model
starts to converge; it then clusters the clients once (any clustering algorithm; density-based ones, HDBSCAN
and Mean-Shift, did best) and trains one model per cluster from then on. The detector is the *clustering
temperature* of the matrix Gamma of pairwise cosine distances between the n clients' updates of a round,

    Gamma_ij = 1 - <Delta_i, Delta_j> / (|Delta_i| |Delta_j|)   (in [0, 2], Gamma_ii = 0),
    T(Gamma) = ||Gamma||_p / lambda,   lambda = (n (n - 1) 2^p)^(1/p),

the entry-wise p-norm of the off-diagonal entries scaled by its largest possible value, so T is in [0, 1]
whatever n is: 0 when every client moves the same way, 1 when every pair points in opposite directions.

Our choices:

- The trigger: the temperature's first peak, the first aggregation t with T_{t-2} < T_{t-1} > T_t (it rose,
  then fell: the clients' updates stopped growing apart). The paper's exact test was not available to us
  beyond its abstract and summaries ("a temperature measure that detects when the federated model starts to
  converge"); this is our reading. A first version fired at the first fall (T_t < T_{t-1}); on the rotation
  benchmark (docs/reproductions.md) the temperature is nearly flat in the first rounds, so that fired at round 2
  in 3 of its 6 runs (10 and 20 clients a round), before the clusters' updates had separated, and found one cluster. If the trigger never
  fires the run is FedAvg, which is what "clustering-agnostic" asks when there is nothing to cluster.
- Clustering: HDBSCAN (scikit-learn, its default ``min_cluster_size`` 5 and no ``allow_single_cluster``) on the
  precomputed cosine distances of each client's latest warm-up update; points HDBSCAN calls noise join the
  cluster of smallest mean distance, and all noise is one cluster, so a federation without structure stays one
  model. (``allow_single_cluster``, tried first, merged the benchmark's two rotation clusters in 3 of its 6
  runs; a ``min_cluster_size`` of 2 or 3 split IID federations into spurious clusters.) ``clusterer:
  agglomerative`` uses FL+HC's average-linkage cut at ``distance_threshold`` instead.
- Partial participation: the temperature of a round is over that round's updates (all computed from the same
  global model, as in the paper's cross-silo rounds); the clustering uses each client's latest update, and
  clients met after it join the nearest cluster, as in FL+HC. A round with fewer than two updates has no
  temperature and cannot trigger.
- Updates are the model changes of a task (several local steps), not single gradients; buffers (BatchNorm's
  statistics) are left out of both the temperature and the clustering.

Everything after the trigger (per-cluster FedAvg, the global model being the largest cluster's, late clients,
``personal_params`` = the client's cluster model) is FL+HC's bookkeeping
(:class:`~hetfl.strategies.clustered.FLHC`), which this class reuses.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from hetfl.strategies.base import Server, Update, buffer_entries
from hetfl.strategies.clustered import FLHC, cosine_distances
from hetfl.strategies.selection import Selection


def clustering_temperature(updates: torch.Tensor, p: float = 2.0) -> float:
    """T(Gamma) = ||Gamma||_p / (n (n - 1) 2^p)^(1/p) of the rows' pairwise cosine distances (needs n >= 2)."""
    n = updates.shape[0]
    if n < 2:
        raise ValueError("the temperature needs at least two updates")
    gamma = cosine_distances(updates)
    return float((gamma ** p).sum() ** (1 / p) / (n * (n - 1) * 2 ** p) ** (1 / p))


def density_clusters(distances: np.ndarray, min_cluster_size: int = 5) -> list[int]:
    """HDBSCAN on a precomputed distance matrix; noise joins the cluster of smallest mean distance; labels 0.. in
    order of first row (all noise, or fewer than 2 rows: one cluster). ``min_cluster_size`` is capped at the rows."""
    from sklearn.cluster import HDBSCAN  # here, not at the top: scikit-learn takes ~1.5 s to import in every hetfl process

    m = distances.shape[0]
    if m < 2:
        return [0] * m
    raw = HDBSCAN(metric="precomputed", min_cluster_size=max(2, min(min_cluster_size, m)),
                  copy=True).fit_predict(distances)
    found = sorted(set(raw) - {-1})
    if not found:
        return [0] * m
    for i in np.flatnonzero(raw == -1):
        raw[i] = min(found, key=lambda c: distances[i, raw == c].mean())
    relabel: dict[int, int] = {}
    return [relabel.setdefault(int(r), len(relabel)) for r in raw]


class OCFL(FLHC):
    """FedAvg until the clients' update temperature peaks, then one clustering, then FedAvg per cluster.

    Parameters
    ----------
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    p : float, default 2.0
        Order of the entry-wise norm of the clustering temperature.
    clusterer : {"hdbscan", "agglomerative"}, default "hdbscan"
        The one-shot clustering: HDBSCAN on cosine distances, or FL+HC's hierarchical cut at ``distance_threshold``.
    min_cluster_size : int, default 5
        HDBSCAN's smallest cluster (scikit-learn's default; capped at the number of clients clustered).
    distance_threshold : float, default 0.8
        Cosine distance of the agglomerative cut (``clusterer: agglomerative`` only).
    """

    name = "ocfl"

    def __init__(
        self,
        *,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
        p: float = 2.0,
        clusterer: Literal["hdbscan", "agglomerative"] = "hdbscan",
        min_cluster_size: int = 5,
        distance_threshold: float = 0.8,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection,
                         warmup_rounds=1, distance_threshold=distance_threshold)
        if p < 1:
            raise ValueError("p must be at least 1 (the order of a norm)")
        if min_cluster_size < 2:
            raise ValueError("min_cluster_size must be at least 2")
        self.p = p
        self.clusterer = clusterer
        self.min_cluster_size = min_cluster_size
        self.temperatures: list[float] = []  # one per aggregation with at least two updates
        self.clustered_at: int | None = None  # the aggregation after which the clients were clustered

    def ready(self, server: Server, updates: list[Update]) -> bool:
        if len(updates) < 2:
            return False
        nb = buffer_entries(server)
        self.temperatures.append(clustering_temperature(torch.stack([u.delta[nb:] for u in updates]), self.p))
        t = self.temperatures
        if len(t) >= 3 and t[-3] < t[-2] > t[-1]:  # the temperature rose, then fell: its first peak
            self.clustered_at = self.rounds
            return True
        return False

    def labels(self, deltas: torch.Tensor) -> list[int]:
        if self.clusterer == "agglomerative":
            return super().labels(deltas)
        return density_clusters(cosine_distances(deltas), self.min_cluster_size)

    def metrics(self) -> dict[str, float]:
        """``temperature``: the latest clustering temperature; ``clusters``: clusters formed (0 before the trigger)."""
        out = super().metrics()
        if self.temperatures:
            out["temperature"] = self.temperatures[-1]
        return out
