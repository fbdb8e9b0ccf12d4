"""HDEE: domain experts of their own rank and training length, ensembled by their mean distribution."""

import math

import pytest
import torch

from hetfl.strategies.base import Task, Update
from hetfl.strategies.hdee import HDEE, ensemble_logits

from conftest import make_simulator, profile, run_rounds


def test_the_ensemble_is_the_log_of_the_experts_mean_distribution():
    # expert 1: softmax([0, 0]) = [1/2, 1/2]; expert 2: softmax([log 3, 0]) = [3/4, 1/4]; mean [5/8, 3/8]
    out = ensemble_logits([torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])])
    torch.testing.assert_close(out, torch.log(torch.tensor([[5 / 8, 3 / 8]])))
    # its cross-entropy for label 0 is -log 5/8
    loss = torch.nn.functional.cross_entropy(out, torch.tensor([0]))
    assert float(loss) == pytest.approx(-math.log(5 / 8), rel=1e-6)


def _arrival(client: int, domain: int, rank: int, n: int, factors) -> Update:
    task = Task(task_id=client, client_id=client, version=0, params=torch.zeros(0), steps=0, dispatched_at=0.0,
                options={"rank": rank, "domain": domain})
    return Update(task=task, params=HDEE.pack(factors), n_samples=n, steps=0, loss=0.0, arrived_at=0.0)


def test_each_domain_averages_its_own_clients_and_an_untrained_expert_stays():
    strategy = HDEE(domains=2, ranks=[1, 2], steps=[1.0, 3.0], clients_per_round=2)
    sim = make_simulator(strategy, [8, 8, 8], [profile(c) for c in range(3)])
    layers = strategy.layers(sim.trainer)  # logreg: one 3 x 4 weight
    assert [strategy.domain(c) for c in range(3)] == [0, 1, 0]
    A0, B0 = torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[2.0], [0], [0]])
    A2, B2 = torch.tensor([[0.0, 0, 0, 4]]), torch.tensor([[0.0], [0], [6]])
    server = type("S", (), {"trainer": sim.trainer, "params": sim.params})()
    new = strategy.aggregate(server, [_arrival(0, 0, 1, 1, [(A0, B0)]), _arrival(2, 0, 1, 3, [(A2, B2)])])
    (A, B), = strategy.experts(layers, new)[0]  # samples 1 : 3
    torch.testing.assert_close(A, torch.tensor([[0.25, 0, 0, 3.0]]))
    torch.testing.assert_close(B, torch.tensor([[0.5], [0], [4.5]]))
    assert torch.equal(new[7:], sim.params[7:])  # domain 1 (rank 2: 14 numbers) had no client this round
    assert new.numel() == 7 + 14
    # training length and bytes follow the domain: 3 x the local steps, its own rank-2 expert each way
    plan = strategy.configure(sim, 1)
    assert plan["steps"] == 3 * sim.default_steps(1) and plan["options"] == {"rank": 2, "domain": 1}
    task = Task(0, 1, 0, sim.params, plan["steps"], 0.0, options=plan["options"])
    assert strategy.transfer_bytes(sim, task) == (4 * 14, 4 * 14)


def test_hdee_runs_and_every_client_is_scored_with_the_ensemble():
    strategy = HDEE(domains=2, ranks=[1, 2], clients_per_round=3)
    sim = make_simulator(strategy, [8, 8, 8], [profile(c) for c in range(3)])
    run_rounds(sim, 2)
    predictor, params = sim.personal_model(0)
    x = sim.pool.data(0).x
    layers = strategy.layers(sim.trainer)
    logits = [sim.trainer.predict(strategy.merge(layers, sim.trainer.initial, f), x) for f in strategy.experts(layers, params)]
    expected = torch.log((torch.softmax(logits[0], -1) + torch.softmax(logits[1], -1)) / 2)
    torch.testing.assert_close(predictor.predict(params, x), expected)
