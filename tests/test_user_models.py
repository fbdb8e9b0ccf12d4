"""Any torch.nn.Module as a model: built-ins through the same door as users', buffers in the flat vector,
train/eval modes, per-task random streams, the head protocol, batched training's probe, and whole runs of a
user's BatchNorm ResNet named by import path in a config.

The user's models live in :data:`SOURCE`, written to a temporary folder as ``hetfl_test_bnnets.py`` and imported
from there by import path, as a user's would be.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from hetfl import registry
from hetfl.cli import main
from hetfl.config import ArchitectureConfig, ModelConfig, TrainingConfig, validate
from hetfl.engine.run import build_federation
from hetfl.errors import ConfigError, HetflError
from hetfl.models import build_model
from hetfl.models import zoo
from hetfl.models.zoo import CNN, MLP, LogisticRegression, OneHot
from hetfl.strategies import (
    FML, AdapterFL, Ditto, FedAvg, FedGH, FedPer, FedProto, FedRep, LGFedAvg, LocalOnly, PFedGate, Task, Update,
)
from hetfl.strategies.base import ClientData
from hetfl.training import LocalTrainer
from hetfl.training.vectorized import batched_grad, train_many

MODULE = "hetfl_test_bnnets"

SOURCE = '''
"""Models a user might write (hetfl's tests import them by import path, hetfl_test_bnnets:ResNet)."""
import math

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    """A residual block: relu(x + bn2(conv2(relu(bn1(conv1(x))))))."""

    def __init__(self, width):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


class ResNet(nn.Module):
    """A small ResNet-style CNN on square images given flat: a conv stem with BatchNorm2d, one residual block,
    2x2 max pooling and a linear head (hetfl's head protocol)."""

    def __init__(self, input_shape, n_classes, width=8):
        super().__init__()
        self.side = math.isqrt(math.prod(input_shape))
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.block = Block(width)
        self.head = nn.Linear(width * (self.side // 2) ** 2, n_classes)

    def forward(self, x):
        x = x.reshape(x.shape[0], 1, self.side, self.side)
        x = self.block(F.relu(self.bn(self.stem(x))))
        return self.head(F.max_pool2d(x, 2).flatten(1))


def small_resnet(*, input_shape, n_classes, width=4):
    """A factory, as a user may give one instead of a class."""
    return ResNet(input_shape, n_classes, width)


class BNMLP(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> head: the smallest model with one BatchNorm layer."""

    def __init__(self, input_shape, n_classes, hidden=2):
        super().__init__()
        self.body = nn.Linear(math.prod(input_shape), hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.body(x.flatten(1)))))


class DropoutMLP(nn.Module):
    def __init__(self, input_shape, n_classes, hidden=8, p=0.5):
        super().__init__()
        self.body = nn.Linear(math.prod(input_shape), hidden)
        self.drop = nn.Dropout(p)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x):
        return self.head(self.drop(F.relu(self.body(x.flatten(1)))))


class Counting(nn.Module):
    """Counts its calls in an integer buffer, in place: torch.func's grad refuses that."""

    def __init__(self, input_shape, n_classes, hidden=8):
        super().__init__()
        self.body = nn.Linear(math.prod(input_shape), hidden)
        self.head = nn.Linear(hidden, n_classes)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls.add_(1)
        return self.head(F.relu(self.body(x.flatten(1))))


class Scaled(nn.Module):
    """A constant float buffer (per-feature scales) that training never changes."""

    def __init__(self, input_shape, n_classes, hidden=8):
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, math.prod(input_shape)))
        self.body = nn.Linear(math.prod(input_shape), hidden)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x):
        return self.head(F.relu(self.body(x.flatten(1) * self.scale)))


class Smoothed(nn.Module):
    """Keeps a running mean of its inputs by assigning a new tensor to its buffer (not in place)."""

    def __init__(self, input_shape, n_classes):
        super().__init__()
        self.register_buffer("mean", torch.zeros(math.prod(input_shape)))
        self.head = nn.Linear(math.prod(input_shape), n_classes)

    def forward(self, x):
        x = x.flatten(1)
        if self.training:
            self.mean = 0.5 * self.mean + 0.5 * x.mean(0).detach()
        return self.head(x - self.mean)


class Headless(nn.Module):
    def __init__(self, input_shape, n_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(math.prod(input_shape), 4), nn.ReLU(), nn.Linear(4, n_classes))

    def forward(self, x):
        return self.net(x.flatten(1))


class HeadFirst(nn.Module):
    """Has a head attribute, but its parameters are not the last."""

    def __init__(self, input_shape, n_classes):
        super().__init__()
        self.head = nn.Linear(4, n_classes)
        self.body = nn.Linear(math.prod(input_shape), 4)

    def forward(self, x):
        return self.head(F.relu(self.body(x.flatten(1))))


class Broken(nn.Module):
    def __init__(self, input_shape, n_classes):
        super().__init__()
        self.head = nn.Linear(math.prod(input_shape), n_classes)

    def forward(self, x):
        raise ValueError("boom")


class WrongShape(nn.Module):
    def __init__(self, input_shape, n_classes):
        super().__init__()
        self.head = nn.Linear(math.prod(input_shape), 3)

    def forward(self, x):
        return self.head(x.flatten(1))


def not_a_model(input_shape, n_classes):
    return "a string"
'''


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """The folder holding hetfl_test_bnnets.py, on sys.path (as the registry leaves a config's folder)."""
    folder = tmp_path_factory.mktemp("user_models")
    (folder / f"{MODULE}.py").write_text(textwrap.dedent(SOURCE))
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))


@pytest.fixture
def nets(models_dir):
    import importlib

    return importlib.import_module(MODULE)


def user(name: str, **params) -> ModelConfig:
    return ModelConfig(name=f"{MODULE}:{name}", params=params)


def trainer_of(nets, cls: str, shape=(3,), classes=2, *, seed=0, **training) -> LocalTrainer:
    torch.manual_seed(seed)
    model = getattr(nets, cls)(shape, classes)
    return LocalTrainer(model, TrainingConfig(**{"lr": 0.1, "batch_size": 4, **training}), f"{MODULE}:{cls}")


def run_config(folder: Path, **changes) -> Path:
    """A digits run of the user's ResNet, named by import path in a config file next to the module."""
    raw = {
        "name": "resnet", "seed": 0, "rounds": 3, "checkpoint_every": 1,
        "data": {"dataset": "digits", "n_clients": 24, "partition": {"kind": "iid"}},
        "devices": {"compute": {"distribution": "constant", "median_flops": 2.0e8}},
        "model": {"name": f"{MODULE}:ResNet", "params": {"width": 4}},
        "training": {"lr": 0.1, "batch_size": 16, "local_steps": 4},
        "strategy": {"name": "fedavg", "clients_per_round": 20},
    }
    for key, value in changes.items():
        node, parts = raw, key.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    path = folder / f"config_{abs(hash(json.dumps(raw, sort_keys=True))) % 10**8}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def hetfl(*argv) -> int:
    return main([str(a) for a in argv])


def checkpoint(run: Path):
    return torch.load(run / "checkpoint.pt", weights_only=False)["state"]


# =========================================================================== built-ins through the same door
@pytest.mark.parametrize("name, direct", [
    ("logreg", lambda: LogisticRegression(64, 10, None)),
    ("mlp", lambda: MLP(64, [32, 16], 10, None)),
    ("cnn", lambda: CNN((1, 8, 8), [4, 8], 10, 12)),
])
def test_a_built_in_name_is_an_import_path_and_builds_the_models_of_before(name, direct):
    assert registry.KINDS["model"].builtins[name] == f"hetfl.models.zoo:{name}"
    assert registry.resolve("model", name, key="model.name").obj is getattr(zoo, name)
    torch.manual_seed(0)
    built = build_model(ModelConfig(name=name, hidden=[32, 16], channels=[4, 8]), (64,), 10,
                        feature_dim=12 if name == "cnn" else None)
    torch.manual_seed(0)
    expected = direct()
    assert type(built) is type(expected)
    assert list(built.state_dict()) == list(expected.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), expected.state_dict().values()))
    assert built.head is [m for m in built.modules() if isinstance(m, nn.Linear)][-1]  # the head protocol


def test_token_inputs_get_a_one_hot_prefix_with_the_same_state_dict_keys_and_tinylm_its_context():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", hidden=[8]), (5,), 3, vocab_size=4)
    assert isinstance(model, nn.Sequential) and isinstance(model[0], OneHot)
    assert list(model.state_dict()) == ["1.net.0.weight", "1.net.0.bias", "1.net.2.weight", "1.net.2.bias"]
    assert model.head is model[1].net[2]
    lm = build_model(ModelConfig(name="tinylm", d_model=16, n_heads=2, d_ff=8, n_layers=1), (12,), 256, vocab_size=256)
    assert lm.context == 12 and lm.vocab_size == 256 and lm.d_model == 16
    with pytest.raises(ConfigError, match=r"^model.name: tinylm reads token sequences"):
        build_model(ModelConfig(name="tinylm"), (12,), 10)


def test_a_user_class_or_factory_gets_what_its_signature_asks_for(nets):
    model = build_model(user("ResNet", width=3), (64,), 10)
    assert isinstance(model, nets.ResNet) and model.head.in_features == 3 * 4 * 4 and model.head.out_features == 10
    assert model(torch.zeros(2, 64)).shape == (2, 10)
    factory = build_model(user("small_resnet"), (16,), 4)
    assert isinstance(factory, nets.ResNet) and factory.head.in_features == 4 * 2 * 2 and factory.side == 4
    assert ArchitectureConfig(name=f"{MODULE}:ResNet", params={"width": 3}).label() == f"{MODULE}:ResNet(width=3)"


def test_model_errors_are_one_line_and_name_the_key_that_named_the_model(nets):
    with pytest.raises(ConfigError, match=rf"^model.zoo.1.name: {MODULE}:not_a_model returned str, not a torch.nn.Module"):
        build_model(ArchitectureConfig(name=f"{MODULE}:not_a_model"), (4,), 2, key="model.zoo.1.name")
    with pytest.raises(ConfigError, match=r"^model.name: .*:ResNet takes no parameter 'depth'"):
        build_model(user("ResNet", depth=3), (64,), 10)
    with pytest.raises(ConfigError, match=r"^model.zoo.0.name: cnn does not take token"):
        build_model(ArchitectureConfig(name="cnn"), (80,), 80, vocab_size=80, key="model.zoo.0.name")
    base = {"data": {"dataset": "digits", "n_clients": 4}, "strategy": {"clients_per_round": 2}}
    for cls, message in (("Broken", r"failed on one sample of shape \(64,\): ValueError: boom \(.*hetfl_test_bnnets.py"),
                         ("WrongShape", r"gives \(1, 3\) for one sample of shape \(64,\); expected logits of shape \(1, 10\)")):
        cfg = validate({**base, "model": {"name": f"{MODULE}:{cls}"}})
        with pytest.raises(ConfigError, match=rf"^model.name: {MODULE}:{cls} {message}") as err:
            build_federation(cfg)
        assert "\n" not in str(err.value)


# =========================================================================== buffers in the flat vector
def test_buffers_come_first_as_views_and_the_head_is_the_tail(nets):
    t = trainer_of(nets, "BNMLP")  # body 3->2, bn(2): running_mean, running_var; head 2->2
    bn = t.model.bn
    assert t.buffer_names == ["bn.running_mean", "bn.running_var"] and t.n_buffers == 4
    assert t.numel == 4 + (3 * 2 + 2) + (2 + 2) + (2 * 2 + 2)
    assert torch.equal(t.flat[:4], torch.tensor([0.0, 0.0, 1.0, 1.0]))  # BatchNorm's initial statistics
    assert bn.running_mean.data_ptr() == t.flat.data_ptr() and bn.running_var.data_ptr() == t.flat[2:].data_ptr()
    assert t.model.body.weight.data_ptr() == t.flat[4:].data_ptr()  # then the parameters, in parameters() order
    assert t.head_slice == slice(t.numel - 6, t.numel) and t.body_slice == slice(4, t.numel - 6)
    assert torch.equal(t.flat[t.head_slice], torch.cat([t.model.head.weight.reshape(-1), t.model.head.bias]).detach())
    assert bn.num_batches_tracked.dtype == torch.long  # an integer buffer: not federated
    t.load(torch.arange(t.numel, dtype=torch.float32))
    assert torch.equal(bn.running_mean, torch.tensor([0.0, 1.0])) and torch.equal(bn.weight.detach(), torch.tensor([12.0, 13.0]))


def test_one_step_moves_the_running_statistics_as_batchnorm_defines_them(nets):
    # BatchNorm1d (momentum 0.1) in training: normalises by the batch's mean and biased variance, and updates
    # running_mean <- 0.9 running_mean + 0.1 mean,  running_var <- 0.9 running_var + 0.1 var_unbiased
    # with the statistics of its input h = body(x) at the step's starting weights (the forward precedes the update).
    t = trainer_of(nets, "BNMLP", batch_size=4, lr=0.1)
    x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [3.0, 1.0, 0.0], [-1.0, 2.0, 1.0]])
    y = torch.tensor([0, 1, 1, 0])
    w0 = t.flat.clone()
    with torch.no_grad():
        h = x @ t.model.body.weight.T + t.model.body.bias
    result = t.train(w0, x, y, steps=1, seed=0)
    assert torch.allclose(result.params[:2], 0.1 * h.mean(0), atol=1e-6)
    assert torch.allclose(result.params[2:4], 0.9 + 0.1 * h.var(0, unbiased=True), atol=1e-6)
    assert torch.equal(t.grad[:4], torch.zeros(4))  # the gradient has nothing for buffers
    # evaluation uses those statistics (eval mode): head(relu(bn_w (h - mean) / sqrt(var + eps) + bn_b))
    t.load(result.params)
    m = t.model
    with torch.no_grad():
        hh = x @ m.body.weight.T + m.body.bias
        z = torch.relu(m.bn.weight * (hh - m.bn.running_mean) / torch.sqrt(m.bn.running_var + m.bn.eps) + m.bn.bias)
        expected = z @ m.head.weight.T + m.head.bias
    assert torch.allclose(t.predict(result.params, x), expected, atol=1e-6)
    assert not t.model.training


def test_the_model_trains_in_train_mode_and_is_in_eval_mode_otherwise(nets):
    t = trainer_of(nets, "BNMLP")
    modes = []
    t.model.bn.register_forward_hook(lambda module, inputs, output: modes.append(module.training))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    assert not t.model.training
    t.train(t.initial, x, y, steps=2, seed=0)
    t.predict(t.initial, x)
    t.features(x)
    assert modes == [True, True, False, False] and not t.model.training


def test_random_layers_are_seeded_per_task_and_leave_the_callers_stream_alone(nets):
    t = trainer_of(nets, "DropoutMLP", shape=(6,), classes=3)
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = t.train(t.initial, x, y, steps=3, seed=7).params
    assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is where it was
    b = t.train(t.initial, x, y, steps=3, seed=7).params
    c = t.train(t.initial, x, y, steps=3, seed=8).params
    assert torch.equal(a, b) and not torch.equal(a, c)
    no_dropout = trainer_of(nets, "DropoutMLP", shape=(6,), classes=3)
    no_dropout.model.drop.p = 0.0
    assert not torch.equal(a, no_dropout.train(no_dropout.initial, x, y, steps=3, seed=7).params)  # dropout did act


def test_a_models_failure_in_training_is_one_line_naming_it(nets):
    t = trainer_of(nets, "BNMLP")
    lonely = ClientData(0, torch.randn(1, 3), torch.tensor([1]))  # BatchNorm cannot normalise one sample
    with pytest.raises(HetflError, match=rf"^model {MODULE}:BNMLP: training step 1 of 2 \(a batch of 1 sample\) "
                                         r"failed: ValueError: Expected more than 1 value per channel") as err:
        t.train(t.initial, lonely.x, lonely.y, steps=2, seed=0)
    assert "\n" not in str(err.value)
    assert not t.model.training
    assert t.predict(t.initial, lonely.x).shape == (1, 2)  # in eval mode one sample is fine: running statistics


def test_a_buffer_replaced_rather_than_updated_in_place_still_lands_in_the_flat_vector(nets):
    t = trainer_of(nets, "Smoothed")
    x, y = torch.ones(4, 3), torch.tensor([0, 1, 0, 1])
    result = t.train(t.initial, x, y, steps=2, seed=0)
    assert torch.equal(result.params[:3], torch.full((3,), 0.75))  # 0 -> 0.5 -> 0.75
    assert t.model.mean.data_ptr() == t.flat.data_ptr()  # the module holds the view again
    t.load(torch.zeros(t.numel))
    assert torch.equal(t.model.mean, torch.zeros(3))


def test_bytes_count_the_buffers(nets):
    from hetfl.models import model_bytes

    t = trainer_of(nets, "BNMLP")
    assert model_bytes(t.model) == 4 * t.numel == 4 * (4 + 8 + 4 + 6)


# =========================================================================== the head protocol
def test_strategies_that_split_off_the_head_refuse_a_model_without_one_and_the_others_take_it(nets):
    headless = trainer_of(nets, "Headless")
    assert headless.head is None
    for strategy in (FedPer(), FedRep(), LGFedAvg(), FedProto(), FedGH(), AdapterFL(), PFedGate()):
        with pytest.raises(ConfigError, match=rf"^model.name: .*{MODULE}:Headless has no classifier head .*`head` "
                                              "attribute") as err:
            strategy.check_models([headless])
        assert "\n" not in str(err.value)
    for strategy in (FedAvg(), FML(), LocalOnly(), Ditto(), PFedGate(dense_head=False)):
        strategy.check_models([headless])
    head_first = trainer_of(nets, "HeadFirst")
    with pytest.raises(ConfigError, match="`head` whose parameters are not the last of model.parameters"):
        head_first.head_slice
    with pytest.raises(ConfigError, match="not the last"):
        LGFedAvg().check_models([head_first])


def test_a_user_head_is_the_trainers_head_and_shares_prototypes(nets):
    t = trainer_of(nets, "BNMLP")
    assert t.head is t.model.head
    data = ClientData(0, torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1]))
    features, logits = t.features(data.x)  # eval mode: running statistics
    with torch.no_grad():
        m = t.model
        expected = torch.relu(m.bn.weight * (data.x @ m.body.weight.T + m.body.bias - m.bn.running_mean)
                              / torch.sqrt(m.bn.running_var + m.bn.eps) + m.bn.bias)
    assert torch.allclose(features, expected, atol=1e-6)


# =========================================================================== batched training
def test_batched_grad_on_a_batchnorm_resnet_is_the_crash_the_probe_prevents(nets):
    t = trainer_of(nets, "ResNet", shape=(16,), classes=3)
    nb = t.n_buffers
    rows = torch.stack([t.initial, t.initial])
    x, y = torch.randn(2, 4, 16), torch.randint(0, 3, (2, 4))
    t.set_mode(True)
    try:
        with pytest.raises(RuntimeError, match="in-place operation"):
            batched_grad(t, masked=False)(rows[:, nb:], rows[:, :nb], x, y)
    finally:
        t.set_mode(False)
    torch.manual_seed(5)
    before, flat = torch.get_rng_state(), t.flat.clone()
    problem = t.batching_problem(x[0], y[0])
    assert problem.startswith("its training-mode forward changes its buffers (bn.running_mean, bn.running_var, ")
    assert torch.equal(t.flat, flat) and torch.equal(torch.get_rng_state(), before)  # the probe leaves no trace
    assert t.batching_problem(None, None) is problem  # probed once, cached


@pytest.mark.parametrize("cls, reason", [
    ("DropoutMLP", r"^torch.func cannot batch its gradient \(vmap: called random operation"),
    ("Counting", r"^torch.func cannot batch its gradient \(During a grad .* in-place operation"),
])
def test_the_probe_names_why_a_model_cannot_be_batched(nets, cls, reason):
    t = trainer_of(nets, cls, shape=(6,), classes=3)
    assert t.batching_problem(torch.randn(5, 6), torch.randint(0, 3, (5,))) is not None
    assert re.match(reason, t.batching_problem(None, None))


def test_constant_buffers_are_batched_and_match_sequential_training(nets):
    t = trainer_of(nets, "Scaled", shape=(6,), classes=3, momentum=0.9, weight_decay=1e-2)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (5, 9, 3)]
    assert t.batching_problem(*data[0]) is None and t.n_buffers == 6
    starts = t.initial + 0.1 * torch.randn(3, t.numel, generator=g)
    steps, seeds = [3, 5, 2], [1, 2, 3]
    batched = train_many(t, starts, data, steps, seeds, prox_mu=0.1)
    for k, (x, y) in enumerate(data):
        alone = t.train(starts[k], x, y, steps=steps[k], seed=seeds[k], prox_mu=0.1)
        assert torch.allclose(batched[k].params, alone.params, atol=1e-5, rtol=1e-4)
        assert torch.equal(batched[k].params[:6], starts[k, :6])  # buffers held, not decayed


# =========================================================================== personalised strategies keep buffers
def task(params: torch.Tensor, steps: int = 2, client: int = 0) -> Task:
    return Task(task_id=0, client_id=client, version=0, params=params, steps=steps, dispatched_at=0.0)


def spy(trainer: LocalTrainer) -> list[torch.Tensor]:
    starts, train = [], trainer.train

    def recording(params, *args, **kwargs):
        starts.append(params.clone())
        return train(params, *args, **kwargs)

    trainer.train = recording
    return starts


@pytest.mark.parametrize("cls", [FedPer, FedRep])
def test_fedper_and_fedrep_keep_the_head_and_the_buffers_on_the_client(nets, cls):
    t = trainer_of(nets, "BNMLP")
    starts = spy(t)
    data = ClientData(0, torch.randn(8, 3), torch.tensor([0, 1] * 4))
    strategy, state = cls(head_steps=2) if cls is FedRep else cls(), {}
    first = strategy.client_train(t, task(t.initial), data, state, seed=0)
    assert torch.equal(state["buffers"], first.params[:4]) and not torch.equal(first.params[:4], t.initial[:4])
    assert torch.equal(state["head"], first.params[t.head_slice])
    glob = t.initial + 1.0
    strategy.client_train(t, task(glob), data, state, seed=1)
    second = starts[2 if cls is FedRep else 1]
    assert torch.equal(second[:4], first.params[:4]) and torch.equal(second[t.head_slice], first.params[t.head_slice])
    assert torch.equal(second[t.body_slice], glob[t.body_slice])  # the global body
    personal = strategy.personal_params(t, glob, data, state, 0)
    assert torch.equal(personal[:4], state["buffers"]) and torch.equal(personal[t.body_slice], glob[t.body_slice])


def test_fedrep_takes_the_buffers_of_its_body_phase(nets):
    t = trainer_of(nets, "BNMLP")
    data = ClientData(0, torch.randn(8, 3), torch.tensor([0, 1] * 4))
    ends = []
    train = t.train
    t.train = lambda *a, **k: ends.append(train(*a, **k)) or ends[-1]
    result = FedRep(head_steps=3).client_train(t, task(t.initial), data, {}, seed=0)
    head_phase, body_phase = ends
    assert torch.equal(result.params[:4], body_phase.params[:4]) and not torch.equal(head_phase.params[:4],
                                                                                     body_phase.params[:4])


def test_pfedgate_keeps_each_clients_buffers_with_its_gate(nets):
    t = trainer_of(nets, "BNMLP", shape=(6,))
    data = ClientData(0, torch.randn(8, 6), torch.tensor([0, 1] * 4))
    strategy, state = PFedGate(sparsity=0.9), {}
    result = strategy.client_train(t, task(t.initial), data, state, seed=0)
    assert torch.equal(state["buffers"], result.params[:4]) and not torch.equal(result.params[:4], t.initial[:4])
    personal = strategy.personal_params(t, t.initial, data, state, 0)
    assert torch.equal(personal[:4], state["buffers"])


def test_models_kept_whole_keep_their_buffers(nets):
    t = trainer_of(nets, "BNMLP")
    data = ClientData(0, torch.randn(8, 3), torch.tensor([0, 1] * 4))
    state = {}
    LGFedAvg().client_train(t, task(t.initial[t.head_slice].clone()), data, state, seed=0)
    assert not torch.equal(state["model"][:4], t.initial[:4])
    personal = LGFedAvg().personal_params(t, torch.zeros(6), data, state, 0)
    assert torch.equal(personal[:4], state["model"][:4])
    ditto = {}
    Ditto(lam=0.5).client_train(t, task(t.initial), data, ditto, seed=0)
    assert not torch.equal(ditto["v"][:4], t.initial[:4])


# =========================================================================== FedAvg averages buffers; whole runs
def test_fedavg_averages_the_buffers_sample_weighted(nets):
    t = trainer_of(nets, "BNMLP")
    a, b = t.initial.clone(), t.initial.clone()
    a[:4], b[:4] = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([5.0, 6.0, 7.0, 8.0])
    updates = [Update(task=task(t.initial), params=p, n_samples=n, steps=1, loss=0.0, arrived_at=0.0)
               for p, n in ((a, 1), (b, 3))]
    server = SimpleNamespace(params=t.initial)
    assert torch.allclose(FedAvg().aggregate(server, updates)[:4], torch.tensor([4.0, 5.0, 6.0, 7.0]))


def test_a_user_resnet_by_import_path_trains_end_to_end_and_averages_its_buffers(models_dir, tmp_path, capsys):
    config = run_config(models_dir, rounds=4, training__vectorize="off")
    out = tmp_path / "run"
    assert hetfl("run", config, "--out", out, "--quiet") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["architectures"] == [f"{MODULE}:ResNet(width=4)"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["accuracy"] > records[0]["accuracy"] + 0.5
    fed = build_federation(validate(yaml.safe_load(config.read_text()), base_dir=models_dir))
    trainer = fed.trainer
    state = checkpoint(out)
    nb = trainer.n_buffers
    assert nb == 2 * 4 * 3  # three BatchNorm2d(4): running_mean and running_var
    assert not torch.equal(state.params[:nb], trainer.initial[:nb])  # the global statistics moved
    # every transfer carries the buffers with the parameters, both ways
    assert summary["bytes_down"] == sum(summary["tasks_per_client"]) * trainer.numel * 4
    assert summary["bytes_up"] == summary["updates"] * trainer.numel * 4


def test_vectorize_auto_falls_back_with_one_notice_and_on_refuses(models_dir, tmp_path, capsys, caplog):
    config = run_config(models_dir)  # 20 clients a round, vectorize auto: a batch of 20 would be tried
    with caplog.at_level(logging.WARNING, logger="hetfl"):
        assert hetfl("run", config, "--out", tmp_path / "auto", "--quiet") == 0
    notices = [r for r in caplog.records if r.name == "hetfl"]
    assert len(notices) == 1
    assert notices[0].getMessage().startswith(
        f"training.vectorize: auto trains {MODULE}:ResNet(width=4) one task at a time: its training-mode forward "
        "changes its buffers (bn.running_mean")
    assert hetfl("run", config, "--out", tmp_path / "off", "--quiet", "--set", "training.vectorize=off") == 0
    assert torch.equal(checkpoint(tmp_path / "auto").params, checkpoint(tmp_path / "off").params)
    capsys.readouterr()
    assert hetfl("run", config, "--out", tmp_path / "on", "--quiet", "--set", "training.vectorize=on") != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "training.vectorize: on, but hetfl_test_bnnets:ResNet(width=4) cannot be trained batched: its " \
           "training-mode forward changes its buffers" in err
    assert not (tmp_path / "on").exists()  # refused before anything was written
