"""Non-IID beyond labels: feature skew (per-client input transforms) and concept drift.

Feature distribution skew (``data.feature_skew``), in the taxonomy of the non-IID surveys: the
clients' labels may follow the same law, but their inputs do not. Three kinds:

- ``noise``: client ``i`` adds Gaussian noise of standard deviation ``sigma_i`` to every feature
  of every one of its samples, as in Li et al. 2021, "Federated Learning on Non-IID Data Silos:
  An Experimental Study" (arXiv:2102.02079), where ``sigma_i = strength * i / (n - 1)``. Sigma is
  in units of each feature's standard deviation over the training samples (per channel for
  images), computed as :func:`~hetfl.data.partition.normalize` does; on normalised data that
  unit is 1. Noise is added after normalisation.
- ``rotation``: client ``i`` rotates every one of its images by ``angle_i`` degrees
  (counter-clockwise as displayed, row 0 at the top: 90 degrees is ``np.rot90``), bilinear
  interpolation, the image size kept and the uncovered corners filled with 0; the rotated-MNIST
  benchmark of clustered FL. Images are ``(C, H, W)``, ``(H, W)`` or a flat square number of
  features (digits: 64 = 8x8), the rule of the model zoo's CNN. Images are rotated *before*
  normalisation, in pixel space, where 0 is the background: rotating standardised flat digits
  would move per-pixel z-scores to pixels with other statistics and fill the corners with the
  pixel means.
- ``affine``: client ``i`` rescales and shifts every feature of every one of its samples,
  ``x <- (1 + l_i) x + l_i s``, with ``s`` the feature's standard deviation over the training samples (as
  for ``noise``; 1 on normalised data), after normalisation: a per-client contrast and brightness, the
  kind of shift a different scanner or camera gives (the feature-shift non-IID of FedBN, Li et al., ICLR
  2021, arXiv:2102.07623). Each client's features then have their own mean and spread, which a model's
  normalisation layers can undo when their statistics are the client's own.

Levels (:func:`feature_levels`): ``n`` evenly spaced levels from 0 to ``strength``
(``np.linspace(0, strength, n)``), or with ``groups: k`` only ``k`` of them
(``strength * j / (k - 1)``, ``j = 0..k-1``) dealt round-robin. Which client gets which level
is a seeded random permutation, so a level does not follow the client index, which for some
partitioners (natural groups, shards) is itself tied to the data. The level of each client is
kept in :attr:`~hetfl.data.partition.FederatedData.feature_levels`.

With ``per: sample`` (:func:`sample_levels`) the levels are not dealt to clients: every sample (train and test)
draws one of the ``groups`` levels uniformly, so each client holds a mixture of feature distributions, the
intra-client heterogeneity of FedIns (Feng et al., arXiv:2308.06051); ``feature_levels`` is then None.

Every sample belongs to exactly one client (train or test split), so a client's transform is
applied in place to its rows of the shared array.

Concept drift (``data.drift``, :class:`LabelDrift`): the mapping from inputs to labels of some
clients changes at a simulated time. FedDAA (Peng & Tang 2025, "FedDAA: Dynamic Client
Clustering for Concept Drift Adaptation in Federated Learning", arXiv:2506.21054) tells apart
real drift (``P(y|x)`` changes), virtual drift (``P(x)``) and label drift (``P(y)``). Swapping
classes is real drift in that taxonomy, the kind that makes a client's old labels wrong (its
``P(x)`` and its label histogram up to renaming stay as they were). A share of the clients
(picked with the seed) swap the same ``pairs`` disjoint pairs of classes from ``at_s`` simulated
seconds on: after the drift the federation holds two concepts, the setting that clustered
methods such as FedDAA address. The time is in simulated seconds, not rounds: asynchronous
algorithms have no rounds, and one clock makes the drift strike at the same moment for every
algorithm of a comparison.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from hetfl.errors import DataError

if TYPE_CHECKING:
    import torch

    from hetfl.config import DriftConfig, FeatureSkewConfig
    from hetfl.data.datasets import Dataset


# --------------------------------------------------------------------------- feature skew
def feature_levels(n_clients: int, strength: float, rng: np.random.Generator, groups: int | None = None) -> np.ndarray:
    """Skew level of every client: evenly spaced from 0 to ``strength``, in a seeded random order.

    Parameters
    ----------
    n_clients : int
        Number of clients.
    strength : float
        The largest level (noise: sigma in feature standard deviations; rotation: degrees).
    rng : numpy.random.Generator
        Draws the order in which the levels are dealt to clients.
    groups : int or None, default None
        None: level ``strength * r / (n_clients - 1)`` for the client of rank ``r`` (0 for a
        single client). ``k``: level ``strength * (r mod k) / (k - 1)``, ``k`` levels dealt
        round-robin, so group sizes differ by at most one.

    Returns
    -------
    numpy.ndarray
        float64 level of each client, by client id.
    """
    rank = rng.permutation(n_clients)
    if groups is not None:
        return strength * (rank % groups) / (groups - 1)
    return strength * rank / max(n_clients - 1, 1)


def sample_levels(
    rows: list[np.ndarray], strength: float, groups: int, rng: np.random.Generator
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-sample skew (``per: sample``): every sample of ``rows`` draws one of ``groups`` levels
    ``strength * j / (groups - 1)`` uniformly; returns the samples grouped by level and the levels, the
    ``(rows, levels)`` the transforms take, so each level's group is transformed as one client's samples are."""
    samples = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    drawn = rng.integers(groups, size=len(samples))
    return [samples[drawn == j] for j in range(groups)], strength * np.arange(groups) / (groups - 1)


