"""Partitioners: how a dataset's samples are dealt out to clients.

Every partitioner follows one convention, ``(labels, n_clients, rng, **params) -> parts``: it
returns ``n_clients`` int64 index arrays (each sorted, none empty) that together cover every
sample exactly once. :data:`PARTITIONERS` maps ``data.partition.kind`` to them:

- ``iid``: a random permutation cut into equal parts.
- ``dirichlet``: label skew. For each class, the clients' shares are drawn from
  ``Dir(alpha, ..., alpha)`` and the class's samples dealt out multinomially; the whole draw is
  repeated until every client has ``min_size`` samples (Hsu et al. 2019, arXiv:1909.06335).
- ``shards``: pathological label skew. Samples sorted by label are cut into
  ``n_clients * classes_per_client`` shards and every client gets ``classes_per_client`` of them
  at random (McMahan et al. 2017, arXiv:1602.05629).
- ``quantity``: IID labels, skewed sizes. Client weights follow a Pareto law with tail index
  ``exponent`` (``P(W > w) = w**-exponent``, so smaller is more skewed); every client gets
  ``min_size`` samples and the rest are dealt out multinomially in proportion to the weights.
- ``natural``: one client per natural group (LEAF writer, CSV id column). With more groups than
  clients, the groups are shuffled and merged round-robin (client ``c`` gets groups
  ``c, c + n_clients, ...`` of the shuffled order); with exactly as many, client ``c`` is group
  ``c``.
- ``embedding``: embedding skew (Borazjani et al. 2025, arXiv:2503.14553). Every sample is
  embedded, the embeddings are clustered by k-means into ``n_clusters`` groups, and each
  cluster is dealt out as ``dirichlet`` deals a class. No pretrained encoder ships with hetfl
  and nothing is downloaded, so the default embedding is a documented feature map
  (:func:`feature_embedding`: standardised features, then PCA to ``embedding_dim``
  components); embeddings from a real encoder can be supplied as a local .npy file
  (``data.partition.embeddings``, :func:`load_embeddings`). :func:`federate` computes the
  clusters (:func:`embedding_clusters`) and keeps them in :attr:`FederatedData.clusters`.

Internally each partitioner computes ``owner``, the client of every sample, and
:func:`_parts_from_owner` turns it into index arrays; that keeps them vectorised (a Dirichlet
draw for 100,000 clients and 10 classes takes a fraction of a second).

``data.partition.kind`` is resolved by :mod:`hetfl.registry` (the built-in names above are import
paths into this module, :data:`PARTITIONERS`), so a partitioner of one's own is named the same
way, ``package.module:function``. :func:`run_partitioner` calls it as
``fn(labels, n_clients, rng, **data.partition.params)``, adding ``groups`` (the natural client ids,
when the dataset has them) and ``x`` (the features, before normalisation) when its signature names
them (or takes ``**kwargs``); ``labels`` is one label per sample (for next-token targets, the
sample's group, :func:`sample_labels`). What it returns is checked (:func:`check_parts`): a list
of ``n_clients`` integer index arrays, none empty, that together hold every sample exactly once;
each is sorted, as the built-ins' are. With an official test set (a loader's ``{"train": ...,
"test": ...}``) the partitioner sees only the train part (so ``data.partition.embeddings`` then has
one row per training sample).

:func:`split_train_test` splits each client's part into train and test, or, with an official test
set, :func:`deal_test` deals its samples to the clients; :func:`federate` runs the whole
pipeline: load, partition, split, normalise.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from hetfl import registry
from hetfl.config import DataConfig, PartitionConfig
from hetfl.data.datasets import Dataset, load_dataset
from hetfl.data.skew import (
    LabelDrift, add_noise, check_feature_skew, feature_levels, feature_std, rotate_clients, sample_levels,
    shift_and_scale,
)
from hetfl.errors import DataError

MAX_DIRICHLET_TRIES = 20
"""Dirichlet draws tried before giving up on ``min_size``."""


# --------------------------------------------------------------------------- helpers
def _check_clients(n_samples: int, n_clients: int, min_size: int = 1) -> None:
    if n_clients < 1:
        raise ValueError(f"n_clients must be at least 1, got {n_clients}")
    if n_clients * min_size > n_samples:
        need = f"{n_clients} clients" if min_size == 1 else f"{n_clients} clients of at least {min_size} samples"
        raise DataError(
            f"data.n_clients: {need} need {n_clients * min_size} samples; the data has {n_samples} "
            "(lower data.n_clients or data.partition.min_size)"
        )


def _class_codes(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels as class codes ``0..K-1`` (non-negative integer labels are kept as they are)."""
    labels = np.asarray(labels).ravel()
    if labels.dtype.kind in "iu" and labels.size and labels.min() >= 0:
        return labels, int(labels.max()) + 1
    uniques, codes = np.unique(labels, return_inverse=True)
    return codes.ravel(), len(uniques)


