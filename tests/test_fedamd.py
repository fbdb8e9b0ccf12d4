"""FedAMD (anchor sampling): the server's arithmetic, the miner's recursion and the anchors' cost, checked by hand."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hetfl import testing as T
from hetfl.config import TrainingConfig
from hetfl.errors import ConfigError
from hetfl.strategies import Task, Update
from hetfl.strategies.base import ClientData
from hetfl.strategies.fedamd import FedAMD, batch_gradient, miner_steps


def update(client, start, params, *, anchor=False, bullseye=None):
    start = torch.tensor(start, dtype=torch.float32)
    task = Task(task_id=0, client_id=client, version=0, params=start, steps=1, dispatched_at=0.0)
    payload = {} if bullseye is None else {"bullseye": torch.tensor(bullseye, dtype=torch.float32)}
    return Update(task=task, params=torch.tensor(params, dtype=torch.float32), n_samples=5, steps=1, loss=0.0,
                  arrived_at=0.0, payload=payload, stats={"anchor": float(anchor)})


def test_server_moves_by_the_miners_mean_change_and_keeps_the_mean_bullseye():
    s = FedAMD(server_lr=0.5)
    server = SimpleNamespace(params=torch.tensor([1.0, 1.0]))
    # round 1: two anchors, no miner -> the model does not move; v = mean([2, 4], [0, 2]) = [1, 3]
    out = s.aggregate(server, [update(0, [1, 1], [1, 1], anchor=True, bullseye=[2, 4]),
                               update(1, [1, 1], [1, 1], anchor=True, bullseye=[0, 2])])
    assert torch.equal(out, server.params)
    assert torch.allclose(s.target(), torch.tensor([1.0, 3.0]))
    # round 2: miners changed the model by [1, 0] and [3, 2] -> uniform mean [2, 1], times eta_g 0.5 -> [1, 0.5];
    # client 0 anchors again with [4, 4], replacing its [2, 4]: v = mean([4, 4], [0, 2]) = [2, 3]
    out = s.aggregate(server, [update(2, [1, 1], [2, 1]), update(3, [1, 1], [4, 3]),
                               update(0, [1, 1], [1, 1], anchor=True, bullseye=[4, 4])])
    assert torch.allclose(out, torch.tensor([2.0, 1.5]))
    assert torch.allclose(s.target(), torch.tensor([2.0, 3.0]))
    assert s.metrics()["anchors"] == 3 and s.metrics()["bullseyes"] == 2


def test_until_a_bullseye_is_known_every_participant_is_an_anchor_and_pays_for_its_large_batch():
    # client 0 holds 50 samples, batch size 8: a full-batch gradient is ceil(50 / 8) = 7 batch gradients;
    # anchor_batch 20 -> ceil(20 / 8) = 3; a miner of K = 4 steps computes 2 (K - 1) = 6 batch gradients
    server = SimpleNamespace(params=torch.zeros(3), rng=np.random.default_rng(0), num_samples=lambda c: 50,
                             trainer=SimpleNamespace(cfg=SimpleNamespace(batch_size=8)), step_flops=lambda c: 10.0)
    s = FedAMD(anchor_prob=0.0)
    cfg = s.configure(server, 0)
    assert cfg["steps"] == 7 and cfg["options"] == {"anchor": 1.0, "batch": 50.0}
    task = Task(task_id=0, client_id=0, version=0, params=server.params, steps=7, dispatched_at=0.0,
                options=cfg["options"])
    assert s.task_flops(server, task) == 70.0
    assert FedAMD(anchor_batch=20).configure(server, 0)["steps"] == 3
    s.aggregate(server, [update(0, [0, 0, 0], [0, 0, 0], anchor=True, bullseye=[1, 2, 3])])
    cfg = s.configure(server, 1)  # anchor_prob 0 and a target known: a miner, sent the target
    assert cfg["options"] == {"anchor": 0.0} and torch.equal(cfg["payload"]["target"], torch.tensor([1.0, 2.0, 3.0]))
    miner = Task(task_id=1, client_id=1, version=0, params=server.params, steps=4, dispatched_at=0.0,
                 options=cfg["options"])
    assert s.task_flops(server, miner) == 60.0


def test_a_miner_whose_target_is_its_own_fresh_full_gradient_is_gradient_descent():
    # d_0 = v, d_k = d_{k-1} + g(x_k) - g(x_{k-1}) telescopes to d_k = v + g(x_k) - g(x_0); with the whole data
    # as every batch and v = g(x_0), d_k = g(x_k): K full-batch SGD steps, what LocalTrainer.train computes
    cfg = TrainingConfig(batch_size=64, lr=0.1, local_steps=4)
    trainer = T._trainer("logreg", cfg, seed=0)
    x, y = T._blobs(20, seed=1)
    start = trainer.initial.clone()
    with trainer.training(0):
        v, _ = batch_gradient(trainer, start, x, y)
    ours, _ = miner_steps(trainer, start, v, x, y, steps=4, seed=3)
    plain = trainer.train(start, x, y, steps=4, seed=3)
    assert torch.allclose(ours, plain.params, atol=1e-6)
    # a target of zero would stand still on step 1 and then only follow g(x_k) - g(x_0) = 0: no move at all
    still, _ = miner_steps(trainer, start, torch.zeros_like(start), x, y, steps=4, seed=3)
    assert torch.equal(still, start)


def test_first_round_only_anchors_then_miners_move_the_model():
    s = FedAMD(clients_per_round=3, anchor_prob=0.0)
    sim = T._simulator(s, [12, 12, 1, 12], T._easy_profiles(), model="logreg", training=T.EASY_TRAINING, seed=0)
    start = sim.params.clone()
    T._run(sim, 1)
    assert torch.equal(sim.params, start) and len(s.bullseyes) == 3  # every participant an anchor (one of 1 sample)
    T._run(sim, 2)
    assert not torch.equal(sim.params, start) and s.anchors == 3  # anchor_prob 0: miners only from now on


def test_bad_values_and_optimisers_are_refused():
    with pytest.raises(ValueError, match="anchor_prob"):
        FedAMD(anchor_prob=1.5)
    with pytest.raises(ValueError, match="anchor_batch"):
        FedAMD(anchor_batch=0)
    with pytest.raises(ConfigError, match="training.optimizer"):
        FedAMD().check_training("sgd", 0.9)


def test_an_anchor_cut_by_partial_work_computes_the_smaller_batch_it_is_charged_for():
    # 20 samples, batch size 4: asked for 5 batch gradients (the whole set); cut to 2 -> a batch of 8 samples, drawn
    # with the task's seed: the gradient equals the mean-loss gradient on exactly those 8 rows
    cfg = TrainingConfig(batch_size=4, lr=0.1, local_steps=1)
    trainer = T._trainer("logreg", cfg, seed=0)
    x, y = T._blobs(20, seed=2)
    task = Task(task_id=0, client_id=0, version=0, params=trainer.initial.clone(), steps=2, dispatched_at=0.0,
                options={"anchor": 1.0, "batch": 20.0})
    result = FedAMD().client_train(trainer, task, ClientData(0, x, y), {}, seed=7)
    rows = torch.randperm(20, generator=torch.Generator().manual_seed(7))[:8]
    with trainer.training(7):
        expected, _ = batch_gradient(trainer, trainer.initial.clone(), x[rows], y[rows])
    assert torch.allclose(result.payload["bullseye"], expected) and torch.equal(result.params, task.params)
