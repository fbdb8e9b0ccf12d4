"""FedDAA: dynamic client clustering for concept drift adaptation.

Peng and Tang, "FedDAA: Dynamic Client Clustering for Concept Drift Adaptation in Federated Learning",
arXiv:2506.21054 (2025).

From the paper: a client's data prototype P_k is the per-class mean of a model's outputs on its data, an R x D
matrix (R classes, D outputs). Three modules:

- number of clusters: K-means over all clients' flattened prototypes for every k in a range, keeping the k of the
  best silhouette score, and its centres;
- real drift detection: client k's prototype on its previous data and on its current data are each assigned to the
  nearest centre; different centres mean real drift (P(y|x) changed), the same centre virtual or label drift
  (P(x) or P(y) changed, P(y|x) kept);
- adaptation: a client with real drift discards its old data and trains on its new data only; otherwise it keeps
  its old data and trains on old and new together (old knowledge stays useful), so it does not forget.

Our choices (the paper's models are FedRC's soft-clustered ensemble; hetfl's clustering is IFCA's):

- Prototypes are per-class mean logits on the client's training data, a C x C matrix (a class the client lacks is a
  zero row). The paper computes every client's prototype at one time with one model. With partial participation the
  server has only the round's clients, so the clustering uses the prototypes of one round's updates, all computed
  under that round's global model (``prototype``, C^2 floats, sent with every update): prototypes computed under
  different models would cluster by model, not by concept. That model, the *reference*, is kept with the centres
  and sent with every task (one more model downloaded, counted in the bytes), so a client compares its
  prototypes with the centres under the model the centres were computed with.
- Every round with at least ``MIN_MEMBERS`` updates the server runs K-means (scikit-learn, ``random_state`` 0, 10
  starts) over the round's prototypes for k = 2 .. ``max_clusters`` (at most the updates minus one) and keeps the k
  of the best silhouette; if no k reaches ``min_silhouette``, one cluster (hetfl runs start before any drift, where
  the paper's range, which starts at 2, would split a federation that has one concept). A smaller round keeps the
  clustering there is.
- Cluster j's model belongs to centre j. After a re-clustering, each new cluster inherits an old cluster's model,
  matched by how many of its members trained each (most first, each old model once, :func:`inherit`); a new cluster
  left over starts from a copy of its most-voted model, so a cluster that splits off at a drift starts from the
  model it split from. The models are then, as in IFCA, the sample-weighted means of their members' results.
- The clusters only split on one round's evidence: a round whose clustering finds fewer clusters than there are
  (a random sample of ten clients can miss a concept) keeps the clustering, so a split-off model is not merged
  away. The paper re-determines the number at each time step from every client.
- A client's cluster is the centre nearest its prototype on its current data under the reference (at training and
  at evaluation); the global model the engine evaluates is the model of the largest cluster of the last clustering
  (IFCA's rule, counting that round's clients).
- A client keeps the labels of its data as of its first task (``state["y_old"]``, its "previous data"); on real
  drift it replaces them by its current labels. hetfl's drifts keep a client's samples and change labels
  (``data.drift``), so "old and new data together" is the samples whose label changed taken twice, once with each
  label; a swap is real drift, so this branch acts only when detection misses one (the first round after a
  drift, before the centres have seen the new concept).
- The prototypes' forward passes (three over the client's data a task) are not charged, as IFCA's cluster losses
  are not.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update
from hetfl.strategies.ifca import IFCA
from hetfl.strategies.selection import Selection
from hetfl.training.local import classifier_head

MIN_MEMBERS = 4
"""The fewest updates a round needs to re-cluster (k = 2 needs 3 points; one more for a silhouette worth reading)."""


def output_prototype(trainer, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The per-class mean of the model's outputs (logits) on (x, y), flattened: a C x C matrix row-major (a zero
    row for a class without samples)."""
    logits = trainer.predict(params, x).cpu()
    n_classes = logits.shape[1]
    counts = torch.bincount(y.cpu(), minlength=n_classes)[:n_classes].float()
    sums = torch.zeros(n_classes, n_classes).index_add_(0, y.cpu(), logits)
    return (sums / counts.clamp(min=1).unsqueeze(1)).reshape(-1)


def nearest(centres: torch.Tensor, prototype: torch.Tensor) -> int:
    """Index of the centre closest to ``prototype`` in Euclidean distance (ties: the lower index)."""
    return int(torch.argmin(((centres - prototype) ** 2).sum(1)))


