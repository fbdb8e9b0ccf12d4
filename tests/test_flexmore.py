"""FlexMoRE: rank-heterogeneous LoRA experts with router vectors, joined by a softmax over experts and the base."""

import math

import pytest
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


def test_a_full_expert_adds_its_dense_change_in_the_same_mixture():
    x = torch.tensor([[1.0, 1.0]])
    full = (torch.tensor([[2.0, 1.0]]), torch.tensor([math.log(3.0), 0.0]))  # dW x = 3, score log 3
    lora = (torch.tensor([[1.0, 0.0]]), torch.tensor([[5.0]]), torch.tensor([0.0, 0.0]))  # B A x = 5, score 0
    # w = softmax(0, log 3, 0) = (1/5, 3/5, 1/5): the layer adds 3/5 * 3 + 1/5 * 5 = 2.8
    torch.testing.assert_close(mixture_delta(x, [full, lora]), torch.tensor([[2.8]]))
    # a full expert whose dW is an adapter's B A adds exactly what the adapter adds
    as_full = (torch.tensor([[5.0, 0.0]]), torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(mixture_delta(x, [full, as_full]), mixture_delta(x, [full, lora]))


def test_a_full_expert_is_charged_its_dense_numbers_in_bytes_and_flops():
    strategy = FlexMoRE(domains=2, ranks=["full", 1], clients_per_round=2)
    sim = make_simulator(strategy, [8, 8, 8], [profile(c) for c in range(3)])
    layers = strategy.layers(sim.trainer)  # logreg: one 3 x 4 weight, the whole model: 2 * 4 * 3 = 24 FLOPs a sample
    # full: 12 numbers of dW + 4 of router = 16; rank 1: 4 + 3 = 7 of A and B + 4 = 11
    assert [s.stop - s.start for s in strategy.segments(layers)] == [16, 11] and sim.params.numel() == 27
    assert torch.equal(sim.params[:16], torch.zeros(16))  # dW = 0 and r = 0: the expert starts as the base
    dense, adapter = (Task(i, c, 0, sim.params, 2, 0.0, options=strategy.configure(sim, c)["options"]) for i, c in
                      ((0, 0), (1, 1)))
    assert strategy.transfer_bytes(sim, dense) == (64, 64) and strategy.transfer_bytes(sim, adapter) == (44, 44)
    # FLOPs: the model's step, plus 24 * 16/12 (full) or 24 * 11/12 (rank 1) on top of its 24: x 7/3 and x 23/12
    step = 2 * sim.step_flops(0)
    assert math.isclose(strategy.task_flops(sim, dense), step * 7 / 3)
    assert math.isclose(strategy.task_flops(sim, adapter), step * 23 / 12)
    result = strategy.client_train(sim.trainer, dense, sim.pool.data(0), {}, seed=0)
    assert result.params.numel() == 16 and result.params[:12].abs().min() > 0  # every entry of dW trained
    (dW,), = strategy.experts(layers, torch.cat([result.params, sim.params[16:]]))[0]
    assert dW.shape == (3, 4)


def test_router_rounds_train_every_router_on_the_joined_mixture_and_leave_the_experts():
    strategy = FlexMoRE(domains=2, ranks=["full", 2], expert_rounds=1, clients_per_round=3)
    sim = make_simulator(strategy, [8, 8, 8], [profile(c) for c in range(3)])
    layers = strategy.layers(sim.trainer)
    after = []
    run_rounds(sim, 2, observe=lambda s: after.append(s.params.clone()))
    experts = [strategy.experts(layers, p) for p in after]
    routers = [torch.cat([r for rs in strategy.routers(layers, p) for r in rs]) for p in after]
    for one, two in zip(experts[0], experts[1]):
        assert all(torch.equal(a, b) for f, g in zip(one, two) for a, b in zip(f, g))  # the experts stay
    assert not torch.equal(routers[0], routers[1])  # both domains' routers moved in round 2
    assert not torch.equal(strategy.routers(layers, after[0])[1][0], strategy.routers(layers, after[1])[1][0])
    task = Task(9, 0, 1, sim.params, 2, 0.0, options=strategy.configure(sim, 0)["options"])
    # a router task downloads the whole mixture (27 + ... numbers) and uploads 2 domains x 4 router numbers
    assert strategy.transfer_bytes(sim, task) == (4 * sim.params.numel(), 4 * 8)
    # and runs both experts: x (1 + 16/12 + (2 * 7 + 4)/12) = x 3.83
    assert math.isclose(strategy.task_flops(sim, task), 2 * sim.step_flops(0) * (1 + 16 / 12 + 18 / 12))


def test_ranks_name_a_rank_or_full_per_domain():
    with pytest.raises(ValueError, match="ranks must list"):
        FlexMoRE(domains=2, ranks=["big", 2])
    with pytest.raises(ValueError, match="ranks must list"):
        FlexMoRE(domains=2, ranks=["full"])


def test_full_experts_and_router_rounds_pass_the_common_checks():
    # accounting, determinism and resume across the switch from expert rounds to router rounds
    from hetfl.testing import check_strategy

    report = check_strategy("flexmore", seeds=[0], expert_rounds=1, ranks=["full", 2])
    assert not report.skipped and "resume equals an uninterrupted run" in report.passed
