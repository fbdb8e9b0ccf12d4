"""OCFL (Zuziak et al., arXiv:2509.01587): the clustering temperature, its trigger and the one-shot clustering by hand."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import run_rounds
from test_cli import assert_one_line_error, cli, write_config
from test_clustered import fedavg_client_accuracy, labelled_simulator, update
from hetfl.strategies import OCFL
from hetfl.strategies.clustered import cosine_distances
from hetfl.strategies.ocfl import clustering_temperature, density_clusters

E1, E2 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]


def test_temperature_by_hand():
    # u1 = e1, u2 = e2, u3 = -e1: Gamma_12 = 1, Gamma_13 = 2, Gamma_23 = 1 (each twice off the diagonal)
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # p = 2: ||Gamma||_2 = sqrt(2 (1 + 4 + 1)) = sqrt(12); lambda = (3 * 2 * 2^2)^(1/2) = sqrt(24); T = sqrt(1/2)
    assert clustering_temperature(u, 2.0) == pytest.approx(math.sqrt(0.5))
    # p = 1: ||Gamma||_1 = 2 (1 + 2 + 1) = 8; lambda = 3 * 2 * 2 = 12; T = 2/3
    assert clustering_temperature(u, 1.0) == pytest.approx(2 / 3)
    # the two extremes: everyone the same way (0), two clients in opposite directions (1), whatever the lengths
    assert clustering_temperature(torch.tensor([[1.0, 1.0], [3.0, 3.0], [0.5, 0.5]])) == pytest.approx(0.0, abs=1e-7)
    assert clustering_temperature(torch.tensor([[2.0, 0.0], [-5.0, 0.0]])) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        clustering_temperature(torch.ones(1, 2))


def test_density_clustering_finds_two_directions_one_or_none():
    two = torch.tensor([[1.0, 0.1, 0.0], [2.0, -0.1, 0.1], [0.5, 0.0, -0.05],
                        [0.1, 1.0, 0.0], [0.0, 3.0, 0.2], [-0.1, 0.7, 0.0]])
    assert density_clusters(cosine_distances(two), min_cluster_size=2) == [0, 0, 0, 1, 1, 1]
    assert density_clusters(cosine_distances(two)) == [0] * 6  # clusters of 3 < 5 (the default): all noise, one
    # no structure: eight unit updates evenly spread over a quarter circle (uniform density, neighbours 1 - cos(pi/14)
    # = 0.025 apart) stay one cluster (clustering-agnostic)
    angle = torch.linspace(0, math.pi / 2, 8)
    assert density_clusters(cosine_distances(torch.stack([angle.cos(), angle.sin()], 1))) == [0] * 8
    # one client: one cluster; a row HDBSCAN would call noise joins the cluster of smallest mean distance
    assert density_clusters(np.zeros((1, 1))) == [0]
    d = np.array([[0.0, 0.01, 0.02, 0.9, 0.95, 0.5],
                  [0.01, 0.0, 0.01, 0.9, 0.95, 0.45],
                  [0.02, 0.01, 0.0, 0.9, 0.95, 0.5],
                  [0.9, 0.9, 0.9, 0.0, 0.01, 0.7],
                  [0.95, 0.95, 0.95, 0.01, 0.0, 0.7],
                  [0.5, 0.45, 0.5, 0.7, 0.7, 0.0]])
    labels = density_clusters(d, min_cluster_size=2)
    assert labels[:5] == [0, 0, 0, 1, 1] and labels[5] == 0  # mean distance 0.483 to cluster 0, 0.7 to cluster 1


def rows(w, deltas):
    """Updates of clients 0.. that start at ``w`` and end at ``w + delta`` (one sample each)."""
    return [update(i, w.tolist(), (w + torch.tensor(d)).tolist(), 1) for i, d in enumerate(deltas)]


def test_ocfl_clusters_once_when_the_temperature_first_falls():
    ocfl = OCFL(clients_per_round=6, min_cluster_size=2)
    w = torch.zeros(3)
    server = SimpleNamespace(params=w)
    # round 1: clients 0, 1 both move along e1: T_1 = 0 (no peak without two earlier temperatures); FedAvg = e1
    w = ocfl.aggregate(server, rows(w, [E1, E1]))
    assert ocfl.temperatures == [pytest.approx(0.0, abs=1e-7)] and not ocfl.clustered
    assert torch.allclose(w, torch.tensor(E1))
    # round 2: [e1, e1, e1, e2, e2, e2]: 18 off-diagonal entries are 1, the rest 0;
    # T_2 = sqrt(18) / sqrt(6 * 5 * 4) = sqrt(0.15) = 0.387 > T_1: still rising, FedAvg
    server.params = w
    w2 = ocfl.aggregate(server, rows(w, [E1] * 3 + [E2] * 3))
    assert ocfl.temperatures[-1] == pytest.approx(math.sqrt(0.15)) and not ocfl.clustered
    assert torch.allclose(w2, w + torch.tensor([0.5, 0.5, 0.0]))
    # round 3: client 3 moves along e1 now: [e1] * 4 + [e2] * 2: 16 entries are 1;
    # T_3 = sqrt(16 / 120) = 0.365: T_1 < T_2 > T_3, the first peak, the trigger. Clusters from each client's latest update: {0..3}, {4, 5}
    server.params = w2
    g = ocfl.aggregate(server, rows(w2, [E1] * 4 + [E2] * 2))
    assert ocfl.temperatures[-1] == pytest.approx(math.sqrt(16 / 120))
    assert ocfl.clustered and ocfl.clustered_at == 3
    assert ocfl.cluster_of == {0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 1}
    # every cluster starts from the round's FedAvg model w2 + (4 e1 + 2 e2) / 6; the global one is the largest
    fedavg = w2 + torch.tensor([4 / 6, 2 / 6, 0.0])
    assert all(torch.allclose(m, fedavg) for m in ocfl.models) and g is ocfl.models[0]
    assert ocfl.metrics() == {"clusters": 2.0, "temperature": pytest.approx(math.sqrt(16 / 120))}
    # one-shot: later rounds are per-cluster FedAvg and never compute a temperature again
    server.params = g
    ups = [update(4, g.tolist(), (g + 2 * torch.tensor(E2)).tolist(), 1, options={"cluster": 1})]
    ocfl.aggregate(server, ups)
    assert torch.allclose(ocfl.models[1], g + 2 * torch.tensor(E2)) and ocfl.models[0] is g
    assert len(ocfl.temperatures) == 3


def test_a_temperature_that_only_falls_never_triggers():
    ocfl = OCFL()
    w = torch.zeros(3)
    for deltas in ([E1, E2], [E1, [1.0, 1.0, 0.0]], [E1, E1]):  # T = 0.5, then 0.146, then 0: no peak
        ocfl.aggregate(SimpleNamespace(params=w), rows(w, deltas))
    assert ocfl.temperatures == sorted(ocfl.temperatures, reverse=True) and not ocfl.clustered


def test_ocfl_without_structure_stays_one_model_and_a_lone_update_cannot_trigger():
    ocfl = OCFL()
    w = torch.zeros(3)
    server = SimpleNamespace(params=w)
    ocfl.aggregate(server, rows(w, [E1, E1]))  # T = 0
    ocfl.aggregate(server, rows(w, [E1, E2]))  # orthogonal: Gamma_12 = 1, T = sqrt(2 * 1) / sqrt(2 * 1 * 4) = 1/2
    assert ocfl.temperatures == [pytest.approx(0.0, abs=1e-7), pytest.approx(0.5)]
    ocfl.aggregate(server, rows(w, [E1]))  # one update: no temperature, no trigger
    assert len(ocfl.temperatures) == 2 and not ocfl.clustered
    angle = torch.linspace(0, math.pi / 6, 5)  # five updates evenly spread over 30 degrees of the e1-e2 plane
    arc = torch.stack([angle.cos(), angle.sin(), torch.zeros(5)], 1).tolist()
    new = ocfl.aggregate(server, rows(w, arc))  # the trigger (T < 1/2), but HDBSCAN finds one cluster
    # 4, 3, 2, 1 pairs at 7.5, 15, 22.5, 30 degrees: Gamma = 1 - cos = 0.00856, 0.0341, 0.0761, 0.134;
    # T = sqrt(2 (4 * 0.00856^2 + 3 * 0.0341^2 + 2 * 0.0761^2 + 0.134^2)) / sqrt(5 * 4 * 4) = 0.258 / 8.94 = 0.0289
    assert ocfl.temperatures[-1] == pytest.approx(0.0289, abs=2e-4)
    assert ocfl.clustered and len(ocfl.models) == 1 and set(ocfl.cluster_of.values()) == {0}
    assert torch.allclose(new, torch.tensor(arc).mean(0), atol=1e-6)  # = FedAvg


def test_ocfl_agglomerative_clusterer_is_flhcs_cut():
    ocfl = OCFL(clusterer="agglomerative", distance_threshold=0.5)
    assert ocfl.labels(torch.tensor([E1, E1, E2])) == [0, 0, 1]


@pytest.mark.parametrize(("key", "value"), [("p", "0.5"), ("min_cluster_size", "1"), ("clusterer", "kmeans")])
def test_bad_ocfl_params_are_one_line_naming_the_key(tmp_path, capsys, key, value):
    code, _, err = cli(capsys, "run", write_config(tmp_path), "--out", tmp_path / "run", "--quiet",
                       "--set", "strategy.name=ocfl", "--set", f"strategy.params.{key}={value}")
    assert_one_line_error(code, err, "strategy.params", key)


def test_ocfl_separates_conflicting_label_groups_and_beats_fedavg():
    rounds = 15
    fedavg_acc = fedavg_client_accuracy(rounds)
    ocfl = OCFL(clients_per_round=8, min_cluster_size=3)  # groups of 4 clients: below the default 5
    sim = run_rounds(labelled_simulator(ocfl), rounds)
    assert ocfl.clustered
    even, odd = {ocfl.cluster_of[c] for c in (0, 2, 4, 6)}, {ocfl.cluster_of[c] for c in (1, 3, 5, 7)}
    assert len(even) == 1 and len(odd) == 1 and even != odd
    personal = sim.evaluator.personal(sim.params, sim.personal_model)
    print(f"FedAvg {fedavg_acc:.3f}; OCFL {personal['personal_acc_mean']:.3f}, clustered after aggregation "
          f"{ocfl.clustered_at}; temperatures {[round(t, 3) for t in ocfl.temperatures]}")
    assert personal["personal_acc_mean"] > fedavg_acc + 0.2
