"""FedConv (hetfl.strategies.fedconv): its convolutions, dilation, aggregation and cost, worked by hand."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import make_simulator, profile, run_rounds, write_config
from hetfl.cli import EXIT_USER_ERROR, main
from hetfl.errors import ConfigError
from hetfl.models.zoo import CNN, MLP
from hetfl.strategies.fedconv import (
    FedConv, Piece, check_chain, compress, delta_kernel, dilate, expand, mixed, plan, shrink, sub_model,
)

W = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
KERNEL = torch.tensor([[1.0, 1.0], [0.0, 1.0]]).reshape(1, 1, 2, 2)
PIECE = Piece("w", (3, 3), (2, 2), (3, 3, 1), (2, 2, 1))  # a 3 x 3 weight, 2 x 2 in the sub-model


def test_compression_is_a_valid_convolution_of_the_weight_matrix_worked_by_hand():
    # out[i, j] = W[i, j] + W[i, j+1] + W[i+1, j+1]: 1+2+5, 2+3+6, 4+5+8, 5+6+9
    assert PIECE.kernel == (1, 1, 2, 2)
    assert shrink(W, PIECE, KERNEL).tolist() == [[8.0, 11.0], [17.0, 20.0]]
    # the delta kernel slices the first rows and columns (HeteroFL's static sub-model)
    assert shrink(W, PIECE, delta_kernel(PIECE)).tolist() == [[1.0, 2.0], [4.0, 5.0]]


def test_dilation_is_the_transposed_convolution_worked_by_hand():
    # out[i+a, j+b] += s[i, j] k[a, b] with k = [[1, 1], [0, 1]]: e.g. out[1, 1] = s11 k00 + s10 k01 + s00 k11 = 4+3+1
    small = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = dilate(small, PIECE, KERNEL)
    assert out.shape == (3, 3)
    assert out.tolist() == [[1.0, 3.0, 2.0], [3.0, 8.0, 6.0], [0.0, 3.0, 4.0]]
    assert dilate(small, PIECE, delta_kernel(PIECE)).tolist() == [[1.0, 2.0, 0.0], [3.0, 4.0, 0.0], [0.0] * 3]


def test_a_sub_model_change_is_dilated_onto_the_global_model_it_started_from():
    # sent: W sliced, [[1, 2], [4, 5]]; trained to [[2, 2], [4, 6]]: change [[1, 0], [0, 1]], dilated by
    # [[1, 1], [0, 1]] to [[1, 1, 0], [0, 2, 1], [0, 0, 1]], added to W
    sent = shrink(W, PIECE, delta_kernel(PIECE))
    task = SimpleNamespace(params=W.reshape(-1), payload={"model": sent.reshape(-1)})
    update = SimpleNamespace(task=task, params=torch.tensor([2.0, 2.0, 4.0, 6.0]))
    out = FedConv.dilated(update, [PIECE], [KERNEL]).reshape(3, 3)
    assert out.tolist() == [[2.0, 3.0, 3.0], [4.0, 7.0, 7.0], [7.0, 8.0, 10.0]]
    # with the delta kernel, what the client lacks keeps its global value (HeteroFL's sub-model update)
    kept = FedConv.dilated(update, [PIECE], [delta_kernel(PIECE)]).reshape(3, 3)
    assert kept.tolist() == [[2.0, 2.0, 3.0], [4.0, 6.0, 6.0], [7.0, 8.0, 9.0]]


def test_a_convolution_layer_has_one_kernel_per_position():
    # a (4, 2, 3, 3) convolution weight at ratio 0.5 is (2, 1, 3, 3): 9 kernels of (4-2+1) x (2-1+1)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    first = plan(model, 0.5)[0]
    assert (first.full, first.small, first.kernel) == ((4, 2, 3, 3), (2, 2, 3, 3), (9, 1, 3, 1))  # input channels kept
    kernels = [torch.randn(p.kernel) for p in plan(model, 0.5)]
    w = torch.randn(4, 2, 3, 3)
    out = shrink(w, first, kernels[0])
    k = kernels[0][4, 0]  # position (1, 1): its own kernel over (rows, columns) of that position
    assert torch.allclose(out[0, 1, 1, 1], (w[0:3, 1, 1, 1] * k[:, 0]).sum())


def test_aggregation_of_two_dilated_models_worked_by_hand():
    # a full model A and a half model B zero-padded: sample counts 1 and 3 weigh them 1/4 and 3/4; a learned logit
    # log 3 on A's size makes the weights 3/6 and 3/6
    a = torch.tensor([4.0, 4.0, 4.0, 4.0])
    b = torch.tensor([8.0, 0.0, 0.0, 0.0])  # B's one entry, padded
    models, counts = torch.stack([a, b]), torch.tensor([1.0, 3.0])
    assert mixed(models, counts, torch.zeros(2)).tolist() == pytest.approx([7.0, 1.0, 1.0, 1.0])
    assert mixed(models, counts, torch.tensor([math.log(3.0), 0.0])).tolist() == pytest.approx([6.0, 2.0, 2.0, 2.0])


def test_zero_padding_a_sub_model_keeps_its_function_for_mlp_and_cnn():
    torch.manual_seed(0)
    for model, x in ((MLP(4, [8, 6], 3), torch.randn(5, 4)), (CNN((1, 8, 8), [4, 8], 3), torch.randn(5, 64))):
        check_chain(model, "model")
        small = sub_model(model, 0.5)
        pieces = plan(model, 0.5)
        assert [tuple(p.shape) for p in small.parameters()] == [p.small for p in pieces]
        flat = torch.cat([p.detach().flatten() for p in small.parameters()])
        padded = expand(flat, pieces, [delta_kernel(p) for p in pieces])
        full = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert padded.numel() == full.numel()
        torch.nn.utils.vector_to_parameters(padded, model.parameters())
        assert torch.allclose(model(x), small(x), atol=1e-6)
        assert torch.equal(compress(padded, pieces, [delta_kernel(p) for p in pieces]), flat)  # slicing undoes it


def test_a_half_width_sub_model_is_charged_its_flops_and_bytes():
    # MLP 4 -> 8 -> 3: 4*8+8 + 8*3+3 = 67 parameters; at ratio 0.5, 4 -> 4 -> 3: 4*4+4 + 4*3+3 = 35, 140 bytes each
    # way. Forward FLOPs 2*(4*8 + 8*3) = 112 and 2*(4*4 + 4*3) = 56: half of the engine's 1e6 FLOPs a step
    strategy = FedConv(clients_per_round=2, ratios=[0.5, 1.0], server_steps=0)
    sim = make_simulator(strategy, [8, 8], [profile(0, speed=1.0), profile(1, speed=2.0)], model="mlp")
    assert strategy.forward_share(sim.trainer, 0.5) == pytest.approx(0.5)
    task = sim.dispatch(0, **strategy.configure(sim, 0))
    full = sim.dispatch(1, **strategy.configure(sim, 1))
    assert (task.bytes_up, strategy.transfer_bytes(sim, task)) == (140, (140, 140))
    assert strategy.transfer_bytes(sim, full) == (67 * 4, 67 * 4)
    assert task.flops == pytest.approx(0.5 * full.flops) and full.flops == pytest.approx(task.steps * 1e6)


def test_the_server_learns_on_public_samples_and_is_charged_for_it():
    from conftest import blobs

    strategy = FedConv(clients_per_round=4, ratios=[0.5, 1.0], server_steps=5, server_lr=0.05)
    x, y = blobs(64, seed=9)
    strategy.set_public(x, y)
    sim = make_simulator(strategy, [12] * 4, [profile(i, speed=1.0 + i) for i in range(4)], model="mlp")
    run_rounds(sim, 3)
    assert strategy._shrink[0.5] and not all(torch.equal(k, delta_kernel(p)) for k, p in
                                              zip(strategy._shrink[0.5], plan(sim.trainer.model, 0.5)))
    assert set(strategy.metrics()) >= {"fedconv_weight_0.5", "fedconv_weight_1"}
    # three commits' weighted means (2 FLOPs a parameter and update) and every learning step on top
    assert sim.server_time.work_flops > 3 * 2 * sim.params.numel() * 4


def test_ratios_by_compute_tier_and_a_missing_tier_names_the_key():
    strategy = FedConv(ratios={"low": 0.5, "high": 1.0})
    low, high = replace(profile(0), tier="low/wifi"), replace(profile(1), tier="high/wifi")
    assert strategy.resolve_ratios([low, high]).tolist() == [0.5, 1.0]
    high = replace(high, tier="mid/wifi")
    with pytest.raises(ConfigError, match="strategy.params.ratios"):
        strategy.check_devices([low, high])
    with pytest.raises(ValueError, match="ratios"):
        FedConv(ratios=[0.0, 1.0])


def test_a_model_with_batchnorm_or_without_a_hidden_width_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="BatchNorm"):
        check_chain(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), "bn")
    with pytest.raises(ConfigError, match="no hidden width"):
        check_chain(nn.Sequential(nn.Linear(4, 2)), "logreg")


def test_hetfl_run_takes_public_samples_from_the_validation_split(tmp_path, capsys):
    params = {"ratios": [0.5, 1.0], "public_samples": 16, "server_steps": 2}
    config = write_config(tmp_path, strategy__name="fedconv", strategy__params=params, model__name="mlp")
    assert main(["run", str(config), "--out", str(tmp_path / "no"), "--quiet"]) == EXIT_USER_ERROR
    assert "data.validation_fraction" in capsys.readouterr().err
    config = write_config(tmp_path, strategy__name="fedconv", strategy__params=params, model__name="mlp",
                          data__validation_fraction=0.2)
    assert main(["run", str(config), "--out", str(tmp_path / "yes"), "--quiet"]) == 0
