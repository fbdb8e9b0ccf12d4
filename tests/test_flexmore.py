"""FlexMoRE: rank-heterogeneous LoRA experts with router vectors, joined by a softmax over experts and the base."""

import math

import torch

from hetfl.strategies.base import Task
from hetfl.strategies.flexmore import FlexMoRE, mixture_delta

from conftest import make_simulator, profile, run_rounds


def test_the_mixture_weights_experts_by_a_softmax_with_the_base_as_expert_zero():
    x = torch.tensor([[1.0, 0.0]])
    one = (torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0]]), torch.tensor([math.log(3.0), 0.0]))  # score log 3, BAx 2
    two = (torch.tensor([[0.0, 1.0]]), torch.tensor([[5.0]]), torch.tensor([0.0, 0.0]))  # score 0, BAx 0
    # w = softmax(0, log 3, 0) = (1/5, 3/5, 1/5): the layer adds 3/5 * 2 + 1/5 * 0 = 1.2
    torch.testing.assert_close(mixture_delta(x, [one, two]), torch.tensor([[1.2]]))
    # one expert alone (a task's training): softmax(0, s)_1 = sigmoid(s), 3/4 here: 1.5
    torch.testing.assert_close(mixture_delta(x, [one]), torch.tensor([[1.5]]))


def test_flexmore_experts_carry_router_vectors_trained_with_the_adapters():
    strategy = FlexMoRE(domains=2, ranks=[1, 2], clients_per_round=2)
    sim = make_simulator(strategy, [8, 8, 8], [profile(c) for c in range(3)])
    layers = strategy.layers(sim.trainer)  # logreg: one 3 x 4 weight; expert sizes 7 + 4 and 14 + 4
    assert [s.stop - s.start for s in strategy.segments(layers)] == [11, 18] and sim.params.numel() == 29
    assert torch.equal(sim.params[7:11], torch.zeros(4)) and torch.equal(sim.params[-4:], torch.zeros(4))
    plan = strategy.configure(sim, 1)
    task = Task(0, 1, 0, sim.params, plan["steps"], 0.0, options=plan["options"])
    assert strategy.transfer_bytes(sim, task) == (4 * 18, 4 * 18)
    result = strategy.client_train(sim.trainer, task, sim.pool.data(1), {}, seed=0)
    assert result.params.numel() == 18 and result.params[-4:].abs().sum() > 0  # the router moved
    run_rounds(sim, 2)
    predictor, params = sim.personal_model(0)
    assert predictor.predict(params, sim.pool.data(0).x).shape[-1] == 3
