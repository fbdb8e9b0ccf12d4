"""FedTiny (hetfl.strategies.fedtiny): the worked examples of its module docstring, by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hetfl.config import TrainingConfig
from hetfl.errors import ConfigError
from hetfl.strategies.base import ClientData, Task, Update
from hetfl.strategies.fedtiny import FedTiny, Footprint, decay, magnitude_mask, prune_and_grow
from hetfl.training import LocalTrainer


def test_prune_and_grow_moves_the_weakest_weight_to_the_strongest_gradient():
    # active 0, 1, 4 with |w| 0.5, 0.1, 2.0: prune 1; inactive 2, 3, 5 with |g| 0.3, 0.7, 0.1: grow 3
    w = torch.tensor([0.5, -0.1, 0.0, 0.0, 2.0, 0.0])
    g = torch.tensor([0.0, 0.0, 0.3, -0.7, 0.0, 0.1])
    mask = torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.bool)
    assert prune_and_grow(w, g, mask, 1).int().tolist() == [1, 0, 0, 1, 1, 0]
    # K = 2: prune 1 and 0 (|w| 0.1, 0.5), grow 3 and 2 (|g| 0.7, 0.3); the density never changes
    assert prune_and_grow(w, g, mask, 2).int().tolist() == [0, 0, 1, 1, 1, 0]
    # K above the pruned count is cut to it; K = 0 changes nothing
    assert int(prune_and_grow(w, g, mask, 5).sum()) == 3
    assert torch.equal(prune_and_grow(w, g, mask, 0), mask)


def test_ties_go_to_the_lower_index():
    w = torch.tensor([0.2, 0.2, 0.0, 0.0])
    g = torch.tensor([0.0, 0.0, 0.5, 0.5])
    mask = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    assert prune_and_grow(w, g, mask, 1).int().tolist() == [0, 1, 1, 0]


def test_the_adjusted_share_decays_as_a_cosine_to_zero_at_t_end():
    assert decay(0, 0.3, 30) == pytest.approx(0.3)
    assert decay(15, 0.3, 30) == pytest.approx(0.15)
    assert decay(30, 0.3, 30) == pytest.approx(0.0)


def test_coarse_pruning_keeps_the_largest_magnitudes_layer_by_layer():
    # two layers of 4 and 2 weights and one bias entry between them; density 0.5 keeps 2 and 1
    params = torch.tensor([0.1, -0.9, 0.3, 0.8, 5.0, 0.2, -0.4])
    mask = magnitude_mask(params, [slice(0, 4), slice(5, 7)], 0.5)
    assert mask.int().tolist() == [0, 1, 0, 1, 1, 0, 1]
    # a layer always keeps one weight
    assert magnitude_mask(params, [slice(0, 4)], 0.01).int().tolist() == [0, 1, 0, 0, 1, 1, 1]


FOOTPRINT = Footprint(prunable=100, other=10, buffers=0, activations=5, largest_layer=60, batch_size=2,
                      optimizer_states=0, alpha=0.3, layers=1)


def test_the_memory_budget_gives_the_density_worked_by_hand():
    # k kept weights: 4 (2 (k + 10) + 2 * 5 + 60) + min(4 k, ceil(100 / 8)) + 8 floor(0.3 k)
    assert FOOTPRINT.bytes(40) == 4 * (2 * 50 + 10 + 60) + 13 + 8 * 12 == 789
    assert FOOTPRINT.bytes(41) == 4 * (2 * 51 + 10 + 60) + 13 + 8 * 12 == 797
    assert FOOTPRINT.densest(789) == 40 and FOOTPRINT.densest(796) == 40 and FOOTPRINT.densest(797) == 41
    strategy = FedTiny(density=1.0)
    strategy._footprint = FOOTPRINT
    devices = [SimpleNamespace(memory_bytes=5000.0), SimpleNamespace(memory_bytes=789.0)]
    assert strategy.run_density(devices) == pytest.approx(0.40)  # the smallest device decides, for every device
    strategy = FedTiny(density=0.3)
    strategy._footprint = FOOTPRINT
    assert strategy.run_density(devices) == pytest.approx(0.3)  # the target density, where memory allows more
    assert strategy.run_density([SimpleNamespace()]) == pytest.approx(0.3)  # no memory limit


def test_a_device_too_small_for_any_sparse_model_is_one_clear_error():
    strategy = FedTiny()
    strategy._footprint = FOOTPRINT
    with pytest.raises(ConfigError, match="devices.memory: the smallest device has 300 bytes"):
        strategy.check_devices([SimpleNamespace(memory_bytes=300.0)])


# -- the selection: BatchNorm re-estimated on local data, the best candidate kept ---------------------
def bn_trainer() -> LocalTrainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 2, bias=False), nn.BatchNorm1d(2))
    trainer = LocalTrainer(model, TrainingConfig(local_steps=1, batch_size=2, lr=0.1))
    trainer.input_shape = (1,)
    return trainer


def test_a_client_scores_each_candidate_after_re_estimating_its_batchnorm_statistics():
    # W = [[1], [-1]] on x = [1, 3]: pre-BN outputs [1, -1] and [3, -3], batch mean [2, -2], unbiased variance
    # [2, 2]; normalised: x=1 -> [-1, 1] / sqrt(2), x=3 -> [1, -1] / sqrt(2); labels [1, 0] make both right, with
    # cross-entropy log(1 + exp(-sqrt(2))) = 0.2176; the candidate W = [[-1], [1]] is wrong on both:
    # log(1 + exp(sqrt(2))) = 1.6318
    trainer = bn_trainer()
    nb = trainer.n_buffers
    good, bad = trainer.flat.detach().clone(), trainer.flat.detach().clone()
    good[nb:nb + 2], bad[nb:nb + 2] = torch.tensor([1.0, -1.0]), torch.tensor([-1.0, 1.0])
    data = ClientData(0, torch.tensor([[1.0], [3.0]]), torch.tensor([1, 0]))
    losses, buffers = FedTiny.score_candidates(trainer, torch.stack([good, bad]), data, seed=0)
    a = 1 / math.sqrt(2 + 1e-5)  # a normalised output: 1 / sqrt(var + eps)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-2 * a)), math.log1p(math.exp(2 * a))], abs=1e-5)
    stats = dict(zip([name for name, _ in trainer.model.named_buffers() if name.endswith(("mean", "var"))],
                     buffers[0].split(2)))
    assert stats["1.running_mean"].tolist() == pytest.approx([2.0, -2.0])
    assert stats["1.running_var"].tolist() == pytest.approx([2.0, 2.0])


def test_the_server_keeps_the_candidate_of_least_sample_weighted_loss_with_the_mean_statistics():
    # client 0 (1 sample) scores [1.0, 2.0], client 1 (3 samples) [3.0, 0.5]: means 0.25 + 2.25 = 2.5 and
    # 0.5 + 0.375 = 0.875, so candidate 1; its statistics 0.25 * 4 + 0.75 * 8 = 7 (an entry each)
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    strategy = FedTiny()
    strategy._pool = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0], [0.0, 0.0, 4.0, 0.0, -5.0]])
    server = SimpleNamespace(trainer=SimpleNamespace(model=model, n_buffers=1), params=strategy._pool[0])
    task = Task(0, 0, 0, server.params, 0, 0.0, options={"fedtiny": "select"})

    def update(n, losses, stat):
        payload = {"losses": torch.tensor(losses), "buffers": torch.tensor([[1.0], [stat]])}
        return Update(task, server.params, n, 0, 0.0, 0.0, payload=payload)

    params = strategy.aggregate(server, [update(1, [1.0, 2.0], 4.0), update(3, [3.0, 0.5], 8.0)])
    assert strategy._selected == 1 and strategy._selection_losses == pytest.approx([2.5, 0.875])
    assert params.tolist() == pytest.approx([7.0, 0.0, 4.0, 0.0, -5.0])
    assert strategy._mask.tolist() == [True, False, True, False, True]  # the buffer entry is not pruned


# -- what a task costs ----------------------------------------------------------------------------------
def cost_server():
    model = nn.Sequential(nn.Linear(10, 10))  # 100 prunable weights, 10 biases
    trainer = LocalTrainer(model, TrainingConfig(local_steps=1, batch_size=2, lr=0.1))
    trainer.input_shape = (10,)
    params = torch.zeros(110)
    return SimpleNamespace(params=params, trainer=trainer, step_flops=lambda client: 1000.0,
                           num_samples=lambda client: 6)


def test_a_sparse_task_is_charged_its_kept_weights_bytes_and_flops():
    server = cost_server()
    mask = torch.ones(110, dtype=torch.bool)
    mask[40:100] = False  # 40 of the 100 weights kept, the biases trained
    strategy = FedTiny()
    train = Task(0, 0, 0, server.params, 3, 0.0, payload={"mask": mask}, options={"fedtiny": "train"})
    # down: 40 values + min(160 index bytes, a 13-byte bitmask) + 10 biases; up: the values and biases only
    assert strategy.transfer_bytes(server, train) == (4 * 40 + 13 + 4 * 10, 4 * 40 + 4 * 10) == (213, 200)
    # forward FLOPs: 2 * 100 multiply-adds of the weights, 40% of them kept: 0.4 of a dense step, 3 steps
    assert strategy.task_flops(server, train) == pytest.approx(3 * 1000 * 0.4)
    # an adjustment round also reports 5 gradients among the 60 pruned weights (20 bytes of values, 8 of bitmask)
    # and computes one dense gradient step
    report = Task(1, 0, 0, server.params, 3, 0.0, payload={"mask": mask, "k": torch.tensor([5])},
                  options={"fedtiny": "report"})
    assert strategy.transfer_bytes(server, report) == (213, 200 + 20 + 8)
    assert strategy.task_flops(server, report) == pytest.approx(3 * 1000 * 0.4 + 1000)


def test_a_selection_task_is_charged_its_candidates_forward_passes_and_bytes():
    server = cost_server()
    pool = torch.zeros(2, 110)
    pool[:, :40] = 1.0  # each candidate keeps 40 weights
    strategy = FedTiny(candidates=2)
    task = Task(0, 0, 0, server.params, 0, 0.0, payload={"candidates": pool}, options={"fedtiny": "select"})
    # down: two sparse candidates; up: a loss each (no buffers)
    assert strategy.transfer_bytes(server, task) == (2 * 213, 2 * 4)
    # a forward pass per sample: a step's FLOPs / (3 * batch 2), times 0.4, over 6 samples, for 2 candidates
    assert strategy.task_flops(server, task) == pytest.approx(1000 / 6 * 0.4 * 6 * 2)


def test_a_client_report_holds_the_top_gradients_of_its_pruned_weights_only():
    server = cost_server()
    trainer = server.trainer
    mask = torch.ones(110, dtype=torch.bool)
    mask[40:100] = False
    strategy = FedTiny(grad_batches=1)
    torch.manual_seed(1)
    data = ClientData(0, torch.randn(2, 10), torch.tensor([3, 7]))
    params = trainer.flat.detach().clone()
    params[~mask] = 0.0
    report = strategy.report(trainer, params, mask, torch.tensor([4]), data, seed=0)
    trainer.load(params)
    loss = nn.functional.cross_entropy(trainer.model(data.x), data.y)
    (full,) = torch.autograd.grad(loss, trainer.model[0].weight)
    full = full.flatten()
    expected = torch.zeros(110)
    pruned = torch.arange(40, 100)
    best = pruned[torch.argsort(-full[pruned].abs(), stable=True)[:4]]
    expected[best] = full[best]
    assert torch.allclose(report, expected, atol=1e-6) and int((report != 0).sum()) == 4
