"""Feature skew (noise, rotation), concept drift (label swap) and the metrics that measure them."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from rich.console import Console

from hetfl.cli import main
from hetfl.config import DataConfig, validate
from hetfl.data import (
    LabelDrift,
    feature_distance,
    feature_distances,
    feature_levels,
    federate,
    federation_skew,
    partition_stats,
    stats_table,
)
from hetfl.data.skew import image_shape, rotate
from hetfl.errors import ConfigError, DataError

N_DIGITS = 1797


def digits(n_clients: int = 5, seed: int = 0, **data) -> object:
    return federate(DataConfig(n_clients=n_clients, **data), seed)


def noise(strength: float, **extra) -> dict:
    return {"feature_skew": {"kind": "noise", "strength": strength, **extra}}


def rotation(strength: float, **extra) -> dict:
    return {"feature_skew": {"kind": "rotation", "strength": strength, **extra}}


# --------------------------------------------------------------------------- rotation, by hand
def test_rotate_90_is_rot90_for_every_image_layout():
    image = np.arange(9, dtype=np.float32).reshape(3, 3)
    expected = np.rot90(image)  # [[2, 5, 8], [1, 4, 7], [0, 3, 6]]: counter-clockwise
    np.testing.assert_allclose(rotate(image[None], 90)[0], expected, atol=1e-5)  # (N, H, W)
    np.testing.assert_allclose(rotate(image[None, None], 90)[0, 0], expected, atol=1e-5)  # (N, C, H, W)
    np.testing.assert_allclose(rotate(image.reshape(1, 9), 90)[0], expected.ravel(), atol=1e-5)  # flat square
    square = np.array([[[1.0, 2.0], [3.0, 4.0]]], dtype=np.float32)
    np.testing.assert_allclose(rotate(square, 90)[0], [[2.0, 4.0], [1.0, 3.0]], atol=1e-5)
    np.testing.assert_allclose(rotate(square, 180)[0], [[4.0, 3.0], [2.0, 1.0]], atol=1e-5)
    assert rotate(image[None], 90).dtype == np.float32


def test_rotate_keeps_the_centre_and_fills_corners_with_zero():
    ones = np.ones((1, 5, 5), dtype=np.float32)
    turned = rotate(ones, 45)[0]
    assert turned[2, 2] == pytest.approx(1.0)  # the centre maps to itself
    assert turned[0, 0] == pytest.approx(0.0)  # the corner comes from outside the image
    np.testing.assert_array_equal(rotate(ones, 360), ones)


def test_image_shape_follows_the_cnn_rule():
    assert image_shape((3, 32, 32)) == (3, 32, 32)
    assert image_shape((28, 28)) == (1, 28, 28)
    assert image_shape((64,)) == (1, 8, 8)
    assert image_shape((10,)) is None and image_shape((1,)) is None


# --------------------------------------------------------------------------- levels
def test_levels_are_evenly_spaced_and_shuffled():
    levels = feature_levels(5, 2.0, np.random.default_rng(0))
    np.testing.assert_allclose(np.sort(levels), [0.0, 0.5, 1.0, 1.5, 2.0])  # strength * i / (n - 1)
    orders = {tuple(feature_levels(5, 2.0, np.random.default_rng(s))) for s in range(10)}
    assert len(orders) > 1  # the order is drawn, not the client index
    np.testing.assert_array_equal(levels, feature_levels(5, 2.0, np.random.default_rng(0)))
    assert feature_levels(1, 3.0, np.random.default_rng(0)).tolist() == [0.0]


def test_groups_deal_k_levels_round_robin():
    levels = feature_levels(10, 270.0, np.random.default_rng(1), groups=4)
    values, counts = np.unique(levels, return_counts=True)
    assert values.tolist() == [0.0, 90.0, 180.0, 270.0]
    assert sorted(counts.tolist()) == [2, 2, 3, 3]


# --------------------------------------------------------------------------- feature skew in federate
def test_noise_level_i_has_std_strength_i_over_n_minus_1():
    clean, noisy = digits(5), digits(5, **noise(2.0))
    for c in range(5):  # the same partition and splits, the same normalisation: the difference is the noise
        np.testing.assert_array_equal(clean.train[c], noisy.train[c])
        np.testing.assert_array_equal(clean.test[c], noisy.test[c])
    np.testing.assert_allclose(np.sort(noisy.feature_levels), [0.0, 0.5, 1.0, 1.5, 2.0])
    for c in range(5):
        rows = np.concatenate([noisy.train[c], noisy.test[c]])  # test samples are skewed too
        added = noisy.dataset.x[rows] - clean.dataset.x[rows]
        assert added.std() == pytest.approx(noisy.feature_levels[c], rel=0.03, abs=1e-6)
        assert abs(added.mean()) < 0.03


def test_shift_and_scale_by_hand():
    from hetfl.data.skew import shift_and_scale

    # client 0 at level 0 is untouched; client 1 at level 0.5: x -> 1.5 x + 0.5 s, with s = (1, 2) per feature
    x = np.array([[1.0, 2.0], [3.0, 4.0], [-2.0, 0.0]], dtype=np.float32)
    shift_and_scale(x, [np.array([0]), np.array([1, 2])], np.array([0.0, 0.5]), np.array([[1.0, 2.0]]))
    np.testing.assert_allclose(x, [[1.0, 2.0], [5.0, 7.0], [-2.5, 1.0]])


def test_affine_skew_gives_each_client_its_own_mean_and_spread():
    clean, shifted = digits(5), digits(5, feature_skew={"kind": "affine", "strength": 2.0})
    np.testing.assert_allclose(np.sort(shifted.feature_levels), [0.0, 0.5, 1.0, 1.5, 2.0])
    for c in range(5):  # same partition and normalisation; then x -> (1 + l) x + l on normalised data (std 1)
        rows = np.concatenate([shifted.train[c], shifted.test[c]])
        level = shifted.feature_levels[c]
        np.testing.assert_allclose(shifted.dataset.x[rows], (1 + level) * clean.dataset.x[rows] + level, rtol=1e-5,
                                   atol=1e-5)


def test_noise_is_in_units_of_the_feature_std_without_normalisation():
    clean, noisy = digits(3, normalize=False), digits(3, normalize=False, **noise(1.0))
    top = int(np.argmax(noisy.feature_levels))
    rows = np.concatenate([noisy.train[top], noisy.test[top]])
    added = noisy.dataset.x[rows] - clean.dataset.x[rows]
    train = np.concatenate(clean.train)
    std = clean.dataset.x[train].std(axis=0)
    varying = std > 1e-8
    np.testing.assert_allclose(added.std(axis=0)[varying] / std[varying], 1.0, atol=0.15)
    np.testing.assert_allclose(added.std(axis=0)[~varying], 1.0, atol=0.15)  # a constant feature counts as 1


def test_rotation_turns_each_clients_images_by_its_angle():
    clean, turned = digits(4, normalize=False), digits(4, normalize=False, **rotation(90.0, groups=2))
    assert sorted(turned.feature_levels.tolist()) == [0.0, 0.0, 90.0, 90.0]
    for c, angle in enumerate(turned.feature_levels):
        rows = np.concatenate([turned.train[c], turned.test[c]])
        images = clean.dataset.x[rows].reshape(-1, 8, 8)
        expected = np.rot90(images, axes=(1, 2)) if angle == 90 else images
        np.testing.assert_allclose(turned.dataset.x[rows].reshape(-1, 8, 8), expected, atol=1e-4)


def test_every_sample_stays_with_one_client_and_same_seed_same_data():
    cfg = {**noise(1.5), "drift": {"kind": "swap", "at_s": 60.0, "clients": 0.5, "pairs": 2}}
    a, b, other = digits(6, seed=3, **cfg), digits(6, seed=3, **cfg), digits(6, seed=4, **cfg)
    owned = np.sort(np.concatenate(a.train + a.test))
    np.testing.assert_array_equal(owned, np.arange(N_DIGITS))
    np.testing.assert_array_equal(a.dataset.x, b.dataset.x)
    np.testing.assert_array_equal(a.feature_levels, b.feature_levels)
    np.testing.assert_array_equal(a.drift.mapping, b.drift.mapping)
    np.testing.assert_array_equal(a.drift.drifting, b.drift.drifting)
    assert not np.array_equal(a.dataset.x, other.dataset.x)
    assert digits(6, seed=3).feature_levels is None and digits(6, seed=3).drift is None


def test_rotation_needs_images_and_tokens_take_no_feature_skew(tmp_path):
    rng = np.random.default_rng(0)
    flat = tmp_path / "flat.npz"
    np.savez(flat, x=rng.normal(size=(40, 10)), y=rng.integers(0, 2, 40))
    with pytest.raises(DataError) as err:
        federate(DataConfig(dataset="npz", path=str(flat), n_clients=2, **rotation(30.0)), 0)
    assert "data.feature_skew.kind" in str(err.value) and "\n" not in str(err.value)
    tokens = tmp_path / "tokens.npz"
    np.savez(tokens, x=rng.integers(0, 5, (40, 6)), y=rng.integers(0, 2, 40), vocab_size=5)
    with pytest.raises(DataError) as err:
        federate(DataConfig(dataset="npz", path=str(tokens), n_clients=2, **noise(1.0)), 0)
    assert "data.feature_skew.kind" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "data, key",
    [
        ({"feature_skew": {"kind": "noise"}}, "data.feature_skew.strength"),
        ({"feature_skew": {"kind": "rotation", "strength": -5}}, "data.feature_skew.strength"),
        ({"feature_skew": {"kind": "noise", "strength": 1, "groups": 1}}, "data.feature_skew.groups"),
        ({"feature_skew": {"kind": "blur", "strength": 1}}, "data.feature_skew.kind"),
        ({"feature_skew": {"sigma": 1}}, "data.feature_skew.sigma"),
        ({"drift": {"kind": "swap"}}, "data.drift.at_s"),
        ({"drift": {"kind": "swap", "at_s": -1}}, "data.drift.at_s"),
        ({"drift": {"kind": "swap", "at_s": 5, "clients": 1.5}}, "data.drift.clients"),
        ({"drift": {"kind": "swap", "at_s": 5, "pairs": 0}}, "data.drift.pairs"),
        ({"drift": {"kind": "permute", "at_s": 5}}, "data.drift.kind"),
    ],
)
def test_bad_configs_are_one_line_errors_naming_the_key(data, key):
    with pytest.raises(ConfigError) as err:
        validate({"data": data})
    message = str(err.value)
    assert key in message and "\n" not in message


def test_too_many_pairs_for_the_classes_is_a_data_error():
    with pytest.raises(DataError, match=r"^data\.drift\.pairs: 6 disjoint pairs need 12 classes"):
        digits(4, drift={"kind": "swap", "at_s": 1.0, "pairs": 6})


# --------------------------------------------------------------------------- concept drift, by hand
def test_swap_drift_maps_exactly_the_chosen_pairs_after_at_s():
    drift = LabelDrift(at_s=10.0, drifting=[0, 2], mapping=[0, 2, 1, 3], n_clients=3)  # swap 1 <-> 2
    y = torch.tensor([0, 1, 2, 2, 3])
    assert drift.pairs == [(1, 2)]
    assert drift.labels(0, y, 9.99) is y  # before the drift: the tensor itself, no copy
    assert drift.labels(1, y, 100.0) is y  # a client that does not drift
    assert drift.labels(0, y, 10.0).tolist() == [0, 2, 1, 1, 3]
    assert drift.labels(2, y.to(torch.int32), 11.0).dtype == torch.int32
    assert drift.labels(2, y.numpy(), 11.0).tolist() == [0, 2, 1, 1, 3]
    assert (drift.drifted(0, 9.0), drift.drifted(0, 10.0), drift.drifted(1, 10.0)) == (False, True, False)
    assert drift.changed_fraction(0, y) == pytest.approx(3 / 5)  # the 1 and both 2s change
    assert drift.changed_fraction(1, y) == 0.0
    assert drift.changed_fraction(2, np.array([0, 3])) == 0.0
    assert drift.drifting_share == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="permutation"):
        LabelDrift(at_s=0.0, drifting=[0], mapping=[0, 0, 1], n_clients=1)


def test_random_swap_picks_share_of_clients_and_disjoint_pairs():
    drift = LabelDrift.swap(at_s=5.0, n_clients=20, n_classes=10, share=0.25, pairs=3, rng=np.random.default_rng(0))
    assert drift.drifting.sum() == 5
    classes = [c for pair in drift.pairs for c in pair]
    assert len(drift.pairs) == 3 and len(set(classes)) == 6
    np.testing.assert_array_equal(drift.mapping[drift.mapping], np.arange(10))  # a swap undoes itself
    assert np.count_nonzero(drift.mapping != np.arange(10)) == 6


def test_drift_statistics_count_changed_training_labels():
    fed = digits(8, drift={"kind": "swap", "at_s": 30.0, "clients": 0.5, "pairs": 2})
    stats = partition_stats(fed)
    y = fed.dataset.y
    for s in stats:
        assert s.drifts == bool(fed.drift.drifting[s.client])
        assert s.drift_changed == pytest.approx(fed.drift.changed_fraction(s.client, y[fed.train[s.client]]))
    skew = federation_skew(stats)
    assert skew["drift_clients_frac"] == pytest.approx(0.5)
    train = np.concatenate([fed.train[c] for c in np.flatnonzero(fed.drift.drifting)])
    changed = np.count_nonzero(fed.drift.mapping[y[train]] != y[train])
    assert skew["drift_labels_frac"] == pytest.approx(changed / sum(len(t) for t in fed.train))
    assert "feature_dist_mean" not in skew  # no feature skew, no feature pass


# --------------------------------------------------------------------------- the feature-skew metric
def test_feature_distance_by_hand():
    reference = np.array([[-1.0], [1.0]])  # mean 0, std 1
    assert feature_distance(reference, reference) == 0.0
    assert feature_distance(np.array([[1.0], [3.0]]), reference) == pytest.approx(2.0)  # mean moved by 2 std
    assert feature_distance(np.array([[-2.0], [2.0]]), reference) == pytest.approx(1.0)  # spread 2 vs 1
    two = np.array([[-1.0, 5.0], [1.0, 5.0]])  # second feature constant: its std counts as 1
    assert feature_distance(two + [0.0, 2.0], two) == pytest.approx(np.sqrt(4 / 2))


def test_feature_distance_grows_with_the_noise():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(4000, 8))
    near = feature_distance(reference + rng.normal(scale=0.5, size=reference.shape), reference)
    far = feature_distance(reference + rng.normal(scale=1.0, size=reference.shape), reference)
    assert feature_distance(reference[:2000], reference) < 0.05  # same law: sampling noise only
    assert 0 < near < far
    assert near == pytest.approx(np.sqrt(1.25) - 1, abs=0.02) and far == pytest.approx(np.sqrt(2) - 1, abs=0.02)


def test_per_client_feature_distances_match_the_direct_formula():
    fed = digits(7, seed=2, **noise(1.0))
    x = fed.dataset.x
    everyone = x[np.concatenate(fed.train)]
    direct = [feature_distance(x[t], everyone) for t in fed.train]
    np.testing.assert_allclose(feature_distances(fed, chunk=100), direct, rtol=1e-9, atol=1e-12)
    stats = partition_stats(fed)
    assert [s.feature_distance for s in stats] == pytest.approx(direct)
    assert [s.feature_level for s in stats] == fed.feature_levels.tolist()


@pytest.mark.parametrize("skew, strengths", [(noise, [0.0, 1.0, 2.0, 4.0]), (rotation, [0.0, 30.0, 90.0, 180.0])])
def test_mean_feature_distance_grows_with_strength_on_digits(skew, strengths):
    means = [federation_skew(partition_stats(digits(20, **skew(s))))["feature_dist_mean"] for s in strengths]
    assert means[0] < 0.2  # no skew: the sampling noise of ~72 training samples a client
    assert all(a < b for a, b in zip(means, means[1:])), means


# --------------------------------------------------------------------------- display
def test_table_and_partition_command_show_the_new_columns(tmp_path, capsys):
    fed = digits(60, **rotation(90.0), drift={"kind": "swap", "at_s": 1.0, "clients": 0.2, "pairs": 1})
    console = Console(record=True, width=220)
    console.print(stats_table(partition_stats(fed), title="sixty"))
    text = " ".join(console.export_text().split())  # the caption wraps
    assert "skew level" in text and "feature dist" in text and "drift" in text
    assert "(30 more)" in text and "drift: 12/60 clients" in text and "feature distance mean" in text

    config = tmp_path / "exp.yaml"
    config.write_text("data:\n  n_clients: 5\n  feature_skew: {kind: noise, strength: 2}\n"
                      "  drift: {kind: swap, at_s: 60, pairs: 1}\n")
    capsys.readouterr()
    assert main(["partition", str(config)]) == 0
    out = capsys.readouterr().out
    assert "noise up to 2 sigma" in out and "drift at 60 s swapping" in out and "feature dist" in out


# -- concept drift in the engine: training data and test labels follow the simulated clock ---------------
def test_drifting_clients_train_and_are_scored_on_their_new_labels_after_the_drift():
    from hetfl.engine import ClientPool
    from hetfl.training.evaluate import Evaluator
    from tests.conftest import blobs

    x, y = blobs(12, classes=3)
    drift = LabelDrift(at_s=5.0, drifting=[1], mapping=[1, 0, 2], n_clients=2)
    pool = ClientPool(x, y, [torch.arange(6), torch.arange(6, 12)], 3, drift)
    assert torch.equal(pool.data(1, 4.9).y, y[6:])  # before the drift: the original labels
    swapped = torch.tensor([1, 0, 2])[y[6:]]
    assert torch.equal(pool.data(1, 5.0).y, swapped)  # from at_s on: label 0 <-> 1
    assert torch.equal(pool.data(0, 9.0).y, y[:6])  # a client that does not drift keeps its labels
    on_cpu = types.SimpleNamespace(device=torch.device("cpu"))  # all the evaluator asks of a trainer until it scores
    evaluator = Evaluator.from_splits(on_cpu, x, y, [np.arange(6), np.arange(6, 12)], drift)
    assert torch.equal(evaluator.labels(0.0), y)
    assert torch.equal(evaluator.labels(5.0), torch.cat([y[:6], swapped]))


def test_a_run_with_drift_loses_global_accuracy_after_the_drift(tmp_path):
    from hetfl.engine.run import run_experiment

    raw = {
        "name": "drift", "seed": 0, "rounds": 12,
        "data": {"dataset": "digits", "n_clients": 6, "partition": {"kind": "iid"},
                 "drift": {"kind": "swap", "at_s": 1.0, "clients": 0.5, "pairs": 5}},
        "devices": {"compute": {"distribution": "constant", "median_flops": 2e8}, "jitter": 0.0},
        "model": {"name": "logreg"},
        "training": {"lr": 0.1, "batch_size": 16, "local_steps": 10},
        "strategy": {"name": "fedavg", "clients_per_round": 6},
    }
    run_experiment(validate(raw), tmp_path / "r", show_progress=False)
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    before = [r for r in records if 0 < r["sim_time_s"] < 1.0]
    after = [r for r in records if r["sim_time_s"] >= 1.0]
    assert before and after
    # half the clients swap all ten classes in pairs: one global model cannot fit both concepts
    assert max(r["accuracy"] for r in after) < max(r["accuracy"] for r in before) - 0.2
