"""FedSA (arXiv:2501.05496): the anchor contrast (RMCL), the classifier calibration (CC) and the anchors' moving
average, on cases worked out by hand; a client without a class; a zoo of two architectures."""

import math
from types import SimpleNamespace

import pytest
import torch

from hetfl.config import ArchitectureConfig, TrainingConfig
from hetfl.models import build_model
from hetfl.strategies import STRATEGIES, Task, Update
from hetfl.strategies.base import ClientData
from hetfl.strategies.fedsa import FedSA, anchor_calibration, anchor_contrast, anchor_update
from hetfl.strategies.hetero import pack_prototypes, unpack_prototypes
from hetfl.training import LocalTrainer
from tests.test_hetero import two_architecture_simulator
from tests.conftest import run_rounds


def update(params, n=1):
    task = Task(task_id=0, client_id=0, version=0, params=torch.zeros(0), steps=1, dispatched_at=0.0)
    return Update(task=task, params=params, n_samples=n, steps=1, loss=0.0, arrived_at=0.0)


def identity_trainer(d=2, classes=3, lr=0.1):
    """A logreg whose representation is its input: features = x."""
    torch.manual_seed(0)
    return LocalTrainer(build_model(ArchitectureConfig(name="logreg"), (d,), classes), TrainingConfig(lr=lr))


def test_anchor_contrast_by_hand():
    # anchors a0 = (0, 0), a1 = (3, 4); margin 1.
    # h = (0, 0), y = 0: distances (0 + 1, 5): -log(e^-1 / (e^-1 + e^-5)) = log(1 + e^-4)
    # h = (3, 0), y = 1: distances (3, 4 + 1):  -log(e^-5 / (e^-3 + e^-5)) = log(1 + e^2)
    anchors = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    h, y = torch.tensor([[0.0, 0.0], [3.0, 0.0]]), torch.tensor([0, 1])
    by_hand = (math.log1p(math.exp(-4)) + math.log1p(math.exp(2))) / 2
    assert float(anchor_contrast(h, y, anchors, 1.0)) == pytest.approx(by_hand, rel=1e-6)
    # the margin only ever raises the loss of the own class: margin 0 gives log(1 + e^-5) and log(1 + e^1)
    assert float(anchor_contrast(h, y, anchors, 0.0)) == pytest.approx((math.log1p(math.exp(-5)) + math.log1p(math.e)) / 2)


def test_anchor_calibration_by_hand():
    # head W = I, b = 0: logits of a0 = (0, 0) are (0, 0): CE log 2; of a1 = (3, 4), label 1: log(1 + e^-1)
    head = torch.nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    anchors = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    with torch.no_grad():
        loss = anchor_calibration(head, anchors)
    assert float(loss) == pytest.approx((math.log(2) + math.log1p(math.exp(-1))) / 2)


def test_anchors_move_by_the_moving_average_of_the_global_prototypes():
    # client a: class 0 at (1, 1) from 1 sample, class 1 at (4, 0) from 3; client b: class 0 at (5, 5) from 3.
    # global prototypes: P0 = (1*(1,1) + 3*(5,5)) / 4 = (4, 4), P1 = (4, 0); class 2: nobody.
    # rho = 0.9: a0 = 0.9 (0, 0) + 0.1 (4, 4) = (0.4, 0.4); a1 = 0.9 (3, 4) + 0.1 (4, 0) = (3.1, 3.6); a2 kept
    a = pack_prototypes(torch.tensor([[1.0, 1.0], [4.0, 0.0], [0.0, 0.0]]), torch.tensor([1.0, 3.0, 0.0]))
    b = pack_prototypes(torch.tensor([[5.0, 5.0], [0.0, 0.0], [0.0, 0.0]]), torch.tensor([3.0, 0.0, 0.0]))
    old = pack_prototypes(torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]]), torch.tensor([0.0, 0.0, 7.0]))
    server = SimpleNamespace(params=old, trainer=identity_trainer())
    anchors, counts = unpack_prototypes(FedSA(rho=0.9).aggregate(server, [update(a), update(b)]), 3)
    assert torch.allclose(anchors, torch.tensor([[0.4, 0.4], [3.1, 3.6], [1.0, 1.0]]))
    assert torch.equal(counts, torch.tensor([4.0, 3.0, 7.0]))
    # rho = 0: the anchors become the round's global prototypes
    assert torch.equal(anchor_update(torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([1.0, 0.0]), 0.0),
                       torch.tensor([[1.0, 1.0], [0.0, 0.0]]))


def test_initial_anchors_are_the_unit_rows_of_the_initial_head():
    trainer = identity_trainer()
    anchors, counts = unpack_prototypes(FedSA().initial_params(trainer), 3)
    weight = trainer.initial[trainer.head_slice][:6].reshape(3, 2)
    assert torch.allclose(anchors, weight / weight.norm(dim=1, keepdim=True))
    assert torch.equal(counts, torch.zeros(3))


def test_calibration_teaches_the_head_a_class_the_client_does_not_hold():
    # the client holds classes 0 and 1 only; anchor 2 lies where both score high. Classifier calibration alone
    # (no contrast) trains the head on the anchors, so it classifies anchor 2 as class 2 without a sample of it.
    trainer = identity_trainer(lr=0.5)
    anchors = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 4.0]])
    data = ClientData(0, torch.tensor([[4.0, 0.5], [0.5, 4.0]] * 4), torch.tensor([0, 1] * 4))
    task = Task(task_id=0, client_id=0, version=0, params=pack_prototypes(anchors, torch.zeros(3)), steps=30,
                dispatched_at=0.0)
    state = {}
    result = FedSA(contrast=0.0, calibration=1.0).client_train(trainer, task, data, state, seed=0)
    assert torch.equal(trainer.predict(state["model"], anchors).argmax(1), torch.tensor([0, 1, 2]))
    prototypes, counts = unpack_prototypes(result.params, 3)
    assert torch.equal(counts, torch.tensor([4.0, 4.0, 0.0]))  # what it sends: its prototypes, class 2 empty
    assert torch.allclose(prototypes[:2], torch.tensor([[4.0, 0.5], [0.5, 4.0]]))
    # without calibration, cross-entropy on classes 0 and 1 never raises class 2's logit above theirs at anchor 2
    state = {}
    FedSA(contrast=0.0, calibration=0.0).client_train(trainer, task, data, state, seed=0)
    assert trainer.predict(state["model"], anchors).argmax(1)[2] != 2


def test_two_architectures_share_anchors_and_keep_their_own_models():
    sim = run_rounds(two_architecture_simulator(FedSA(clients_per_round=2)), 2)
    anchors, counts = unpack_prototypes(sim.params, 3)
    assert sim.params.numel() == 3 * 4 + 3  # C x d anchors and C counts: what travels each way
    assert sim.counters.bytes_down == sim.counters.bytes_up == 4 * sim.params.numel() * sim.counters.tasks
    assert counts.sum() == 16  # every sample of the round's two clients is behind some anchor
    assert sim.personal_model(1)[0].label == "mlp"


@pytest.mark.parametrize("params", [{"margin": -1.0}, {"contrast": -1.0}, {"calibration": -0.5}, {"rho": 1.0}])
def test_bad_parameters_are_refused(params):
    with pytest.raises(ValueError):
        FedSA(**params)


def test_registered_under_its_name():
    assert STRATEGIES["fedsa"] is FedSA
