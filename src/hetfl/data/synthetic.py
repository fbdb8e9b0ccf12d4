"""``data.dataset: synthetic``: Synthetic(alpha, beta) of Li et al., generated client by client on demand.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous Networks"
(FedProx), MLSys 2020, arXiv:1812.06127, section 5.1. Client ``k`` has its own softmax-regression
model and its own input distribution::

    u_k ~ N(0, alpha),  W_k ~ N(u_k, 1) (10 x 60),  b_k ~ N(u_k, 1) (10)
    B_k ~ N(0, beta),   v_k ~ N(B_k, 1) (60)
    x ~ N(v_k, Sigma),  Sigma diagonal, Sigma_jj = j^-1.2
    y = argmax softmax(W_k x + b_k)

with 60 features and 10 classes. alpha controls how much the clients' models differ, beta how much
their inputs do (Synthetic(0, 0) still differs between clients, Synthetic(1, 1) the most in the paper).
As in the authors' generator (``generate_synthetic.py`` of their repository), the second argument of
each ``N(., .)`` is a standard deviation, and client ``k`` holds ``n_k = floor(LogNormal(4, 2)) + 50``
samples (``data.synthetic.size_mean_log``, ``size_sigma_log``, ``min_size``; ``max_size`` optionally caps
the heavy tail, which the paper does not). Each client's samples are split into train and test as other
datasets are (``data.test_fraction`` of them, at least one, for testing).

Why this dataset for 100,000 clients. A real dataset with a natural partition has as many samples as it
has: digits has 1,797, and dealing a fixed pool to 100,000 clients would give each one sample, which
measures nothing. Here every client's data is a pure function of ``(seed, client)``: nothing is held
per client but its two sample counts, and a client's samples are generated when it trains (and, for
the evaluation, for a fixed subset of clients), so memory does not grow with the number of clients, and
the federation is non-IID in both labels and features by construction. ``data.partition``,
``data.feature_skew`` and ``data.normalize`` do not apply (the inputs are on a unit scale already).

Evaluation. Scoring the global model on every client's test split would generate all clients' data at
every evaluation; instead ``data.synthetic.eval_clients`` clients, drawn once with the seed, are the
test set (their test splits, pooled; per-client accuracies over them). Those clients also train, on
their train splits, like everyone else.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import torch

from hetfl.data.skew import LabelDrift
from hetfl.strategies.base import ClientData

if TYPE_CHECKING:
    from hetfl.config import DataConfig

FEATURES = 60
CLASSES = 10
SIGMA = np.arange(1, FEATURES + 1, dtype=np.float64) ** -1.2  # Sigma_jj = j^-1.2 (variances)


def sample_sizes(n_clients: int, *, mean_log: float, sigma_log: float, min_size: int, max_size: int | None,
                 rng: np.random.Generator) -> np.ndarray:
    """Every client's number of samples: ``floor(LogNormal(mean_log, sigma_log)) + min_size``, at most ``max_size``."""
    sizes = np.floor(rng.lognormal(mean_log, sigma_log, size=n_clients)).astype(np.int64) + min_size
    return sizes if max_size is None else np.minimum(sizes, max_size)


def split_sizes(sizes: np.ndarray, test_fraction: float) -> np.ndarray:
    """Test samples of clients of ``sizes`` samples: ``round(test_fraction * n)``, at least 1 and at most ``n - 1``
    (as :func:`hetfl.data.partition.split_train_test`; every client here has at least two samples)."""
    return np.clip(np.rint(test_fraction * sizes), 1, sizes - 1).astype(np.int64)


