"""SemiPFL (arXiv:2203.08176) and data.labelled_fraction: the hypernetwork's pFedHN step and the clients' mixing of
base models by hand, and unlabelled samples whose labels nothing reads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import make_simulator, profile, run_rounds, write_config
from hetfl.config import StrategyConfig, validate
from hetfl.errors import ConfigError
from hetfl.strategies import build_strategy
from hetfl.strategies.base import ClientData, Task, Update
from hetfl.strategies.semipfl import SemiPFL, hypernet_step, mix_heads
from test_cli import cli


# ---------------------------------------------------------------------------- the hypernetwork, by hand
def test_hypernet_step_by_hand():
    # P = 2 body entries, k = 1: b = (1, 1), A = [[1], [0]], e_0 = 1, e_1 = 2; g_0 = (1, 0), g_1 = (0, 2), p = (1/2, 1/2)
    b, a, e = torch.tensor([1.0, 1.0]), torch.tensor([[1.0], [0.0]]), torch.tensor([[1.0], [2.0]])
    g, p = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0.5, 0.5])
    nb, na, ne = hypernet_step(b, a, e, [0, 1], g, p, lr=1.0, embedding_lr=1.0)
    # b - (1/2 (1,0) + 1/2 (0,2)) = (0.5, 0)
    assert nb.tolist() == [0.5, 0.0]
    # A - (1/2 (1,0)^T 1 + 1/2 (0,2)^T 2) = [[1 - 0.5], [0 - 2]]
    assert na.tolist() == [[0.5], [-2.0]]
    # e_0 - A^T g_0 = 1 - 1 = 0; e_1 - A^T g_1 = 2 - 0 = 2 (with the A before the step)
    assert ne.tolist() == [[0.0], [2.0]]


def test_hypernet_step_is_pfedhns_gradient():
    # pFedHN: grad of (b, A, e_i) = (d theta_i / d .)^T g_i with theta_i = b + A e_i, autograd's answer for one client
    torch.manual_seed(0)
    b, a, e = torch.randn(5), torch.randn(5, 3), torch.randn(4, 3)
    g = torch.randn(1, 5)
    leaves = [b.clone().requires_grad_(), a.clone().requires_grad_(), e[2].clone().requires_grad_()]
    theta = leaves[0] + leaves[1] @ leaves[2]
    grads = torch.autograd.grad(theta, leaves, grad_outputs=g[0])
    nb, na, ne = hypernet_step(b, a, e, [2], g, torch.tensor([1.0]), lr=0.1, embedding_lr=0.1)
    assert torch.allclose(nb, b - 0.1 * grads[0]) and torch.allclose(na, a - 0.1 * grads[1])
    assert torch.allclose(ne[2], e[2] - 0.1 * grads[2]) and torch.equal(ne[[0, 1, 3]], e[[0, 1, 3]])


def test_mix_heads_by_hand():
    # losses 0 and ln 3: softmax(-L) = (1, 1/3) / (4/3) = (3/4, 1/4); (3/4)(2, 0) + (1/4)(6, 4) = (3, 1)
    mixed = mix_heads(torch.tensor([0.0, math.log(3)]), torch.tensor([[2.0, 0.0], [6.0, 4.0]]), temperature=1.0)
    assert torch.allclose(mixed, torch.tensor([3.0, 1.0]))
    # a high temperature: the plain mean
    assert torch.allclose(mix_heads(torch.tensor([0.0, 5.0]), torch.tensor([[2.0], [4.0]]), 1e6), torch.tensor([3.0]))


def test_with_a_zero_hypernet_matrix_the_shared_encoder_is_the_weighted_mean():
    sim = make_simulator(SemiPFL(clients_per_round=2), [4, 12], [profile(0), profile(1)], model="mlp")
    strategy = sim.strategy
    strategy.start(sim)
    body = sim.params.numel()
    updates = []
    for client, n in ((0, 4), (1, 12)):
        task = Task(client, client, 0, sim.params, 1, 0.0, payload=strategy.configure(sim, client)["payload"])
        assert torch.equal(task.payload["encoder"], sim.params)  # A = 0: every client starts from b
        updates.append(Update(task, torch.full((body,), float(client + 1)), n, 1, 0.0, 0.0,
                              payload={"head": torch.full((27,), float(client))}))
    down, up = strategy.transfer_bytes(sim, updates[0].task)
    assert (down, up) == ((body + 3 * 27) * 4, (body + 27) * 4)  # its encoder and 3 base heads down; encoder, head up
    new = strategy.aggregate(sim, updates)
    # b - sum p_i (b - theta~_i) = sum p_i theta~_i = (4 * 1 + 12 * 2) / 16 = 1.75 in every entry
    assert torch.allclose(new, torch.full((body,), 1.75))
    assert strategy._a.abs().sum() > 0  # A moved along the clients' differences
    # b's step size and A's apart: b moves by lr, A by embedding_lr (here 1 and 0.01 x the same outer products)
    half = hypernet_step(torch.zeros(1), torch.zeros(1, 1), torch.ones(1, 1), [0], torch.ones(1, 1), torch.ones(1),
                         1.0, 0.01)
    assert half[0].tolist() == [-1.0] and torch.allclose(half[1], torch.tensor([[-0.01]]))


def test_base_models_are_the_nearest_clients_heads_own_first():
    sim = make_simulator(SemiPFL(clients_per_round=1, base_models=3), [4, 4, 4, 4], [profile(i) for i in range(4)],
                         model="mlp")
    strategy = sim.strategy
    strategy.start(sim)
    strategy._e = torch.tensor([[0.0], [1.0], [5.0], [2.0]])
    initial = sim.trainer.initial[sim.trainer.head_slice]
    assert all(torch.equal(h, initial) for h in strategy._base_heads(sim, 0))  # nobody has a head yet: the initial one
    strategy._heads = {c: torch.full_like(initial, float(c)) for c in (0, 2, 3)}
    heads = strategy._base_heads(sim, 0)  # own (0), then 3 (distance 2), then 2 (distance 5); 1 has none
    assert [float(h[0]) for h in heads] == [0.0, 3.0, 2.0]
    heads = strategy._base_heads(sim, 1)  # client 1 has no head: nearest 0 (1), 3 (1), 2 (4); ties by client order
    assert [float(h[0]) for h in heads] == [0.0, 3.0, 2.0]


def test_the_client_trains_its_encoder_on_unlabelled_features_and_only_the_head_on_labels():
    sim = make_simulator(SemiPFL(clients_per_round=1, finetune_steps=3), [12], [profile(0)], model="mlp")
    strategy, trainer = sim.strategy, sim.trainer
    strategy.start(sim)
    task = Task(0, 0, 0, sim.params, 4, 0.0, payload=strategy.configure(sim, 0)["payload"])
    x, y = sim.pool.x, sim.pool.y
    labelled = ClientData(0, x[:2], y[:2], x[2:])  # 2 labelled samples, 10 unlabelled
    state: dict = {}
    result = strategy.client_train(trainer, task, labelled, state, seed=0)
    assert not torch.equal(result.params, task.payload["encoder"])  # the autoencoder moved the encoder
    assert torch.equal(state["model"][trainer.body_slice], result.params)  # the head fine-tuning left it alone
    assert torch.equal(state["model"][trainer.head_slice], result.payload["head"])
    assert state["decoder"].shape == (4 * 8 + 4,)  # D (4 features x 8 hidden) and c
    # more autoencoder steps lower the reconstruction error
    losses = [strategy._autoencoder(trainer, trainer.initial.clone(), x, None, steps, 0)[2] for steps in (1, 40)]
    assert losses[1] < losses[0]
    assert torch.equal(strategy.personal_params(trainer, sim.params, labelled, state, 0), state["model"])


def test_semipfl_learns_and_bad_parameters_are_one_line_errors():
    sim = make_simulator(SemiPFL(clients_per_round=2), [20, 20], [profile(0), profile(1)], model="mlp")
    run_rounds(sim, 6)
    state = sim.client_states.load(0)
    own = sim.trainer.predict(state["model"], sim.pool.x[:20]).argmax(1)
    assert (own == sim.pool.y[:20]).float().mean() > 0.5  # 3 blob classes: a personal model well above chance
    assert build_strategy(StrategyConfig(name="semipfl", params={"base_models": 2})).base_models == 2
    for key, value in (("embedding_dim", 0), ("hn_lr", 0.0), ("embedding_lr", -1.0), ("base_models", 0),
                       ("temperature", 0.0)):
        with pytest.raises(ConfigError, match=f"strategy.params: semipfl: {key} must"):
            build_strategy(StrategyConfig(name="semipfl", params={key: value}))


# ---------------------------------------------------------------------------- data.labelled_fraction
def test_labelled_fraction_splits_each_clients_training_samples():
    from hetfl.data import federate

    plain = federate(validate({"data": {"n_clients": 4}}).data, 0)
    fed = federate(validate({"data": {"n_clients": 4, "labelled_fraction": [1, 0.5, 0.1, 0.2]}}).data, 0)
    for c, share in enumerate([1, 0.5, 0.1, 0.2]):
        n = len(plain.train[c])
        assert len(fed.train[c]) == n - round((1 - share) * n) and not set(fed.train[c]) & set(fed.unlabelled[c])
        assert np.array_equal(np.sort(np.concatenate([fed.train[c], fed.unlabelled[c]])), plain.train[c])
    assert all(np.array_equal(a, b) for a, b in zip(fed.test, plain.test))  # the test splits do not move
    assert federate(validate({"data": {"n_clients": 4, "labelled_fraction": 1.0}}).data, 0).unlabelled == []


@pytest.mark.parametrize("value, message", [
    (0.0, "data.labelled_fraction: each share must lie in"),
    ([0.5, 0.5], "data.labelled_fraction: a list needs one share per client"),
])
def test_bad_labelled_fractions_are_one_line_errors(value, message):
    with pytest.raises(ConfigError, match=message):
        validate({"data": {"n_clients": 3, "labelled_fraction": value}})
    with pytest.raises(ConfigError, match="data.labelled_fraction: the synthetic dataset has no unlabelled"):
        validate({"data": {"dataset": "synthetic", "labelled_fraction": 0.5}})


@pytest.mark.parametrize("name", ["fedavg", "semipfl", "ditto"])
def test_no_strategy_reads_the_labels_of_unlabelled_samples(tmp_path, capsys, monkeypatch, name):
    config = write_config(tmp_path, data__labelled_fraction=0.2, strategy__name=name)
    code, _, err = cli(capsys, "run", config, "--out", tmp_path / "clean", "--quiet")
    assert code == 0, err
    with monkeypatch.context() as m:
        import hetfl.engine.run as run_module

        real = run_module.federate

        def federate(cfg, seed):
            fed = real(cfg, seed)
            fed.dataset.y[np.concatenate(fed.unlabelled)] = -7
            return fed

        m.setattr(run_module, "federate", federate)
        code, _, err = cli(capsys, "run", config, "--out", tmp_path / "poisoned", "--quiet")
    assert code == 0, err
    clean = json.loads((tmp_path / "clean" / "summary.json").read_text())
    poisoned = json.loads((tmp_path / "poisoned" / "summary.json").read_text())
    assert poisoned["final_accuracy"] == clean["final_accuracy"]  # the same run: nothing read the poisoned labels


def test_a_model_without_a_body_is_refused_in_one_line(tmp_path, capsys):
    config = write_config(tmp_path, strategy__name="semipfl", model={"name": "logreg"})
    code, _, err = cli(capsys, "run", config, "--out", tmp_path / "run", "--quiet")
    assert code == 2 and err.strip().count("\n") == 0 and "semipfl trains the body as an autoencoder's encoder" in err


def test_the_pool_hands_out_unlabelled_features_and_never_their_labels():
    # samples 2-5 are unlabelled, their labels poisoned: every client's data has only labelled labels
    from hetfl.engine import ClientPool

    x, y = torch.arange(16.0).reshape(8, 2), torch.tensor([0, 1, -7, -7, -7, -7, 1, 0])
    pool = ClientPool(x, y, [[0, 1], [6, 7]], 2, unlabelled_indices=[[2, 3], [4, 5]])
    for client, (labelled, unlabelled) in enumerate((([0, 1], [2, 3]), ([6, 7], [4, 5]))):
        data = pool.data(client)
        assert torch.equal(data.x, x[labelled]) and torch.equal(data.y, y[labelled]) and (data.y >= 0).all()
        assert torch.equal(data.x_unlabelled, x[unlabelled]) and data.n_samples == 2
    assert ClientPool(x, y, [[0, 1]], 2).data(0).x_unlabelled is None
    with pytest.raises(ConfigError, match="data.labelled_fraction: a Flower client's data is its own"):
        validate({"client": "flowerapp:client_fn", "data": {"labelled_fraction": 0.5}})
