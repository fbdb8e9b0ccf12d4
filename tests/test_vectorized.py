"""Vectorised local training (train_many) against training the same tasks one by one.

Tolerance: ``torch.allclose(atol=1e-5, rtol=1e-4)`` between ``train_many`` and K sequential
``LocalTrainer.train`` calls. The arithmetic is the same, but not its order: vmap turns each
client's matrix products into one batched product (``bmm``, a grouped convolution for the CNN), and
a padded batch's loss is a masked sum divided by the count rather than ``F.cross_entropy``'s mean,
so float32 sums are added in another order (about 1e-7 relative each); over a few steps that stays
far below 1e-5. One client (K=1) agrees to within 1e-6.
"""

import math

import pytest
import torch

from hetfl.config import ModelConfig, TrainingConfig
from hetfl.errors import DivergedError
from hetfl.models import build_model
from hetfl.training import LocalTrainer
from hetfl.training.vectorized import train_many

ATOL, RTOL = 1e-5, 1e-4
FEATURES, CLASSES = 16, 3  # 16 features: the CNN sees 1x4x4 images
SIZES = [3, 20, 8, 13, 40]  # batch size 8: clients 0 (3 samples) and 2 (8) train on smaller or whole batches
STEPS = [4, 7, 2, 3, 9]
SEEDS = [5, 6, 7, 8, 9]


def make_trainer(model: str, **training) -> LocalTrainer:
    torch.manual_seed(0)
    net = build_model(ModelConfig(name=model, hidden=[8], channels=[4]), (FEATURES,), CLASSES)
    return LocalTrainer(net, TrainingConfig(**{"batch_size": 8, "lr": 0.1, **training}))


def clients(trainer: LocalTrainer, sizes=SIZES, seed: int = 1):
    """Each client's data, and starting parameters near the trainer's initial ones (a different row each)."""
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(n, FEATURES, generator=g), torch.randint(0, CLASSES, (n,), generator=g)) for n in sizes]
    starts = trainer.initial + 0.1 * torch.randn(len(sizes), trainer.numel, generator=g)
    return data, starts


def sequential(trainer: LocalTrainer, starts, data, steps, seeds, **kwargs):
    return [trainer.train(starts[k], x, y, steps=steps[k], seed=seeds[k], **kwargs) for k, (x, y) in enumerate(data)]


def assert_same(vectorised, one_by_one, atol=ATOL, rtol=RTOL):
    assert len(vectorised) == len(one_by_one)
    for k, (v, s) in enumerate(zip(vectorised, one_by_one)):
        assert v.steps == s.steps
        gap = (v.params - s.params).abs().max()
        assert torch.allclose(v.params, s.params, atol=atol, rtol=rtol), f"client {k}: largest difference {gap}"
        assert v.loss == pytest.approx(s.loss, rel=rtol, abs=atol), f"client {k}"


# ----------------------------------------------------------------------------- by hand
def test_one_step_from_zero_is_the_softmax_gradient_over_the_real_samples_only():
    # logreg from zero weights: logits 0, softmax uniform, so the gradient of the mean cross-entropy is
    # W: mean_i (1/C - onehot(y_i)) x_i^T and b: mean_i (1/C - onehot(y_i)); the loss is log C.
    # Client 0 has 3 samples in a batch padded to 8: its padding must not count.
    t = make_trainer("logreg")
    data, _ = clients(t, sizes=[3, 8])
    results = train_many(t, torch.zeros(2, t.numel), data, [1, 1], [0, 0], lr=0.5)
    for (x, y), r in zip(data, results):
        residual = torch.full((len(y), CLASSES), 1 / CLASSES) - torch.eye(CLASSES)[y]
        expected = -0.5 * torch.cat([(residual.T @ x / len(y)).reshape(-1), residual.mean(0)])
        assert torch.allclose(r.params, expected, atol=1e-6)
        assert r.loss == pytest.approx(math.log(CLASSES), rel=1e-6)


