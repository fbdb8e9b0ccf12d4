"""FedLD (arXiv:2408.12300): the margin-control regulariser and the principal-gradient aggregation, on cases
worked out by hand."""

import math
from types import SimpleNamespace

import pytest
import torch

from hetfl.config import ArchitectureConfig, TrainingConfig
from hetfl.models import build_model
from hetfl.strategies import STRATEGIES, Task, Update
from hetfl.strategies.base import ClientData
from hetfl.strategies.fedld import FedLD, layer_slices, margin_control, principal_mean
from hetfl.training import LocalTrainer


def update(params, start, n=1):
    task = Task(task_id=0, client_id=0, version=0, params=start, steps=1, dispatched_at=0.0)
    return Update(task=task, params=params, n_samples=n, steps=1, loss=0.0, arrived_at=0.0)


def logreg(d=2, classes=2):
    torch.manual_seed(0)
    return LocalTrainer(build_model(ArchitectureConfig(name="logreg"), (d,), classes), TrainingConfig(lr=0.1))


def test_margin_control_is_lambda_log_one_plus_the_squared_frobenius_norm_of_the_batch_probabilities():
    # two samples, two classes, logits 0: every probability is 1/2, ||P||_F^2 = 4 * 1/4 = 1, so lambda * log 2
    assert float(margin_control(0.1)(None, torch.zeros(2, 2), None)) == pytest.approx(0.1 * math.log(2))
    # one confident sample: p = (1, 0) in the limit, ||P||^2 = 1: log 2 again; a uniform one over 4 classes: 1/4
    assert float(margin_control(1.0)(None, torch.tensor([[50.0, 0.0]]), None)) == pytest.approx(math.log(2))
    assert float(margin_control(1.0)(None, torch.zeros(1, 4), None)) == pytest.approx(math.log(1.25))


def test_principal_mean_by_hand():
    # G = [[2, 0], [0, 1]]: right singular vectors e1 (sigma 2) and e2 (sigma 1); r = (4/5, 1/5).
    # Every client agrees in sign with both (dots >= 0), so no direction flips.
    # k = max(1, floor(0.8 * 2)) = 1: g~_1 = ||g_1|| 4/5 e1 = (1.6, 0); g~_2 = 1 * 4/5 * sign(0) e1 = 0; mean (0.8, 0)
    g = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(principal_mean(g, 0.8), torch.tensor([0.8, 0.0]))
    # k = 2: g~_1 = 2 (4/5 e1 + 1/5 * 0) = (1.6, 0), g~_2 = 1 (0 + 1/5 e2) = (0, 0.2); mean (0.8, 0.1).
    # The plain mean would be (1, 0.5): the minor direction is shrunk by its share of the energy
    assert torch.allclose(principal_mean(g, 1.0), torch.tensor([0.8, 0.1]))


def test_directions_follow_the_majority_and_rank_one_changes_are_averaged_plainly():
    # changes along one line: g~_i = ||g_i|| sign(g_i . v) v = g_i, whichever sign the SVD gives v
    g = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-3.0, 0.0]])
    assert torch.allclose(principal_mean(g, 0.8), g.mean(0))
    # the 2 x 2 case with the second client reversed: e1 oriented by the majority (a tie, broken by the sum of
    # dots 2 + 0 > 0), e2 by the sum -1 < 0 -> -e2: g~_2 = 1 * (1/5) * sign(1) * (-e2) = (0, -0.2)
    g = torch.tensor([[2.0, 0.0], [0.0, -1.0]])
    assert torch.allclose(principal_mean(g, 1.0), torch.tensor([0.8, -0.1]))


def test_one_client_and_an_unchanged_layer():
    g = torch.tensor([[3.0, -4.0]])
    assert torch.allclose(principal_mean(g, 0.8), g[0])  # k is at least 1: one client's change passes unchanged
    assert torch.equal(principal_mean(torch.zeros(3, 5), 0.8), torch.zeros(5))  # no NaN from 0 / 0
    assert torch.equal(principal_mean(torch.tensor([[1.0], [3.0]]), 0.8), torch.tensor([2.0]))  # one entry: plain