def client_samples(seed: int, client: int, n: int, alpha: float, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` samples of client ``client``: ``(x float32 (n, 60), y int64 (n,))``, a function of
    ``(seed, client)`` alone (a smaller ``n`` gives the first rows of a larger one's)."""
    rng = np.random.default_rng([seed, 11, client])
    u = rng.normal(0.0, alpha)
    w = rng.normal(u, 1.0, size=(FEATURES, CLASSES)).astype(np.float32)
    b = rng.normal(u, 1.0, size=CLASSES).astype(np.float32)
    v = rng.normal(rng.normal(0.0, beta), 1.0, size=FEATURES).astype(np.float32)
    x = rng.standard_normal((n, FEATURES), dtype=np.float32)  # drawn row by row: the first rows never depend on n
    x *= np.sqrt(SIGMA).astype(np.float32)
    x += v
    y = np.argmax(x @ w + b, axis=1)  # softmax is monotone: its argmax is the logits'
    return x, y.astype(np.int64)


class SyntheticData:
    """The ``synthetic`` federation: sample counts for every client, samples generated on demand.

    Parameters
    ----------
    cfg : DataConfig
        The validated ``data`` section (``n_clients``, ``test_fraction``, ``synthetic``, ``drift``).
    seed : int
        Seeds the sample counts, every client's samples and the evaluated clients.
    """

    name = "synthetic"
    n_classes = CLASSES
    input_shape = (FEATURES,)
    vocab_size = None
    sequence_targets = False

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        syn = cfg.synthetic
        self.seed, self.alpha, self.beta = seed, syn.alpha, syn.beta
        self.n_clients = cfg.n_clients
        sizes_rng, eval_rng, drift_rng = (np.random.default_rng(s) for s in np.random.SeedSequence([seed, 12]).spawn(3))
        sizes = sample_sizes(cfg.n_clients, mean_log=syn.size_mean_log, sigma_log=syn.size_sigma_log,
                             min_size=syn.min_size, max_size=syn.max_size, rng=sizes_rng)
        self.test_sizes = split_sizes(sizes, cfg.test_fraction)
        self.train_sizes = sizes - self.test_sizes
        k = min(syn.eval_clients, cfg.n_clients)
        self.eval_clients = np.sort(eval_rng.choice(cfg.n_clients, size=k, replace=False))
        self.drift = LabelDrift.from_config(cfg.drift, cfg.n_clients, CLASSES, drift_rng)

    def client(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Client ``c``'s ``(x_train, y_train, x_test, y_test)``: its samples, the first ``train_sizes[c]`` to train."""
        n_train = int(self.train_sizes[c])
        x, y = client_samples(self.seed, c, n_train + int(self.test_sizes[c]), self.alpha, self.beta)
        return x[:n_train], y[:n_train], x[n_train:], y[n_train:]

    def train(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Client ``c``'s training samples alone (``client(c)[:2]``, without generating the test ones)."""
        return client_samples(self.seed, c, int(self.train_sizes[c]), self.alpha, self.beta)

    def test_set(self) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """The evaluated clients' test splits, pooled: ``x``, ``y`` and the client of each row."""
        parts = [self.client(int(c))[2:] for c in self.eval_clients]
        owner = np.repeat(self.eval_clients, [len(y) for _, y in parts]).astype(np.int64)
        x = torch.from_numpy(np.concatenate([x for x, _ in parts]))
        y = torch.from_numpy(np.concatenate([y for _, y in parts]))
        return x, y, owner


class SyntheticPool:
    """The clients' training data of a :class:`SyntheticData`, generated when a client trains (the engine's pool).

    The engine asks for a task's data more than once (to train it, in a batch, and at its arrival, for its
    sample count and label statistics), so the most recently generated clients' samples are kept, least
    recently used first out, up to ``cache_bytes``: the memory of the clients active now, not of all clients.
    """

    def __init__(self, data: SyntheticData, cache_bytes: int = 256 * 2**20) -> None:
        self.source = data
        self.n_classes = data.n_classes
        self.drift = data.drift
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cached_bytes = 0

    def _train(self, client_id: int) -> tuple[np.ndarray, np.ndarray]:
        hit = self._cache.get(client_id)
        if hit is not None:
            self._cache.move_to_end(client_id)
            return hit
        x, y = self.source.train(client_id)
        size = x.nbytes + y.nbytes
        if size <= self.cache_bytes:
            while self._cache and self._cached_bytes + size > self.cache_bytes:
                _, (old_x, old_y) = self._cache.popitem(last=False)
                self._cached_bytes -= old_x.nbytes + old_y.nbytes
            self._cache[client_id] = (x, y)
            self._cached_bytes += size
        return x, y

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": OrderedDict(), "_cached_bytes": 0}  # a cache, not state

    @property
    def n_clients(self) -> int:
        return self.source.n_clients

    def data(self, client_id: int, t: float = 0.0) -> ClientData:
        """Client ``client_id``'s training data at simulated time ``t`` (generated now; labels drifted once drifted)."""
        x, y = self._train(client_id)
        labels = torch.from_numpy(y.copy())
        if self.drift is not None:
            labels = self.drift.labels(client_id, labels, t)
        return ClientData(client_id, torch.from_numpy(x.copy()), labels)

    def n_samples(self, client_id: int) -> int:
        return int(self.source.train_sizes[client_id])

    def sample_counts(self) -> np.ndarray:
        return self.source.train_sizes
