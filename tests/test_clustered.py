"""Clustered FL: IFCA (Ghosh et al. 2020) and FL+HC (Briggs et al. 2020), by hand and end to end."""

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import blobs, profile, run_rounds
from hetfl.config import ModelConfig, TrainingConfig
from hetfl.engine import ClientPool, Simulator
from hetfl.models import build_model
from hetfl.strategies import FLHC, IFCA, FedAvg, Task, Update
from hetfl.strategies.base import ClientData
from hetfl.strategies.clustered import cosine_clusters
from hetfl.training import LocalTrainer
from hetfl.training.evaluate import Evaluator


def update(client, start, end, n, *, stats=None, options=None):
    task = Task(task_id=client, client_id=client, version=0, params=torch.tensor(start, dtype=torch.float32),
                steps=1, dispatched_at=0.0, options=options or {})
    return Update(task=task, params=torch.tensor(end, dtype=torch.float32), n_samples=n, steps=1, loss=0.0,
                  arrived_at=0.0, stats=stats or {})


# ---------------------------------------------------------------------------------- IFCA
def two_class_trainer():
    torch.manual_seed(0)
    net = build_model(ModelConfig(name="logreg"), (2,), 2)  # weight (2x2) then bias (2)
    return LocalTrainer(net, TrainingConfig(lr=0.1, batch_size=4, local_steps=1))


@pytest.mark.parametrize("global_cluster", [0, 1])
def test_ifca_client_picks_the_cluster_with_the_lowest_loss(global_cluster):
    # data: x = e1 -> class 0, x = e2 -> class 1. "fits" (10 * I) classifies it with loss ~ 5e-5;
    # "flipped" (10 * swap) gets every label wrong (loss ~ 10). The fitting model sits in cluster 1.
    trainer = two_class_trainer()
    data = ClientData(0, torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 2), torch.tensor([0, 1] * 2))
    fits = torch.tensor([10.0, 0.0, 0.0, 10.0, 0.0, 0.0])
    flipped = torch.tensor([0.0, 10.0, 10.0, 0.0, 0.0, 0.0])
    models = [flipped, fits]
    task = Task(0, 0, 0, models[global_cluster], 1, 0.0,
                payload={f"cluster_{k}": m for k, m in enumerate(models) if k != global_cluster},
                options={"global_cluster": global_cluster, "n_clusters": 2})
    result = IFCA().client_train(trainer, task, data, {}, seed=0)
    assert result.stats["cluster"] == 1.0
    assert torch.allclose(result.params, fits, atol=1e-3)  # it trained the model it chose (gradient ~ 0 there)
    # IFCA's inference does the same choice at evaluation
    strategy = IFCA()
    strategy.models = models
    assert strategy.personal_params(trainer, flipped, data, {}, 0) is fits


def test_ifca_aggregation_is_the_sample_weighted_mean_per_cluster():
    # cluster 0: clients return [1, 2] (n=1) and [3, 4] (n=3) -> 0.25*[1,2] + 0.75*[3,4] = [2.5, 3.5]
    # cluster 1: nobody -> unchanged (the same tensor); cluster 2: one client [9, 9] (n=2) -> [9, 9]
    strategy = IFCA(n_clusters=3)
    old = [torch.tensor([0.0, 0.0]), torch.tensor([5.0, 5.0]), torch.tensor([-1.0, -1.0])]
    strategy.models = list(old)
    ups = [update(0, [0, 0], [1, 2], 1, stats={"cluster": 0.0}),
           update(1, [0, 0], [3, 4], 3, stats={"cluster": 0.0}),
           update(2, [0, 0], [9, 9], 2, stats={"cluster": 2.0})]
    new_global = strategy.aggregate(SimpleNamespace(params=old[0]), ups)
    assert torch.allclose(strategy.models[0], torch.tensor([2.5, 3.5]))
    assert strategy.models[1] is old[1]
    assert torch.allclose(strategy.models[2], torch.tensor([9.0, 9.0]))
    # the global model is the largest cluster's: 4 samples chose cluster 0, 2 chose cluster 2
    assert strategy.global_cluster == 0 and new_global is strategy.models[0]
    # clients 0 and 1 move to cluster 2 in the next round: cluster 2 now holds 6 samples of 6
    ups = [update(0, [0, 0], [7, 7], 1, stats={"cluster": 2.0}), update(1, [0, 0], [7, 7], 3, stats={"cluster": 2.0})]
    assert strategy.aggregate(SimpleNamespace(params=new_global), ups) is strategy.models[2]
    assert strategy.global_cluster == 2
    assert strategy.configure(None, 0)["options"] == {"global_cluster": 2, "n_clusters": 3}
    assert sorted(strategy.configure(None, 0)["payload"]) == ["cluster_0", "cluster_1"]


