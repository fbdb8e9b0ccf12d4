"""Partitioners, the per-client train/test split, federate and the partition statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from rich.console import Console

from hetfl.config import DataConfig
from hetfl.data import (
    PARTITIONERS,
    dirichlet,
    embedding,
    federate,
    iid,
    js_distance,
    natural,
    partition_stats,
    quantity,
    shards,
    split_train_test,
    stats_table,
)
from hetfl.data.datasets import load_digits
from hetfl.errors import DataError

N_CLASSES = 10
LABELS = np.repeat(np.arange(N_CLASSES), 100)  # balanced, 1000 samples
GROUPS = np.random.default_rng(7).integers(0, 50, len(LABELS))  # 50 natural groups
CLUSTERS = np.random.default_rng(8).integers(0, 10, len(LABELS))  # 10 embedding clusters

CASES = {
    "iid": (iid, {}),
    "dirichlet": (dirichlet, {"alpha": 0.5}),
    "shards": (shards, {"classes_per_client": 2}),
    "quantity": (quantity, {"exponent": 1.5}),
    "natural": (natural, {"groups": GROUPS}),
    "embedding": (embedding, {"clusters": CLUSTERS, "alpha": 0.5}),
}


def run(kind: str, seed: int = 0, n_clients: int = 10, labels: np.ndarray = LABELS) -> list[np.ndarray]:
    fn, params = CASES[kind]
    return fn(labels, n_clients, np.random.default_rng(seed), **params)


def client_label_counts(parts: list[np.ndarray], labels: np.ndarray = LABELS) -> np.ndarray:
    return np.stack([np.bincount(labels[p], minlength=N_CLASSES) for p in parts])


def cv(sizes) -> float:
    sizes = np.asarray(sizes, dtype=float)
    return sizes.std() / sizes.mean()


# --------------------------------------------------------------------------- every partitioner
def test_registry_matches_the_built_in_partitioners():
    from hetfl import registry

    builtins = registry.KINDS["partition"].builtins
    assert set(PARTITIONERS) == set(builtins) == set(CASES)
    for kind, fn in PARTITIONERS.items():  # each built-in name resolves, through the registry, to its function
        assert registry.resolve("partition", kind, key="data.partition.kind").obj is fn


@pytest.mark.parametrize("kind", CASES)
def test_covers_every_sample_exactly_once(kind):
    parts = run(kind)
    assert len(parts) == 10
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))


@pytest.mark.parametrize("kind", CASES)
def test_clients_non_empty_sorted_int64(kind):
    for part in run(kind):
        assert len(part) > 0
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)


@pytest.mark.parametrize("kind", CASES)
def test_deterministic_for_a_seed_and_different_for_another(kind):
    first, again, other = run(kind, seed=1), run(kind, seed=1), run(kind, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("kind", CASES)
def test_more_clients_than_samples_is_a_data_error(kind):
    with pytest.raises(DataError):
        run(kind, n_clients=len(LABELS) + 1)


# --------------------------------------------------------------------------- dirichlet
def test_dirichlet_skew_grows_as_alpha_shrinks():
    def mean_distance(alpha):
        parts = dirichlet(LABELS, 10, np.random.default_rng(0), alpha=alpha)
        counts = client_label_counts(parts)
        return js_distance(counts, counts.sum(axis=0)).mean()

    skewed, flat = mean_distance(0.05), mean_distance(100.0)
    assert skewed > 0.5
    assert flat < 0.15
    assert skewed > 3 * flat


def test_dirichlet_respects_min_size():
    def smallest(seed, min_size):
        return min(len(p) for p in dirichlet(LABELS, 10, np.random.default_rng(seed), alpha=0.1, min_size=min_size))

    assert min(smallest(seed, 1) for seed in range(5)) < 20  # the constraint binds
    assert min(smallest(seed, 20) for seed in range(5)) >= 20


def test_dirichlet_rejects_non_positive_alpha():
    with pytest.raises(ValueError, match="alpha"):
        dirichlet(LABELS, 10, np.random.default_rng(0), alpha=0.0)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet(LABELS, 10, np.random.default_rng(0), alpha=-1.0)


def test_dirichlet_refuses_impossible_sizes_with_a_clear_error():
    with pytest.raises(DataError, match="need 1100 samples"):
        dirichlet(LABELS, 100, np.random.default_rng(0), alpha=1.0, min_size=11)


def test_dirichlet_tops_up_short_clients_with_many_clients_and_small_alpha():
    # 100 clients, alpha 0.1, 10 classes: plain draws essentially never give everyone 2 samples.
    labels = np.repeat(np.arange(10), 180)
    parts = dirichlet(labels, 100, np.random.default_rng(0), alpha=0.1, min_size=2)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 2
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    # still strongly skewed: for most clients one class is the majority of their data
    top_share = np.array([np.bincount(labels[p]).max() / len(p) for p in parts])
    assert np.median(top_share) >= 0.6


def test_top_up_moves_exactly_the_shortfall_from_the_largest_clients():
    from hetfl.data.partition import _top_up

    counts = np.array([[10, 0, 1, 0], [5, 0, 0, 3]])  # classes x clients; totals 15, 0, 1, 3
    fixed = _top_up(counts, 2, np.random.default_rng(0))
    assert fixed.sum(axis=0).tolist() == [12, 2, 2, 3]  # 3 samples short, all given by client 0
    assert (fixed.sum(axis=1) == counts.sum(axis=1)).all()  # class totals unchanged
    assert (fixed[:, 3] == counts[:, 3]).all()


def test_dirichlet_handles_100k_clients():
    # its speed is not asserted: a timed assertion fails on a busy machine (speed belongs in benchmarks/)
    labels = np.random.default_rng(0).integers(0, 10, 2_000_000)
    parts = dirichlet(labels, 100_000, np.random.default_rng(0), alpha=100.0, min_size=1)
    assert len(parts) == 100_000
    assert min(len(p) for p in parts) >= 1
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))  # every sample once


def test_dirichlet_accepts_labels_that_are_not_codes():
    labels = np.where(LABELS % 2 == 0, "even", "odd")
    parts = dirichlet(labels, 5, np.random.default_rng(0), alpha=1.0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


# --------------------------------------------------------------------------- shards, quantity, natural
@pytest.mark.parametrize("classes_per_client", [1, 2, 5])
def test_shards_limit_classes_per_client(classes_per_client):
    # 1000 balanced samples; 10 clients x k shards of 100/k samples never straddle a class.
    parts = shards(LABELS, 10, np.random.default_rng(0), classes_per_client=classes_per_client)
    for part in parts:
        assert len(np.unique(LABELS[part])) <= classes_per_client


def test_shards_refuse_more_shards_than_samples():
    with pytest.raises(DataError, match="shards"):
        shards(LABELS, 600, np.random.default_rng(0), classes_per_client=2)


def test_quantity_sizes_are_skewed_and_sum_to_n():
    q_sizes = [len(p) for p in quantity(LABELS, 20, np.random.default_rng(0), exponent=1.0, min_size=3)]
    iid_sizes = [len(p) for p in iid(LABELS, 20, np.random.default_rng(0))]
    assert sum(q_sizes) == len(LABELS)
    assert min(q_sizes) >= 3
    assert cv(iid_sizes) < 0.01
    assert cv(q_sizes) > 0.5


def test_quantity_smaller_exponent_is_more_skewed():
    def mean_cv(exponent):
        draws = [quantity(LABELS, 20, np.random.default_rng(seed), exponent=exponent) for seed in range(10)]
        return np.mean([cv([len(p) for p in parts]) for parts in draws])

    assert mean_cv(0.5) > mean_cv(5.0)


def test_natural_clients_equal_groups():
    groups = np.repeat([3, 1, 2], [5, 7, 4])  # group ids need not be 0..G-1
    labels = np.zeros(len(groups), dtype=np.int64)
    parts = natural(labels, 3, np.random.default_rng(0), groups=groups)
    # client c is the c-th group in sorted order
    for client, group in enumerate([1, 2, 3]):
        assert np.array_equal(parts[client], np.flatnonzero(groups == group))


def test_natural_merges_whole_groups_round_robin():
    parts = natural(LABELS, 10, np.random.default_rng(0), groups=GROUPS)
    groups_per_client = [np.unique(GROUPS[p]) for p in parts]
    assert [len(g) for g in groups_per_client] == [5] * 10  # 50 groups round-robin into 10 clients
    for part, groups in zip(parts, groups_per_client):  # every group lies wholly in one client
        assert np.array_equal(part, np.flatnonzero(np.isin(GROUPS, groups)))


def test_natural_errors():
    with pytest.raises(DataError, match="fewer than data.n_clients=60"):
        natural(LABELS, 60, np.random.default_rng(0), groups=GROUPS)
    with pytest.raises(DataError, match="group ids for 1000 samples"):
        natural(LABELS, 10, np.random.default_rng(0), groups=GROUPS[:-1])


# --------------------------------------------------------------------------- train/test split
def test_split_is_disjoint_and_covers_each_part():
    parts = dirichlet(LABELS, 20, np.random.default_rng(0), alpha=0.5)
    train, test = split_train_test(parts, LABELS, 0.25, np.random.default_rng(1))
    for part, tr, te in zip(parts, train, test):
        assert len(np.intersect1d(tr, te)) == 0
        assert np.array_equal(np.sort(np.concatenate([tr, te])), part)
        assert len(tr) >= 1 and len(te) >= 1
        assert abs(len(te) - 0.25 * len(part)) <= 1
        assert tr.dtype == np.int64 and te.dtype == np.int64


def test_split_small_clients():
    parts = [np.array([0]), np.array([1, 2]), np.array([3, 4, 5])]
    train, test = split_train_test(parts, np.zeros(6, dtype=np.int64), 0.9, np.random.default_rng(0))
    assert [len(t) for t in train] == [1, 1, 1]
    assert [len(t) for t in test] == [0, 1, 2]


def test_split_is_stratified_by_label():
    labels = np.array([0, 1] * 50)
    train, test = split_train_test([np.arange(100)], labels, 0.2, np.random.default_rng(3))
    assert np.bincount(labels[test[0]]).tolist() == [10, 10]


def test_split_is_random_and_deterministic():
    parts = iid(LABELS, 4, np.random.default_rng(0))
    a = split_train_test(parts, LABELS, 0.2, np.random.default_rng(5))[1]
    b = split_train_test(parts, LABELS, 0.2, np.random.default_rng(5))[1]
    c = split_train_test(parts, LABELS, 0.2, np.random.default_rng(6))[1]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


# --------------------------------------------------------------------------- statistics
def test_js_distance_hand_computed():
    assert js_distance([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0, abs=1e-12)  # same distribution
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint supports
    assert js_distance([5, 5, 0, 0], [0, 0, 1, 3]) == pytest.approx(1.0)
    # p = (1, 0), q = (1/2, 1/2), m = (3/4, 1/4):
    # KL(p||m) = log2(4/3), KL(q||m) = 1/2 log2(2/3) + 1/2 log2(2)
    expected = math.sqrt((math.log2(4 / 3) + 0.5 * math.log2(2 / 3) + 0.5) / 2)
    assert js_distance([1, 0], [1, 1]) == pytest.approx(expected)
    rows = js_distance(np.array([[1, 0], [0, 1], [1, 1]]), np.array([1, 1]))
    assert rows.shape == (3,)
    assert rows[0] == pytest.approx(expected) and rows[1] == pytest.approx(expected) and rows[2] == pytest.approx(0.0)


def test_js_distance_matches_scipy():
    scipy_distance = pytest.importorskip("scipy.spatial.distance")
    rng = np.random.default_rng(0)
    for _ in range(5):
        p, q = rng.random(7), rng.random(7)
        assert js_distance(p, q) == pytest.approx(scipy_distance.jensenshannon(p, q, base=2))


def _fed(kind: str, n_clients: int = 20, **partition):
    cfg = DataConfig(n_clients=n_clients, partition={"kind": kind, **partition})
    return federate(cfg, seed=0)


def test_partition_stats_counts_and_distances():
    fed = _fed("dirichlet", alpha=0.3)
    stats = partition_stats(fed)
    assert [s.client for s in stats] == list(range(20))
    for s, train, test in zip(stats, fed.train, fed.test):
        assert s.n_train == len(train) and s.n_test == len(test)
        assert np.array_equal(s.label_counts, np.bincount(fed.dataset.y[train], minlength=10))
        assert s.n_classes == np.count_nonzero(s.label_counts)
        assert 0.0 <= s.distance <= 1.0
    iid_mean = np.mean([s.distance for s in partition_stats(_fed("iid"))])
    assert np.mean([s.distance for s in stats]) > 3 * iid_mean


def test_stats_table_small_and_large():
    fed = _fed("iid", n_clients=60)
    stats = partition_stats(fed)
    console = Console(record=True, width=200)
    console.print(stats_table(stats[:10], title="ten"))
    small = console.export_text()
    assert "ten" in small and "…" not in small
    assert "10 clients" in small

    console = Console(record=True, width=200)
    console.print(stats_table(stats, title="sixty"))
    text = console.export_text()
    rows = [line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")]
    assert rows == [str(c) for c in range(25)] + ["…"] + [str(c) for c in range(55, 60)]
    assert "60 clients" in text and "(30 more)" in text
    assert f"{sum(s.n_train for s in stats)} train" in text


def test_top_labels_format():
    from hetfl.data.stats import top_labels

    assert top_labels(np.array([0, 0, 0, 41, 0, 0, 0, 22, 37, 0]), top=2) == "3:41% 8:37%"
    assert top_labels(np.array([5, 0, 0])) == "0:100%"


# --------------------------------------------------------------------------- federate
def test_federate_digits_normalises_with_training_splits_only():
    fed = _fed("dirichlet", alpha=0.5)
    assert fed.n_clients == 20 and fed.n_classes == 10 and fed.input_shape == (64,)
    train = np.concatenate(fed.train)
    test = np.concatenate(fed.test)
    assert len(np.intersect1d(train, test)) == 0
    assert len(train) + len(test) == 1797

    raw = load_digits().x.astype(np.float64)
    mean = raw[train].mean(axis=0)
    std = raw[train].std(axis=0)
    std[std < 1e-8] = 1.0
    assert np.allclose(fed.dataset.x, (raw - mean) / std, atol=1e-5)
    assert np.abs(fed.dataset.x[train].mean(axis=0)).max() < 1e-5
    assert fed.dataset.x.dtype == np.float32


def test_federate_is_deterministic_per_seed():
    cfg = DataConfig(n_clients=10, partition={"kind": "dirichlet", "alpha": 0.5})
    a, b, c = federate(cfg, 3), federate(cfg, 3), federate(cfg, 4)
    assert all(np.array_equal(x, y) for x, y in zip(a.train + a.test, b.train + b.test))
    assert np.array_equal(a.dataset.x, b.dataset.x)
    assert not all(np.array_equal(x, y) for x, y in zip(a.train, c.train))


def test_federate_without_normalisation_keeps_raw_values():
    fed = federate(DataConfig(n_clients=5, normalize=False), 0)
    assert fed.dataset.x.min() == 0.0 and fed.dataset.x.max() == 16.0


def test_federate_errors():
    with pytest.raises(DataError, match=r"data.n_clients=5000 exceeds the 1797 samples of digits"):
        federate(DataConfig(n_clients=5000), 0)
    with pytest.raises(DataError, match="natural client ids"):
        federate(DataConfig(partition={"kind": "natural"}), 0)


def test_federate_images_per_channel_and_tokens_untouched(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.random((200, 3, 4, 4)).astype(np.float32) * np.array([1, 10, 100], dtype=np.float32)[None, :, None, None]
    np.savez(tmp_path / "img.npz", x=images, y=rng.integers(0, 3, 200), groups=rng.integers(0, 8, 200))
    fed = federate(DataConfig(dataset="npz", path=str(tmp_path / "img.npz"), n_clients=8, partition={"kind": "natural"}), 0)
    train_x = fed.dataset.x[np.concatenate(fed.train)]
    assert np.allclose(train_x.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    assert np.allclose(train_x.std(axis=(0, 2, 3)), 1, atol=1e-4)

    tokens = rng.integers(0, 80, (100, 12))
    np.savez(tmp_path / "tok.npz", x=tokens, y=rng.integers(0, 80, 100), vocab_size=80)
    fed = federate(DataConfig(dataset="npz", path=str(tmp_path / "tok.npz"), n_clients=4), 0)
    assert fed.dataset.x.dtype == np.int64
    assert np.array_equal(fed.dataset.x, tokens)