def _stable_argsort(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` for non-negative integer keys, 2-5x faster.

    Small keys are sorted as uint16 (numpy radix-sorts those). Otherwise the distinct values
    ``key * n + position`` are sorted with the fast unstable sort, which orders by key and then
    by position, as a stable sort does.
    """
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    top = int(keys.max())
    if top < 2**16:
        return np.argsort(keys.astype(np.uint16), kind="stable")
    if top >= np.iinfo(np.int64).max // n:
        return np.argsort(keys, kind="stable")
    return np.sort(keys.astype(np.int64) * n + np.arange(n)) % n


def _shuffled_by_class(codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sample indices grouped by class (ascending), in random order within each class."""
    perm = rng.permutation(len(codes))
    return perm[_stable_argsort(codes[perm])]


def _even_sizes(n: int, k: int) -> np.ndarray:
    """``k`` sizes summing to ``n`` that differ by at most one (as ``np.array_split``)."""
    sizes = np.full(k, n // k, dtype=np.int64)
    sizes[: n % k] += 1
    return sizes


def _cut(array: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """Consecutive pieces of ``array`` of the given sizes (``np.split`` is slow for many pieces)."""
    ends = np.cumsum(sizes)
    return [array[start:end] for start, end in zip((ends - sizes).tolist(), ends.tolist())]


def _parts_from_owner(owner: np.ndarray, n_clients: int) -> list[np.ndarray]:
    """Index arrays (sorted) of the samples each client owns."""
    return _cut(_stable_argsort(owner), np.bincount(owner, minlength=n_clients))


def _deal(order: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Owner of each sample when ``order`` is dealt out in runs: ``sizes[c]`` samples to client ``c``."""
    owner = np.empty(len(order), dtype=np.int64)
    owner[order] = np.repeat(np.arange(len(sizes)), sizes)
    return owner


# --------------------------------------------------------------------------- partitioners
def iid(labels: np.ndarray, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Deal the samples out at random in (nearly) equal parts.

    Parameters
    ----------
    labels : numpy.ndarray
        Label of each sample (only its length is used).
    n_clients : int
        Number of parts.
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    list of numpy.ndarray
        Sorted int64 sample indices of each client.
    """
    n = len(labels)
    _check_clients(n, n_clients)
    return _parts_from_owner(_deal(rng.permutation(n), _even_sizes(n, n_clients)), n_clients)


def dirichlet(
    labels: np.ndarray, n_clients: int, rng: np.random.Generator, *, alpha: float, min_size: int = 2
) -> list[np.ndarray]:
    """Label skew: each class is shared among clients in ``Dir(alpha)`` proportions.

    Parameters
    ----------
    labels : numpy.ndarray
        Label of each sample.
    n_clients : int
        Number of parts.
    rng : numpy.random.Generator
        Source of randomness.
    alpha : float
        Dirichlet concentration, > 0: small (0.1) gives clients few classes, large (100) is
        nearly IID.
    min_size : int, default 2
        Smallest client. The draw is repeated (up to :data:`MAX_DIRICHLET_TRIES` times) until
        every client has this many samples; if none does, the draw closest to it is topped up
        by moving the shortfall from the largest clients (see :func:`_top_up`).

    Returns
    -------
    list of numpy.ndarray
        Sorted int64 sample indices of each client.

    Raises
    ------
    ValueError
        If ``alpha <= 0``.
    DataError
        If there are too few samples for ``n_clients * min_size``.
    """
    return _dirichlet_over_groups(labels, n_clients, rng, alpha, min_size, "dirichlet")


def _dirichlet_over_groups(
    groups: np.ndarray, n_clients: int, rng: np.random.Generator, alpha: float, min_size: int, name: str
) -> list[np.ndarray]:
    """Share every group (class, cluster) among clients in ``Dir(alpha)`` proportions.

    The machinery of :func:`dirichlet` for any grouping of the samples; ``name`` names the
    partitioner in error messages.
    """
    if not alpha > 0:
        raise ValueError(f"{name}: alpha must be positive, got {alpha}")
    if min_size < 1:
        raise ValueError(f"{name}: min_size must be at least 1, got {min_size}")
    codes, n_groups = _class_codes(groups)
    _check_clients(len(codes), n_clients, min_size)
    group_sizes = np.bincount(codes, minlength=n_groups)
    best = None
    for _ in range(MAX_DIRICHLET_TRIES):
        shares = rng.dirichlet(np.full(n_clients, alpha), size=n_groups)  # (groups, clients)
        counts = rng.multinomial(group_sizes, shares)  # each row sums to its group size
        shortfall = np.maximum(min_size - counts.sum(axis=0), 0).sum()
        if best is None or shortfall < best[0]:
            best = (shortfall, counts)
        if shortfall == 0:
            break
    counts = _top_up(best[1], min_size, rng)
    # Group-major runs: group 0's samples to clients 0..n-1, then group 1's, and so on.
    owner = np.empty(len(codes), dtype=np.int64)
    owner[_shuffled_by_class(codes, rng)] = np.repeat(np.tile(np.arange(n_clients), n_groups), counts.ravel())
    return _parts_from_owner(owner, n_clients)


def _top_up(counts: np.ndarray, min_size: int, rng: np.random.Generator) -> np.ndarray:
    """Give every client (column) at least ``min_size`` samples by moving as few as possible.

    The missing samples are taken from the clients with the most samples beyond ``min_size``
    (the largest first), each donation drawn from the donor's own classes in proportion to them,
    and handed to the short clients. With many clients and a small alpha a plain Dirichlet draw
    almost never gives every client ``min_size`` samples; this moves only the shortfall.
    """
    totals = counts.sum(axis=0)
    deficits = np.maximum(min_size - totals, 0)
    need = int(deficits.sum())
    if need == 0:
        return counts
    counts = counts.copy()
    surplus = np.maximum(totals - min_size, 0)
    order = np.argsort(-surplus, kind="stable")
    give = np.minimum(surplus[order], np.maximum(need - (np.cumsum(surplus[order]) - surplus[order]), 0))
    donated: list[np.ndarray] = []
    for donor, k in zip(order[give > 0], give[give > 0]):
        taken = rng.multivariate_hypergeometric(counts[:, donor], int(k))
        counts[:, donor] -= taken
        donated.append(np.repeat(np.arange(counts.shape[0]), taken))
    classes = rng.permutation(np.concatenate(donated))
    recipients = np.repeat(np.flatnonzero(deficits), deficits[deficits > 0])
    np.add.at(counts, (classes, recipients), 1)
    return counts


def shards(
    labels: np.ndarray, n_clients: int, rng: np.random.Generator, *, classes_per_client: int
) -> list[np.ndarray]:
    """Pathological label skew: every client gets ``classes_per_client`` shards of label-sorted data.

    Parameters
    ----------
    labels : numpy.ndarray
        Label of each sample.
    n_clients : int
        Number of parts.
    rng : numpy.random.Generator
        Source of randomness.
    classes_per_client : int
        Shards per client. On balanced labels with shards aligned to classes, a client sees at
        most this many classes (two shards may share one class).

    Returns
    -------
    list of numpy.ndarray
        Sorted int64 sample indices of each client.
    """
    if classes_per_client < 1:
        raise ValueError(f"shards: classes_per_client must be at least 1, got {classes_per_client}")
    codes, _ = _class_codes(labels)
    n_shards = n_clients * classes_per_client
    if n_shards > len(codes):
        raise DataError(
            f"shards partition: {n_clients} clients x {classes_per_client} classes = {n_shards} shards "
            f"exceed the {len(codes)} samples"
        )
    _check_clients(len(codes), n_clients)
    shard_of_position = np.repeat(np.arange(n_shards), _even_sizes(len(codes), n_shards))
    client_of_shard = rng.permutation(np.repeat(np.arange(n_clients), classes_per_client))
    owner = np.empty(len(codes), dtype=np.int64)
    owner[_shuffled_by_class(codes, rng)] = client_of_shard[shard_of_position]
    return _parts_from_owner(owner, n_clients)


def quantity(
    labels: np.ndarray, n_clients: int, rng: np.random.Generator, *, exponent: float, min_size: int = 2
) -> list[np.ndarray]:
    """Quantity skew: IID labels, client sizes from a power law.

    Parameters
    ----------
    labels : numpy.ndarray
        Label of each sample (only its length is used).
    n_clients : int
        Number of parts.
    rng : numpy.random.Generator
        Source of randomness.
    exponent : float
        Tail index of the Pareto law of client weights, > 0; smaller is more skewed.
    min_size : int, default 2
        Every client gets at least this many samples.

    Returns
    -------
    list of numpy.ndarray
        Sorted int64 sample indices of each client.
    """
    if not exponent > 0:
        raise ValueError(f"quantity: exponent must be positive, got {exponent}")
    if min_size < 1:
        raise ValueError(f"quantity: min_size must be at least 1, got {min_size}")
    n = len(labels)
    _check_clients(n, n_clients, min_size)
    # Pareto(tail index a) is exp(E / a) with E ~ Exp(1); scaling by the largest avoids overflow.
    log_weights = rng.standard_exponential(n_clients) / exponent
    weights = np.exp(log_weights - log_weights.max())
    extra = rng.multinomial(n - n_clients * min_size, weights / weights.sum())
    return _parts_from_owner(_deal(rng.permutation(n), min_size + extra), n_clients)


def natural(labels: np.ndarray, n_clients: int, rng: np.random.Generator, *, groups: np.ndarray) -> list[np.ndarray]:
    """One client per natural group, merging shuffled groups round-robin if there are more.

    Parameters
    ----------
    labels : numpy.ndarray
        Label of each sample (only its length is used).
    n_clients : int
        Number of parts; at most the number of groups.
    rng : numpy.random.Generator
        Shuffles the groups before merging (unused when groups and clients are as many).
    groups : numpy.ndarray
        Natural client id of each sample.

    Returns
    -------
    list of numpy.ndarray
        Sorted int64 sample indices of each client.
    """
    groups = np.asarray(groups).ravel()
    if len(groups) != len(labels):
        raise DataError(f"natural partition: {len(groups)} group ids for {len(labels)} samples; expected one per sample")
    _check_clients(len(labels), n_clients)
    uniques, group_of_sample = np.unique(groups, return_inverse=True)
    n_groups = len(uniques)
    if n_groups < n_clients:
        raise DataError(
            f"natural partition: the data has {n_groups} natural clients, fewer than data.n_clients={n_clients}; "
            f"set data.n_clients <= {n_groups}"
        )
    order = np.arange(n_groups) if n_groups == n_clients else rng.permutation(n_groups)
    client_of_group = np.empty(n_groups, dtype=np.int64)
    client_of_group[order] = np.arange(n_groups) % n_clients
    return _parts_from_owner(client_of_group[group_of_sample.ravel()], n_clients)


def embedding(
    labels: np.ndarray, n_clients: int, rng: np.random.Generator, *, clusters: np.ndarray, alpha: float, min_size: int = 2
) -> list[np.ndarray]:
    """Embedding skew: each embedding cluster is shared among clients in ``Dir(alpha)`` proportions.

    :func:`dirichlet` with cluster ids in place of labels (Borazjani et al. 2025,
    arXiv:2503.14553); the clusters come from :func:`embedding_clusters`.

    Parameters
    ----------
    labels : numpy.ndarray
        Label of each sample (only its length is used).
    n_clients : int
        Number of parts.
    rng : numpy.random.Generator
        Source of randomness.
    clusters : numpy.ndarray
        Cluster id of each sample.
    alpha : float
        Dirichlet concentration, > 0: small gives clients few clusters, large is nearly IID.
    min_size : int, default 2
        Smallest client, as in :func:`dirichlet`.

    Returns
    -------
    list of numpy.ndarray
        Sorted int64 sample indices of each client.
    """
    clusters = np.asarray(clusters).ravel()
    if len(clusters) != len(labels):
        raise DataError(f"embedding partition: {len(clusters)} cluster ids for {len(labels)} samples; expected one per sample")
    return _dirichlet_over_groups(clusters, n_clients, rng, alpha, min_size, "embedding")


def feature_embedding(x: np.ndarray, dim: int, rng: np.random.Generator) -> np.ndarray:
    """A stand-in embedding when no encoder is at hand: standardised features, then PCA.

    Each sample's features (flattened) are standardised over the whole dataset (a constant
    feature is only centred) and projected on their first ``dim`` principal components
    (scikit-learn ``PCA``, seeded from ``rng``). ``dim`` is capped at the number of features and
    samples. This is a linear map of the inputs, not a learned representation: a user with a real
    encoder should supply its embeddings (``data.partition.embeddings``).

    Parameters
    ----------
    x : numpy.ndarray
        Features ``(N, ...)``.
    dim : int
        Number of principal components kept.
    rng : numpy.random.Generator
        Seeds the PCA solver.

    Returns
    -------
    numpy.ndarray
        float32 embeddings ``(N, min(dim, features, N))``.
    """
    from sklearn.decomposition import PCA

    flat = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    std = flat.std(axis=0)
    std[std < 1e-8] = 1.0
    standardised = flat - flat.mean(axis=0)  # a new array: the dataset is left as it is
    standardised /= std
    dim = min(dim, standardised.shape[1], len(standardised))
    pca = PCA(n_components=dim, random_state=int(rng.integers(2**31)))
    return pca.fit_transform(standardised).astype(np.float32)


def embedding_clusters(embeddings: np.ndarray, n_clusters: int, rng: np.random.Generator) -> np.ndarray:
    """Cluster id of every sample: k-means (scikit-learn, seeded from ``rng``) on its embedding.

    k-means runs on one thread (threadpoolctl, which scikit-learn depends on): on small machines
    its default thread pool was 5-50x slower (1,797 digits: 15 ms on one thread, 1 s on two).

    Parameters
    ----------
    embeddings : numpy.ndarray
        ``(N, d)`` embeddings.
    n_clusters : int
        Number of clusters, at most ``N``.
    rng : numpy.random.Generator
        Seeds k-means.

    Returns
    -------
    numpy.ndarray
        int64 cluster ids in ``[0, n_clusters)``.
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    if n_clusters > len(embeddings):
        raise DataError(
            f"data.partition.n_clusters={n_clusters} exceeds the {len(embeddings)} samples; lower data.partition.n_clusters"
        )
    kmeans = KMeans(n_clusters=n_clusters, n_init=3, random_state=int(rng.integers(2**31)))
    with threadpool_limits(limits=1):
        return kmeans.fit_predict(np.asarray(embeddings, dtype=np.float64)).astype(np.int64)


def load_embeddings(path: str, n_samples: int) -> np.ndarray:
    """Read a ``(n_samples, d)`` array of embeddings from a local .npy file (``data.partition.embeddings``)."""
    key = "data.partition.embeddings"
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{key}: {path} not found") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{key}: {path} is not a readable .npy array ({err})") from None
    if array.ndim != 2 or array.shape[0] != n_samples or array.shape[1] < 1:
        raise DataError(f"{key}: {path} has shape {array.shape}; expected ({n_samples}, d), one row per sample of the dataset")
    if array.dtype.kind not in "iuf" or not np.isfinite(array).all():
        raise DataError(f"{key}: {path} must hold finite numbers, one row per sample")
    return array


PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "shards": shards,
    "quantity": quantity,
    "natural": natural,
    "embedding": embedding,
}
"""The built-in partitioners, by ``data.partition.kind`` (``hetfl.registry.KINDS["partition"]`` names them)."""


# --------------------------------------------------------------------------- a partitioner of one's own
def check_parts(parts: Any, n_samples: int, n_clients: int, name: str) -> list[np.ndarray]:
    """``parts`` as ``n_clients`` sorted int64 index arrays, checked: none empty, every sample in exactly one.

    Parameters
    ----------
    parts : object
        What a partitioner returned: a list (or tuple) of integer index arrays (numpy, torch, lists).
    n_samples : int
        The number of samples partitioned.
    n_clients : int
        The number of parts expected.
    name : str
        The partitioner, for messages (``data.partition.kind: mypkg.parts:by_site``).

    Raises
    ------
    DataError
        One line naming ``name``, if the parts are not a partition of ``0..n_samples-1`` into ``n_clients``.
    """
    if isinstance(parts, np.ndarray) or not isinstance(parts, (list, tuple)):
        raise DataError(
            f"{name} returned {type(parts).__name__}; expected a list of data.n_clients={n_clients} index arrays, one per client"
        )
    if len(parts) != n_clients:
        raise DataError(f"{name} returned {len(parts)} parts for data.n_clients={n_clients}; expected one index array per client")
    out: list[np.ndarray] = []
    for c, part in enumerate(parts):
        if hasattr(part, "detach"):  # a torch tensor
            part = part.detach().cpu().numpy()
        try:
            array = np.asarray(part)
        except (TypeError, ValueError):
            raise DataError(f"{name} returned {type(part).__name__} for client {c}; expected an array of sample indices") from None
        if array.ndim != 1:
            raise DataError(f"{name} returned an array of shape {array.shape} for client {c}; expected 1-d sample indices")
        if array.size == 0:
            raise DataError(f"{name} gave client {c} no samples; every client needs at least one")
        if array.dtype.kind not in "iu":
            hint = " (a boolean mask? give np.flatnonzero(mask))" if array.dtype.kind == "b" else ""
            raise DataError(f"{name} gave client {c} indices of dtype {array.dtype}; expected integer sample indices{hint}")
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= n_samples:
            bad = low if low < 0 else high
            raise DataError(f"{name} gave client {c} the index {bad}; the {n_samples} samples are 0..{n_samples - 1}")
        out.append(np.sort(array.astype(np.int64)))
    counts = np.bincount(np.concatenate(out), minlength=n_samples)
    if (counts > 1).any():
        sample = int(np.argmax(counts > 1))
        owners = [c for c, part in enumerate(out) if (part == sample).any()]
        twice = f"twice to client {owners[0]}" if len(owners) == 1 else f"to clients {owners[0]} and {owners[1]}"
        raise DataError(f"{name} gave sample {sample} {twice}; every sample must go to exactly one client")
    if (counts == 0).any():
        lost = int(np.count_nonzero(counts == 0))
        raise DataError(
            f"{name} gave {lost} of the {n_samples} samples to no client (the first: {int(np.argmax(counts == 0))}); the "
            "parts must cover every sample"
        )
    return out


def run_partitioner(
    cfg: DataConfig, ds: Dataset, labels: np.ndarray, rng: np.random.Generator
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Deal ``ds``'s samples to ``cfg.n_clients`` clients with the partitioner ``cfg.partition.kind`` names.

    Parameters
    ----------
    cfg : DataConfig
        The ``data`` section (``n_clients``, ``partition``).
    ds : Dataset
        The samples partitioned (for an official test set, its train part).
    labels : numpy.ndarray
        One label per sample of ``ds`` (:func:`sample_labels`).
    rng : numpy.random.Generator
        The partition's random stream.

    Returns
    -------
    parts : list of numpy.ndarray
        Sorted int64 sample indices of each client.
    clusters : numpy.ndarray or None
        For ``embedding``, the cluster of every sample.
    """
    kind, key = cfg.partition.kind, "data.partition.kind"
    resolved = registry.resolve("partition", kind, key=key, search=registry.user_search_path())
    if resolved.builtin:
        params = _partition_params(cfg.partition, ds, rng)
        return resolved.obj(labels, cfg.n_clients, rng, **params), params.get("clusters")
    fn, name = resolved.obj, f"{key}: {kind}"
    try:
        signature = inspect.signature(fn)
        signature.bind_partial(labels, cfg.n_clients, rng)
    except TypeError:
        raise DataError(f"{name} must take (labels, n_clients, rng) as its first three arguments") from None
    except ValueError:  # no signature to read: call it and see
        signature = None
    provided: dict[str, Any] = {"x": ds.x}
    if ds.groups is not None:
        provided["groups"] = ds.groups
    elif signature is not None:
        asked = signature.parameters.get("groups")
        if asked is not None and asked.default is asked.empty and asked.kind is not asked.VAR_KEYWORD:
            raise DataError(
                f"{name} takes natural client ids (its parameter 'groups'), and dataset '{ds.name}' has none; use leaf, "
                "csv with data.id_column, npz with a 'groups' array, or a loader that returns groups"
            )
    parts = registry.call(functools.partial(fn, labels, cfg.n_clients, rng), provided, dict(cfg.partition.params),
                          key=key, spec=kind)
    return check_parts(parts, len(labels), cfg.n_clients, name), None


# --------------------------------------------------------------------------- an official test set
def _apportion(n: int, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``n`` items shared in proportion to non-negative integer ``weights`` (largest remainders, ties at random).

    Share ``i`` is ``floor(n * w_i / W)``, plus one for each of the ``n - sum(floors)`` shares with the largest
    remainders ``(n * w_i) mod W``; shares of equal remainder are ordered at random. A zero weight gets nothing.
    """
    weights = weights.astype(np.int64)
    total = int(weights.sum())
    exact = n * weights
    shares, remainders = exact // total, exact % total
    extra = n - int(shares.sum())
    if extra:
        order = np.lexsort((rng.random(len(weights)), -remainders))
        shares[order[:extra]] += 1
    return shares


def deal_test(
    train: list[np.ndarray], labels: np.ndarray, test: np.ndarray, rng: np.random.Generator,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Deal an official test set to clients so that each client's test label mix follows its training label mix.

    The rule, exactly:

    1. With ``groups`` (``data.partition.kind: natural`` and natural client ids on the test part), a test sample
       whose group some client trains on goes to that client (the client of its group's training samples).
    2. Every other test sample is dealt class by class. The ``n_k`` remaining test samples of class ``k``, in a
       random order, are shared among the clients in proportion to their training samples of class ``k``, ``w_c``:
       client ``c`` gets ``floor(n_k w_c / W)`` of them (``W = sum_c w_c``), and the ``n_k`` minus the sum of those
       that are left go one each to the clients of the largest remainders ``n_k w_c mod W`` (equal remainders in a
       random order). A class no client trains on is shared in proportion to the clients' training sizes.

    Every test sample goes to exactly one client; a client that trains on no sample of a class gets no test sample
    of it, and a client whose shares all round down has an empty test split (it is then left out of the
    per-client accuracies).

    Parameters
    ----------
    train : list of numpy.ndarray
        Each client's training sample indices.
    labels : numpy.ndarray
        One label per sample of the dataset (train and test; :func:`sample_labels`).
    test : numpy.ndarray
        The official test samples' indices, sorted.
    rng : numpy.random.Generator
        Orders each class's test samples and breaks ties between remainders.
    groups : numpy.ndarray or None
        Natural client id of every sample, to keep a group's test samples with the client that trains on it.

    Returns
    -------
    list of numpy.ndarray
        Each client's test sample indices, sorted.
    """
    n_clients = len(train)
    codes, n_classes = _class_codes(np.asarray(labels))
    train_index = np.concatenate(train).astype(np.int64)
    client = np.repeat(np.arange(n_clients), [len(t) for t in train])
    owner = np.full(len(test), -1, dtype=np.int64)
    if groups is not None:
        groups = np.asarray(groups)
        client_of_group = np.full(int(groups.max()) + 1, -1, dtype=np.int64)
        client_of_group[groups[train_index]] = client
        owner = client_of_group[groups[test]]
    rest = np.flatnonzero(owner < 0)
    if len(rest):
        sizes = np.bincount(client, minlength=n_clients)
        # training samples grouped by class, to read each class's per-client counts
        by_class = _stable_argsort(codes[train_index])
        starts = np.searchsorted(codes[train_index][by_class], np.arange(n_classes + 1))
        rest_codes = codes[test[rest]]
        order = rest[_shuffled_by_class(rest_codes, rng)]
        counts = np.bincount(rest_codes, minlength=n_classes)
        start = 0
        for k in np.flatnonzero(counts).tolist():
            n_k = int(counts[k])
            weights = np.bincount(client[by_class[starts[k] : starts[k + 1]]], minlength=n_clients)
            shares = _apportion(n_k, weights if weights.any() else sizes, rng)
            owner[order[start : start + n_k]] = np.repeat(np.arange(n_clients), shares)
            start += n_k
    return [test[p] for p in _parts_from_owner(owner, n_clients)]


# --------------------------------------------------------------------------- train/test split
def split_train_test(
    parts: list[np.ndarray], labels: np.ndarray, test_fraction: float | np.ndarray, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split each client's samples at random into train and test.

    The test split of a client of ``n`` samples has ``round(test_fraction * n)`` of them, at
    least 1 and at most ``n - 1`` when ``n >= 2`` (a client of one sample keeps it for
    training). The choice is stratified by label: the client's samples are ordered by label
    (randomly within a label) and every ``n / n_test``-th one from a random offset is taken.

    Parameters
    ----------
    parts : list of numpy.ndarray
        Sample indices of each client.
    labels : numpy.ndarray
        Label of every sample of the dataset.
    test_fraction : float or numpy.ndarray
        Share of each client's samples for its test split, in (0, 1); or one share per client.
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    train, test : list of numpy.ndarray
        int64 indices of each client's train and test samples, in their order in ``parts``
        (sorted, for parts from a partitioner).
    """
    if not np.all((0 < np.asarray(test_fraction)) & (np.asarray(test_fraction) < 1)):
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if not parts:
        return [], []
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    n_test = np.where(sizes >= 2, np.clip(np.rint(test_fraction * sizes), 1, sizes - 1), 0).astype(np.int64)
    index = np.concatenate(parts).astype(np.int64)
    client = np.repeat(np.arange(len(parts)), sizes)

    # Order each client's samples by label, at random within a label.
    codes, n_classes = _class_codes(np.asarray(labels)[index])
    perm = rng.permutation(len(index))
    order = perm[_stable_argsort(client[perm] * n_classes + codes[perm])]
    # Systematic sampling along that order: the sample of rank r (within its client) is taken
    # when (r * t + o) // n steps up, which happens exactly t times for r in 0..n-1.
    rank = np.arange(len(index)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    offset = np.floor(rng.random(len(parts)) * sizes).astype(np.int64)
    n, t, o = sizes[client], n_test[client], offset[client]
    is_test = np.empty(len(index), dtype=bool)
    is_test[order] = ((rank + 1) * t + o) // n > (rank * t + o) // n
    return _cut(index[~is_test], sizes - n_test), _cut(index[is_test], n_test)


# --------------------------------------------------------------------------- normalisation
def normalize(x: np.ndarray, rows: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Standardise ``x`` in place with the mean and standard deviation of ``x[rows]``.

    Statistics are per feature for flat data ``(N, F)`` and per channel (axis 1) for image data
    ``(N, C, H, W)``. A constant feature (std 0) is only centred.

    Parameters
    ----------
    x : numpy.ndarray
        float features, changed in place.
    rows : numpy.ndarray
        Indices of the samples the statistics are computed on (the training samples).
    chunk : int, default 8192
        Samples read at a time, to bound memory on large image sets.

    Returns
    -------
    mean, std : numpy.ndarray
        The statistics used, shaped to broadcast against ``x``.
    """
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    count = len(rows) * int(np.prod(x.shape[2:], dtype=np.int64))
    blocks = [rows[i : i + chunk] for i in range(0, len(rows), chunk)]
    mean = sum(x[b].sum(axis=axes, dtype=np.float64) for b in blocks) / count
    mean = mean.reshape(shape)
    var = sum(((x[b] - mean) ** 2).sum(axis=axes) for b in blocks) / count
    std = np.sqrt(var).reshape(shape)
    std[std < 1e-8] = 1.0
    x -= mean.astype(x.dtype)
    x /= std.astype(x.dtype)
    return mean, std


# --------------------------------------------------------------------------- federate
@dataclass
class FederatedData:
    """A dataset dealt out to clients.

    Attributes
    ----------
    dataset : Dataset
        All samples; ``x`` already normalised when ``data.normalize`` is set.
    train : list of numpy.ndarray
        Each client's training sample indices into ``dataset.x`` (int64, sorted).
    test : list of numpy.ndarray
        Each client's test sample indices, disjoint from its training ones (with an official test
        set, ``dataset.n_test``, the test samples :func:`deal_test` gave it).
    clusters : numpy.ndarray or None
        Embedding cluster id of every sample (int64, ``0..n_clusters-1``; of the train part, with
        an official test set) when the partition is embedding-based, else None.
    feature_levels : numpy.ndarray or None
        Feature skew level of each client (``data.feature_skew``: noise sigma in feature standard
        deviations, or rotation angle in degrees), float64 by client id; None without feature skew.
    drift : LabelDrift or None
        The concept drift (``data.drift``): which clients relabel their samples, how and when;
        None without drift. Labels in ``dataset.y`` are the original ones.
    validation : list of numpy.ndarray
        Each client's validation sample indices (``data.validation_fraction`` of its training samples, taken out of
        ``train``); empty lists without a validation split.
    unlabelled : list of numpy.ndarray
        Each client's unlabelled training samples (all but ``data.labelled_fraction`` of them, taken out of
        ``train``, which keeps the labelled ones): their features train semi-supervised algorithms, their labels are
        never read; empty lists when every sample is labelled.
    """

    dataset: Dataset
    train: list[np.ndarray]
    test: list[np.ndarray]
    clusters: np.ndarray | None = None
    feature_levels: np.ndarray | None = None
    drift: LabelDrift | None = None
    validation: list[np.ndarray] = field(default_factory=list)
    unlabelled: list[np.ndarray] = field(default_factory=list)

    def evaluation_split(self, split: str) -> list[np.ndarray]:
        """Each client's samples the run scores on: ``test`` or ``validation`` (``evaluation.split``)."""
        return self.validation if split == "validation" else self.test

    @property
    def n_clients(self) -> int:
        return len(self.train)

    @property
    def n_classes(self) -> int:
        return self.dataset.n_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.dataset.input_shape

    @property
    def vocab_size(self) -> int | None:
        return self.dataset.vocab_size

    @property
    def sequence_targets(self) -> bool:
        """Whether a sample's target is a sequence (next tokens, scored by perplexity) rather than a class."""
        return self.dataset.y.ndim > 1

    @property
    def train_sizes(self) -> np.ndarray:
        """Every client's number of training samples."""
        return np.array([len(t) for t in self.train], dtype=np.int64)

    @property
    def test_sizes(self) -> np.ndarray:
        """Every client's number of test samples."""
        return np.array([len(t) for t in self.test], dtype=np.int64)


def _partition_params(partition: PartitionConfig, ds: Dataset, rng: np.random.Generator) -> dict:
    """The keyword arguments of the configured partitioner (for embedding, the clusters, drawn with ``rng``)."""
    if partition.kind == "embedding":
        if partition.embeddings is not None:
            vectors = load_embeddings(partition.embeddings, len(ds))
        elif ds.vocab_size is not None:
            raise DataError(
                f"data.partition.kind=embedding: dataset '{ds.name}' holds token ids, which have no feature map; "
                "supply data.partition.embeddings"
            )
        else:
            vectors = feature_embedding(ds.x, partition.embedding_dim, rng)
        return {"clusters": embedding_clusters(vectors, partition.n_clusters, rng), "alpha": partition.alpha,
                "min_size": partition.min_size}
    if partition.kind == "dirichlet":
        return {"alpha": partition.alpha, "min_size": partition.min_size}
    if partition.kind == "shards":
        return {"classes_per_client": partition.classes_per_client}
    if partition.kind == "quantity":
        return {"exponent": partition.exponent, "min_size": partition.min_size}
    if partition.kind == "natural":
        if ds.groups is None:
            raise DataError(
                f"data.partition.kind=natural needs natural client ids, and dataset '{ds.name}' has none; "
                "use leaf, csv with data.id_column, npz with a 'groups' array, or a loader of your own that returns groups"
            )
        return {"groups": ds.groups}
    return {}


def sample_labels(ds: Dataset) -> np.ndarray:
    """One label per sample, for partitioners and the stratified split: ``ds.y``, or for next-token targets
    ``(N, L)`` (language modelling) the sample's natural group (all zeros without groups)."""
    if ds.y.ndim == 1:
        return ds.y
    return ds.groups if ds.groups is not None else np.zeros(len(ds.y), dtype=np.int64)


def federate(cfg: DataConfig, seed: int) -> FederatedData:
    """Load the dataset, partition it among clients, split each client, normalise.

    Parameters
    ----------
    cfg : DataConfig
        The validated ``data`` section.
    seed : int
        Seed of the partition and the splits; the same seed gives the same result.

    Returns
    -------
    FederatedData
        The dataset and each client's train and test indices (with an official test set, each client
        trains on its whole part and :func:`deal_test` deals the test samples; ``test_fraction`` does
        not apply). Float features are standardised
        with statistics of the union of the training splits when ``cfg.normalize``; token ids
        are left alone. With ``cfg.feature_skew``, each client's samples (train and test) are
        transformed in place (:mod:`hetfl.data.skew`): rotation before normalisation, noise
        after; the levels are kept in ``feature_levels`` (None with ``per: sample``, where each sample draws its
        own). With ``cfg.drift``, ``drift`` says
        which clients relabel their samples and when (the labels themselves are not changed).

    Notes
    -----
    Randomness comes from five generators spawned from ``seed``: partition, split, feature skew,
    drift, validation; adding feature skew, drift or a validation split leaves the partition and the
    test splits as they were. With ``cfg.validation_fraction``, each client's training samples are split
    again by :func:`split_train_test` (``round(validation_fraction * n)`` of its ``n``, at least 1 and at
    most ``n - 1`` when ``n >= 2``, stratified by label) into the samples it trains on and its validation
    split; normalisation statistics are those of the samples trained on.
    """
    ds = load_dataset(cfg, seed)
    if cfg.n_clients > ds.n_train:
        source = ds.name if cfg.path is None else f"{ds.name} at {cfg.path}"
        samples = f"{ds.n_train} training samples" if ds.n_test else f"{len(ds)} samples"
        raise DataError(f"data.n_clients={cfg.n_clients} exceeds the {samples} of {source}")
    partition_rng, split_rng, skew_rng, drift_rng, validation_rng, labelled_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)  # the first ones as spawn(4), spawn(5) give
    )
    skew = cfg.feature_skew
    check_feature_skew(skew, ds)
    labels = sample_labels(ds)
    parts, clusters = run_partitioner(cfg, ds.train_part(), labels[: ds.n_train], partition_rng)
    if ds.n_test:  # an official test set: every client trains on its whole part; the test samples are dealt after
        natural_groups = ds.groups if cfg.partition.kind == "natural" else None
        train, test = parts, deal_test(parts, labels, np.arange(ds.n_train, len(ds)), split_rng, natural_groups)
    else:
        train, test = split_train_test(parts, labels, cfg.test_fraction, split_rng)
    validation: list[np.ndarray] = []
    if cfg.validation_fraction:
        train, validation = split_train_test(train, labels, cfg.validation_fraction, validation_rng)
    train, unlabelled = unlabelled_split(train, labels, cfg.labelled_fraction, labelled_rng)
    levels = None if skew.kind == "none" else feature_levels(cfg.n_clients, skew.strength, skew_rng, skew.groups)
    held = [np.concatenate([te, va]) for te, va in zip(test, validation)] if validation else test
    rows = [np.concatenate([tr, te]) for tr, te in zip(train, held)] if levels is not None else []
    if unlabelled:  # their features are the clients' as much as the labelled ones' (for the transforms and statistics)
        train_rows = [np.concatenate([tr, un]) for tr, un in zip(train, unlabelled)]
        rows = [np.concatenate([r, un]) for r, un in zip(rows, unlabelled)] if rows else rows
    else:
        train_rows = train
    if levels is not None and skew.per == "sample":  # the transforms apply by level group; no level per client
        (rows, levels), client_levels = sample_levels(rows, skew.strength, skew.groups, skew_rng), None
    else:
        client_levels = levels
    if skew.kind == "rotation":
        rotate_clients(ds.x, rows, levels)
    if cfg.normalize and ds.vocab_size is None and ds.x.dtype.kind == "f":
        normalize(ds.x, np.concatenate(train_rows))
    if skew.kind == "noise":
        add_noise(ds.x, rows, levels, feature_std(ds.x, np.concatenate(train_rows)), skew_rng)
    if skew.kind == "affine":
        shift_and_scale(ds.x, rows, levels, feature_std(ds.x, np.concatenate(train_rows)))
    drift = LabelDrift.from_config(cfg.drift, cfg.n_clients, ds.n_classes, drift_rng)
    return FederatedData(ds, train, test, clusters=clusters, feature_levels=client_levels, drift=drift, validation=validation,
                         unlabelled=unlabelled)


def unlabelled_split(
    train: list[np.ndarray], labels: np.ndarray, labelled_fraction: float | list[float], rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each client's training samples split into labelled and unlabelled ones (``data.labelled_fraction``: one share,
    or one per client): a client of share ``f < 1`` and ``n >= 2`` samples has ``round((1 - f) * n)`` unlabelled, at
    least 1 and at most ``n - 1`` (it keeps a labelled sample), stratified by label (:func:`split_train_test`); a
    client of share 1 keeps all. ``(train, [])`` when every share is 1."""
    shares = np.broadcast_to(np.asarray(labelled_fraction, dtype=np.float64), (len(train),))
    if not len(train) or np.all(shares >= 1):
        return train, []
    labelled, unlabelled = split_train_test(train, labels, np.clip(1 - shares, 1e-12, 1 - 1e-12), rng)
    for c in np.flatnonzero(shares >= 1):  # all labelled
        labelled[c], unlabelled[c] = train[c], train[c][:0]
    return labelled, unlabelled