def test_ifca_sends_all_k_models_and_the_bytes_count_them():
    strategy = IFCA(n_clusters=3, clients_per_round=2)
    sim = labelled_simulator(strategy, n_per_group=1)
    run_rounds(sim, 2)
    assert sim.counters.bytes_down == sim.counters.tasks * 3 * sim.shared_bytes
    assert sim.counters.bytes_up == sim.counters.arrived * sim.shared_bytes
    # the K initial models differ, and the global one is one of them
    assert len({tuple(m[:3].tolist()) for m in strategy.models}) == 3
    assert any(m is sim.params for m in strategy.models)


# ---------------------------------------------------------------------------------- FL+HC
TWO_DIRECTIONS = torch.tensor([
    [1.0, 0.1, 0.0], [2.0, -0.1, 0.1], [0.5, 0.0, -0.05],  # along e1
    [0.1, 1.0, 0.0], [0.0, 3.0, 0.2], [-0.1, 0.7, 0.0],    # along e2
])


@pytest.mark.parametrize("cut", [{"n_clusters": 2}, {"distance_threshold": 0.5}])
def test_hierarchical_clustering_splits_two_directions(cut):
    # within a group the cosine distance is < 0.03; across groups it is ~ 1
    assert cosine_clusters(TWO_DIRECTIONS, **cut) == [0, 0, 0, 1, 1, 1]


def test_hierarchical_clustering_threshold_decides_the_number_of_clusters():
    assert cosine_clusters(TWO_DIRECTIONS, distance_threshold=1.5) == [0] * 6  # everything merges below 1.5
    assert len(set(cosine_clusters(TWO_DIRECTIONS, distance_threshold=1e-6))) == 6


def test_flhc_clusters_after_warmup_then_averages_within_each_cluster():
    strategy = FLHC(warmup_rounds=1, n_clusters=2)
    w = [0.0, 0.0, 0.0]
    # warm-up round: FedAvg of everyone = mean of w + delta_i (all n = 1)
    ups = [update(i, w, TWO_DIRECTIONS[i].tolist(), 1) for i in range(6)]
    fedavg = TWO_DIRECTIONS.mean(0)
    g = strategy.aggregate(SimpleNamespace(params=torch.tensor(w)), ups)
    assert torch.allclose(g, fedavg)
    assert strategy.cluster_of == {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1}
    assert all(torch.allclose(m, fedavg) for m in strategy.models)
    # next round: clients 0 (n=1), 1 (n=3) of cluster 0 and 4 (n=2) of cluster 1 report; each cluster
    # model is the sample-weighted mean of its own members only
    ups = [update(0, fedavg.tolist(), [1, 1, 1], 1, options={"cluster": 0}),
           update(1, fedavg.tolist(), [5, 5, 5], 3, options={"cluster": 0}),
           update(4, fedavg.tolist(), [-2, 0, 2], 2, options={"cluster": 1})]
    g = strategy.aggregate(SimpleNamespace(params=g), ups)
    assert torch.allclose(strategy.models[0], torch.tensor([4.0, 4.0, 4.0]))
    assert torch.allclose(strategy.models[1], torch.tensor([-2.0, 0.0, 2.0]))
    # cluster 0 has 1 + 3 + 1 samples (client 2 counted once from the warm-up), cluster 1 has 1 + 2 + 1
    assert strategy.global_cluster == 0 and g is strategy.models[0]
    assert strategy.configure(None, 4) == {"payload": {"model": strategy.models[1]}, "options": {"cluster": 1}}
    data = ClientData(4, torch.zeros(1, 3), torch.zeros(1))
    assert strategy.personal_params(None, g, data, {}, 0) is strategy.models[1]
    assert strategy.personal_params(None, g, ClientData(9, torch.zeros(1, 3), torch.zeros(1)), {}, 0) is None


