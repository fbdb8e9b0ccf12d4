"""FedPer and FedRep: which part is shared, which stays on the client, on cases worked out by hand."""

import json
from types import SimpleNamespace

import pytest
import torch

from hetfl.config import ModelConfig, TrainingConfig, validate
from hetfl.engine.run import Run, build_federation
from hetfl.errors import ConfigError
from hetfl.models import build_model
from hetfl.models.zoo import MLP
from hetfl.strategies import FedAvg, FedPer, FedRep, Task, Update
from hetfl.strategies.base import ClientData
from hetfl.training import LocalTrainer

DATA = ClientData(0, torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))


def task(params, steps=3):
    return Task(task_id=0, client_id=0, version=0, params=torch.tensor(params, dtype=torch.float32), steps=steps,
                dispatched_at=0.0)


def update(start, end, n):
    return Update(task=task(start), params=torch.tensor(end, dtype=torch.float32), n_samples=n, steps=1, loss=0.0,
                  arrived_at=0.0)


def adding_trainer():
    """A stand-in trainer on MLP(1, [1], 1): flat = [body w, body b, head w, head b]; training adds 1 to everything."""
    starts = []

    def train(params, x, y, *, steps, seed, **kw):
        starts.append(params.clone())
        return SimpleNamespace(params=params + 1, steps=steps, loss=0.0)

    return SimpleNamespace(model=MLP(1, [1], 1), train=train, starts=starts, n_buffers=0, buffer_slice=slice(0, 0),
                           head_slice=slice(2, 4), body_slice=slice(0, 2))


# -- the head slice ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name, shape, head_numel", [
    ("logreg", (64,), 64 * 10 + 10),
    ("mlp", (64,), 16 * 10 + 10),
    ("cnn", (64,), 8 * 2 * 2 * 10 + 10),  # 8x8 -> pool -> 4x4 -> pool -> 2x2, 8 channels
    ("cnn1d", (1, 40), 8 * 10 * 10 + 10),  # 40 -> 20 -> 10 points, 8 channels
])
def test_head_slice_is_the_last_linear_layer(name, shape, head_numel):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, hidden=[32, 16], channels=[4, 8]), shape, 10)
    trainer = LocalTrainer(model, TrainingConfig())
    head = trainer.head_slice
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert trainer.head is last and trainer.n_buffers == 0
    assert head.stop == trainer.numel and head.stop - head.start == head_numel == last.weight.numel() + 10
    assert torch.equal(trainer.flat[head], torch.cat([last.weight.detach().reshape(-1), last.bias.detach()]))


def test_head_slice_of_a_token_model_and_of_a_model_without_a_head():
    model = build_model(ModelConfig(name="mlp", hidden=[8]), (5,), 3, vocab_size=4)  # OneHot in front
    assert LocalTrainer(model, TrainingConfig()).head_slice == slice(5 * 4 * 8 + 8, 5 * 4 * 8 + 8 + 8 * 3 + 3)
    headless = LocalTrainer(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()), TrainingConfig(), "mine:Net")
    with pytest.raises(ConfigError, match=r"^model.name: mine:Net has no classifier head .*`head` attribute"):
        headless.head_slice
    with pytest.raises(ConfigError, match=r"^model.name: fedper splits the model .* mine:Net has no classifier head"):
        FedPer().check_models([headless])


# -- the trainer's gradient mask --------------------------------------------------------------------
def test_grad_mask_freezes_the_masked_entries_even_with_momentum():
    torch.manual_seed(0)
    trainer = LocalTrainer(MLP(2, [3], 2), TrainingConfig(lr=0.5, momentum=0.9, batch_size=4))
    x, y = torch.randn(8, 2), torch.tensor([0, 1] * 4)
    w0 = trainer.flat.clone()
    mask = torch.zeros_like(w0)
    mask[::2] = 1.0
    w = trainer.train(w0, x, y, steps=5, seed=0, grad_mask=mask).params
    assert torch.equal(w[1::2], w0[1::2])
    assert (w[::2] != w0[::2]).all()


# -- the server: the sample-weighted mean of what came back ----------------------------------------
@pytest.mark.parametrize("cls", [FedPer, FedRep])
def test_aggregation_is_the_sample_weighted_mean_of_shared_and_private_parts(cls):
    # flat = [body(2), head(2)]; returns [1,2,3,4] (n=1) and [5,6,7,8] (n=3):
    # shared part (the body) = 0.25 * first + 0.75 * second; so is the private part,
    # by the documented choice: a trained start for first-time clients.
    server = SimpleNamespace(params=torch.zeros(4))
    new = cls().aggregate(server, [update([0] * 4, [1, 2, 3, 4], 1), update([0] * 4, [5, 6, 7, 8], 3)])
    assert torch.equal(new, torch.tensor([4.0, 5.0, 6.0, 7.0]))


def test_aggregation_ignores_where_a_client_started():
    # a client starting from its own head returns w_i; the mean uses w_i, not the global model + delta
    server = SimpleNamespace(params=torch.tensor([9.0, 9.0]))
    assert torch.equal(FedPer().aggregate(server, [update([0, 0], [2, 4], 1)]), torch.tensor([2.0, 4.0]))


