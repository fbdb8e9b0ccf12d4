"""FedIns (arXiv:2308.06051): the SSF pool chosen per instance, its local step worked by hand, the per-sample feature
skew it is measured on, and whole runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from hetfl.config import DataConfig, TrainingConfig
from hetfl.data import federate
from hetfl.data.skew import sample_levels
from hetfl.models.zoo import LogisticRegression
from hetfl.strategies import FedIns
from hetfl.strategies.base import ClientData, Task
from hetfl.strategies.fedins import InstanceScorer, modulate, select
from hetfl.training.local import LocalTrainer


def logreg_trainer(lr: float = 1.0) -> LocalTrainer:
    # d = 2, 2 classes, the representation is the input itself (logreg: the head alone)
    net = LogisticRegression(2, 2)
    with torch.no_grad():
        net.linear.weight.copy_(torch.eye(2))
        net.linear.bias.zero_()
    return LocalTrainer(net, TrainingConfig(lr=lr, batch_size=1, local_steps=1))


def test_each_instance_takes_the_ssf_of_its_nearest_keys():
    # keys k0 = (1, 0.1), k1 = (0, -1), k2 = (0.2, 1)
    # q0 = (1, 0): cos = 0.995, 0, 0.196 -> k0;  q1 = (0, 1): cos = 0.0995, -1, 0.981 -> k2
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 0.1], [0.0, -1.0], [0.2, 1.0]])
    index, sims = select(q, keys, 1)
    assert index.tolist() == [[0], [2]]
    assert sims[:, 0].tolist() == pytest.approx([1 / math.sqrt(1.01), 1 / math.sqrt(1.04)], abs=1e-6)
    # top 2: q0 -> k0, k2; q1 -> k2, k0
    assert select(q, keys, 2)[0].tolist() == [[0, 2], [2, 0]]
    # gamma_m = m + 1, beta_m = 10 m (both coordinates); q0 with top 2 averages entries 0 and 2:
    # gamma = (1 + 3) / 2 = 2, beta = (0 + 20) / 2 = 10, so h0 = (1, 0) -> (2 + 10, 0 + 10) = (12, 10)
    gamma = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    beta = torch.tensor([[0.0, 0.0], [10.0, 10.0], [20.0, 20.0]])
    out = modulate(q, gamma, beta, select(q, keys, 2)[0])
    assert out.tolist() == [[12.0, 10.0], [10.0, 12.0]]


def test_one_ssf_step_by_hand():
    # One sample x = (1, 0), y = 0, head W = I, b = 0, pool of 2 with gamma = 1, beta = 0, keys k0 = (1, 1), k1 = (0, 1);
    # key_weight 1, SGD lr 1, one step.
    # Selection: cos(q, k0) = 1/sqrt2 > cos(q, k1) = 0 -> k0.  h' = 1 * h + 0 = (1, 0), logits = (1, 0).
    # CE: p = (s, 1 - s), s = sigmoid(1); dL/dlogits = (s - 1, 1 - s) = (-a, a), a = 1 - sigmoid(1) = 0.26894.
    # dW = (-a, a)^T (1, 0) = [[-a, 0], [a, 0]], db = (-a, a); dh' = W^T (-a, a) = (-a, a)
    # dgamma0 = dh' * h = (-a, 0), dbeta0 = (-a, a); entry 1 not selected: no gradient.
    # key: d(1 - cos)/dk0 = -(q^ - cos k0^) / |k0| = -((1, 0) - (1/2, 1/2)) / sqrt2 = (-0.35355, 0.35355)
    # after the step: gamma0 = (1 + a, 1), beta0 = (a, -a), W = [[1 + a, 0], [-a, 1]], b = (a, -a),
    # k0 = (1.35355, 0.64645); loss = -log sigmoid(1) + (1 - 1/sqrt2) = 0.31326 + 0.29289
    trainer = logreg_trainer()
    fedins = FedIns(pool_size=2, top_k=1, key_weight=1.0, warmup_rounds=0)
    model = trainer.flat.clone()
    pool = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 1])  # gamma (2 x 2), beta (2 x 2), keys (2 x 2)
    data = ClientData(0, torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    out, loss = fedins.train_ssf(trainer, torch.cat([model, pool]), data, steps=1, seed=0)
    a = 1 - 1 / (1 + math.exp(-1))
    r = 1 / (2 * math.sqrt(2))
    head, (gamma, beta, keys) = fedins.unpack(trainer, out)
    assert gamma.flatten().tolist() == pytest.approx([1 + a, 1, 1, 1], abs=1e-5)
    assert beta.flatten().tolist() == pytest.approx([a, -a, 0, 0], abs=1e-5)
    assert keys.flatten().tolist() == pytest.approx([1 + r, 1 - r, 0, 1], abs=1e-5)
    assert head.tolist() == pytest.approx([1 + a, 0, -a, 1, a, -a], abs=1e-5)  # W row-major, then b
    assert loss == pytest.approx(-math.log(1 - a) + 1 - 1 / math.sqrt(2), abs=1e-5)
    assert fedins.entries_used(trainer, out, data) == 1.0  # one instance, one entry


def test_inference_uses_each_instances_own_ssf():
    # pool: entry 0 (key (1, 0)) doubles coordinate 0, entry 1 (key (0, 1)) adds 5 to coordinate 1; W = I, b = 0
    # x0 = (1, 0.2) -> entry 0: (2, 0.2); x1 = (0.2, 1) -> entry 1: (0.2, 6)
    trainer = logreg_trainer()
    fedins = FedIns(pool_size=2, top_k=1)
    pool = torch.tensor([2.0, 1, 1, 1, 0, 0, 0, 5, 1, 0, 0, 1])
    params = torch.cat([trainer.flat.clone(), pool])
    logits = fedins.scorer(trainer).predict(params, torch.tensor([[1.0, 0.2], [0.2, 1.0]]))
    assert isinstance(fedins.scorer(trainer), InstanceScorer)
    assert logits.flatten().tolist() == pytest.approx([2.0, 0.2, 0.2, 6.0])


def test_the_initial_pool_is_the_identity_and_warmup_trains_the_model_alone():
    trainer = logreg_trainer(lr=0.5)
    fedins = FedIns(pool_size=3, warmup_rounds=1)
    params = fedins.initial_params(trainer)
    model, (gamma, beta, keys) = fedins.unpack(trainer, params)
    assert params.numel() == trainer.numel + 3 * 3 * 2
    assert torch.equal(gamma, torch.ones(3, 2)) and torch.equal(beta, torch.zeros(3, 2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(fedins.scorer(trainer).predict(params, x), trainer.predict(model, x))  # the plain model
    data = ClientData(0, x, torch.tensor([1, 0]))
    task = Task(task_id=0, client_id=0, version=0, params=params, steps=2, dispatched_at=0.0, options={"warmup": True})
    result = fedins.client_train(trainer, task, data, {}, seed=0)
    expected = trainer.train(model, x, data.y, steps=2, seed=0).params
    assert torch.equal(result.params[: trainer.numel], expected)  # FedAvg's local training
    assert torch.equal(result.params[trainer.numel :], params[trainer.numel :])  # the pool untouched


@pytest.mark.parametrize("bad", [{"pool_size": 0}, {"top_k": 3, "pool_size": 2}, {"key_weight": -1.0},
                                 {"warmup_rounds": -1}, {"ssf_lr": 0.0}])
def test_bad_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        FedIns(**bad)


def test_per_sample_skew_deals_every_sample_one_level():
    # rows: client 0 holds samples 0, 1; client 1 holds 2, 3, 4. groups 2, strength 90: levels 0 and 90.
    rng = np.random.default_rng(0)
    drawn = np.random.default_rng(0).integers(2, size=5)
    groups, levels = sample_levels([np.array([0, 1]), np.array([2, 3, 4])], 90.0, 2, rng)
    assert levels.tolist() == [0.0, 90.0]
    assert [g.tolist() for g in groups] == [np.flatnonzero(drawn == j).tolist() for j in range(2)]
    assert sorted(np.concatenate(groups).tolist()) == [0, 1, 2, 3, 4]  # every sample exactly once


def test_per_sample_affine_skew_mixes_levels_inside_each_client():
    # affine x -> (1 + l) x + l s with levels 0 and 1: a sample at level 0 is unchanged
    clean = federate(DataConfig(n_clients=4), 0)
    skewed = federate(DataConfig(n_clients=4, feature_skew={"kind": "affine", "strength": 1.0, "groups": 2,
                                                            "per": "sample"}), 0)
    assert skewed.feature_levels is None
    for rows in skewed.train:
        same = np.all(np.isclose(clean.dataset.x[rows], skewed.dataset.x[rows]), axis=1)
        assert 0 < same.sum() < len(rows)  # both distributions in every client


def test_per_sample_skew_needs_groups():
    with pytest.raises(ValidationError, match="data.feature_skew.groups"):
        DataConfig(feature_skew={"kind": "rotation", "strength": 90.0, "per": "sample"})


def test_fedins_runs_end_to_end_on_per_sample_rotations(tmp_path):
    # digits over 6 clients, every sample rotated by 0 or 180 degrees drawn per sample; 4 rounds of 3 clients,
    # 2 FedAvg warm-up rounds then 2 SSF rounds. Same seed, same records; every client scores the global model.
    from hetfl.config import validate
    from hetfl.engine.run import run_experiment

    raw = {"name": "fedins", "seed": 0, "rounds": 4,
           "data": {"dataset": "digits", "n_clients": 6, "partition": {"kind": "iid"},
                    "feature_skew": {"kind": "rotation", "strength": 180.0, "groups": 2, "per": "sample"}},
           "model": {"name": "mlp", "hidden": [16]},
           "training": {"lr": 0.1, "batch_size": 16, "local_steps": 5},
           "strategy": {"name": "fedins", "clients_per_round": 3, "params": {"warmup_rounds": 2, "pool_size": 2}}}
    records = {}
    for run in "ab":
        run_experiment(validate(raw), tmp_path / run, show_progress=False)
        records[run] = [{k: v for k, v in json.loads(line).items() if k != "wall_time_s"}
                        for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert records["a"] == records["b"]
    last = records["a"][-1]
    assert last["round"] == 4 and last["personal_models"] == 6
    assert last["accuracy"] == last["personal_accuracy"] > 0.2  # chance is 0.1
    assert 1 <= last["fedins_entries"] <= 2 and "fedins_entries" not in records["a"][0]  # none in warm-up rounds


def test_top_k_equal_to_the_pool_gives_every_instance_the_mean_ssf():
    # pool of 2, top_k 2: every instance averages both entries, whatever the keys:
    # gamma = ((2, 1) + (4, 3)) / 2 = (3, 2), beta = ((0, 1) + (2, -1)) / 2 = (1, 0); h = (1, 1) -> (4, 2), (0, 2) -> (1, 4)
    trainer = logreg_trainer()
    fedins = FedIns(pool_size=2, top_k=2)
    pool = torch.tensor([2.0, 1, 4, 3, 0, 1, 2, -1, 1, 0, 0, 1])
    logits = fedins.scorer(trainer).predict(torch.cat([trainer.flat.clone(), pool]), torch.tensor([[1.0, 1.0], [0.0, 2.0]]))
    assert logits.flatten().tolist() == pytest.approx([4.0, 2.0, 1.0, 4.0])


def test_other_strategies_score_with_the_trainer_itself():
    from hetfl.strategies import FedAvg

    trainer = logreg_trainer()
    assert FedAvg().scorer(trainer) is trainer
