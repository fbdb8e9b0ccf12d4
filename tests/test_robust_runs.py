"""Robust aggregation and DP-FedAvg end to end on the simulator (the rules are worked by hand in test_robust.py)."""

import json
import pickle
from pathlib import Path

import torch

from conftest import make_simulator, profile, run_rounds
from hetfl.config import PrivacyConfig, validate
from hetfl.engine.run import run_experiment
from hetfl.strategies import FedAvg
from hetfl.strategies.robust import dp_epsilon

# 10 IID digits clients, all of them every round: 2 of them (20%) are attackers when devices.byzantine is set
DIGITS = {
    "name": "robust", "seed": 0, "rounds": 20, "checkpoint_every": 100,
    "data": {"dataset": "digits", "n_clients": 10, "partition": {"kind": "iid"}},
    "devices": {"compute": {"distribution": "constant", "median_flops": 2e8}, "jitter": 0.0},
    "model": {"name": "mlp", "hidden": [32]},
    "training": {"lr": 0.1, "batch_size": 16, "local_steps": 10},
    "strategy": {"name": "fedavg", "clients_per_round": 10},
    "evaluation": {"every": 20},
}


def digits_run(tmp_path, name, attack=None, rule="mean", **strategy):
    raw = json.loads(json.dumps(DIGITS))
    if attack:
        raw["devices"]["byzantine"] = {"fraction": 0.2, "attack": attack, "scale": 10.0}
    raw["strategy"].update(aggregator={"rule": rule, "trim_frac": 0.2, "byzantine": 2}, **strategy)
    return run_experiment(validate(raw), tmp_path / name, show_progress=False)


def test_robust_rules_hold_against_sign_flipping_clients_and_the_mean_does_not(tmp_path):
    clean = digits_run(tmp_path, "clean")["final_accuracy"]
    assert clean > 0.9
    # two of ten clients send w - 10 d: the mean moves by 0.8 d - 2 d, against the honest clients
    assert digits_run(tmp_path, "mean", "sign_flip")["final_accuracy"] < 0.3
    for rule in ("median", "trimmed_mean", "krum"):
        accuracy = digits_run(tmp_path, rule, "sign_flip", rule)["final_accuracy"]
        assert accuracy >= clean - 0.05, (rule, accuracy, clean)


def test_privacy_without_noise_and_with_a_huge_clip_is_plain_fedavg():
    # three clients of 8 samples each, all in every round: p_i = 8/24 = 1/3 = 1/m, and no change reaches norm 1e9
    def final(strategy):
        devices = [profile(c, flops=2e6, bw=1e12) for c in range(3)]
        return run_rounds(make_simulator(strategy, [8, 8, 8], devices), 4).params
    plain = final(FedAvg(clients_per_round=3))
    private = FedAvg(clients_per_round=3, privacy=PrivacyConfig(clip=1e9, noise_multiplier=0.0))
    assert torch.equal(final(private), plain)
    assert private.metrics() == {"dp_epsilon": None, "dp_delta": 1e-5, "dp_clipped_frac": 0.0}
    restored = pickle.loads(pickle.dumps(private))  # a checkpoint keeps the accounting
    assert restored.aggregation.dp_rounds == 4 and restored.summary(None)["dp_rounds"] == 4


def test_a_private_digits_run_learns_and_reports_its_budget(tmp_path):
    raw = json.loads(json.dumps(DIGITS))
    raw["data"]["n_clients"] = 20
    raw["evaluation"]["every"] = 10
    raw["strategy"] = {"name": "fedavg", "clients_per_round": 10, "privacy": {"clip": 0.5, "noise_multiplier": 1.0}}
    summary = run_experiment(validate(raw), tmp_path / "dp", show_progress=False)
    assert summary["final_accuracy"] > 0.7  # chance is 0.1
    records = [json.loads(line) for line in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    # q = 10 / 20, z = 1, delta 1e-5; epsilon after 0, 10 and 20 rounds
    assert [r["dp_epsilon"] for r in records] == [0.0, dp_epsilon(0.5, 1.0, 10, 1e-5), dp_epsilon(0.5, 1.0, 20, 1e-5)]
    assert all(r["dp_delta"] == 1e-5 for r in records) and 0 < records[-1]["dp_clipped_frac"] <= 1
    assert summary["strategy_summary"] == {"dp_epsilon": records[-1]["dp_epsilon"], "dp_delta": 1e-5, "dp_rounds": 20}
    # the same seed gives the same noise
    again = run_experiment(validate(raw), tmp_path / "dp2", show_progress=False)
    assert again["final_accuracy"] == summary["final_accuracy"]


def test_new_fields_are_defined_in_docs_metrics():
    doc = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()
    missing = [k for k in ("dp_epsilon", "dp_delta", "dp_clipped_frac", "dp_rounds", "robust_skipped") if f"`{k}`" not in doc]
    assert not missing, f"define these in docs/metrics.md: {missing}"
