"""FedDAA: prototypes, the number of clusters, real-drift detection and adaptation, checked by hand."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import run_rounds
from hetfl.strategies import Task, Update
from hetfl.strategies.base import ClientData
from hetfl.strategies.feddaa import FedDAA, choose_clusters, inherit, nearest, output_prototype


class Identity:
    """A 'trainer' whose logits are the inputs themselves (two classes), and whose training records its data."""

    def __init__(self):
        self.trained = None

    def predict(self, params, x):
        return x

    def train(self, params, x, y, *, steps, seed):
        self.trained = (x.clone(), y.clone())
        return SimpleNamespace(params=params + 1, steps=steps, loss=0.5)


X = torch.tensor([[4.0, 0.0], [2.0, 0.0], [0.0, 6.0]])


def test_prototype_is_the_per_class_mean_output():
    # class 0: rows [4, 0] and [2, 0] -> [3, 0]; class 1: [0, 6]; flattened row-major
    proto = output_prototype(Identity(), None, X, torch.tensor([0, 0, 1]))
    assert torch.equal(proto, torch.tensor([3.0, 0.0, 0.0, 6.0]))
    # a class without samples is a zero row
    assert torch.equal(output_prototype(Identity(), None, X[:2], torch.tensor([0, 0])), torch.tensor([3.0, 0, 0, 0]))


def test_number_of_clusters_by_silhouette_and_one_cluster_without_structure():
    # two tight groups far apart: k = 2 has silhouette close to 1; points 0, 1 together and 2, 3, 4 together
    groups = np.array([[0.0, 0.0], [0.1, 0.0], [10.0, 10.0], [10.1, 10.0], [10.0, 10.1]])
    labels, centres = choose_clusters(groups, max_clusters=3, min_silhouette=0.5)
    assert labels[0] == labels[1] != labels[2] == labels[3] == labels[4]
    assert np.allclose(centres[labels[0]], [0.05, 0.0]) and np.allclose(centres[labels[2]], [10.1 / 3 + 20 / 3, 10.1 / 3 + 20 / 3])
    # evenly spaced points on a line: no k reaches 0.9 -> one cluster at the mean, 2.0
    labels, centres = choose_clusters(np.arange(5.0).reshape(-1, 1), max_clusters=3, min_silhouette=0.9)
    assert labels.tolist() == [0] * 5 and np.allclose(centres, [[2.0]])
    # two clients: k = 2 would need n - 1 >= 2; one cluster
    assert choose_clusters(groups[:2], 4, 0.0)[1].shape == (1, 2)


def task_with(centres, models=2):
    params = torch.zeros(2)
    payload = {"centres": centres, "reference": params} if centres is not None else {}
    payload.update({f"cluster_{k}": torch.full((2,), float(k)) for k in range(1, models)})
    return Task(task_id=0, client_id=0, version=0, params=params, steps=3, dispatched_at=0.0, payload=payload,
                options={"global_cluster": 0, "n_clusters": models})


def test_a_real_drift_is_detected_and_discards_the_old_labels():
    s = FedDAA()
    trainer, state = Identity(), {"y_old": torch.tensor([0, 0, 1])}
    # old prototype [3, 0, 0, 6]; after a swap of the two classes the labels are [1, 1, 0] and the prototype is
    # [0, 6, 3, 0]: squared distances to centre 0 = [3, 0, 0, 6] are 0 (old) and 90 (new), to centre 1 = [0, 6, 3, 0]
    # 90 and 0 -> different centres: real drift; the client trains cluster 1's model on its new labels only
    centres = torch.tensor([[3.0, 0.0, 0.0, 6.0], [0.0, 6.0, 3.0, 0.0]])
    result = s.client_train(trainer, task_with(centres), ClientData(0, X, torch.tensor([1, 1, 0])), state, seed=0)
    assert result.stats == {"cluster": 1.0, "real_drift": 1.0}
    assert torch.equal(result.payload["prototype"], torch.tensor([0.0, 6.0, 3.0, 0.0]))
    assert torch.equal(trainer.trained[1], torch.tensor([1, 1, 0])) and torch.equal(state["y_old"], torch.tensor([1, 1, 0]))
    assert torch.equal(result.params, torch.full((2,), 2.0))  # cluster 1's model (ones) plus the stand-in's step of 1


def test_without_real_drift_the_old_data_is_kept():
    s = FedDAA()
    trainer, state = Identity(), {"y_old": torch.tensor([0, 0, 1])}
    # only sample 1 changed label (0 -> 1): new prototype class 0 = [4, 0], class 1 = mean([2, 0], [0, 6]) = [1, 3];
    # one centre only -> the same centre for both: no real drift; the changed sample is trained with both labels
    centres = torch.tensor([[3.0, 0.0, 0.0, 6.0]])
    result = s.client_train(trainer, task_with(centres, models=1), ClientData(0, X, torch.tensor([0, 1, 1])), state, seed=0)
    assert result.stats == {"cluster": 0.0, "real_drift": 0.0}
    assert torch.equal(result.payload["prototype"], torch.tensor([4.0, 0.0, 1.0, 3.0]))
    x, y = trainer.trained
    assert torch.equal(y, torch.tensor([0, 1, 1, 0])) and torch.equal(x[3], X[1])
    assert torch.equal(state["y_old"], torch.tensor([0, 0, 1]))  # kept


def prototype_update(client, proto, cluster, n=10):
    task = Task(task_id=client, client_id=client, version=0, params=torch.zeros(2), steps=1, dispatched_at=0.0)
    return Update(task=task, params=torch.full((2,), float(client)), n_samples=n, steps=1, loss=0.0, arrived_at=0.0,
                  payload={"prototype": torch.tensor(proto)}, stats={"cluster": float(cluster)})


def test_a_cluster_that_splits_off_inherits_the_model_it_split_from():
    s = FedDAA(max_clusters=3, min_silhouette=0.5)
    s.models = [torch.zeros(2)]
    server = SimpleNamespace(params=torch.zeros(2))
    # four clients all in cluster 0; clients 0, 1 report prototypes near [0, 0], clients 2, 3 near [10, 10]
    # -> cluster 0's model = mean of the four results [0, 1, 2, 3] = 1.5; two clusters, both inheriting it
    updates = [prototype_update(0, [0.0, 0.0], 0), prototype_update(1, [0.1, 0.0], 0),
               prototype_update(2, [10.0, 10.0], 0), prototype_update(3, [10.0, 10.1], 0)]
    out = s.aggregate(server, updates)
    assert s.n_clusters == 2 and all(torch.allclose(m, torch.full((2,), 1.5)) for m in s.models)
    assert torch.allclose(out, torch.full((2,), 1.5))
    assert s.assignment[0] == s.assignment[1] != s.assignment[2] == s.assignment[3]
    assert nearest(s.centres, torch.tensor([9.0, 9.0])) == s.assignment[2]
    assert torch.equal(s.reference, torch.zeros(2))  # the round's start model, under which its prototypes were taken
    # a round of fewer than MIN_MEMBERS = 4 updates (here 2, whose prototypes alone would be one cluster) keeps the
    # clustering: cluster a's model = mean of clients 0 and 1's results [0, 1] = 0.5, cluster b's unchanged
    a, b = s.assignment[0], s.assignment[2]
    s.aggregate(server, [prototype_update(0, [0.0, 0.0], a), prototype_update(1, [0.1, 0.0], a)])
    assert s.n_clusters == 2 and torch.allclose(s.models[a], torch.full((2,), 0.5))
    assert torch.allclose(s.models[b], torch.full((2,), 1.5))


def test_a_round_that_finds_fewer_clusters_keeps_the_split():
    s = FedDAA(max_clusters=3, min_silhouette=0.5)
    s.models = [torch.zeros(2)]
    server = SimpleNamespace(params=torch.zeros(2))
    s.aggregate(server, [prototype_update(0, [0.0, 0.0], 0), prototype_update(1, [0.1, 0.0], 0),
                         prototype_update(2, [10.0, 10.0], 0), prototype_update(3, [10.0, 10.1], 0)])
    centres, a = s.centres.clone(), s.assignment[0]
    # four clients of one concept only (all near [0, 0]): one cluster found, fewer than the two there are -> kept;
    # cluster a's model = mean of the results [4, 5, 6, 7] = 5.5
    s.aggregate(server, [prototype_update(c, [0.05 * (c - 4), 0.0], a) for c in range(4, 8)])
    assert s.n_clusters == 2 and torch.equal(s.centres, centres) and torch.allclose(s.models[a], torch.full((2,), 5.5))


def test_new_clusters_inherit_old_models_by_votes_each_once():
    # votes[new, old]: new 0 was trained mostly in old 1 (5), new 1 in old 1 (3) and old 0 (2) -> (0, 1) first with 5
    # votes, then new 1 takes the best free old model, 0; a third new cluster copies its most-voted model (old 1)
    assert inherit(np.array([[1, 5], [2, 3]])) == [1, 0]
    assert inherit(np.array([[1, 5], [2, 3], [0, 4]])) == [1, 0, 1]
    assert inherit(np.array([[3], [1]])) == [0, 0]  # one old model, two new clusters: both start from it


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="max_clusters"):
        FedDAA(max_clusters=0)
    with pytest.raises(ValueError, match="min_silhouette"):
        FedDAA(min_silhouette=2.0)


def test_a_simulated_swap_drift_is_detected_and_split_off():
    # 8 clients of 3-class blobs, all in every round; from t = 12 s clients 0-3 swap classes 0 and 1 (real drift).
    # Before it one concept (one cluster); after it FedDAA finds two, the drifting clients detect real drift, and
    # each group's own model fits its own labels better than the other group's model does
    from conftest import blobs, profile

    from hetfl.config import ModelConfig, TrainingConfig
    from hetfl.data.skew import LabelDrift
    from hetfl.engine.simulator import ClientPool, Simulator
    from hetfl.models import build_model
    from hetfl.training import LocalTrainer

    x, y = blobs(240, seed=0)
    indices = [torch.arange(30 * c, 30 * (c + 1)) for c in range(8)]
    drift = LabelDrift(at_s=12.0, drifting=[0, 1, 2, 3], mapping=[1, 0, 2], n_clients=8)
    torch.manual_seed(0)
    trainer = LocalTrainer(build_model(ModelConfig(name="logreg"), (4,), 3), TrainingConfig(local_steps=5, batch_size=8, lr=0.1))
    s = FedDAA(clients_per_round=8)
    sim = Simulator(strategy=s, trainer=trainer, pool=ClientPool(x, y, indices, 3, drift),
                    profiles=[profile(c) for c in range(8)], flops_per_step=1e6, seed=0)
    seen = []
    run_rounds(sim, 14, observe=lambda sim: seen.append((sim.now, s.n_clusters)))
    assert all(k == 1 for t, k in seen if t < 12.0) and s.n_clusters == 2
    assert s.real_drifts >= 4
    mine = {c: sim.personal_model(c)[1] for c in (0, 7)}
    for c, other in ((0, 7), (7, 0)):
        data = sim.pool.data(c, sim.now)
        acc = [float((trainer.predict(mine[k], data.x).argmax(1) == data.y).float().mean()) for k in (c, other)]
        assert acc[0] > acc[1] + 0.2, (c, acc)
