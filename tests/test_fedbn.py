"""FedBN (Li et al., ICLR 2021, arXiv:2102.07623): FedAvg whose BatchNorm layers stay on each client.

First a case worked out by hand (two clients, a model with one BatchNorm1d), then real training, then whole runs
of a user's BatchNorm ResNet named by import path (tests/test_user_models.py writes the module).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from hetfl.config import StrategyConfig, TrainingConfig, validate
from hetfl.engine.run import build_federation
from hetfl.errors import ConfigError
from hetfl.strategies import STRATEGIES, FedBN, Task, Update, build_strategy
from hetfl.strategies.base import ClientData
from hetfl.strategies.fedbn import norm_entries
from hetfl.training import LocalTrainer
from test_user_models import MODULE, checkpoint, hetfl, models_dir, nets, run_config, trainer_of  # noqa: F401

# BNMLP((2,), 2) with hidden 2: the flat vector is
#   0-1 bn.running_mean | 2-3 bn.running_var | 4-7 body.weight | 8-9 body.bias | 10-11 bn.weight | 12-13 bn.bias
#   | 14-17 head.weight | 18-19 head.bias
NORM = [0, 1, 2, 3, 10, 11, 12, 13]
SHARED = [4, 5, 6, 7, 8, 9, 14, 15, 16, 17, 18, 19]


def task(params: torch.Tensor, client: int, task_id: int = 0) -> Task:
    return Task(task_id=task_id, client_id=client, version=0, params=params, steps=1, dispatched_at=0.0)


def adding(trainer: LocalTrainer, by: dict[int, float]) -> list[torch.Tensor]:
    """Stand-in training: a client of n samples adds ``by[n]`` to every entry of where it starts; the starts are kept."""
    starts = []

    def train(params, x, y, *, steps, seed, **kwargs):
        starts.append(params.clone())
        return SimpleNamespace(params=params + by[x.shape[0]], steps=steps, loss=0.0)

    trainer.train = train
    return starts


def test_the_normalisation_entries_are_the_batchnorm_layers_parameters_and_statistics(nets):
    t = trainer_of(nets, "BNMLP", shape=(2,))
    assert t.numel == 20 and norm_entries(t).tolist() == NORM

    class Both(nn.Module):  # BatchNorm1d and LayerNorm: "all" counts the LayerNorm too
        def __init__(self):
            super().__init__()
            self.body, self.bn, self.ln, self.head = nn.Linear(2, 3), nn.BatchNorm1d(3), nn.LayerNorm(3), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.ln(self.bn(self.body(x))))

    both = LocalTrainer(Both(), TrainingConfig())  # 6 buffers | body 9 | bn 6 | ln 6 | head 8
    assert norm_entries(both, "batchnorm").tolist() == [*range(6), *range(15, 21)]
    assert norm_entries(both, "all").tolist() == [*range(6), *range(15, 27)]


@pytest.mark.parametrize("global_norm", ["mean", "initial"])
def test_two_clients_by_hand(nets, global_norm):
    # client A holds 1 sample and adds 1 to every entry, client B holds 3 and adds 5: p = (1/4, 3/4)
    t = trainer_of(nets, "BNMLP", shape=(2,))
    starts = adding(t, {1: 1.0, 3: 5.0})
    strategy = FedBN(global_norm=global_norm)
    w = torch.arange(20, dtype=torch.float32)
    a = ClientData(0, torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))
    b = ClientData(1, torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
    state_a, state_b = {}, {}
    up_a = strategy.client_train(t, task(w, 0), a, state_a, seed=0)
    up_b = strategy.client_train(t, task(w, 1), b, state_b, seed=0)
    assert torch.equal(starts[0], w) and torch.equal(starts[1], w)  # first tasks: the global model, norm entries too
    assert torch.equal(state_a["norm"], w[NORM] + 1) and torch.equal(state_b["norm"], w[NORM] + 5)  # kept local
    if global_norm == "mean":
        assert torch.equal(up_a.params, w + 1)
    else:  # the norm entries never leave the client: the upload carries back what it received
        assert torch.equal(up_a.params[NORM], w[NORM]) and torch.equal(up_a.params[SHARED], w[SHARED] + 1)

    server = SimpleNamespace(params=w, trainer=t)
    updates = [Update(task=task(w, c), params=u.params, n_samples=n, steps=1, loss=0.0, arrived_at=0.0)
               for c, u, n in ((0, up_a, 1), (1, up_b, 3))]
    new = strategy.aggregate(server, updates)
    assert torch.equal(new[SHARED], w[SHARED] + 4)  # 1/4 * 1 + 3/4 * 5 = 4
    assert torch.equal(new[NORM], w[NORM] + 4 if global_norm == "mean" else w[NORM])

    # the next task of A starts from the global shared part and A's own norm entries; so does its personal model
    strategy.client_train(t, task(new, 0), a, state_a, seed=1)
    expected = new.clone()
    expected[NORM] = w[NORM] + 1
    assert torch.equal(starts[2], expected)
    assert torch.equal(strategy.personal_params(t, new, a, state_b | {"norm": w[NORM] + 1}, 0), expected)
    assert strategy.personal_params(t, new, a, {}, 0) is None  # never trained: the global model

    # bytes: 12 shared entries (48 bytes) and 8 norm entries (32 bytes)
    server.params = new
    fresh, known = task(new, 7), task(new, 0)
    assert strategy.transfer_bytes(server, fresh) == ((80, 80) if global_norm == "mean" else (48, 48))
    assert strategy.transfer_bytes(server, known) == ((48, 80) if global_norm == "mean" else (48, 48))


def test_real_training_keeps_the_trained_norm_entries_and_shares_the_weighted_mean(nets):
    t = trainer_of(nets, "BNMLP", shape=(2,), lr=0.2, batch_size=4)
    g = torch.Generator().manual_seed(0)
    data = [ClientData(c, torch.randn(n, 2, generator=g) * (c + 1) + 3 * c, torch.randint(0, 2, (n,), generator=g))
            for c, n in ((0, 4), (1, 8))]
    strategy, states = FedBN(), [{}, {}]
    results = [strategy.client_train(t, task(t.initial, d.client_id), d, s, seed=d.client_id)
               for d, s in zip(data, states)]
    for d, s, r in zip(data, states, results):
        alone = t.train(t.initial, d.x, d.y, steps=1, seed=d.client_id)  # FedAvg's local training, the first time
        assert torch.equal(r.params, alone.params) and torch.equal(s["norm"], alone.params[NORM])
    assert not torch.allclose(states[0]["norm"], states[1]["norm"])  # each client's own statistics
    updates = [Update(task=task(t.initial, c), params=r.params, n_samples=n, steps=1, loss=0.0, arrived_at=0.0)
               for c, r, n in ((0, results[0], 4), (1, results[1], 8))]
    new = strategy.aggregate(SimpleNamespace(params=t.initial, trainer=t), updates)
    assert torch.allclose(new, (results[0].params + 2 * results[1].params) / 3, atol=1e-6)


def test_fedbn_is_registered_and_refuses_models_without_batchnorm_in_one_line(nets):
    assert STRATEGIES["fedbn"] is FedBN and FedBN.personalised and not FedBN.model_heterogeneous
    strategy = build_strategy(StrategyConfig(name="fedbn", params={"layers": "all", "global_norm": "initial"}))
    assert (strategy.layers, strategy.global_norm) == ("all", "initial")
    with pytest.raises(ConfigError, match=r"^model.name: fedbn keeps the BatchNorm layers on each client, and the "
                                          r"built-in mlp has none"):
        FedBN().check_model("mlp")
    with pytest.raises(ConfigError, match=rf"^model.name: fedbn keeps the BatchNorm layers on each client, and "
                                          rf"{MODULE}:Headless has none"):
        FedBN().check_models([trainer_of(nets, "Headless")])
    with pytest.raises(ConfigError, match=r"strategy.params.layers"):
        build_strategy(StrategyConfig(name="fedbn", params={"layers": "groupnorm"}))


# --------------------------------------------------------------------------- whole runs
FEATURE_SHIFT = {"data__feature_skew": {"kind": "noise", "strength": 1.0}, "data__n_clients": 8,
                 "strategy__name": "fedbn", "strategy__clients_per_round": 6, "rounds": 4}


@pytest.mark.parametrize("global_norm", ["mean", "initial"])
def test_a_fedbn_run_keeps_each_clients_batchnorm_and_counts_only_what_travels(models_dir, tmp_path, capsys,
                                                                              global_norm):
    config = run_config(models_dir, strategy__params={"global_norm": global_norm}, **FEATURE_SHIFT)
    out = tmp_path / "run"
    assert hetfl("run", config, "--out", out, "--quiet") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["personal_acc_mean"] > 0.5
    fed = build_federation(validate(yaml.safe_load(config.read_text()), base_dir=models_dir))
    t = fed.trainer
    local = norm_entries(t)
    assert local.numel() == 3 * 4 * 4  # three BatchNorm2d(4): running mean and variance, weight, bias
    state = checkpoint(out)
    kept = {c: s.get("norm") for c, s in state.client_state.items()}
    kept = {c: v for c, v in kept.items() if v is not None}
    assert len(kept) >= 6
    norms = torch.stack(list(kept.values()))
    assert all(not torch.equal(norms[0], other) for other in norms[1:])  # per client
    if global_norm == "initial":
        assert torch.equal(state.params[local], t.initial[local])  # the server never averaged them
    else:
        assert not torch.equal(state.params[local], t.initial[local])
    n_norm, shared = local.numel() * 4, (t.numel - local.numel()) * 4
    up = shared + (n_norm if global_norm == "mean" else 0)
    assert summary["bytes_up"] == summary["updates"] * up
    first = sum(1 for n in summary["tasks_per_client"] if n)
    extra = first * n_norm if global_norm == "mean" else 0  # each client's first download carries the norm entries
    assert summary["bytes_down"] == sum(summary["tasks_per_client"]) * shared + extra


def test_a_resumed_fedbn_run_equals_an_uninterrupted_one(models_dir, tmp_path, capsys):
    from test_runs_end_to_end import assert_same_run

    config = run_config(models_dir, **FEATURE_SHIFT)
    assert hetfl("run", config, "--out", tmp_path / "straight", "--quiet", "--set", "rounds=6") == 0
    assert hetfl("run", config, "--out", tmp_path / "resumed", "--quiet") == 0
    assert hetfl("run", "--resume", tmp_path / "resumed", "--quiet", "--set", "rounds=6") == 0
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    a, b = checkpoint(tmp_path / "straight"), checkpoint(tmp_path / "resumed")
    assert torch.equal(a.params, b.params)
    assert sorted(a.client_state) == sorted(b.client_state)
    for client, kept in a.client_state.items():
        assert kept.keys() == {"norm"} and torch.equal(kept["norm"], b.client_state[client]["norm"])
