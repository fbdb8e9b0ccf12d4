"""Every examples/*.yaml is a valid config (the models it names build on its data's shapes where that is cheap)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hetfl.config import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_the_examples_are_found():
    names = {p.name for p in EXAMPLES}
    assert {"quickstart.yaml", "mnist1d.yaml", "synthetic_0_0.yaml", "synthetic_05_05.yaml", "synthetic_1_1.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates(path):
    cfg = load_config(path)
    assert cfg.rounds >= 1


@pytest.mark.parametrize("tag, alpha", [("0_0", 0.0), ("05_05", 0.5), ("1_1", 1.0)])
def test_the_fedprox_synthetic_settings(tag, alpha):
    cfg = load_config(EXAMPLES[0].parent / f"synthetic_{tag}.yaml")
    assert (cfg.data.synthetic.alpha, cfg.data.synthetic.beta) == (alpha, alpha)
    assert cfg.data.n_clients == 30 and cfg.model.name == "logreg" and cfg.strategy.clients_per_round == 10
    assert (cfg.training.lr, cfg.training.batch_size, cfg.training.local_epochs) == (0.01, 10, 20)


def test_the_mnist1d_example():
    cfg = load_config(EXAMPLES[0].parent / "mnist1d.yaml")
    assert cfg.data.dataset == "mnist1d" and cfg.data.params["num_samples"] == 40000
    assert cfg.model.label() == "cnn1d[32,32,32]" and cfg.data.partition.kind == "dirichlet"


def test_the_cross_silo_mnist1d_example_maps_exponential_step_times_onto_devices():
    import csv
    import math

    from hetfl.models.cost import flops_per_sample, training_flops
    from hetfl.models.zoo import build_model

    cfg = load_config(EXAMPLES[0].parent / "mnist1d_cross_silo.yaml")
    assert cfg.data.n_clients == 10 and cfg.data.partition.alpha == 0.1 and cfg.evaluation.every_s is not None
    # a speed-1.0 device takes one simulated second per step: median_flops is one cnn1d step at batch 32
    model = build_model(cfg.model, (40,), 10)
    assert cfg.devices.compute.median_flops == pytest.approx(training_flops(flops_per_sample(model, (40,)), 32), rel=1e-5)
    with open(EXAMPLES[0].parent / cfg.devices.trace) as f:
        speeds = [float(row["speed"]) for row in csv.DictReader(f)]
    # device i's time per step is the (i + 1) / 11 quantile of Exp(1): by hand, ln(11/10) = 0.0953 and ln(11) = 2.398
    assert 1 / speeds[0] == pytest.approx(math.log(11 / 10), rel=1e-5)
    assert 1 / speeds[-1] == pytest.approx(math.log(11), rel=1e-5)
    assert [1 / s for s in speeds] == pytest.approx([-math.log(1 - (i + 1) / 11) for i in range(10)], rel=1e-5)
