"""CELLM: top-k sparse uploads of LoRA adapters with error feedback, on hand cases."""

import torch

from hetfl.strategies.cellm import CELLM, sparsify
from hetfl.strategies.base import Task

from conftest import make_simulator, profile


def test_sparsify_keeps_the_top_k_of_the_update_plus_residual_and_carries_the_rest():
    delta = torch.tensor([0.5, -2.0, 1.0, 0.1])
    residual = torch.tensor([0.0, 0.0, 0.5, 0.0])
    # acc = [0.5, -2, 1.5, 0.1]; density 0.5: k = ceil(2.0) = 2, the entries -2 and 1.5
    sent, left = sparsify(delta, residual, 0.5)
    torch.testing.assert_close(sent, torch.tensor([0.0, -2.0, 1.5, 0.0]))
    torch.testing.assert_close(left, torch.tensor([0.5, 0.0, 0.0, 0.1]))
    # next task: delta [0, 0, 0, 0.3] + residual [0.5, 0, 0, 0.1] = [0.5, 0, 0, 0.4]; density 0.25: k = 1
    sent, left = sparsify(torch.tensor([0.0, 0.0, 0.0, 0.3]), left, 0.25)
    torch.testing.assert_close(sent, torch.tensor([0.5, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(left, torch.tensor([0.0, 0.0, 0.0, 0.4]))
    # ties go to the lower index; no residual: the delta alone
    sent, _ = sparsify(torch.tensor([1.0, -1.0, 1.0]), None, 0.34)  # k = ceil(1.02) = 2
    torch.testing.assert_close(sent, torch.tensor([1.0, -1.0, 0.0]))


def test_cellm_uploads_values_and_indices_and_the_server_rebuilds_start_plus_sparse_change():
    strategy = CELLM(density=0.25, rank=2, clients_per_round=1)
    sim = make_simulator(strategy, [8, 8], [profile(0), profile(1)])
    layer, = strategy.layers(sim.trainer)  # logreg: one 3 x 4 weight; rank 2: 2 * (4 + 3) = 14 numbers
    params = sim.params
    task = Task(0, 0, 0, params, 3, 0.0, options={"rank": 2})
    server = type("S", (), {"trainer": sim.trainer, "params": params})()
    assert strategy.transfer_bytes(server, task) == (4 * 14, 8 * 4)  # k = ceil(0.25 * 14) = 4
    state: dict = {}
    result = strategy.client_train(sim.trainer, task, sim.pool.data(0), state, seed=0)
    change = result.params - params
    assert int((change != 0).sum()) <= 4 and result.stats["sent"] == 4
    dense = CELLM(density=1.0, rank=2, clients_per_round=1).client_train(sim.trainer, task, sim.pool.data(0), {}, 0)
    torch.testing.assert_close(change + state["residual"], dense.params - params)  # sent + kept = the whole change


def test_cellm_at_density_one_is_fedlora_hetlora():
    from conftest import run_rounds
    from hetfl.strategies import FedLoRA

    results = []
    for strategy in (CELLM(density=1.0, rank=2, clients_per_round=2), FedLoRA(rank=2, clients_per_round=2)):
        sim = make_simulator(strategy, [8, 8], [profile(0), profile(1)])
        run_rounds(sim, 2)
        results.append(sim.params.clone())
    torch.testing.assert_close(*results)  # s + (x - s) is x up to float rounding