def image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """``(C, H, W)`` of an input shape, as the model zoo's CNN reads it; None if it is no image.

    ``(C, H, W)`` as given, ``(H, W)`` with one channel, a flat square ``(H * H,)`` as ``(1, H, H)``.
    """
    if len(input_shape) == 3:
        return tuple(input_shape)  # type: ignore[return-value]
    if len(input_shape) == 2:
        return (1, *input_shape)  # type: ignore[return-value]
    if len(input_shape) == 1:
        side = math.isqrt(input_shape[0])
        if side > 1 and side * side == input_shape[0]:
            return (1, side, side)
    return None


def rotate(x: np.ndarray, angle: float) -> np.ndarray:
    """Images rotated by ``angle`` degrees, counter-clockwise as displayed, size kept.

    Bilinear interpolation (``scipy.ndimage.rotate``, ``order=1``, ``reshape=False``) about the
    image centre; pixels that come from outside the image are 0. A multiple of 90 degrees
    permutes the pixels exactly (90: ``np.rot90`` on every image).

    Parameters
    ----------
    x : numpy.ndarray
        Samples ``(N, *input_shape)`` with an image shape (see :func:`image_shape`).
    angle : float
        Degrees.

    Returns
    -------
    numpy.ndarray
        The rotated samples, same shape and dtype.
    """
    from scipy.ndimage import rotate as nd_rotate

    shape = image_shape(tuple(x.shape[1:]))
    if shape is None:
        raise ValueError(f"rotate: samples of shape {tuple(x.shape[1:])} are no images")
    if angle % 360 == 0:
        return x.copy()
    images = x.reshape(len(x), *shape)
    rotated = nd_rotate(images, angle, axes=(2, 3), reshape=False, order=1, mode="constant", cval=0.0)
    return rotated.astype(x.dtype, copy=False).reshape(x.shape)