def test_a_client_with_no_steps_keeps_its_start_and_others_are_unaffected():
    t = make_trainer("mlp", momentum=0.9)
    data, starts = clients(t)
    steps = [0, *STEPS[1:]]
    results = train_many(t, starts, data, steps, SEEDS)
    assert torch.equal(results[0].params, starts[0]) and results[0].loss == 0.0 and results[0].steps == 0
    assert_same(results[1:], sequential(t, starts[1:], data[1:], steps[1:], SEEDS[1:]))


# ----------------------------------------------------------------------------- against LocalTrainer.train
OPTIMISERS = {
    "sgd": {},
    "sgd momentum": {"momentum": 0.9},
    "sgd momentum weight decay": {"momentum": 0.9, "weight_decay": 1e-2},
    "adam weight decay": {"optimizer": "adam", "weight_decay": 1e-2},
}


@pytest.mark.parametrize("model", ["logreg", "mlp", "cnn", "cnn1d"])
@pytest.mark.parametrize("optimiser", list(OPTIMISERS))
def test_matches_training_the_clients_one_by_one(model, optimiser):
    t = make_trainer(model, **OPTIMISERS[optimiser])
    data, starts = clients(t)
    assert_same(train_many(t, starts, data, STEPS, SEEDS), sequential(t, starts, data, STEPS, SEEDS))


@pytest.mark.parametrize("model", ["logreg", "mlp", "cnn"])
def test_fedprox_and_learning_rate_match(model):
    t = make_trainer(model, momentum=0.5, weight_decay=1e-3)
    data, starts = clients(t)
    vectorised = train_many(t, starts, data, STEPS, SEEDS, prox_mu=0.3, lr=0.05)
    assert_same(vectorised, sequential(t, starts, data, STEPS, SEEDS, prox_mu=0.3, lr=0.05))


def test_correction_and_grad_mask_match():
    # SCAFFOLD's correction per client (K, P), a FedRep-style mask shared by all (P,)
    t = make_trainer("mlp", momentum=0.9)
    data, starts = clients(t)
    corr = 0.01 * torch.randn(len(SIZES), t.numel, generator=torch.Generator().manual_seed(3))
    mask = (torch.arange(t.numel) % 3 != 0).float()
    vectorised = train_many(t, starts, data, STEPS, SEEDS, correction=corr, grad_mask=mask)
    one_by_one = [
        t.train(starts[k], x, y, steps=STEPS[k], seed=SEEDS[k], correction=corr[k], grad_mask=mask)
        for k, (x, y) in enumerate(data)
    ]
    assert_same(vectorised, one_by_one)


@pytest.mark.parametrize("model", ["logreg", "mlp", "cnn", "cnn1d"])
def test_one_client_agrees_to_1e_6(model):
    t = make_trainer(model, momentum=0.9, weight_decay=1e-3)
    data, starts = clients(t, sizes=[13])
    assert_same(train_many(t, starts, data, [6], [4]), sequential(t, starts, data, [6], [4]), atol=1e-6, rtol=0)


def test_leaves_its_inputs_and_the_trainer_alone():
    t = make_trainer("mlp")
    data, starts = clients(t)
    before, flat = starts.clone(), t.flat.clone()
    train_many(t, starts, data, STEPS, SEEDS, prox_mu=0.1)
    assert torch.equal(starts, before) and torch.equal(t.flat, flat)


# ----------------------------------------------------------------------------- errors
def test_divergence_names_the_client():
    t = make_trainer("logreg", lr=1e30)
    data, starts = clients(t)
    data[2] = (data[2][0] * 1e10, data[2][1])
    with pytest.raises(DivergedError, match="client"):
        train_many(t, starts, data, STEPS, SEEDS)


def test_shapes_are_checked():
    t = make_trainer("logreg")
    data, starts = clients(t)
    with pytest.raises(ValueError, match="starts"):
        train_many(t, starts[:2], data, STEPS, SEEDS)
    with pytest.raises(ValueError, match="steps and seeds"):
        train_many(t, starts, data, STEPS[:2], SEEDS)
    with pytest.raises(ValueError, match="correction"):
        train_many(t, starts, data, STEPS, SEEDS, correction=torch.zeros(3))
    assert train_many(t, starts[:0], [], [], []) == []
