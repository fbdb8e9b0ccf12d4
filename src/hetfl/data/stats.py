"""Per-client statistics of a partition, and a table of them.

How skewed a client is: the Jensen-Shannon distance (base 2, so in [0, 1]) between the label
distribution of its training split and that of all training splits together. 0 means the client
sees the global label mix; 1 means it shares no label with the rest of the federation.

Embedding skew, for an embedding-based partition, is measured the same way on embedding clusters:
the distance between the histogram of cluster ids in a client's training split and that of all
training splits together. :func:`federation_skew` averages both over the clients.

Feature skew (``data.feature_skew``, or any partition when asked): the feature distance of a
client compares its training features with all training features together. Features are
flattened and standardised with the global training mean ``m_f`` and standard deviation ``s_f``
(a constant feature has ``s_f = 1``, as in normalisation). With ``mu_c`` the client's mean of
the standardised features, ``v_c`` the mean over features of their variance within the client,
and ``v_g`` the same over all training samples (1, less any constant features)::

    d_c = sqrt( (1/F) * |mu_c|^2 + (sqrt(v_c) - sqrt(v_g))^2 )

It is the 2-Wasserstein distance between the isotropic Gaussians with the client's and the
federation's mean and total variance, divided by ``sqrt(F)``: a per-feature distance in units of
the global standard deviation, with a mean term (rotation moves the ink) and a spread term (noise
widens every feature). It is 0 when the client has the federation's mean and total variance; a
client of ``n`` samples drawn at random from the federation scores about ``sqrt(1/n)`` from the
sampling of its mean alone. The spread is pooled over features on purpose: per-feature spreads
(a diagonal Fréchet distance) or a full covariance are dominated, for the small clients of FL, by
the sampling noise of heavy-tailed features (digits pixels that are rarely inked); on digits the
diagonal version scored IID clients 0.47 and fell as noise was added.

Concept drift (``data.drift``): the share of a client's training labels that its drift mapping
changes (0 for clients that do not drift), and over the federation the share of drifting clients
and of training labels that change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rich.table import Table

from hetfl.data.partition import FederatedData

FULL_TABLE_ROWS = 50
"""Tables of more clients show only the first :data:`HEAD_ROWS` and last :data:`TAIL_ROWS`."""
HEAD_ROWS = 25
TAIL_ROWS = 5


@dataclass
class ClientStats:
    """What one client holds.

    Attributes
    ----------
    client : int
        Client index.
    n_train, n_test : int
        Sizes of its train and test splits.
    n_classes : int
        Distinct labels in its training split.
    label_counts : numpy.ndarray
        Training samples of each class, shape ``(n_classes of the dataset,)``.
    distance : float
        Jensen-Shannon distance of its training labels from the global training labels.
    cluster_counts : numpy.ndarray or None
        Training samples of each embedding cluster (embedding-based partitions only).
    cluster_distance : float or None
        Jensen-Shannon distance of its training clusters from the global training clusters
        (embedding-based partitions only).
    feature_level : float or None
        Its feature skew level (noise sigma or rotation degrees; with ``data.feature_skew`` only).
    feature_distance : float or None
        Feature distance (module docstring) of its training features from the global training
        features (with feature skew, or when asked for).
    drifts : bool or None
        Whether it drifts (with ``data.drift`` only).
    drift_changed : float or None
        Share of its training labels the drift changes, 0 if it does not drift (with ``data.drift`` only).
    """

    client: int
    n_train: int
    n_test: int
    n_classes: int
    label_counts: np.ndarray
    distance: float
    cluster_counts: np.ndarray | None = None
    cluster_distance: float | None = None
    feature_level: float | None = None
    feature_distance: float | None = None
    drifts: bool | None = None
    drift_changed: float | None = None


def js_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon distance, base 2, between distributions along the last axis.

    Parameters
    ----------
    p, q : numpy.ndarray
        Counts or probabilities (normalised here), broadcast against each other.

    Returns
    -------
    numpy.ndarray
        ``sqrt(JSD(p, q))`` in [0, 1]: 0 for identical distributions, 1 for disjoint supports.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p = p / p.sum(axis=-1, keepdims=True)
    q = q / q.sum(axis=-1, keepdims=True)
    m = (p + q) / 2
    divergence = (_kl(p, m) + _kl(q, m)) / 2
    return np.sqrt(np.clip(divergence, 0.0, 1.0))


def _kl(p: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Kullback-Leibler divergence in bits, with ``0 log 0 = 0`` (``m > 0`` wherever ``p > 0``)."""
    ratio = np.divide(p, m, out=np.ones(np.broadcast_shapes(p.shape, m.shape)), where=p > 0)
    return (p * np.log2(ratio)).sum(axis=-1)


