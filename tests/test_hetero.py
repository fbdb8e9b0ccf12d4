"""Model-heterogeneous FL: the zoo and its assignment, the engine with several architectures, and the
defining step of local-only, LG-FedAvg, FedProto and FedGH, each on a case worked out by hand."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from hetfl.config import ArchitectureConfig, ModelConfig, TrainingConfig, validate
from hetfl.engine import ClientPool, Simulator
from hetfl.engine.run import build_federation, run_experiment
from hetfl.engine.simulator import ClientModels
from hetfl.errors import ConfigError
from hetfl.models import build_model
from hetfl.models.assign import assign_architectures
from hetfl.strategies import STRATEGIES, FedAvg, FedGH, FedProto, LGFedAvg, LocalOnly, Task, Update
from hetfl.strategies.base import ClientData
from hetfl.strategies.fedgh import train_head
from hetfl.strategies.fedproto import prototype_head, prototype_pull
from hetfl.strategies.hetero import class_prototypes, pack_prototypes, prototype_mean, unpack_prototypes
from hetfl.training import LocalTrainer
from tests.conftest import blobs, profile, run_rounds


def task(params, client=0, steps=3):
    return Task(task_id=0, client_id=client, version=0, params=params, steps=steps, dispatched_at=0.0)


def update(params, n=1):
    return Update(task=task(torch.zeros(0)), params=params, n_samples=n, steps=1, loss=0.0, arrived_at=0.0)


ZOO = [{"name": "logreg"}, {"name": "mlp", "hidden": [16]}, {"name": "cnn", "channels": [4, 8]}]


def zoo_config(strategy="fedgh", rounds=3, **model):
    return validate({
        "name": "zoo", "seed": 0, "rounds": rounds,
        "data": {"dataset": "digits", "n_clients": 6, "partition": {"kind": "dirichlet", "alpha": 0.5}},
        "devices": {"compute": {"distribution": "lognormal", "median_flops": 2e8}},
        "model": {"name": "mlp", "hidden": [16], "feature_dim": 16, "zoo": ZOO, **model},
        "training": {"lr": 0.05, "batch_size": 16, "local_steps": 5},
        "strategy": {"name": strategy, "clients_per_round": 3},
    })


# -- the zoo -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ZOO)
def test_every_architecture_hands_its_head_a_representation_of_feature_dim(arch):
    model = build_model(ArchitectureConfig(**arch), (64,), 10, feature_dim=12)
    trainer = LocalTrainer(model, TrainingConfig())
    assert trainer.head.in_features == 12 and trainer.head.out_features == 10
    features, logits = trainer.features(torch.randn(5, 64))
    assert features.shape == (5, 12) and logits.shape == (5, 10)
    assert torch.allclose(logits, features @ trainer.head.weight.T + trainer.head.bias)


def test_feature_dim_adds_a_layer_only_where_the_width_differs():
    count = lambda m: sum(isinstance(x, torch.nn.Linear) for x in m.modules())  # noqa: E731
    assert count(build_model(ArchitectureConfig(name="mlp", hidden=[16]), (64,), 10, feature_dim=16)) == 2
    assert count(build_model(ArchitectureConfig(name="mlp", hidden=[32]), (64,), 10, feature_dim=16)) == 3
    assert count(build_model(ArchitectureConfig(name="logreg"), (64,), 10)) == 1
    assert count(build_model(ArchitectureConfig(name="logreg"), (64,), 10, feature_dim=8)) == 2


# -- assignment ------------------------------------------------------------------------------------------
def profiles_with(speeds, tiers=None):
    return [SimpleNamespace(speed=s, tier=f"{(tiers or ['x'] * len(speeds))[i]}/wifi") for i, s in enumerate(speeds)]


def test_speed_assignment_gives_the_slowest_third_the_first_architecture():
    cfg = ModelConfig(zoo=[ArchitectureConfig(name="logreg")] * 3, assign="speed")
    speeds = [5.0, 0.1, 1.0, 0.2, 3.0, 2.0, 0.3]  # ranks: 6 0 3 1 5 4 2 -> groups 7*k//... of sizes 3, 2, 2
    # ranked slowest first: clients 1, 3, 6 | 2, 5 | 4, 0 -> rank r gets r * 3 // 7
    assert assign_architectures(cfg, profiles_with(speeds)).tolist() == [2, 0, 1, 0, 2, 1, 0]


def test_tier_cycle_and_explicit_assignment():
    zoo = [ArchitectureConfig(name="logreg")] * 2
    tiers = ["low", "high", "low", "mid"]
    cfg = ModelConfig(zoo=zoo, assign="tier", tiers={"low": 0, "mid": 1, "high": 1})
    assert assign_architectures(cfg, profiles_with([1.0] * 4, tiers)).tolist() == [0, 1, 0, 1]
    cfg = ModelConfig(zoo=zoo, assign="tier", tiers={"low": 0, "high": 1})
    with pytest.raises(ConfigError, match="model.tiers: no zoo index for compute tier 'mid'"):
        assign_architectures(cfg, profiles_with([1.0] * 4, tiers))
    assert assign_architectures(ModelConfig(zoo=zoo, assign="cycle"), profiles_with([1.0] * 5)).tolist() == [0, 1, 0, 1, 0]
    cfg = ModelConfig(zoo=zoo, assign="explicit", assignment=[1, 1, 0])
    assert assign_architectures(cfg, profiles_with([1.0] * 3)).tolist() == [1, 1, 0]
    with pytest.raises(ConfigError, match="model.assignment: 3 zoo indices for 4 clients"):
        assign_architectures(cfg, profiles_with([1.0] * 4))


@pytest.mark.parametrize("model, message", [
    ({"zoo": [{"name": "logreg"}], "assign": "tier"}, "model.tiers: assign 'tier' needs"),
    ({"zoo": [{"name": "logreg"}], "assign": "explicit"}, "model.assignment: assign 'explicit' needs"),
    ({"zoo": [{"name": "logreg"}], "assign": "explicit", "assignment": [0, 1]}, "model.assignment: zoo index 1 is out of range"),
    ({"zoo": [{"name": "vgg"}]}, "model.zoo.0.name"),  # not a built-in (resnet now is)
])
def test_bad_zoo_configs_are_one_line_errors(model, message):
    with pytest.raises(ConfigError, match=message):
        validate({"model": model})


def test_a_single_architecture_algorithm_refuses_a_zoo_and_a_shared_head_needs_one_width():
    fed = build_federation(zoo_config("fedavg"))
    with pytest.raises(ConfigError, match="model.zoo: fedavg trains one architecture on every client"):
        fed.strategy()
    raw = zoo_config("fedgh").model_dump()
    raw["model"]["feature_dim"] = None
    with pytest.raises(ConfigError, match=r"model.feature_dim: fedgh shares .* \(16, 32, 64\)"):
        build_federation(validate(raw)).strategy()
    build_federation(validate({**raw, "strategy": {"name": "local"}})).strategy()  # nothing shared: any widths


# -- the engine with several architectures --------------------------------------------------------------
def two_architecture_simulator(strategy, on_commit=None):
    """Client 0 trains logreg (1 MFLOP a step), client 1 an MLP (4 MFLOP a step); devices of 1 MFLOP/s."""
    x, y = blobs(16, features=4, classes=3)
    pool = ClientPool(x, y, [torch.arange(8), torch.arange(8, 16)])
    torch.manual_seed(0)
    cfg = TrainingConfig(local_steps=2, batch_size=4, lr=0.1)
    small = LocalTrainer(build_model(ArchitectureConfig(name="logreg"), (4,), 3, feature_dim=4), cfg, "logreg")
    large = LocalTrainer(build_model(ArchitectureConfig(name="mlp", hidden=[8]), (4,), 3, feature_dim=4), cfg, "mlp")
    models = ClientModels([small, large], [1e6, 4e6], np.array([0, 1]))
    profiles = [profile(i, flops=1e6, bw=1e12) for i in range(2)]
    return Simulator(strategy=strategy, trainer=small, pool=pool, profiles=profiles, flops_per_step=1e6, seed=0,
                     on_commit=on_commit, models=models)


def test_each_client_trains_its_own_architecture_and_is_timed_and_charged_by_it():
    seen = {}
    strategy = LocalOnly(clients_per_round=2)
    train = strategy.client_train

    def spy(trainer, task, data, state, seed):
        seen[task.client_id] = trainer.label
        return train(trainer, task, data, state, seed)

    strategy.client_train = spy
    sim = run_rounds(two_architecture_simulator(strategy), 1)
    assert seen == {0: "logreg", 1: "mlp"}
    assert sim.now == pytest.approx(2 * 4e6 / 1e6)  # the round waits for the MLP: 2 steps x 4 MFLOP at 1 MFLOP/s
    assert sim.counters.trained_flops == 2 * 1e6 + 2 * 4e6
    assert sim.counters.bytes_up == sim.counters.bytes_down == 0  # local training: nothing travels
    assert sim.personal_model(1)[0].label == "mlp"


def test_a_single_architecture_strategy_is_refused_by_a_heterogeneous_simulator():
    with pytest.raises(ValueError, match="fedavg needs one architecture"):
        two_architecture_simulator(FedAvg())


def test_bytes_are_the_size_of_what_the_server_holds():
    sim = run_rounds(two_architecture_simulator(FedGH(clients_per_round=2)), 2)
    head = 3 * 4 + 3  # C x d + C floats: the head down, the prototypes and counts up
    assert sim.params.numel() == head
    assert sim.counters.bytes_down == sim.counters.bytes_up == 4 * head * sim.counters.tasks


# -- prototypes ------------------------------------------------------------------------------------------
def identity_trainer(d=2, classes=3):
    """A logreg whose representation is its input (no feature_dim): prototypes are input means."""
    return LocalTrainer(build_model(ArchitectureConfig(name="logreg"), (d,), classes), TrainingConfig())


def test_class_prototypes_are_the_mean_representation_per_class():
    trainer = identity_trainer()
    data = ClientData(0, torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]]), torch.tensor([0, 0, 2]))
    prototypes, counts = class_prototypes(trainer, trainer.flat.clone(), data, 3)
    assert torch.equal(prototypes, torch.tensor([[2.0, 3.0], [0.0, 0.0], [10.0, 0.0]]))
    assert torch.equal(counts, torch.tensor([2.0, 0.0, 1.0]))
    assert torch.equal(pack_prototypes(prototypes, counts), torch.tensor([2.0, 3.0, 0.0, 0.0, 10.0, 0.0, 2.0, 0.0, 1.0]))


def test_fedproto_aggregation_is_the_sample_weighted_mean_of_prototypes_per_class():
    # client a: class 0 at (1, 1) from 1 sample, class 1 at (4, 0) from 3; client b: class 0 at (5, 5) from 3.
    # class 0: (1*(1,1) + 3*(5,5)) / 4 = (4, 4); class 1: (4, 0), N = 3; class 2: nobody, keeps the old (9, 9).
    a = pack_prototypes(torch.tensor([[1.0, 1.0], [4.0, 0.0], [0.0, 0.0]]), torch.tensor([1.0, 3.0, 0.0]))
    b = pack_prototypes(torch.tensor([[5.0, 5.0], [0.0, 0.0], [0.0, 0.0]]), torch.tensor([3.0, 0.0, 0.0]))
    mean, n = prototype_mean([update(a), update(b)], 3)
    assert torch.equal(mean, torch.tensor([[4.0, 4.0], [4.0, 0.0], [0.0, 0.0]])) and torch.equal(n, torch.tensor([4.0, 3, 0]))
    old = pack_prototypes(torch.tensor([[0.0, 0.0], [0.0, 0.0], [9.0, 9.0]]), torch.tensor([0.0, 0.0, 7.0]))
    server = SimpleNamespace(params=old, trainer=identity_trainer())
    new = FedProto().aggregate(server, [update(a), update(b)])
    prototypes, counts = unpack_prototypes(new, 3)
    assert torch.equal(prototypes, torch.tensor([[4.0, 4.0], [4.0, 0.0], [9.0, 9.0]]))
    assert torch.equal(counts, torch.tensor([4.0, 3.0, 7.0]))


def test_fedproto_regulariser_pulls_each_sample_towards_its_class_prototype():
    prototypes, counts = torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, 0.0]]), torch.tensor([1.0, 0.0, 1.0])
    features = torch.tensor([[1.0, 3.0], [5.0, 5.0], [2.0, 1.0]])
    y = torch.tensor([0, 1, 2])
    # squared distances: (0 + 4) for class 0, class 1 has no prototype (0), (0 + 1) for class 2; / (3 x 2) entries
    assert float(prototype_pull(prototypes, counts, 0.5)(features, None, y)) == pytest.approx(0.5 * 5 / 6)


def test_the_prototype_head_predicts_the_nearest_prototype():
    g = torch.Generator().manual_seed(0)
    prototypes, h = torch.randn(5, 4, generator=g), torch.randn(50, 4, generator=g)
    counts = torch.tensor([1.0, 2.0, 0.0, 1.0, 1.0])  # class 2 has no prototype: never predicted
    head = prototype_head(prototypes, counts)
    logits = h @ head[:20].reshape(5, 4).T + head[20:]
    distances = torch.cdist(h, prototypes)
    distances[:, 2] = float("inf")
    assert torch.equal(logits.argmax(1), distances.argmin(1))


# -- FedGH ----------------------------------------------------------------------------------------------
def test_fedgh_server_head_training_lowers_the_loss_on_the_uploaded_representations():
    g = torch.Generator().manual_seed(0)
    prototypes, labels = torch.randn(12, 6, generator=g) + torch.arange(12).remainder(4).unsqueeze(1), torch.arange(12) % 4
    head = torch.randn(4 * 6 + 4, generator=g) * 0.1
    loss = lambda flat: float(F.cross_entropy(prototypes @ flat[:24].reshape(4, 6).T + flat[24:], labels))  # noqa: E731
    trained = train_head(head, prototypes, labels, lr=0.1, steps=10)
    assert loss(trained) < loss(head)
    # one step by hand: the gradient of mean CE is (softmax - onehot)^T [P, 1] / n
    p = torch.softmax(prototypes @ head[:24].reshape(4, 6).T + head[24:], 1) - F.one_hot(labels, 4)
    by_hand = head - 0.1 * torch.cat([(p.T @ prototypes).reshape(-1), p.sum(0)]) / 12
    assert torch.allclose(train_head(head, prototypes, labels, lr=0.1, steps=1), by_hand, atol=1e-6)


def test_fedgh_client_trains_its_body_under_the_global_head_and_uploads_prototypes():
    torch.manual_seed(0)
    trainer = LocalTrainer(build_model(ArchitectureConfig(name="mlp", hidden=[4]), (3,), 2), TrainingConfig(lr=0.1))
    data = ClientData(0, torch.randn(8, 3), torch.tensor([0, 1] * 4))
    head = torch.zeros(2 * 4 + 2)
    state = {}
    result = FedGH().client_train(trainer, task(head), data, state, seed=0)
    own = state["model"]
    assert not torch.equal(own[trainer.head_slice], head)  # the head trained too, starting from the global one
    assert torch.equal(result.params, pack_prototypes(*class_prototypes(trainer, own, data, 2)))
    personal = FedGH().personal_params(trainer, head, data, state, 0)
    assert torch.equal(personal[trainer.head_slice], head) and torch.equal(personal[:-10], own[:-10])


# -- LG-FedAvg and local ----------------------------------------------------------------------------------
def test_lgfedavg_keeps_the_body_and_shares_the_sample_weighted_mean_head():
    torch.manual_seed(0)
    trainer = LocalTrainer(build_model(ArchitectureConfig(name="mlp", hidden=[4]), (3,), 2), TrainingConfig(lr=0.1))
    data = ClientData(0, torch.randn(8, 3), torch.tensor([0, 1] * 4))
    strategy, state, head = LGFedAvg(), {}, torch.full((10,), 0.5)
    assert torch.equal(strategy.initial_params(trainer), trainer.initial[-10:])
    result = strategy.client_train(trainer, task(head), data, state, seed=0)
    assert torch.equal(result.params, state["model"][-10:])  # only the head travels
    mean = strategy.aggregate(None, [update(torch.ones(10), 1), update(torch.full((10,), 5.0), 3)])
    assert torch.equal(mean, torch.full((10,), 4.0))
    personal = strategy.personal_params(trainer, mean, data, state, 0)
    assert torch.equal(personal, torch.cat([state["model"][:-10], mean]))


def test_local_only_keeps_everything_on_the_client():
    torch.manual_seed(0)
    trainer = LocalTrainer(build_model(ArchitectureConfig(name="logreg"), (3,), 2), TrainingConfig(lr=0.1))
    data = ClientData(0, torch.randn(8, 3), torch.tensor([0, 1] * 4))
    state = {}
    assert torch.equal(LocalOnly().personal_params(trainer, torch.zeros(0), data, state, 0), trainer.initial)
    result = LocalOnly().client_train(trainer, task(torch.zeros(0)), data, state, seed=0)
    assert result.params.numel() == 0
    assert torch.equal(LocalOnly().personal_params(trainer, torch.zeros(0), data, state, 0), state["model"])


# -- end to end ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["local", "lgfedavg", "fedproto", "fedgh"])
def test_model_heterogeneous_runs_score_each_client_with_its_own_architecture(tmp_path, name):
    cfg = zoo_config(name)
    summary = run_experiment(cfg, tmp_path / "a", show_progress=False)
    again = run_experiment(cfg, tmp_path / "b", show_progress=False)
    assert summary["final_accuracy"] == again["final_accuracy"]  # deterministic for a seed
    last = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["accuracy"] == last["personal_accuracy"] and last["client_acc_mean"] == last["personal_acc_mean"]
    assert last["personal_models"] == 6
    assert summary["architectures"] == ["logreg", "mlp[16]", "cnn[4,8]"]
    assert sorted(set(summary["architecture"])) == [0, 1, 2]
    assert summary["train_flops"] == last["train_flops"] > 0
    assert summary["flops_per_task"] == pytest.approx(summary["train_flops"] / (3 * 3))


def test_personalised_model_heterogeneous_methods_are_registered_as_such():
    for name in ("local", "lgfedavg", "fedproto", "fedgh"):
        cls = STRATEGIES[name]
        assert cls.model_heterogeneous and cls.personalised and not cls.global_model
    assert not STRATEGIES["fedavg"].model_heterogeneous


def test_compare_refuses_a_single_architecture_algorithm_on_a_zoo_before_any_run(tmp_path, capsys):
    from hetfl.cli import main
    from tests.conftest import write_config

    config = write_config(tmp_path, model={"name": "mlp", "hidden": [16], "feature_dim": 16, "zoo": ZOO})
    capsys.readouterr()
    code = main(["compare", str(config), "--algorithms", "fedgh,fedavg", "--out", str(tmp_path / "cmp"), "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and "model.zoo: fedavg trains one architecture on every client" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cmp" / "fedgh").exists()  # refused before the first run
