"""Each algorithm's defining step on a tiny case worked out by hand."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hetfl.config import validate, StrategyConfig, TrainingConfig
from hetfl.errors import ConfigError
from hetfl.strategies import STRATEGIES, FedAdam, FedAvg, FedNova, FedYogi, Scaffold, Task, Update, build_strategy
from hetfl.strategies.base import ClientData
from hetfl.strategies.fednova import nova_norm


def server(params, n_clients=4):
    return SimpleNamespace(params=torch.tensor(params, dtype=torch.float32), n_clients=n_clients)


def update(start, end, n, steps=1, payload=None, stats=None):
    task = Task(task_id=0, client_id=0, version=0, params=torch.tensor(start, dtype=torch.float32),
                steps=steps, dispatched_at=0.0)
    return Update(task=task, params=torch.tensor(end, dtype=torch.float32), n_samples=n, steps=steps, loss=0.0,
                  arrived_at=0.0, payload=payload or {}, stats=stats or {})


def test_fedavg_is_the_sample_weighted_mean():
    # w = [0, 0]; clients return [1, 2] (n=1) and [3, 4] (n=3): 0.25*[1,2] + 0.75*[3,4] = [2.5, 3.5]
    s = server([0.0, 0.0])
    new = FedAvg().aggregate(s, [update([0, 0], [1, 2], 1), update([0, 0], [3, 4], 3)])
    assert torch.allclose(new, torch.tensor([2.5, 3.5]))


def test_fedavg_server_lr_scales_the_step():
    s = server([1.0])
    new = FedAvg(server_lr=0.5).aggregate(s, [update([1.0], [3.0], 2), update([1.0], [5.0], 2)])
    assert torch.allclose(new, torch.tensor([1.0 + 0.5 * 3.0]))


def test_server_optimisers_average_the_buffers_and_step_only_the_parameters():
    # entry 0 is a buffer (a BatchNorm running variance), entry 1 a parameter; w = [1, 0]
    # clients: [0.5, 2] (n=1) and [0.1, 4] (n=3): mean change [-0.8, 3.5]
    s = server([1.0, 0.0])
    s.trainer = SimpleNamespace(n_buffers=1)
    ups = [update([1, 0], [0.5, 2], 1), update([1, 0], [0.1, 4], 3)]
    # FedAvg, server_lr 2: parameter 0 + 2 * 3.5 = 7; the variance takes the plain mean 1 - 0.8 = 0.2, not 1 - 1.6
    assert torch.allclose(FedAvg(server_lr=2.0).aggregate(s, ups), torch.tensor([0.2, 7.0]))
    # FedAdam's first step is server_lr * sign(d) on the parameters (m = 0.1 d, v = 0.99 tau^2 + 0.01 d^2 ...);
    # the variance again takes the mean, whatever Adam makes of it
    adam = FedAdam(server_lr=0.1).aggregate(s, ups)
    assert adam[0] == pytest.approx(0.2) and adam[1] > 0
    without = server([1.0, 0.0])  # no buffers: the step on everything, as before
    assert torch.allclose(FedAvg(server_lr=2.0).aggregate(without, ups), torch.tensor([1.0 - 1.6, 7.0]))


def test_fednova_norm_matches_the_paper():
    assert nova_norm(5) == 5.0
    # rho = 0.5, tau = 3: [3 - 0.5 (1 - 0.125) / 0.5] / 0.5 = 4.25 = sum_k (1 - rho^k) / (1 - rho)
    assert nova_norm(3, 0.5) == pytest.approx(4.25)
    assert nova_norm(3, 0.5) == pytest.approx(sum((1 - 0.5**k) / 0.5 for k in (1, 2, 3)))


def test_fednova_norm_is_what_torch_momentum_sgd_walks_under_a_constant_gradient():
    # loss = g . w has constant gradient g; heavy-ball SGD then moves by -lr * g * ||a||_1
    g, lr, rho, steps = torch.tensor([0.3, -1.2]), 0.1, 0.9, 7
    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([w], lr=lr, momentum=rho)
    for _ in range(steps):
        opt.zero_grad()
        (g * w).sum().backward()
        opt.step()
    assert torch.allclose(w.detach(), -lr * g * nova_norm(steps, rho), atol=1e-6)


def test_fednova_aggregation_by_hand():
    # p = (0.25, 0.75), ||a|| = (2, 4), deltas (4, 8):
    # sum p d / a = 0.25*4/2 + 0.75*8/4 = 2;  tau_eff = 0.25*2 + 0.75*4 = 3.5;  w = 0 + 3.5*2 = 7
    s = server([0.0])
    ups = [update([0.0], [4.0], 1, steps=2, stats={"a_norm": 2.0}), update([0.0], [8.0], 3, steps=4, stats={"a_norm": 4.0})]
    assert torch.allclose(FedNova().aggregate(s, ups), torch.tensor([7.0]))


def test_fednova_equals_fedavg_when_every_client_runs_the_same_steps():
    s = server([0.5, -0.5])
    ups = [update([0.5, -0.5], [1.0, 0.0], 2, steps=3, stats={"a_norm": 3.0}),
           update([0.5, -0.5], [0.0, 2.0], 5, steps=3, stats={"a_norm": 3.0})]
    assert torch.allclose(FedNova().aggregate(s, ups), FedAvg().aggregate(s, ups))


def test_scaffold_client_control_variate_by_hand():
    # x = 1, client ends at y = 0.4 after K = 3 steps of lr 0.1; c = 0.5, c_i = 0.2
    # c_i+ = 0.2 - 0.5 + (1 - 0.4) / 0.3 = 1.7; delta_c = 1.5; correction used = c - c_i = 0.3
    seen = {}

    def train(params, x, y, *, steps, seed, correction):
        seen["correction"] = correction
        return SimpleNamespace(params=torch.tensor([0.4]), steps=steps, loss=0.0)

    trainer = SimpleNamespace(train=train, cfg=TrainingConfig(lr=0.1))
    task = Task(0, 0, 0, torch.tensor([1.0]), 3, 0.0, payload={"c": torch.tensor([0.5])})
    state = {"c_i": torch.tensor([0.2])}
    result = Scaffold().client_train(trainer, task, ClientData(0, torch.zeros(1, 1), torch.zeros(1)), state, seed=0)
    assert torch.allclose(seen["correction"], torch.tensor([0.3]))
    assert torch.allclose(state["c_i"], torch.tensor([1.7]))
    assert torch.allclose(result.payload["delta_c"], torch.tensor([1.5]))


def test_scaffold_server_step_by_hand():
    # N = 4 clients, |S| = 2: x = 0 + mean(2, 4) = 3;  c = 0 + (2/4) * mean(1, 3) = 1
    strategy = Scaffold()
    s = server([0.0], n_clients=4)
    strategy.configure(s, 0)
    ups = [update([0.0], [2.0], 1, payload={"delta_c": torch.tensor([1.0])}),
           update([0.0], [4.0], 9, payload={"delta_c": torch.tensor([3.0])})]
    assert torch.allclose(strategy.aggregate(s, ups), torch.tensor([3.0]))
    assert torch.allclose(strategy.c, torch.tensor([1.0]))


def test_fedadam_and_fedyogi_first_step_by_hand():
    # d = 0.5, beta1 = 0.9, beta2 = 0.99, tau = 0.1, eta = 0.1, v0 = tau^2 = 0.01
    # m = 0.05; Adam v = 0.99*0.01 + 0.01*0.25 = 0.0124;  Yogi v = 0.01 + 0.01*0.25 = 0.0125
    s = server([0.0])
    ups = [update([0.0], [0.5], 1)]
    adam = FedAdam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.1).aggregate(s, ups)
    yogi = FedYogi(server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.1).aggregate(s, ups)
    assert adam.item() == pytest.approx(0.1 * 0.05 / (np.sqrt(0.0124) + 0.1), rel=1e-5)
    assert yogi.item() == pytest.approx(0.1 * 0.05 / (np.sqrt(0.0125) + 0.1), rel=1e-5)


def test_yogi_second_moment_moves_additively():
    # v = 1, d^2 = 4: Adam v = 0.99 + 0.04 = 1.03;  Yogi v = 1 - 0.01*4*sign(1-4) = 1.04
    y = FedYogi(beta2=0.99)
    assert y.second_moment(torch.tensor([1.0]), torch.tensor([4.0])).item() == pytest.approx(1.04)
    assert FedAdam(beta2=0.99).second_moment(torch.tensor([1.0]), torch.tensor([4.0])).item() == pytest.approx(1.03)


def test_registry_and_parameter_errors_name_the_key():
    assert {"fedavg", "fedprox", "fednova", "scaffold", "fedadam", "fedyogi"} <= set(STRATEGIES)
    assert build_strategy(StrategyConfig(name="fedprox", params={"mu": 0.1})).mu == 0.1
    with pytest.raises(ConfigError, match="strategy.params.mux"):
        build_strategy(StrategyConfig(name="fedprox", params={"mux": 0.1}))
    with pytest.raises(ConfigError, match="strategy.name"):
        validate({"strategy": {"name": "fedbest"}})  # a name is checked where the config is validated
    with pytest.raises(ConfigError, match="strategy.params"):
        build_strategy(StrategyConfig(name="fedprox", params={"mu": -1}))


def test_algorithms_refuse_optimisers_their_mathematics_does_not_cover():
    with pytest.raises(ConfigError, match="training.optimizer"):
        Scaffold().check_training("adam", 0.0)
    with pytest.raises(ConfigError, match="training.optimizer"):
        Scaffold().check_training("sgd", 0.9)
    with pytest.raises(ConfigError, match="training.optimizer"):
        FedNova().check_training("adam", 0.0)
    FedNova().check_training("sgd", 0.9)


def test_per_algorithm_parameters_apply_to_their_algorithm_only():
    cfg = StrategyConfig(name="fedavg", params={"server_lr": 0.5}, per_algorithm={"fedprox": {"mu": 0.3}})
    assert build_strategy(cfg).server_lr == 0.5
    prox = build_strategy(cfg.model_copy(update={"name": "fedprox", "params": cfg.params_for("fedprox")}))
    assert prox.mu == 0.3 and prox.server_lr == 1.0
    with pytest.raises(ConfigError, match="strategy.per_algorithm.fedprox.mux"):
        build_strategy(StrategyConfig(per_algorithm={"fedprox": {"mux": 1}}))
    with pytest.raises(ConfigError, match="strategy.per_algorithm: unknown algorithm 'fedbest'"):
        validate({"strategy": {"per_algorithm": {"fedbest": {}}}})