def feature_distance(x: np.ndarray, reference: np.ndarray) -> float:
    """Feature distance (module docstring) of the samples ``x`` from the samples ``reference``.

    Parameters
    ----------
    x : numpy.ndarray
        Samples ``(n, ...)``, features flattened.
    reference : numpy.ndarray
        Samples ``(N, ...)`` with as many features; their mean and standard deviation
        standardise both.

    Returns
    -------
    float
        ``sqrt(mean_f(mu_f**2) + (sqrt(v_x) - sqrt(v_ref))**2)`` in standardised units: 0 when ``x``
        has the reference's mean and total variance.
    """
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    reference = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    mean, std = reference.mean(axis=0), reference.std(axis=0)
    scale = np.where(std < 1e-8, 1.0, std)
    return float(_isotropic_w2((x.mean(axis=0) - mean) / scale, x.var(axis=0) / scale**2, (std / scale) ** 2))


def _isotropic_w2(gap: np.ndarray, var: np.ndarray, ref_var: np.ndarray) -> np.ndarray:
    """``sqrt(mean(gap**2) + (sqrt(mean(var)) - sqrt(mean(ref_var)))**2)`` along the last axis."""
    spread = np.sqrt(var.mean(axis=-1)) - np.sqrt(ref_var.mean(axis=-1))
    return np.sqrt((gap**2).mean(axis=-1) + spread**2)


def feature_distances(fed: FederatedData, chunk: int = 8192) -> np.ndarray:
    """Feature distance of every client's training features from all training features together.

    Two passes over the training samples, ``chunk`` at a time; memory ``2 * n_clients * F``
    float64 for the per-client sums.

    Returns
    -------
    numpy.ndarray
        float64, one per client; as :func:`feature_distance` of ``x[train[c]]`` from
        ``x[concatenate(train)]``.
    """
    x = fed.dataset.x
    sizes = np.array([len(t) for t in fed.train], dtype=np.int64)
    rows = np.concatenate(fed.train) if fed.n_clients else np.empty(0, dtype=np.int64)
    if len(rows) == 0:
        return np.full(fed.n_clients, np.nan)
    client = np.repeat(np.arange(fed.n_clients), sizes)
    n_features = int(np.prod(x.shape[1:], dtype=np.int64))
    blocks = range(0, len(rows), chunk)
    centre = sum(x[rows[i : i + chunk]].reshape(-1, n_features).sum(axis=0, dtype=np.float64) for i in blocks) / len(rows)
    s1 = np.zeros((fed.n_clients, n_features))
    s2 = np.zeros((fed.n_clients, n_features))
    for i in blocks:  # clients are contiguous in rows, so each block is a run of client segments
        z = x[rows[i : i + chunk]].reshape(-1, n_features).astype(np.float64) - centre
        c = client[i : i + chunk]
        starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
        s1[c[starts]] += np.add.reduceat(z, starts, axis=0)
        s2[c[starts]] += np.add.reduceat(z * z, starts, axis=0)
    n = np.maximum(sizes, 1)[:, None]
    gap = s1 / n  # client mean minus the global mean
    var = np.maximum(s2 / n - gap**2, 0.0)
    global_gap = s1.sum(axis=0) / len(rows)  # ~0: rounding of the centre
    ref_var = np.maximum(s2.sum(axis=0) / len(rows) - global_gap**2, 0.0)
    scale = np.sqrt(ref_var)
    scale[scale < 1e-8] = 1.0
    return _isotropic_w2((gap - global_gap) / scale, var / scale**2, ref_var / scale**2)


