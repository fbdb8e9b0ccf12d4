"""GGEUR (arXiv:2503.06457): class-wise embedding statistics, their pooled global shape, and training on
embeddings generated along it; hand-worked cases."""

from __future__ import annotations

import pytest
import torch

from conftest import make_simulator, profile, run_rounds
from hetfl.config import StrategyConfig
from hetfl.errors import ConfigError
from hetfl.strategies import FedAvg, build_strategy
from hetfl.strategies.base import ClientData, Task, Update
from hetfl.strategies.ggeur import GGEUR, class_covariances, geometric_shape, pooled_statistics
from hetfl.strategies.hetero import prototypes_of

# Class 0, d = 2: client A holds (0,0), (2,0); client B holds (1,2), (1,4); B also holds class 1 at (5,5) alone.
A = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
B = torch.tensor([[1.0, 2.0], [1.0, 4.0], [5.0, 5.0]])
YA, YB = torch.tensor([0, 0]), torch.tensor([0, 0, 1])


def _stats(z, y, n_classes=3):
    means, counts = prototypes_of(z, y, n_classes)
    return means, class_covariances(z, y, means), counts


def test_class_covariances_by_hand():
    means, covs, counts = _stats(A, YA)
    # A, class 0: mean (1, 0); deviations (-1, 0), (1, 0): covariance (1/2) sum = [[1, 0], [0, 0]]
    assert means[0].tolist() == [1.0, 0.0] and counts.tolist() == [2.0, 0.0, 0.0]
    assert covs[0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert covs[1].abs().sum() == 0 and covs[2].abs().sum() == 0  # classes A does not hold: zeros
    _, covs_b, _ = _stats(B, YB)
    # B, class 0: mean (1, 3); deviations (0, -1), (0, 1): [[0, 0], [0, 1]]; class 1: one sample, covariance 0
    assert covs_b[0].tolist() == [[0.0, 0.0], [0.0, 1.0]] and covs_b[1].abs().sum() == 0


def test_pooled_statistics_equal_those_of_the_union_by_hand():
    (ma, ca, na), (mb, cb, nb) = _stats(A, YA), _stats(B, YB)
    mu, cov, total = pooled_statistics(torch.stack([ma, mb]), torch.stack([ca, cb]), torch.stack([na, nb]))
    # class 0: N = 4, mu = (2 (1,0) + 2 (1,3)) / 4 = (1, 1.5); between-client spread (0, -1.5), (0, 1.5):
    # Sigma = 1/2 ([[1,0],[0,0]] + [[0,0],[0,2.25]]) + 1/2 ([[0,0],[0,1]] + [[0,0],[0,2.25]]) = [[0.5, 0], [0, 2.75]]
    # = the covariance of the four points (0,0), (2,0), (1,2), (1,4): var x = 2/4, var y = 11/4, cov 0
    assert total.tolist() == [4.0, 1.0, 0.0]
    assert mu[0].tolist() == [1.0, 1.5] and mu[1].tolist() == [5.0, 5.0]
    assert torch.allclose(cov[0], torch.tensor([[0.5, 0.0], [0.0, 2.75]]))
    union = torch.cat([A, B[:2]])
    assert torch.allclose(cov[0], torch.cov(union.T, correction=0))
    assert cov[1].abs().sum() == 0 and cov[2].abs().sum() == 0 and mu[2].abs().sum() == 0  # class 2: nobody holds it


def test_the_geometric_shape_is_the_leading_eigenpairs_scaled():
    cov = torch.tensor([[[0.5, 0.0], [0.0, 2.75]]])
    full = geometric_shape(cov, 2)
    assert torch.allclose(full[0] @ full[0].T, cov[0], atol=1e-6)  # shape shape^T = Sigma: draws have covariance Sigma
    lead = geometric_shape(cov, 1)  # the principal direction (0, 1), length sqrt(2.75)
    assert lead.shape == (1, 2, 1) and torch.allclose(lead[0, :, 0].abs(), torch.tensor([0.0, 2.75**0.5]))


def test_generated_embeddings_follow_the_global_shape():
    # the regulariser's draws z + shape_y eps, eps ~ N(0, I): around each embedding, of covariance Sigma = diag(0.5, 2.75)
    seen = []

    class Capture(torch.nn.Module):  # a head that records what it is given
        def forward(self, g):
            seen.append(g)
            return torch.zeros(len(g), 1)

    trainer = type("Trainer", (), {"head": Capture()})()
    shape = geometric_shape(torch.tensor([[[0.5, 0.0], [0.0, 2.75]]]), 2)
    reg = GGEUR(augment=50)._regularizer(trainer, shape, torch.tensor([True]))
    torch.manual_seed(0)
    z = torch.tensor([[3.0, -1.0]]).repeat(400, 1)
    reg(z, None, torch.zeros(400, dtype=torch.long))
    draws = seen[0]  # 50 x 400 draws around (3, -1)
    assert draws.shape == (20000, 2)
    assert torch.allclose(draws.mean(0), torch.tensor([3.0, -1.0]), atol=0.05)
    assert torch.allclose(torch.cov(draws.T), torch.diag(torch.tensor([0.5, 2.75])), atol=0.08)


def test_the_regulariser_trains_the_head_on_generated_embeddings_only():
    # a zero head gives every class logit 0, so the cross-entropy of any embedding over 2 classes is log 2:
    # the term is lam log 2; its gradient reaches the head, never the (detached) features
    trainer = type("Trainer", (), {})()
    trainer.head = torch.nn.Linear(2, 2)
    torch.nn.init.zeros_(trainer.head.weight), torch.nn.init.zeros_(trainer.head.bias)
    shape = geometric_shape(torch.tensor([[[0.5, 0.0], [0.0, 2.75]]] * 2), 2)
    reg = GGEUR(lam=2.0, augment=3)._regularizer(trainer, shape, torch.tensor([True, False]))
    features = torch.ones(4, 2, requires_grad=True)
    loss = reg(features, None, torch.tensor([0, 0, 1, 1]))  # only class 0 has a global shape: 2 samples x 3 draws
    assert float(loss.detach()) == pytest.approx(2.0 * torch.log(torch.tensor(2.0)).item())
    loss.backward()
    assert features.grad is None and trainer.head.bias.grad.abs().sum() > 0
    assert float(reg(features, None, torch.tensor([1, 1]))) == 0.0  # no sample of a class with a shape


def test_with_lam_zero_the_model_is_fedavgs_and_the_server_keeps_every_class_shape():
    sizes, profiles = [8, 8, 8], [profile(i) for i in range(3)]
    ours = run_rounds(make_simulator(GGEUR(lam=0.0, clients_per_round=3), sizes, profiles, model="mlp"), 2)
    theirs = run_rounds(make_simulator(FedAvg(clients_per_round=3), sizes, profiles, model="mlp"), 2)
    assert torch.equal(ours.params, theirs.params)
    mu, cov, total = ours.strategy._stats
    assert total.sum() == 24 and cov.shape == (3, 8, 8)  # every sample counted once a round, hidden width 8


def test_a_class_no_client_of_the_round_holds_keeps_its_shape():
    sim = make_simulator(GGEUR(clients_per_round=1), [4], [profile(0)], model="mlp")
    strategy = GGEUR()
    old = (torch.zeros(3, 8), torch.eye(8).expand(3, 8, 8).clone(), torch.tensor([5.0, 5.0, 5.0]))
    strategy._stats = old
    task = Task(0, 0, 0, sim.params, 1, 0.0)
    means, counts = torch.ones(3, 8), torch.tensor([2.0, 0.0, 0.0])
    update = Update(task, sim.params, 2, 1, 0.0, 0.0,
                    payload={"means": means, "covs": torch.zeros(3, 8, 8), "counts": counts})
    strategy.aggregate(sim, [update])
    mu, cov, total = strategy._stats
    assert total.tolist() == [2.0, 5.0, 5.0] and torch.equal(cov[1], torch.eye(8)) and cov[0].abs().sum() == 0


def test_the_shared_statistics_are_charged():
    sim = make_simulator(GGEUR(clients_per_round=1, rank=3), [6], [profile(0)], model="mlp")
    strategy = sim.strategy
    task = sim.dispatch(0, **strategy.configure(sim, 0))
    down, up = strategy.transfer_bytes(sim, task)
    model = sim.params.numel() * 4
    assert task.payload["shape"].shape == (3, 8, 3)
    assert down == model + (3 * 8 * 3 + 3) * 4  # the model, the C shapes (d x r) and which classes have one
    assert up == model + 3 * (8 * 8 + 8 + 1) * 4  # the model, covariances, means and counts of every class slot
    client = ClientData(0, sim.pool.x[:6], sim.pool.y[:6])
    result = strategy.client_train(sim.trainer, task, client, {}, 0)
    expected = strategy.expected_payload(sim, task)
    assert {k: (tuple(v.shape), v.dtype) for k, v in result.payload.items()} == expected


def test_bad_parameters_are_one_line_errors():
    assert build_strategy(StrategyConfig(name="ggeur", params={"rank": 4, "augment": 2})).rank == 4
    for key, value in (("rank", 0), ("augment", 0), ("lam", -1.0)):
        with pytest.raises(ConfigError, match=f"strategy.params: ggeur: {key} must"):
            build_strategy(StrategyConfig(name="ggeur", params={key: value}))
    with pytest.raises(ConfigError, match="strategy.privacy: ggeur's clients send their class covariances"):
        build_strategy(StrategyConfig(name="ggeur", privacy={"clip": 1.0}))