def test_flhc_assigns_a_late_client_to_the_nearest_cluster():
    strategy = FLHC(warmup_rounds=1, n_clusters=2)
    strategy.aggregate(SimpleNamespace(params=torch.zeros(3)),
                       [update(i, [0, 0, 0], TWO_DIRECTIONS[i].tolist(), 1) for i in range(6)])
    g = strategy.models[strategy.global_cluster]
    late = update(7, g.tolist(), (g + torch.tensor([0.0, 2.0, 0.0])).tolist(), 1)  # an e2 update
    strategy.aggregate(SimpleNamespace(params=g), [late])
    assert strategy.cluster_of[7] == 1


# ---------------------------------------------------------------------------------- end to end
def labelled_simulator(strategy, *, n_per_group=4, train=24, test=24, seed=0, clients_per_round=None):
    """Blobs for 2 * n_per_group clients; clients of group B (odd ids) see labels permuted y -> (y + 1) % 3.

    Returns the simulator with an ``evaluator`` attribute scoring each client's own test split.
    """
    n_clients = 2 * n_per_group
    x, y = blobs(n_clients * (train + test), seed)
    y = y.clone()
    per = train + test
    for c in range(1, n_clients, 2):
        y[c * per:(c + 1) * per] = (y[c * per:(c + 1) * per] + 1) % 3
    train_idx = [torch.arange(c * per, c * per + train) for c in range(n_clients)]
    test_idx = [np.arange(c * per + train, (c + 1) * per) for c in range(n_clients)]
    torch.manual_seed(seed)
    net = build_model(ModelConfig(name="logreg"), (x.shape[1],), 3)
    trainer = LocalTrainer(net, TrainingConfig(lr=0.1, batch_size=8, local_steps=5))
    sim = Simulator(strategy=strategy, trainer=trainer, pool=ClientPool(x, y, train_idx),
                    profiles=[profile(i) for i in range(n_clients)], flops_per_step=1e6, seed=seed)
    sim.evaluator = Evaluator.from_splits(trainer, x, y, test_idx)
    return sim


@functools.lru_cache
def fedavg_client_accuracy(rounds):
    """FedAvg's mean per-client test accuracy on the two-group federation (one global model for both)."""
    sim = run_rounds(labelled_simulator(FedAvg(clients_per_round=8)), rounds)
    return sim.evaluator(sim.params)["client_acc_mean"]


def test_ifca_separates_conflicting_label_groups_and_beats_fedavg():
    rounds = 15
    fedavg_acc = fedavg_client_accuracy(rounds)

    ifca = IFCA(n_clusters=2, clients_per_round=8)
    sim = run_rounds(labelled_simulator(ifca), rounds)
    groups = {c: ifca.assignment[c] for c in range(8)}
    assert {groups[c] for c in (0, 2, 4, 6)} != {groups[c] for c in (1, 3, 5, 7)}  # the groups are split
    assert len({groups[c] for c in (0, 2, 4, 6)}) == 1 and len({groups[c] for c in (1, 3, 5, 7)}) == 1
    personal = sim.evaluator.personal(sim.params, sim.personal_model)
    print(f"FedAvg client_acc_mean {fedavg_acc:.3f}; IFCA personal_acc_mean {personal['personal_acc_mean']:.3f} "
          f"(min {personal['personal_acc_min']:.3f}); IFCA assignment {groups}")
    assert personal["personal_acc_mean"] > fedavg_acc + 0.2
    assert personal["personal_acc_min"] > 0.8


def test_flhc_separates_conflicting_label_groups_and_beats_fedavg():
    rounds = 15
    fedavg_acc = fedavg_client_accuracy(rounds)

    flhc = FLHC(warmup_rounds=2, n_clusters=2, clients_per_round=8)
    sim = run_rounds(labelled_simulator(flhc), rounds)
    assert {flhc.cluster_of[c] for c in (0, 2, 4, 6)} != {flhc.cluster_of[c] for c in (1, 3, 5, 7)}
    assert len({flhc.cluster_of[c] for c in (0, 2, 4, 6)}) == 1
    personal = sim.evaluator.personal(sim.params, sim.personal_model)
    print(f"FedAvg client_acc_mean {fedavg_acc:.3f}; FL+HC personal_acc_mean {personal['personal_acc_mean']:.3f} "
          f"(min {personal['personal_acc_min']:.3f}); clusters {flhc.cluster_of}")
    assert personal["personal_acc_mean"] > fedavg_acc + 0.2
