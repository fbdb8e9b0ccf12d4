"""Local trainer and evaluator on cases small enough to check by hand."""

import numpy as np
import pytest
import torch

from hetfl.config import ModelConfig, TrainingConfig
from hetfl.errors import DivergedError
from hetfl.models import build_model
from hetfl.training import LocalTrainer
from hetfl.training.evaluate import Evaluator


def logreg_trainer(**training) -> LocalTrainer:
    torch.manual_seed(0)
    return LocalTrainer(build_model(ModelConfig(name="logreg"), (3,), 3), TrainingConfig(**training))


def test_steps_from_epochs_round_up():
    t = logreg_trainer(batch_size=10, local_epochs=1.5)
    assert t.steps_for(25) == 4  # ceil(1.5 * 25 / 10)
    assert logreg_trainer(local_steps=7).steps_for(25) == 7


def test_parameters_and_gradients_live_in_the_flat_buffers():
    t = logreg_trainer()
    new = torch.arange(12, dtype=torch.float32)
    t.flat.copy_(new)
    weight, bias = list(t.model.parameters())
    assert torch.equal(weight.detach().reshape(-1), new[:9]) and torch.equal(bias.detach(), new[9:])
    t.grad.zero_()
    t.model(torch.ones(1, 3)).sum().backward()
    assert t.grad.abs().sum() > 0  # autograd accumulated into the flat gradient


def test_same_seed_same_result_and_the_input_model_is_not_modified():
    t = logreg_trainer(batch_size=2)
    x, y = torch.randn(10, 3), torch.randint(0, 3, (10,))
    start = torch.zeros(12)
    a = t.train(start, x, y, steps=6, seed=5)
    b = t.train(start, x, y, steps=6, seed=5)
    c = t.train(start, x, y, steps=6, seed=6)
    assert torch.equal(a.params, b.params) and not torch.equal(a.params, c.params)
    assert torch.equal(start, torch.zeros(12))


def test_correction_shifts_every_step_like_scaffold():
    # with a zero learning signal (lr applies to grad + correction), one SGD step moves by -lr * correction
    t = logreg_trainer(lr=0.5, batch_size=4)
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    start = torch.zeros(12)
    plain = t.train(start, x, y, steps=1, seed=0).params
    corr = torch.linspace(-1, 1, 12)
    shifted = t.train(start, x, y, steps=1, seed=0, correction=corr).params
    assert torch.allclose(shifted - plain, -0.5 * corr, atol=1e-6)


def test_divergence_is_a_clear_error():
    t = logreg_trainer(lr=1e30)
    x, y = torch.randn(8, 3) * 1e10, torch.randint(0, 3, (8,))
    with pytest.raises(DivergedError, match="training.lr"):
        t.train(torch.zeros(12), x, y, steps=20, seed=0)


def test_evaluator_overall_and_per_client_accuracy_by_hand():
    # logits = x (identity weights, zero bias): the prediction is the argmax feature
    t = logreg_trainer()
    params = torch.cat([torch.eye(3).reshape(-1), torch.zeros(3)])
    x = torch.eye(3)[[0, 1, 2, 0, 1, 2]]
    y = torch.tensor([0, 1, 0, 0, 2, 2])  # correct: samples 0, 1, 3, 5
    ev = Evaluator.from_splits(t, x, y, [np.array([0, 1]), np.array([2, 3, 4, 5])])
    m = ev(params)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["client_acc_mean"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["client_acc_min"] == pytest.approx(0.5)
    assert m["client_acc_p10"] == pytest.approx(np.percentile([1.0, 0.5], 10))
