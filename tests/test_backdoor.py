"""The backdoor attack (devices.byzantine.attack: backdoor) and norm bounding (strategy.aggregator.max_update_norm),
worked by hand on tiny tensors, then once end to end on digits."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hetfl.config import AggregatorConfig, ByzantineConfig, PrivacyConfig, validate
from hetfl.devices.byzantine import Byzantine, attack_success, stamp
from hetfl.errors import ConfigError
from hetfl.strategies import build_strategy
from hetfl.strategies.robust import Aggregation

BACKDOOR = ByzantineConfig(fraction=0.25, attack="backdoor", scale=10.0, target=0, poison_frac=0.5, trigger_size=2)


def test_the_trigger_sets_the_last_features_and_leaves_the_samples_alone():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    assert stamp(x, 2, 9.0).tolist() == [[1.0, 2.0, 9.0, 9.0], [5.0, 6.0, 9.0, 9.0]]
    assert x.tolist() == [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]  # a copy
    # an image (N, 1, 2, 2): the last pixels of the flattened image, i.e. the bottom row's right end
    image = torch.arange(8.0).reshape(2, 1, 2, 2)
    assert stamp(image, 1, -1.0)[:, 0].tolist() == [[[0.0, 1.0], [2.0, -1.0]], [[4.0, 5.0], [6.0, -1.0]]]


def test_the_boost_is_model_replacement_and_honest_clients_are_untouched():
    bd = Byzantine(BACKDOOR, n_clients=8, seed=0)
    assert len(bd.clients) == 2  # round(0.25 * 8)
    attacker, honest = min(bd.clients), min(set(range(8)) - bd.clients)
    start, trained = torch.tensor([1.0, 1.0, 0.0]), torch.tensor([2.0, 0.5, 0.0])  # d = (1, -0.5, 0)
    assert bd.returned(attacker, 0, start, trained).tolist() == [11.0, -4.0, 0.0]  # start + 10 d
    assert torch.equal(bd.returned(honest, 0, start, trained), trained)
    # FedAvg over 10 equal clients, 9 of them at the start model: start + (10 d) / 10 = the attacker's model
    mean = (9 * start + bd.returned(attacker, 0, start, trained)) / 10
    assert mean.tolist() == pytest.approx(trained.tolist())


def test_poisoning_copies_a_share_of_each_attackers_samples_and_relabels_them():
    bd = Byzantine(BACKDOOR, n_clients=4, seed=0)
    (attacker,) = bd.clients  # round(0.25 * 4) = 1
    x = torch.arange(24.0).reshape(12, 2)  # largest feature 23: the trigger's value
    y = torch.arange(12) % 3
    train = [np.arange(3 * c, 3 * c + 3) for c in range(4)]
    px, py, ptrain = bd.poison(x, y, train)
    k = 2  # round(0.5 * 3), halves up
    assert px.shape == (12 + k, 2) and torch.equal(px[:12], x) and torch.equal(py[:12], y)
    assert py[12:].tolist() == [0, 0] and px[12:, 1].tolist() == [23.0, 23.0]  # trigger_size 2 of 2 features
    for c in range(4):
        if c != attacker:
            assert ptrain[c].tolist() == train[c].tolist()
    new = ptrain[attacker]
    assert sorted(new[new >= 12].tolist()) == [12, 13] and len(set(new[new < 12]) & set(train[attacker])) == 1
    assert train[attacker].tolist() == [3 * attacker, 3 * attacker + 1, 3 * attacker + 2]  # the input is not changed
    again = bd.poison(x, y, train)  # seeded: the same samples
    assert torch.equal(again[0], px) and again[2][attacker].tolist() == new.tolist()


def test_attack_success_rate_on_a_hand_made_prediction_set():
    y = torch.tensor([0, 1, 2, 3, 1])
    predicted = torch.tensor([0, 0, 2, 0, 1])
    # the target (0) itself is left out: of the four others (1, 2, 3, 1), two are predicted 0
    assert attack_success(predicted, y, 0) == 0.5
    # target 2: the others are samples 0, 1, 3, 4, predicted 0, 0, 0, 1: none is 2
    assert attack_success(predicted, y, 2) == 0.0
    assert attack_success(torch.tensor([1, 1]), torch.tensor([1, 1]), 1) is None  # every sample is the target
    # success_rate stamps the samples before predicting: a "model" that answers 0 exactly when the trigger is on
    bd = Byzantine(BACKDOOR, n_clients=8, seed=0)
    bd.trigger_value = 5.0
    x = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [3.0, 0.0, 0.0]])

    def model(inputs):
        on = (inputs[:, 1:] == 5.0).all(dim=1)
        return torch.stack([on.double(), (~on).double()], dim=1)

    assert bd.success_rate(model, x, torch.tensor([1, 1, 0])) == 1.0
    assert bd.success_rate(lambda inputs: torch.tensor([[0.0, 1.0]] * len(inputs)), x, torch.tensor([1, 1, 0])) == 0.0


def test_norm_bounding_cuts_a_boosted_change_to_the_bound():
    honest = torch.tensor([0.3, 0.4])  # norm 0.5, under the bound: unchanged
    boosted = 10 * honest  # (3, 4), norm 5: scaled by 1/5 to (0.6, 0.8)
    deltas, weights = torch.stack([honest, boosted]), torch.tensor([0.5, 0.5])
    plain = Aggregation(AggregatorConfig())
    assert plain.delta(None, deltas, weights).tolist() == pytest.approx([1.65, 2.2])
    bounded = Aggregation(AggregatorConfig(max_update_norm=1.0))
    assert bounded.delta(None, deltas, weights).tolist() == pytest.approx([0.45, 0.6])
    assert bounded.metrics() == {"norm_bounded_frac": 0.5} and not bounded.linear
    # before a robust rule too: the median sees the bounded rows, x (0.3, 0.15, 0.6) and y (0.4, 0.2, 0.8)
    three = torch.stack([honest, honest / 2, boosted])
    median = Aggregation(AggregatorConfig(rule="median", max_update_norm=1.0))
    assert median.delta(None, three, torch.full((3,), 1 / 3)).tolist() == pytest.approx([0.3, 0.4])


def test_bad_backdoor_and_norm_bound_settings_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="^strategy.aggregator.max_update_norm: strategy.privacy.clip already"):
        Aggregation(AggregatorConfig(max_update_norm=1.0), PrivacyConfig(clip=1.0))
    cfg = validate({"strategy": {"name": "scaffold", "aggregator": {"max_update_norm": 1.0}}}).strategy
    with pytest.raises(ConfigError, match="^strategy.aggregator.max_update_norm: scaffold does not aggregate a mean"):
        build_strategy(cfg)
    bd = Byzantine(BACKDOOR.model_copy(update={"target": 10}), n_clients=8, seed=0)
    with pytest.raises(ConfigError, match=r"^devices.byzantine.target: 10 is not a class of this dataset \(0 to 9\)$"):
        bd.check(10, (64,), token_input=False)
    with pytest.raises(ConfigError, match="^devices.byzantine.trigger_size: 2 is more than"):
        Byzantine(BACKDOOR, 8, 0).check(10, (1,), token_input=False)
    with pytest.raises(ConfigError, match="^devices.byzantine.attack: backdoor"):
        Byzantine(BACKDOOR, 8, 0).check(10, (16,), token_input=True)


TINY_DIGITS = {
    "name": "backdoor", "seed": 0, "rounds": 6, "checkpoint_every": 100,
    "data": {"dataset": "digits", "n_clients": 10, "partition": {"kind": "iid"}},
    "devices": {"compute": {"distribution": "constant", "median_flops": 2e8}, "jitter": 0.0,
                "byzantine": {"fraction": 0.1, "attack": "backdoor", "scale": 5.0, "poison_frac": 0.5}},
    "model": {"name": "mlp", "hidden": [32]},
    "training": {"lr": 0.1, "batch_size": 16, "local_steps": 10},
    "strategy": {"name": "fedavg", "clients_per_round": 5},
    "evaluation": {"every": 3},
}


def run(tmp_path, name, **strategy):
    from hetfl.engine.run import run_experiment

    raw = json.loads(json.dumps(TINY_DIGITS))
    raw["strategy"].update(strategy)
    run_experiment(validate(raw), tmp_path / name, show_progress=False)
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_a_backdoored_digits_run_reports_the_attack_and_norm_bounding_cuts_it(tmp_path):
    plain = run(tmp_path, "plain")
    assert plain[-1]["backdoor_asr"] > 0.5  # the boosted poisoned model implants the trigger
    bounded = run(tmp_path, "bounded", aggregator={"max_update_norm": 0.05})
    assert bounded[-1]["backdoor_asr"] < plain[-1]["backdoor_asr"] and 0 < bounded[-1]["norm_bounded_frac"] <= 1
    doc = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()
    assert all(f"`{key}`" in doc for key in [*plain[-1], *bounded[-1]])


def test_a_norm_bounded_run_has_its_own_variant_label():
    from hetfl.results.variant import variant_label

    strategy = {"name": "fedavg", "aggregator": {"rule": "mean", "trim_frac": 0.1, "max_update_norm": 0.25}}
    assert variant_label(strategy) == "fedavg[mean(max_update_norm=0.25)]"
    assert variant_label({"name": "fedavg", "aggregator": {"rule": "mean", "max_update_norm": None}}) == "fedavg"