def feature_std(x: np.ndarray, rows: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Standard deviation of ``x[rows]`` per feature (flat data) or per channel (axis 1, images).

    The statistics :func:`~hetfl.data.partition.normalize` divides by: a constant feature counts
    as 1. Shaped to broadcast against ``x``.
    """
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    count = len(rows) * int(np.prod(x.shape[2:], dtype=np.int64))
    blocks = [rows[i : i + chunk] for i in range(0, len(rows), chunk)]
    mean = (sum(x[b].sum(axis=axes, dtype=np.float64) for b in blocks) / count).reshape(shape)
    var = sum(((x[b] - mean) ** 2).sum(axis=axes) for b in blocks) / count
    std = np.sqrt(var).reshape(shape)
    std[std < 1e-8] = 1.0
    return std


def check_feature_skew(cfg: FeatureSkewConfig, ds: Dataset) -> None:
    """Refuse a feature skew the dataset cannot take (token ids; rotation of non-images), in one line."""
    if cfg.kind == "none":
        return
    if ds.vocab_size is not None or ds.x.dtype.kind != "f":
        raise DataError(
            f"data.feature_skew.kind={cfg.kind}: dataset '{ds.name}' holds token ids, which take no feature skew; "
            "set data.feature_skew.kind=none"
        )
    if cfg.kind == "rotation" and image_shape(ds.input_shape) is None:
        raise DataError(
            f"data.feature_skew.kind=rotation needs images (C,H,W), (H,W) or a square number of features; "
            f"dataset '{ds.name}' has samples of shape {ds.input_shape}"
        )


def rotate_clients(x: np.ndarray, rows: list[np.ndarray], angles: np.ndarray) -> None:
    """Rotate, in place, the images of each client ``c`` (``x[rows[c]]``) by ``angles[c]`` degrees."""
    for r, angle in zip(rows, angles):
        if len(r) and angle % 360 != 0:
            x[r] = rotate(x[r], float(angle))


def shift_and_scale(x: np.ndarray, rows: list[np.ndarray], levels: np.ndarray, scale: np.ndarray) -> None:
    """``x <- (1 + level_c) x + level_c * scale`` in place, on the samples ``x[rows[c]]`` of each client ``c``."""
    for r, level in zip(rows, levels):
        if level and len(r):
            x[r] = ((1.0 + level) * x[r] + level * scale).astype(x.dtype, copy=False)


def add_noise(x: np.ndarray, rows: list[np.ndarray], sigmas: np.ndarray, scale: np.ndarray, rng: np.random.Generator) -> None:
    """Add, in place, Gaussian noise of std ``sigmas[c] * scale`` to the samples of each client ``c``.

    Noise is drawn client after client from ``rng`` (for every client, so a client's noise does
    not depend on the others' levels), which makes it reproducible from the seed.
    """
    for r, sigma in zip(rows, sigmas):
        noise = rng.standard_normal((len(r), *x.shape[1:]), dtype=np.float32)
        if sigma > 0 and len(r):
            x[r] += (noise * (sigma * scale)).astype(x.dtype, copy=False)


# --------------------------------------------------------------------------- concept drift
class LabelDrift:
    """Concept drift by label swap: drifting clients relabel their samples from a simulated time on.

    From ``at_s`` simulated seconds on, a drifting client's sample of class ``y`` has the label
    ``mapping[y]``: its ``P(y|x)`` changes (real drift). Every drifting client uses the same
    ``mapping``, so after the drift the federation holds two concepts, the old and the new. The
    drift is not applied to the data: whoever reads a client's labels at time ``t`` (local
    training, per-client evaluation) asks :meth:`labels`::

        y_now = drift.labels(client_id, y, t)   # y itself if the client has not drifted by t

    Parameters
    ----------
    at_s : float
        Simulated seconds of the drift; a client has drifted at ``t`` when ``t >= at_s``.
    drifting : array-like of int
        Ids of the clients that drift.
    mapping : array-like of int
        A permutation of ``0..K-1``: label ``y`` becomes ``mapping[y]``.
    n_clients : int
        Number of clients of the federation.

    Attributes
    ----------
    at_s : float
    mapping : numpy.ndarray
        int64 permutation of the classes.
    drifting : numpy.ndarray
        bool, shape ``(n_clients,)``: whether each client drifts (at ``at_s``).
    """

    def __init__(self, *, at_s: float, drifting: Any, mapping: Any, n_clients: int) -> None:
        mapping = np.asarray(mapping, dtype=np.int64).ravel()
        if not np.array_equal(np.sort(mapping), np.arange(len(mapping))):
            raise ValueError(f"LabelDrift: mapping must be a permutation of 0..{len(mapping) - 1}, got {mapping.tolist()}")
        ids = np.asarray(drifting, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= n_clients):
            raise ValueError(f"LabelDrift: drifting client ids must lie in 0..{n_clients - 1}")
        if not at_s >= 0:
            raise ValueError(f"LabelDrift: at_s must be non-negative, got {at_s}")
        self.at_s = float(at_s)
        self.mapping = mapping
        self.drifting = np.zeros(n_clients, dtype=bool)
        self.drifting[ids] = True
        self._on_device: dict[Any, torch.Tensor] = {}

    @classmethod
    def swap(
        cls, *, at_s: float, n_clients: int, n_classes: int, share: float, pairs: int, rng: np.random.Generator
    ) -> LabelDrift:
        """Random swap drift: ``round(share * n_clients)`` clients (halves up) swap ``pairs`` disjoint class pairs.

        The clients and the ``2 * pairs`` classes are drawn from ``rng``; the classes pair up in
        the order drawn.
        """
        if 2 * pairs > n_classes:
            raise DataError(f"data.drift.pairs: {pairs} disjoint pairs need {2 * pairs} classes; the dataset has {n_classes}")
        k = math.floor(share * n_clients + 0.5)
        drifting = np.sort(rng.choice(n_clients, size=k, replace=False))
        classes = rng.permutation(n_classes)[: 2 * pairs]
        mapping = np.arange(n_classes)
        mapping[classes[0::2]], mapping[classes[1::2]] = classes[1::2], classes[0::2]
        return cls(at_s=at_s, drifting=drifting, mapping=mapping, n_clients=n_clients)

    @classmethod
    def from_config(cls, cfg: DriftConfig, n_clients: int, n_classes: int, rng: np.random.Generator) -> LabelDrift | None:
        """The drift ``data.drift`` describes, or None when its kind is none."""
        if cfg.kind == "none":
            return None
        return cls.swap(at_s=cfg.at_s, n_clients=n_clients, n_classes=n_classes, share=cfg.clients, pairs=cfg.pairs, rng=rng)

    @property
    def n_clients(self) -> int:
        return len(self.drifting)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """The swapped classes ``(a, b)``, ``a < b``, of a swap mapping (classes moved in longer cycles are left out)."""
        a = np.flatnonzero(self.mapping != np.arange(len(self.mapping)))
        return [(int(i), int(self.mapping[i])) for i in a if i < self.mapping[i] and self.mapping[self.mapping[i]] == i]

    @property
    def drifting_share(self) -> float:
        """Share of the clients that drift."""
        return float(self.drifting.mean()) if len(self.drifting) else 0.0

    def drifted(self, client_id: int, t: float) -> bool:
        """Whether client ``client_id`` uses the new labels at simulated time ``t``."""
        return bool(self.drifting[client_id]) and t >= self.at_s

    def labels(self, client_id: int, y: torch.Tensor | np.ndarray, t: float) -> torch.Tensor | np.ndarray:
        """Client ``client_id``'s labels at simulated time ``t``.

        Parameters
        ----------
        client_id : int
            The client the labels belong to.
        y : torch.Tensor or numpy.ndarray
            Integer labels (original classes), any shape.
        t : float
            Simulated seconds.

        Returns
        -------
        torch.Tensor or numpy.ndarray
            ``mapping[y]`` (a new tensor of ``y``'s dtype and device) if the client has drifted by
            ``t``; else ``y`` itself, not copied.
        """
        if not self.drifted(client_id, t):
            return y
        if isinstance(y, np.ndarray):
            return self.mapping[y].astype(y.dtype, copy=False)
        import torch

        table = self._on_device.get(y.device)
        if table is None:
            table = self._on_device[y.device] = torch.as_tensor(self.mapping, device=y.device)
        return table[y.long()].to(y.dtype)

    def changed_fraction(self, client_id: int, y: torch.Tensor | np.ndarray) -> float:
        """Share of the labels ``y`` of client ``client_id`` that the drift changes (0 if it does not drift or ``y`` is empty)."""
        y = np.asarray(y.cpu() if hasattr(y, "cpu") else y).ravel()
        if not self.drifting[client_id] or y.size == 0:
            return 0.0
        return float(np.mean(self.mapping[y] != y))

    def __repr__(self) -> str:
        return (f"LabelDrift(at_s={self.at_s:g}, drifting={int(self.drifting.sum())}/{self.n_clients} clients, "
                f"pairs={self.pairs})")
