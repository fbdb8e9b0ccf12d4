"""FML and pFedLoRA-style adapters: the mathematics on hand-worked cases, then a three-architecture zoo end to end."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from hetfl.config import TrainingConfig, validate
from hetfl.engine.run import Run, build_federation
from hetfl.errors import ConfigError
from hetfl.models.zoo import MLP, LogisticRegression
from hetfl.strategies import FML, AdapterFL, Task, Update
from hetfl.strategies.adapters import adapt, fold
from hetfl.strategies.base import ClientData
from hetfl.strategies.fml import mutual_loss
from hetfl.training import LocalTrainer


def task(params, steps=3):
    params = params if isinstance(params, torch.Tensor) else torch.tensor(params, dtype=torch.float32)
    return Task(task_id=0, client_id=0, version=0, params=params, steps=steps, dispatched_at=0.0)


def update(end, n):
    return Update(task=task([0.0] * len(end)), params=torch.tensor(end, dtype=torch.float32), n_samples=n, steps=1,
                  loss=0.0, arrived_at=0.0)


def trainer_of(model, **training):
    torch.manual_seed(0)
    return LocalTrainer(model, TrainingConfig(**{"lr": 0.2, "batch_size": 4, **training}))


def data(n=12, features=3, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ClientData(0, torch.randn(n, features, generator=g), torch.arange(n) % classes)


# -- FML: the mutual-learning loss ---------------------------------------------------------------------
def test_mutual_loss_is_alpha_ce_plus_one_minus_alpha_kl_worked_by_hand():
    # row 1: p = softmax(0, 0) = (1/2, 1/2), peer q = softmax(ln 3, 0) = (3/4, 1/4), y = 0
    #   CE = ln 2;  KL(q || p) = 3/4 ln(3/2) + 1/4 ln(1/2)
    # row 2: p = softmax(0, ln 3) = (1/4, 3/4), q = (1/2, 1/2), y = 1
    #   CE = -ln(3/4);  KL(q || p) = 1/2 ln 2 + 1/2 ln(2/3)
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3)]], requires_grad=True)
    peer = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    ce = (math.log(2) - math.log(3 / 4)) / 2
    kl = (0.75 * math.log(1.5) + 0.25 * math.log(0.5) + 0.5 * math.log(2) + 0.5 * math.log(2 / 3)) / 2
    loss = mutual_loss(logits, peer, y, 0.3)
    assert loss.item() == pytest.approx(0.3 * ce + 0.7 * kl, abs=1e-6)
    loss.backward()
    assert peer.grad is None  # the peer's distribution is a target: the loss moves only its own model
    # d/dlogits of the KL term is (p - q) / batch: here (p - q) = (-1/4, 1/4) and (-1/4, 1/4)
    expected = 0.3 * (F.softmax(logits, 1) - F.one_hot(y, 2)) / 2 + 0.7 * torch.tensor([[-0.25, 0.25]] * 2) / 2
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_fml_with_pure_cross_entropy_is_two_independent_local_trainings():
    # alpha = beta = 1: the KL terms vanish, so the private model and the meme train exactly as plain local
    # training of each would, on the same batches (one seed)
    trainer, d = trainer_of(MLP(3, [4], 3)), data()
    meme_start = trainer.initial + 0.1
    state = {}
    result = FML(alpha=1.0, beta=1.0).client_train(trainer, task(meme_start), d, state, seed=7)
    private_alone = trainer.train(trainer.initial, d.x, d.y, steps=3, seed=7).params
    meme_alone = trainer.train(meme_start, d.x, d.y, steps=3, seed=7).params
    assert torch.allclose(state["model"], private_alone, atol=1e-7)
    assert torch.allclose(result.params, meme_alone, atol=1e-7)
    assert result.steps == 3 and "private_loss" in result.stats


def test_fml_uploads_the_meme_and_keeps_the_private_model_in_its_state():
    trainer, d, strategy = trainer_of(MLP(3, [4], 3)), data(), FML()
    meme_start = trainer.initial + 0.1
    state = {}
    result = strategy.client_train(trainer, task(meme_start), d, state, seed=0)
    alone = trainer.train(trainer.initial, d.x, d.y, steps=3, seed=0).params
    assert not torch.allclose(state["model"], alone)  # the KL pull towards the meme changed the private model
    assert not torch.equal(result.params, meme_start) and not torch.equal(result.params, state["model"])
    private = state["model"].clone()
    assert torch.equal(strategy.personal_params(trainer, meme_start, d, state, 0), private)  # its private model
    assert torch.equal(state["model"], private)  # evaluation does not change the state
    assert torch.equal(strategy.personal_params(trainer, meme_start, d, {}, 0), trainer.initial)  # before a task
    # without a zoo the meme trains in a second, cached instance of the architecture
    assert strategy.meme_trainer(trainer) is trainer.twin() is trainer.twin() and trainer.twin() is not trainer
    # a second task starts the private model where the first left it
    strategy.client_train(trainer, task(result.params), d, state, seed=1)
    assert not torch.equal(state["model"], private)


def test_fml_meme_has_the_reference_architecture_and_the_private_model_the_clients():
    reference, own = trainer_of(MLP(3, [5], 3)), trainer_of(LogisticRegression(3, 3))
    own.reference = reference
    state = {}
    result = FML().client_train(own, task(reference.initial), data(), state, seed=0)
    assert result.params.numel() == reference.numel == 3 * 5 + 5 + 5 * 3 + 3
    assert state["model"].numel() == own.numel == 3 * 3 + 3
    assert FML.meme_trainer(own) is reference


def test_fml_server_takes_the_sample_weighted_mean_of_the_memes():
    server = SimpleNamespace(params=torch.zeros(2))
    assert torch.equal(FML().aggregate(server, [update([1, 2], 1), update([5, 6], 3)]), torch.tensor([4.0, 5.0]))


def test_fml_charges_two_models_of_training():
    assert FML().compute_steps(5) == 10
    assert FML.global_model and FML.personalised and FML.model_heterogeneous


@pytest.mark.parametrize("kwargs, match", [({"alpha": -0.1}, "alpha"), ({"alpha": 1.5}, "alpha"),
                                           ({"beta": 2.0}, "beta")])
def test_fml_refuses_weights_outside_zero_one(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FML(**kwargs)


# -- adapters: folding into the head -------------------------------------------------------------------
def test_folding_a_hand_worked_adapter_into_the_head():
    # d = 2, r = 1, s = 2: A = [1 0], B = [0 1]^T, so B A h = (0, h_1);  h = (1, 1) -> h' = (1, 3)
    # W = [1 2]: W h' = 7;  W' = W + s (W B) A = [1 2] + 2 * 2 * [1 0] = [5 2]: W' h = 7
    A, B, W, h = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0], [1.0]]), torch.tensor([[1.0, 2.0]]), torch.ones(1, 2)
    assert torch.equal(adapt(h, A, B, 2.0), torch.tensor([[1.0, 3.0]]))
    assert torch.equal(fold(W, A, B, 2.0), torch.tensor([[5.0, 2.0]]))


def test_folding_identity_on_random_tensors():
    g = torch.Generator().manual_seed(0)
    d, r, c = 7, 3, 4
    W, b, A, B, h = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((c, d), (c,), (r, d), (d, r), (5, d)))
    assert torch.allclose(F.linear(adapt(h, A, B, 0.7), W, b), F.linear(h, fold(W, A, B, 0.7), b), atol=1e-6)


@pytest.mark.parametrize("model", [MLP(3, [6], 4, feature_dim=5), LogisticRegression(3, 4)],
                         ids=["mlp with feature_dim", "logreg: the head reads the raw input"])
def test_the_folded_model_predicts_what_the_model_with_the_adapter_attached_predicts(model):
    trainer, strategy = trainer_of(model), AdapterFL(rank=2, alpha=3.0)
    d = trainer.head.in_features
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(2, d, generator=g), torch.randn(d, 2, generator=g)
    adapter, x = torch.cat([A.reshape(-1), B.reshape(-1)]), torch.randn(10, 3, generator=g)
    w = trainer.initial + 0.1
    with strategy.attached(trainer, A, B):
        attached = trainer.predict(w, x)
    plain = trainer.predict(w, x)
    folded = strategy.folded(trainer, w, adapter)
    assert torch.allclose(trainer.predict(folded, x), attached, atol=1e-5)
    assert not torch.allclose(plain, attached, atol=1e-3)  # the adapter does change the predictions
    assert torch.equal(trainer.predict(w, x), plain)  # the hook is gone after the block
    changed = (folded != w).nonzero().flatten()
    weight = trainer.head.weight.numel()
    assert changed.min() >= trainer.numel - weight - trainer.head.bias.numel()  # only the head's weight changes
    assert changed.max() < trainer.numel - trainer.head.bias.numel()


# -- adapters: the server and the start ----------------------------------------------------------------
def test_adapter_aggregation_is_the_weighted_mean_of_A_and_of_B():
    # rank 1 on width 2: flat = [A (1x2), B (2x1)]; weights 1/4 and 3/4
    strategy, trainer = AdapterFL(rank=1), SimpleNamespace(head=torch.nn.Linear(2, 3))
    server = SimpleNamespace(params=torch.zeros(4))
    new = strategy.aggregate(server, [update([1, 0, 2, 0], 1), update([0, 1, 0, 4], 3)])
    A, B = strategy.unpack(trainer, new)
    assert torch.equal(A, torch.tensor([[0.25, 0.75]])) and torch.equal(B, torch.tensor([[0.5], [3.0]]))
    # the mean of the factors is not the mean of the maps: B_1 A_1 = [[2, 0], [0, 0]], B_2 A_2 = [[0, 0], [0, 4]],
    # whose mean is [[.5, 0], [0, 3]], while B A = [[.125, .375], [.75, 2.25]]
    assert torch.equal(B @ A, torch.tensor([[0.125, 0.375], [0.75, 2.25]]))


def test_the_initial_adapter_is_the_identity_so_a_clients_first_model_is_its_own():
    trainer, strategy = trainer_of(MLP(3, [6], 4, feature_dim=5)), AdapterFL(rank=2)
    adapter = strategy.initial_params(trainer)
    A, B = strategy.unpack(trainer, adapter)
    assert adapter.numel() == 2 * 2 * 5
    assert torch.equal(B, torch.zeros(5, 2)) and (A != 0).all() and A.abs().max() <= 1 / math.sqrt(5)
    assert torch.equal(strategy.initial_params(trainer), adapter)  # a fixed generator seed
    assert torch.equal(strategy.personal_params(trainer, adapter, data(), {}, 0), trainer.initial)


def test_a_task_trains_the_model_under_the_frozen_adapter_then_the_adapter_on_the_frozen_model():
    trainer, d = trainer_of(MLP(3, [6], 3, feature_dim=5)), data()
    strategy = AdapterFL(rank=2, adapter_steps=4, adapter_lr=0.5)
    g = torch.Generator().manual_seed(2)
    received = torch.randn(2 * 2 * 5, generator=g) * 0.3  # a global adapter that is not the identity
    A, B = strategy.unpack(trainer, received)
    state = {}
    result = strategy.client_train(trainer, task(received), d, state, seed=3)
    with strategy.attached(trainer, A, B):  # phase 1 by hand: the model under the frozen global adapter
        expected = trainer.train(trainer.initial, d.x, d.y, steps=3, seed=3).params
    assert torch.equal(state["model"], expected)  # and phase 2 did not move the model
    assert not torch.allclose(expected, trainer.train(trainer.initial, d.x, d.y, steps=3, seed=3).params)
    assert torch.equal(result.params, state["adapter"]) and not torch.equal(result.params, received)
    assert result.steps == 3 and result.stats["adapter_steps"] == 4.0
    assert strategy.compute_steps(3) == 7 and AdapterFL().compute_steps(3) == 6
    assert torch.equal(strategy.personal_params(trainer, received, d, state, 0),
                       strategy.folded(trainer, state["model"], state["adapter"]))  # its own model and adapter


def test_without_adapter_steps_the_adapter_comes_back_as_it_went():
    trainer, strategy = trainer_of(MLP(3, [6], 3, feature_dim=5)), AdapterFL(rank=2, adapter_steps=0)
    received = strategy.initial_params(trainer)
    assert torch.equal(strategy.client_train(trainer, task(received), data(), {}, seed=0).params, received)


@pytest.mark.parametrize("kwargs, match", [({"rank": 0}, "rank"), ({"alpha": 0.0}, "alpha"),
                                           ({"adapter_steps": -1}, "adapter_steps"),
                                           ({"adapter_lr": 0.0}, "adapter_lr")])
def test_adapters_refuse_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdapterFL(**kwargs)


def test_adapters_need_one_representation_width():
    narrow, wide = trainer_of(MLP(3, [4], 3)), trainer_of(MLP(3, [6], 3))
    with pytest.raises(ConfigError, match="feature_dim"):
        AdapterFL().check_models([narrow, wide])
    wide.reference = narrow
    with pytest.raises(ConfigError, match="feature_dim"):  # the server's adapter is shaped by the reference
        AdapterFL().check_models([wide])
    with pytest.raises(ValueError, match="feature_dim"):
        AdapterFL().unpack(wide, AdapterFL().initial_params(narrow))


# -- end to end: a three-architecture zoo --------------------------------------------------------------
ZOO = {
    "name": "zoo", "seed": 0, "rounds": 4,
    "data": {"dataset": "digits", "n_clients": 6, "partition": {"kind": "dirichlet", "alpha": 0.1}},
    "devices": {"compute": {"distribution": "lognormal", "median_flops": 2e8}},
    "model": {"name": "mlp", "hidden": [16], "feature_dim": 16, "assign": "cycle",
              "zoo": [{"name": "logreg"}, {"name": "mlp", "hidden": [32]}, {"name": "cnn", "channels": [4, 8]}]},
    "training": {"lr": 0.05, "batch_size": 16, "local_steps": 10},
    "strategy": {"name": "local", "clients_per_round": 3},
}


def run_zoo(tmp_path, name: str, tag: str = "") -> list[dict]:
    cfg = validate({**ZOO, "strategy": {**ZOO["strategy"], "name": name}})
    fed = build_federation(cfg)
    out = tmp_path / f"{name}{tag}"
    Run(cfg, out, fed, fed.strategy(), resume=False).execute(show_progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in records]


def test_fml_and_adapters_run_deterministically_on_a_three_architecture_zoo(tmp_path):
    runs = {name: run_zoo(tmp_path, name) for name in ("local", "fml", "pfedlora")}
    for name in ("fml", "pfedlora"):
        assert run_zoo(tmp_path, name, "-again") == runs[name], name
        last = runs[name][-1]
        assert last["round"] == 4 and last["personal_models"] == 6
        assert last["personal_acc_mean"] > runs[name][0]["personal_acc_mean"] + 0.1, name
    assert runs["fml"][-1]["bytes_up"] > runs["pfedlora"][-1]["bytes_up"] > 0  # a model against an adapter
    print({name: {k: round(r[-1][k], 3) for k in ("personal_acc_mean", "personal_accuracy", "accuracy")}
           for name, r in runs.items()})
