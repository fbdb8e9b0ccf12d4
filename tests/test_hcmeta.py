"""HC-meta: FL+HC's adaptive clustering, Reptile per cluster, personal models adapted from the cluster's meta-model."""

from types import SimpleNamespace

import pytest
import torch

from conftest import run_rounds
from test_cli import assert_one_line_error, cli, write_config
from test_clustered import TWO_DIRECTIONS, fedavg_client_accuracy, labelled_simulator, two_class_trainer, update
from hetfl.strategies import FLHC, HCMeta
from hetfl.strategies.base import ClientData


def clustered(meta_lr):
    """HC-meta after a one-round warm-up on FL+HC's two-direction updates: clients 0-2 in cluster 0, 3-5 in 1."""
    strategy = HCMeta(warmup_rounds=1, distance_threshold=0.5, meta_lr=meta_lr)
    g = strategy.aggregate(SimpleNamespace(params=torch.zeros(3)),
                           [update(i, [0, 0, 0], TWO_DIRECTIONS[i].tolist(), 1) for i in range(6)])
    assert strategy.cluster_of == {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1}  # the cut at 0.5 found the two directions
    return strategy, g


@pytest.mark.parametrize(("meta_lr", "expected"), [(1.0, [0.5, 3.0, 0.0]), (0.5, [0.25, 1.5, 0.0])])
def test_reptile_step_within_a_cluster_by_hand(meta_lr, expected):
    strategy, _ = clustered(meta_lr)
    theta = torch.zeros(3)
    strategy.models = [theta, theta]
    # cluster 0's members return phi_0 = [2, 0, 0] (n = 1) and phi_1 = [0, 4, 0] (n = 3):
    # their weighted mean is [0.5, 3, 0]; theta_0 <- 0 + meta_lr * ([0.5, 3, 0] - 0)
    ups = [update(0, [0, 0, 0], [2, 0, 0], 1, options={"cluster": 0}),
           update(1, [0, 0, 0], [0, 4, 0], 3, options={"cluster": 0})]
    strategy.aggregate(SimpleNamespace(params=theta), ups)
    assert torch.allclose(strategy.models[0], torch.tensor(expected))
    assert strategy.models[1] is theta  # nobody of cluster 1 came
    if meta_lr == 1.0:  # the meta-model of step 1 is FL+HC's cluster model
        flhc = FLHC(warmup_rounds=1, distance_threshold=0.5)
        flhc.aggregate(SimpleNamespace(params=torch.zeros(3)),
                       [update(i, [0, 0, 0], TWO_DIRECTIONS[i].tolist(), 1) for i in range(6)])
        flhc.models = [theta, theta]
        flhc.aggregate(SimpleNamespace(params=theta), ups)
        assert torch.equal(flhc.models[0], strategy.models[0])


def test_personal_model_is_adapted_from_the_clients_cluster_meta_model():
    trainer = two_class_trainer()  # logreg on 2 features, 2 classes: 6 parameters
    data = ClientData(4, torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 2), torch.tensor([0, 1] * 2))
    strategy, g = clustered(1.0)
    strategy.models = [torch.zeros(6), torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])]
    strategy.finetune_steps = 0  # no adaptation: the cluster's meta-model itself (client 4 is in cluster 1)
    assert strategy.personal_params(trainer, torch.zeros(6), data, {}, 0) is strategy.models[1]
    assert strategy.personal_params(trainer, torch.zeros(6), ClientData(9, data.x, data.y), {}, 0) is None  # global
    strategy.finetune_steps, strategy.finetune_lr = 2, 0.5
    personal = strategy.personal_params(trainer, torch.zeros(6), data, {}, seed=3)
    by_hand = trainer.train(strategy.models[1], data.x, data.y, steps=2, seed=3, lr=0.5).params
    assert torch.equal(personal, by_hand) and not torch.equal(personal, strategy.models[1])
    # one adaptation step by hand (batch_size 4 = the data, so the step is deterministic): with W = I, b = 0 every
    # sample has p(correct) = e / (e + 1), q = 1 - p = 1 / (1 + e) = 0.269; dCE/dlogits = p - onehot = [-q, q] for
    # x = e1 (label 0) and [q, -q] for x = e2 (label 1); dW = mean over 4 samples of g x^T = [[-q/2, q/2], [q/2, -q/2]],
    # db = 0; W <- W - 0.5 dW = [[1 + q/4, -q/4], [-q/4, 1 + q/4]]
    strategy.finetune_steps = 1
    one = strategy.personal_params(trainer, torch.zeros(6), data, {}, seed=3)
    q = 1 / (1 + torch.e)
    assert torch.allclose(one, torch.tensor([1 + q / 4, -q / 4, -q / 4, 1 + q / 4, 0.0, 0.0]), atol=1e-5)
    # a client without data keeps its cluster's meta-model
    empty = ClientData(4, torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    assert strategy.personal_params(trainer, torch.zeros(6), empty, {}, 0) is strategy.models[1]


@pytest.mark.parametrize(("key", "value"), [("meta_lr", "0"), ("meta_lr", "1.5"), ("finetune_steps", "-1"),
                                            ("distance_threshold", "0")])
def test_bad_hcmeta_params_are_one_line_naming_the_key(tmp_path, capsys, key, value):
    code, _, err = cli(capsys, "run", write_config(tmp_path), "--out", tmp_path / "run", "--quiet",
                       "--set", "strategy.name=hcmeta", "--set", f"strategy.params.{key}={value}")
    assert_one_line_error(code, err, "strategy.params", key)


def test_hcmeta_separates_conflicting_label_groups_and_beats_fedavg():
    rounds = 15
    fedavg_acc = fedavg_client_accuracy(rounds)
    hcmeta = HCMeta(warmup_rounds=2, clients_per_round=8, finetune_steps=5)
    sim = run_rounds(labelled_simulator(hcmeta), rounds)
    even, odd = {hcmeta.cluster_of[c] for c in (0, 2, 4, 6)}, {hcmeta.cluster_of[c] for c in (1, 3, 5, 7)}
    assert len(even) == 1 and len(odd) == 1 and even != odd
    personal = sim.evaluator.personal(sim.params, sim.personal_model)
    print(f"FedAvg {fedavg_acc:.3f}; HC-meta {personal['personal_acc_mean']:.3f}; clusters {hcmeta.cluster_of}")
    assert personal["personal_acc_mean"] > fedavg_acc + 0.2