def partition_stats(fed: FederatedData, features: bool | None = None) -> list[ClientStats]:
    """Statistics of every client of a federation.

    Parameters
    ----------
    fed : FederatedData
        The partitioned dataset.
    features : bool or None, default None
        Whether to measure feature distances (a pass over the training features); None: when the
        federation has feature skew. Never for token datasets.

    Returns
    -------
    list of ClientStats
        One per client, in client order.
    """
    counts, distances = _group_skew(fed, fed.dataset.y, fed.n_classes)
    cluster_counts = cluster_distances = None
    if fed.clusters is not None:
        cluster_counts, cluster_distances = _group_skew(fed, fed.clusters, int(fed.clusters.max()) + 1)
    if features is None:
        features = fed.feature_levels is not None
    feature = None
    if features and fed.dataset.vocab_size is None and fed.dataset.x.dtype.kind == "f":
        feature = feature_distances(fed)
    changed = None
    if fed.drift is not None and fed.n_clients:
        sizes = np.array([len(t) for t in fed.train], dtype=np.int64)
        labels = fed.dataset.y[np.concatenate(fed.train)]
        client = np.repeat(np.arange(fed.n_clients), sizes)
        flipped = np.bincount(client, weights=fed.drift.mapping[labels] != labels, minlength=fed.n_clients)
        changed = np.where(fed.drift.drifting, flipped / np.maximum(sizes, 1), 0.0)
    levels = fed.feature_levels
    return [
        ClientStats(
            client=c,
            n_train=len(fed.train[c]),
            n_test=len(fed.test[c]),
            n_classes=int(np.count_nonzero(counts[c])),
            label_counts=counts[c],
            distance=float(distances[c]),
            cluster_counts=None if cluster_counts is None else cluster_counts[c],
            cluster_distance=None if cluster_distances is None else float(cluster_distances[c]),
            feature_level=None if levels is None else float(levels[c]),
            feature_distance=None if feature is None else float(feature[c]),
            drifts=None if changed is None else bool(fed.drift.drifting[c]),
            drift_changed=None if changed is None else float(changed[c]),
        )
        for c in range(fed.n_clients)
    ]