def test_the_server_averages_plainly_first_then_layer_by_layer():
    trainer = logreg()  # weight 2 x 2 (entries 0..3), bias 2 (entries 4, 5)
    assert layer_slices(trainer) == [slice(0, 4), slice(4, 6)]
    w = torch.zeros(6)
    a = torch.tensor([2.0, 0.0, 0.0, 0.0, 2.0, 0.0])
    b = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    server = SimpleNamespace(params=w, trainer=trainer)
    strategy = FedLD(k_proportion=1.0)
    updates = [update(a, w, n=1), update(b, w, n=9)]
    assert torch.equal(strategy.aggregate(server, updates), (a + b) / 2)  # first: the unweighted mean
    # then each layer on its own: the weight layer's changes are [[2, 0, 0, 0], [0, 1, 0, 0]], the hand case of
    # test_principal_mean_by_hand padded with zeros: (0.8, 0.1, 0, 0); the bias layer's [[2, 0], [0, 1]]: (0.8, 0.1)
    new = strategy.aggregate(server, updates)
    assert torch.allclose(new, torch.tensor([0.8, 0.1, 0.0, 0.0, 0.8, 0.1]), atol=1e-6)
    # the ablation without principal-gradient aggregation keeps the plain mean
    mean = FedLD(aggregation="mean")
    assert torch.equal(mean.aggregate(server, updates), mean.aggregate(server, updates)) and torch.equal(
        mean.aggregate(server, updates), (a + b) / 2)


def test_the_client_adds_the_margin_term_to_its_loss():
    trainer = logreg()
    data = ClientData(0, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    start = trainer.flat.clone()
    task = Task(task_id=0, client_id=0, version=0, params=start, steps=1, dispatched_at=0.0)
    plain = FedLD(margin_penalty=0.0).client_train(trainer, task, data, {}, seed=0)
    with_margin = FedLD(margin_penalty=0.5).client_train(trainer, task, data, {}, seed=0)
    # the loss reported is the batch's CE + 0.5 log(1 + ||P||^2) at the start (one step)
    trainer.load(start)
    with torch.no_grad():
        logits = trainer.model(data.x)
    extra = 0.5 * float(torch.log1p((torch.softmax(logits, 1) ** 2).sum()))
    assert with_margin.loss == pytest.approx(plain.loss + extra, rel=1e-5)
    assert not torch.equal(with_margin.params, plain.params)


@pytest.mark.parametrize("params", [{"margin_penalty": -1.0}, {"k_proportion": 0.0}, {"k_proportion": 1.5},
                                    {"aggregation": "median"}])
def test_bad_parameters_are_refused(params):
    with pytest.raises(ValueError):
        FedLD(**params)


def test_registered_under_its_name():
    assert STRATEGIES["fedld"] is FedLD


def test_the_gram_matrix_route_gives_the_same_mean():
    # the docstring's claim: with e_j, s_j the eigenvectors and eigenvalues of G G^T / m, the directions
    # G^T e_j and the shares s_j / sum s equal the right singular vectors and sigma_j^2 / sum sigma^2
    g = torch.Generator().manual_seed(1)
    changes = torch.randn(5, 30, generator=g) + torch.randn(1, 30, generator=g)
    s, e = torch.linalg.eigh(changes @ changes.T / 5)
    s, e = s.flip(0), e.flip(1)  # descending
    k = 4  # floor(0.8 * 5)
    directions = (changes.T @ e[:, :k]).T
    directions = directions / directions.norm(dim=1, keepdim=True)
    dots = changes @ directions.T
    directions = torch.where(((dots >= 0).sum(0) < (dots < 0).sum(0)).unsqueeze(1), -directions, directions)
    dots = changes @ directions.T
    revised = [changes[i].norm() * sum(s[j] / s.sum() * torch.sign(dots[i, j]) * directions[j] for j in range(k))
               for i in range(5)]
    assert torch.allclose(principal_mean(changes, 0.8), torch.stack(revised).mean(0), atol=1e-5)