# -- the client: where a task starts, what it keeps, what it uses ----------------------------------
def test_fedper_client_starts_from_the_global_body_and_its_own_head():
    trainer, state, strategy = adding_trainer(), {}, FedPer()
    first = strategy.client_train(trainer, task([0, 0, 0, 0]), DATA, state, seed=0)
    assert torch.equal(trainer.starts[0], torch.zeros(4))  # the global head the first time
    assert torch.equal(state["head"], first.params[2:]) and torch.equal(state["head"], torch.ones(2))
    second = strategy.client_train(trainer, task([10, 10, 10, 10]), DATA, state, seed=0)
    assert torch.equal(trainer.starts[1], torch.tensor([10.0, 10.0, 1.0, 1.0]))  # global body, own head
    assert torch.equal(second.params, torch.tensor([11.0, 11.0, 2.0, 2.0]))
    assert torch.equal(state["head"], torch.tensor([2.0, 2.0]))


@pytest.mark.parametrize("cls, state, expected", [
    (FedPer, {"head": torch.tensor([2.0, 3.0])}, [5.0, 5.0, 2.0, 3.0]),   # global body + own head
    (FedRep, {"head": torch.tensor([2.0, 3.0])}, [5.0, 5.0, 2.0, 3.0]),
])
def test_personal_params_mix_the_global_shared_part_with_the_clients_own(cls, state, expected):
    trainer, strategy, glob = adding_trainer(), cls(), torch.full((4,), 5.0)
    kept = {k: v.clone() for k, v in state.items()}
    assert torch.equal(strategy.personal_params(trainer, glob, DATA, state, 0), torch.tensor(expected))
    assert all(torch.equal(state[k], kept[k]) for k in kept)  # evaluation does not change the state
    assert torch.equal(glob, torch.full((4,), 5.0))  # nor the global model
    assert strategy.personal_params(trainer, glob, DATA, {}, 0) is None  # never trained: the global model


def test_fedrep_trains_the_head_with_the_body_frozen_then_the_body_with_the_head_frozen():
    torch.manual_seed(0)
    trainer = LocalTrainer(MLP(2, [4], 3), TrainingConfig(lr=0.3, momentum=0.9, batch_size=4))
    head = trainer.head_slice
    body = slice(0, head.start)
    phases = []
    train = trainer.train

    def spy(params, *args, **kwargs):
        start = params.clone()
        result = train(params, *args, **kwargs)
        phases.append((start, result.params.clone(), kwargs["steps"]))
        return result

    trainer.train = spy
    data = ClientData(0, torch.randn(12, 2), torch.tensor([0, 1, 2] * 4))
    state, w0 = {}, trainer.flat.clone()
    result = FedRep(head_steps=4).client_train(trainer, task(w0.tolist(), steps=3), data, state, seed=0)
    (start1, end1, steps1), (start2, end2, steps2) = phases
    assert steps1 == 4 and steps2 == 3
    assert torch.equal(start1, w0) and torch.equal(end1[body], w0[body])  # head phase: body does not move
    assert not torch.equal(end1[head], w0[head])
    assert torch.equal(start2[head], end1[head]) and torch.equal(end2[head], end1[head])  # body phase: head still
    assert not torch.equal(end2[body], w0[body])
    assert torch.equal(result.params, torch.cat([end2[body], end1[head]]))
    assert torch.equal(state["head"], end1[head])
    assert result.steps == 3 and result.stats == {"head_steps": 4.0}  # the engine times the task's steps


@pytest.mark.parametrize("cls", [FedPer, FedRep])
def test_logreg_has_no_body_to_split_off(cls):
    with pytest.raises(ConfigError, match="mlp or cnn"):
        cls().check_model("logreg")
    cls().check_model("mlp")


def test_fedrep_refuses_negative_head_steps():
    with pytest.raises(ValueError, match="head_steps"):
        FedRep(head_steps=-1)


# -- end to end: personal models beat the global one under label skew -----------------------------
def test_fedper_personal_accuracy_beats_fedavg_global_accuracy_under_label_skew(tmp_path):
    # digits, 10 clients, Dirichlet(0.1) over labels: each client sees few classes. Same federation and seed.
    cfg = validate({
        "name": "skew", "seed": 0, "rounds": 10,
        "data": {"dataset": "digits", "n_clients": 10, "partition": {"kind": "dirichlet", "alpha": 0.1}},
        "devices": {"compute": {"distribution": "lognormal", "median_flops": 2e8}},
        "model": {"name": "mlp", "hidden": [32]},
        "training": {"lr": 0.05, "batch_size": 16, "local_steps": 10},
        "strategy": {"name": "fedavg", "clients_per_round": 5},
    })
    last = {}
    for strategy in (FedAvg(clients_per_round=5), FedPer(clients_per_round=5)):
        Run(cfg, tmp_path / strategy.name, build_federation(cfg), strategy, resume=False).execute(show_progress=False)
        lines = (tmp_path / strategy.name / "metrics.jsonl").read_text().splitlines()
        last[strategy.name] = json.loads(lines[-1])
    assert last["fedper"]["personal_models"] == 10
    assert last["fedper"]["personal_acc_mean"] > last["fedavg"]["client_acc_mean"] + 0.05, last