def _group_skew(fed: FederatedData, groups: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Training samples of each group per client ``(clients, groups)``, and each client's JS distance from the total.

    With sequence labels (text), every target token is counted: the label histogram is the client's byte histogram.
    """
    n_clients = fed.n_clients
    train_sizes = np.array([len(t) for t in fed.train], dtype=np.int64)
    client = np.repeat(np.arange(n_clients), train_sizes)
    codes = groups[np.concatenate(fed.train)] if n_clients else np.empty(0, dtype=np.int64)
    if codes.ndim > 1:  # next-token targets (language modelling): every token counts, the histogram is of bytes
        client, codes = np.repeat(client, codes[0].size), codes.reshape(-1)
    counts = np.bincount(client * n_groups + codes, minlength=n_clients * n_groups).reshape(n_clients, n_groups)
    return counts, js_distance(counts, counts.sum(axis=0))


def federation_skew(stats: list[ClientStats]) -> dict[str, float]:
    """Skew of the whole federation: means over the clients, and the drift's reach.

    Returns
    -------
    dict
        ``label_js_mean``; ``cluster_js_mean`` (the embedding skew) when the statistics hold
        embedding clusters; ``feature_dist_mean`` (mean feature distance) when they hold feature
        distances; ``drift_clients_frac`` (share of clients that drift) and ``drift_labels_frac``
        (share of all training labels the drift changes) with a drift. NaN for no clients.
    """
    skew = {"label_js_mean": float(np.mean([s.distance for s in stats])) if stats else float("nan")}
    if stats and stats[0].cluster_distance is not None:
        skew["cluster_js_mean"] = float(np.mean([s.cluster_distance for s in stats]))
    if stats and stats[0].feature_distance is not None:
        skew["feature_dist_mean"] = float(np.mean([s.feature_distance for s in stats]))
    if stats and stats[0].drift_changed is not None:
        train = np.array([s.n_train for s in stats], dtype=np.float64)
        changed = np.array([s.drift_changed for s in stats])
        skew["drift_clients_frac"] = float(np.mean([s.drifts for s in stats]))
        skew["drift_labels_frac"] = float((changed * train).sum() / train.sum()) if train.sum() else 0.0
    return skew


def top_labels(counts: np.ndarray, top: int = 3) -> str:
    """The most frequent labels and their shares, e.g. ``"3:41% 7:22%"``."""
    total = counts.sum()
    order = np.argsort(-counts, kind="stable")[:top]
    return " ".join(f"{label}:{100 * counts[label] / total:.0f}%" for label in order if counts[label] > 0)


def stats_table(stats: list[ClientStats], title: str = "Clients", top: int = 3) -> Table:
    """A rich table of client statistics, one row a client.

    Parameters
    ----------
    stats : list of ClientStats
        From :func:`partition_stats`.
    title : str
        Table title.
    top : int, default 3
        Labels shown in the "top labels" column.

    Returns
    -------
    rich.table.Table
        Columns client, train, test, classes, top labels, JS distance; for an embedding-based
        partition clusters and cluster JS distance; with feature skew the client's level and
        feature distance; with a drift the share of its training labels the drift changes ("—"
        for a client that does not drift). A caption with totals, mean and max distances, the
        drift's reach and the coefficient of variation of the training sizes. Beyond
        :data:`FULL_TABLE_ROWS` clients, the first and last few rows with an ellipsis row
        between.
    """
    table = Table(title=title, caption=_caption(stats))
    for name in ("client", "train", "test", "classes"):
        table.add_column(name, justify="right")
    table.add_column("top labels")
    table.add_column("JS dist", justify="right")
    clustered = bool(stats) and stats[0].cluster_counts is not None
    if clustered:
        table.add_column("clusters", justify="right")
        table.add_column("cluster JS", justify="right")
    leveled = bool(stats) and stats[0].feature_level is not None
    featured = bool(stats) and stats[0].feature_distance is not None
    drifting = bool(stats) and stats[0].drift_changed is not None
    for name, shown_if in (("skew level", leveled), ("feature dist", featured), ("drift", drifting)):
        if shown_if:
            table.add_column(name, justify="right")
    extra = leveled + featured + drifting
    shown: list[ClientStats | None] = list(stats)
    if len(stats) > FULL_TABLE_ROWS:
        shown = stats[:HEAD_ROWS] + [None] + stats[-TAIL_ROWS:]
    for s in shown:
        if s is None:
            cells = ("…", "…", "…", "…", f"({len(stats) - HEAD_ROWS - TAIL_ROWS} more)", "…") + ("…", "…") * clustered
            cells += ("…",) * extra
        else:
            cells = (s.client, s.n_train, s.n_test, s.n_classes, top_labels(s.label_counts, top), f"{s.distance:.3f}")
            if clustered:
                cells += (int(np.count_nonzero(s.cluster_counts)), f"{s.cluster_distance:.3f}")
            if leveled:
                cells += (f"{s.feature_level:.3g}",)
            if featured:
                cells += (f"{s.feature_distance:.3f}",)
            if drifting:
                cells += (f"{100 * s.drift_changed:.0f}%" if s.drifts else "—",)
        table.add_row(*map(str, cells))
    return table


def _caption(stats: list[ClientStats]) -> str:
    if not stats:
        return "no clients"
    train = np.array([s.n_train for s in stats], dtype=np.float64)
    distance = np.array([s.distance for s in stats])
    cluster = ""
    if stats[0].cluster_distance is not None:
        cluster_distance = np.array([s.cluster_distance for s in stats])
        cluster = f"cluster JS distance mean {cluster_distance.mean():.3f}, max {cluster_distance.max():.3f} · "
    if stats[0].feature_distance is not None:
        feature_distance = np.array([s.feature_distance for s in stats])
        cluster += f"feature distance mean {feature_distance.mean():.3f}, max {feature_distance.max():.3f} · "
    if stats[0].drift_changed is not None:
        skew = federation_skew(stats)
        cluster += (f"drift: {sum(bool(s.drifts) for s in stats)}/{len(stats)} clients, "
                    f"{100 * skew['drift_labels_frac']:.1f}% of training labels change · ")
    return (
        f"{len(stats)} clients · {int(train.sum())} train / {sum(s.n_test for s in stats)} test samples · "
        f"JS distance mean {distance.mean():.3f}, max {distance.max():.3f} · {cluster}"
        f"train size CV {train.std() / train.mean():.2f}"
    )