def choose_clusters(prototypes: np.ndarray, max_clusters: int, min_silhouette: float) -> tuple[np.ndarray, np.ndarray]:
    """FedDAA's number of clusters: (labels, centres) of the K-means with the best silhouette over k = 2 ..
    ``max_clusters`` (at most n - 1); one cluster (its mean) if none reaches ``min_silhouette``."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score
    from threadpoolctl import threadpool_limits

    n = prototypes.shape[0]
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for k in range(2, min(max_clusters, n - 1) + 1):
        # a few dozen points: one thread (OpenMP's pool costs more than it saves, and much more on a busy machine);
        # identical prototypes give fewer distinct clusters than k, skipped below
        with warnings.catch_warnings(), threadpool_limits(limits=1):
            warnings.simplefilter("ignore")
            km = KMeans(n_clusters=k, random_state=0, n_init=10).fit(prototypes)
        if len(set(km.labels_.tolist())) < 2:
            continue
        score = float(silhouette_score(prototypes, km.labels_))
        if score >= min_silhouette and (best is None or score > best[0]):
            best = (score, km.labels_, km.cluster_centers_)
    if best is None:
        return np.zeros(n, dtype=np.int64), prototypes.mean(0, keepdims=True)
    return best[1].astype(np.int64), best[2]


def inherit(votes: np.ndarray) -> list[int]:
    """Which old model each new cluster starts from, given ``votes[new, old]`` (members of new cluster ``new`` that
    trained old cluster ``old``'s model): pairs taken by most votes first (ties: lower new, then lower old index), each
    old model to one new cluster; a new cluster left over (more new clusters than old) copies its most-voted model."""
    order = sorted(np.ndindex(*votes.shape), key=lambda p: (-votes[p], p))
    chosen: dict[int, int] = {}
    for new, old in order:
        if new not in chosen and old not in chosen.values():
            chosen[new] = old
    return [chosen.get(new, int(np.argmax(votes[new]))) for new in range(votes.shape[0])]


class FedDAA(IFCA):
    """Clusters by data prototypes, re-clustered every round; real drift discards old data, other drift keeps it.

    Parameters
    ----------
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    max_clusters : int, default 4
        The largest number of clusters tried (the paper tries 2 to 9).
    min_silhouette : float, default 0.5
        A clustering of k >= 2 is kept only if its silhouette reaches this; otherwise one cluster.
    """

    name = "feddaa"

    def __init__(
        self,
        *,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
        max_clusters: int = 4,
        min_silhouette: float = 0.5,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection, n_clusters=1)
        if max_clusters < 1:
            raise ValueError("max_clusters must be at least 1")
        if not -1 <= min_silhouette <= 1:
            raise ValueError(f"min_silhouette must be in [-1, 1], got {min_silhouette}")
        self.max_clusters = max_clusters
        self.min_silhouette = min_silhouette
        self.centres: torch.Tensor | None = None  # (K, C*C), centres[j] belongs to models[j]
        self.reference: torch.Tensor | None = None  # the model the centres' prototypes were computed under
        self.real_drifts = 0  # real drifts the clients detected

    # -- server ----------------------------------------------------------------------------
    def configure(self, server: Server, client_id: int) -> dict[str, Any]:
        cfg = super().configure(server, client_id)
        if self.centres is not None:
            cfg["payload"].update(centres=self.centres, reference=self.reference)
        return cfg

    def expected_payload(self, server: Server, task: Task) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        head = classifier_head(server.trainer.model)
        return {} if head is None else {"prototype": ((head.out_features**2,), torch.float32)}

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        super().aggregate(server, updates)  # IFCA's step: each cluster model is the mean of its members' results
        self.real_drifts += sum(int(u.stats.get("real_drift", 0.0)) for u in updates)
        if len(updates) >= MIN_MEMBERS:
            self.recluster(updates)
            self.global_cluster = self.largest_cluster()
        assert self.models is not None
        return self.models[self.global_cluster]

    def recluster(self, updates: list[Update]) -> None:
        """The number of clusters and the centres from the round's prototypes (all under the round's global model,
        which becomes the reference), unless they find fewer clusters than there are (see the module docstring)."""
        assert self.models is not None
        labels, centres = choose_clusters(torch.stack([u.payload["prototype"] for u in updates]).numpy(),
                                          self.max_clusters, self.min_silhouette)
        if self.centres is not None and centres.shape[0] < self.n_clusters:
            return  # a round that misses a concept does not merge its cluster away
        votes = np.zeros((centres.shape[0], len(self.models)), dtype=np.int64)
        for u, label in zip(updates, labels):
            votes[label, int(u.stats["cluster"])] += 1
        self.models = [self.models[i] for i in inherit(votes)]
        self.assignment = {u.client_id: int(label) for u, label in zip(updates, labels)}
        self.n_clusters = len(self.models)
        self.centres = torch.as_tensor(centres, dtype=torch.float32)
        self.reference = updates[0].task.params  # a round's tasks all start from the same global model

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), "clusters": float(self.n_clusters), "real_drifts": float(self.real_drifts)}

    # -- client ----------------------------------------------------------------------------
    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        models = self.received_models(task)
        y_old = state.get("y_old")
        if y_old is None:
            y_old = state["y_old"] = data.y.clone()
        prototype = output_prototype(trainer, task.params, data.x, data.y)  # for the next clustering
        centres, j, real_drift = task.payload.get("centres"), 0, False
        if centres is not None:  # both prototypes under the model the centres were computed with
            reference = task.payload["reference"]
            j = nearest(centres, output_prototype(trainer, reference, data.x, data.y))
            real_drift = j != nearest(centres, output_prototype(trainer, reference, data.x, y_old))
        x, y = data.x, data.y
        if real_drift:  # P(y|x) changed: the old data is outdated
            state["y_old"] = data.y.clone()
        else:  # virtual or label drift (or none): train on old and new data together
            changed = y_old.to(y.device) != y
            if bool(changed.any()):
                x, y = torch.cat([x, x[changed]]), torch.cat([y, y_old.to(y.device)[changed]])
        result = trainer.train(models[j], x, y, steps=task.steps, seed=seed)
        return ClientResult(result.params, result.steps, result.loss, payload={"prototype": prototype},
                            stats={"cluster": float(j), "real_drift": float(real_drift)})

    def personal_params(self, trainer, params: torch.Tensor, data: ClientData, state: dict[str, Any],
                        seed: int) -> torch.Tensor | None:
        """The model of the centre nearest the client's prototype on its current data (under the reference)."""
        if self.models is None or self.centres is None:
            return None
        return self.models[nearest(self.centres, output_prototype(trainer, self.reference, data.x, data.y))]
