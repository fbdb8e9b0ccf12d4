"""HideNseek (hetfl.strategies.hidenseek): the worked examples of its module docstring, by hand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hetfl.config import TrainingConfig
from hetfl.errors import ConfigError
from hetfl.models.cost import flops_by_module
from hetfl.strategies.base import ClientData, Task, Update
from hetfl.strategies.hidenseek import HideNseek, prunable, synflow_prune, synflow_scores
from hetfl.training import LocalTrainer

W1 = [[1.0, -2.0], [3.0, 0.5]]
W2 = [[2.0, -1.0]]


def tiny() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(W1))
        model[2].weight.copy_(torch.tensor(W2))
    return model


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_synflow_scores_a_tiny_network_as_worked_by_hand():
    # R = |W2| |W1| 1 = 2 * (1 + 2) + 1 * (3 + 0.5) = 9.5; a W1 weight's score is |W2 of its row| * |w|, a W2
    # weight's is |w| * (the sum of its input row of |W1|)
    model = tiny()
    scores = synflow_scores(model, flat(model), (2,))
    assert scores.tolist() == pytest.approx([2.0, 4.0, 3.0, 0.5, 6.0, 3.5])


def test_synflow_keeps_the_top_half_globally():
    model = tiny()
    keep = synflow_prune(model, flat(model), (2,), sparsity=0.5)
    assert keep.tolist() == [False, True, False, False, True, True]  # scores 4, 6 and 3.5 of 2, 4, 3, 0.5, 6, 3.5
    assert synflow_prune(model, flat(model), (2,), sparsity=0.0).all()


def test_iterative_synflow_keeps_every_layer_where_scoring_once_collapses_one():
    # the quickstart's MLP 64 (64 -> 64 -> 10) at sparsity 0.9: one scoring keeps none of the first layer's 4096
    # weights (the head's are each worth more); SynFlow's 100 rescorings keep some of every layer, 474 in all
    from hetfl.models.zoo import MLP

    torch.manual_seed(0)
    model = MLP(64, [64], 10)
    first = model.net[0].weight.numel()
    once = synflow_prune(model, flat(model), (64,), sparsity=0.9)
    iterative = synflow_prune(model, flat(model), (64,), sparsity=0.9, iterations=100)
    assert not once[:first].any() and iterative[:first].any() and iterative[first + 64:].any()
    assert int(once.sum()) == int(iterative.sum()) == round(0.1 * (first + 640))


def test_only_linear_and_convolution_weights_are_prunable():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 3))  # weight 6, bias 2, weight 12, bias 3
    assert prunable(model).tolist() == [True] * 6 + [False] * 2 + [True] * 12 + [False] * 3


def trainer_of(model: nn.Module) -> LocalTrainer:
    trainer = LocalTrainer(model, TrainingConfig(local_steps=1, batch_size=2, lr=0.1))
    trainer.input_shape = (2,)
    return trainer


def server_of(trainer: LocalTrainer, params: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(params=params, trainer=trainer, step_flops=lambda client: 100.0)


def test_the_initial_model_is_the_random_one_with_the_pruned_weights_zeroed():
    trainer = trainer_of(tiny())
    params = HideNseek(sparsity=0.5, iterations=1).initial_params(trainer)
    assert params.tolist() == [0.0, -2.0, 0.0, 0.0, 2.0, -1.0]


def test_the_server_votes_the_signs_weighted_by_samples_and_a_tie_keeps_the_sign():
    trainer = trainer_of(tiny())
    strategy = HideNseek(sparsity=0.5)
    current = torch.tensor([0.0, -2.0, 0.0, 0.0, 2.0, -1.0])
    task = Task(0, 0, 0, current, 1, 0.0)

    def update(signs, n):
        return Update(task, torch.tensor(signs) * current.abs(), n, 1, 0.0, 0.0)

    # kept entries 1, 4, 5; votes (3 samples, 1 sample): entry 1: 3/4 * (+1) + 1/4 * (-1) = +1/2 -> +;
    # entry 4: -3/4 + 1/4 -> -; entry 5: 3/4 * (-1) + 1/4 * (-1) -> -
    new = strategy.aggregate(server_of(trainer, current), [update([0, 1, 0, 0, -1, -1], 3),
                                                           update([0, -1, 0, 0, 1, -1], 1)])
    assert new.tolist() == [0.0, 2.0, 0.0, 0.0, -2.0, -1.0]
    assert strategy.metrics() == {"hidenseek_flipped": pytest.approx(2 / 3)}
    # equal weights, opposite signs: a tie keeps the current sign
    tie = strategy.aggregate(server_of(trainer, current), [update([0, 1, 0, 0, 1, 1], 2),
                                                           update([0, -1, 0, 0, -1, -1], 2)])
    assert tie.tolist() == current.tolist()


def test_a_task_charges_one_bit_per_kept_weight_and_the_pruned_model_once():
    trainer = trainer_of(tiny())
    strategy = HideNseek(sparsity=0.5, iterations=1)
    server = server_of(trainer, strategy.initial_params(trainer))
    task = Task(0, 7, 0, server.params, 1, 0.0)
    # P = 6, k = 3: signs ceil(3 / 8) = 1 byte each way; first time also the mask ceil(6 / 8) = 1 and 3 floats = 12
    assert strategy.transfer_bytes(server, task) == (1 + 1 + 12, 1)
    assert strategy.transfer_bytes(server, task) == (1, 1)


def test_a_task_charges_the_sparse_forward_share_of_the_flops():
    trainer = trainer_of(tiny())
    strategy = HideNseek()
    # dense forward 2 * (4 + 2) = 12; keeping 1 of W1's 4 weights and both of W2's: 8 / 4 + 4 = 6, half the price
    params = torch.tensor([0.0, -2.0, 0.0, 0.0, 2.0, -1.0])
    assert flops_by_module(trainer.model, (2,))[""] == 12.0
    task = Task(0, 0, 0, params, 3, 0.0)
    assert strategy.task_flops(server_of(trainer, params), task) == pytest.approx(3 * 100.0 * 0.5)


def test_the_client_learns_signs_only_and_keeps_magnitudes_and_pruned_zeros():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    trainer = trainer_of(model)
    strategy = HideNseek(sparsity=0.5)
    params = strategy.initial_params(trainer)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.2], [0.1, 1.0]])
    y = torch.tensor([0, 1, 0, 1])
    result = strategy.client_train(trainer, Task(0, 0, 0, params, 20, 0.0), ClientData(0, x, y), {}, seed=1)
    assert result.params.abs().tolist() == pytest.approx(params.abs().tolist())  # |w| and zeros unchanged
    biases = ~prunable(model)
    assert result.params[biases].tolist() == params[biases].tolist()  # fixed at their initial values


def test_the_client_flips_the_signs_its_loss_asks_to_flip():
    # one linear layer, all weights kept, every sign wrong: e1 must score class 0, e2 class 1. The scores start at
    # 0.001 times the downloaded weights (+-0.001); a first SGD step moves each by lr * dL/dw * |w| = 0.1 * 0.44 * 1
    # (dL/dw = (softmax - onehot) / 2 = -+0.88 / 2) = 0.044 the other way: every sign flips, and stays
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-1.0, 1.0], [1.0, -1.0]]))
    trainer = trainer_of(model)
    params = flat(model)
    x, y = torch.eye(2), torch.tensor([0, 1])
    result = HideNseek(sparsity=0.0).client_train(trainer, Task(0, 0, 0, params, 3, 0.0), ClientData(0, x, y), {}, 1)
    assert result.params.tolist() == [1.0, -1.0, -1.0, 1.0]


def test_a_model_on_token_ids_is_refused_with_one_line():
    trainer = trainer_of(tiny())
    trainer.token_input = True
    with pytest.raises(ConfigError, match="model.name: hidenseek"):
        HideNseek().check_models([trainer])


def test_a_pruned_model_costs_less_simulated_time_and_fewer_bytes_than_fedavg():
    from conftest import make_simulator, profile, run_rounds

    from hetfl.strategies import FedAvg

    def run(strategy):
        sim = make_simulator(strategy, [8, 8], [profile(0, bw=1e3), profile(1, bw=1e3)], model="mlp")
        return run_rounds(sim, 2)

    dense, pruned = run(FedAvg(clients_per_round=2)), run(HideNseek(sparsity=0.75, clients_per_round=2))
    c, d = pruned.counters, dense.counters
    # mlp 4 -> 8 -> 3: 56 weights, 11 biases. FedAvg moves 67 floats (268 B) each way a task; HideNseek keeps 14
    # weights: 2 bytes of signs each way, plus the model once per client (7 bytes of mask and 25 floats)
    assert (d.bytes_down, d.bytes_up) == (4 * 268, 4 * 268)
    assert (c.bytes_down, c.bytes_up) == (4 * 2 + 2 * (7 + 100), 4 * 2)
    assert c.trained_flops < 0.5 * d.trained_flops and pruned.now < dense.now
