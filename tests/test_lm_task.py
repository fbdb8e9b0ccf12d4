"""The language-model task: the text dataset, token-level training and evaluation, TinyLM in the zoo, the
pretrained base, and federated LoRA fine-tuning with heterogeneous ranks (fedlora)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_simulator, profile, run_rounds
from hetfl.config import validate
from hetfl.data import federate
from hetfl.data.text import encode, style_text
from hetfl.engine.run import build_federation, run_experiment
from hetfl.errors import ConfigError, HetflError
from hetfl.models.lora import truncate
from hetfl.models.pretrain import load_or_pretrain
from hetfl.models.transformer import TinyLM, lm_loss
from hetfl.strategies import FedLoRA, Task, Update
from hetfl.training.local import task_loss


ALL_LINEARS = ["q", "k", "v", "o", "fc1", "fc2"]


def lm_config(tmp_path, **strategy_params) -> dict:
    """4 text clients (code, prose), a d_model-16 TinyLM pretrained briefly into ``tmp_path``, 3 rounds of 3."""
    return {
        "name": "lm", "seed": 0, "rounds": 3,
        "data": {"dataset": "text", "n_clients": 4, "text": {"context": 16, "tokens_per_client": 4096}},
        "devices": {"compute": {"distribution": "tiers", "median_flops": 2e8}},
        "model": {"name": "tinylm", "d_model": 16, "n_heads": 2, "d_ff": 32, "n_layers": 2, "pretrained": True,
                  "pretrain": {"steps": 100, "cache_dir": str(tmp_path / "cache")}},
        "training": {"optimizer": "adam", "lr": 0.01, "batch_size": 16, "local_steps": 10},
        "strategy": {"name": "fedlora", "clients_per_round": 3, "params": strategy_params},
    }


# --------------------------------------------------------------------------- the text dataset
def test_text_clients_hold_windows_of_their_own_style_deterministically():
    cfg = validate({"data": {"dataset": "text", "n_clients": 4, "text": {"context": 16, "tokens_per_client": 1024}},
                    "model": {"name": "tinylm"}})
    assert cfg.data.partition.kind == "natural"
    fed = federate(cfg.data, seed=3)
    ds = fed.dataset
    assert ds.x.shape == ds.y.shape == (4 * (1024 // 17), 16) and ds.vocab_size == 256
    assert (ds.x[:, 1:] == ds.y[:, :-1]).all()  # y is x shifted by one: the next-token targets
    texts = {s: encode(style_text(s)).astype(np.uint8).tobytes() for s in ("code", "prose")}
    for c in range(4):
        rows = np.sort(np.concatenate([fed.train[c], fed.test[c]]))
        assert (ds.groups[rows] == c).all() and len(fed.test[c]) >= 1
        stream = np.concatenate([ds.x[rows], ds.y[rows][:, -1:]], axis=1).reshape(-1).astype(np.uint8).tobytes()
        own, other = ("code", "prose") if c % 2 == 0 else ("prose", "code")
        assert stream in texts[own] and stream not in texts[other]  # consecutive windows of the client's style
    again, other_seed = federate(cfg.data, seed=3), federate(cfg.data, seed=4)
    assert np.array_equal(again.dataset.x, ds.x) and all(np.array_equal(a, b) for a, b in zip(again.train, fed.train))
    assert not np.array_equal(other_seed.dataset.x, ds.x)


def test_token_level_loss_is_lm_loss_and_the_evaluator_reports_it(tmp_path):
    fed = build_federation(validate({**lm_config(tmp_path), "model": {"name": "tinylm", "d_model": 16, "n_heads": 2,
                                                                       "d_ff": 32, "n_layers": 2}}))
    trainer, ev = fed.trainer, fed.evaluator
    rows = torch.cat([ev.x, ev.y[:, -1:]], dim=1)
    trainer.flat.copy_(trainer.initial)
    with torch.no_grad():
        expected = float(lm_loss(trainer.model, rows))
    with torch.no_grad():
        assert float(task_loss(trainer.model(ev.x), ev.y)) == pytest.approx(expected, rel=1e-6)
    scores = ev(trainer.initial)
    assert scores["loss"] == pytest.approx(expected, rel=1e-5)
    hits = (trainer.predict(trainer.initial, ev.x).argmax(-1) == ev.y).double().mean()
    assert scores["accuracy"] == pytest.approx(float(hits))
    # one full-batch step of LocalTrainer reports the loss before the step: lm_loss again
    n = len(rows)
    trainer.cfg = trainer.cfg.model_copy(update={"batch_size": n})
    assert trainer.train(trainer.initial, ev.x, ev.y, steps=1, seed=0).loss == pytest.approx(expected, rel=1e-5)


def test_tinylm_flops_count_its_linears_per_position_attention_and_the_tied_head():
    from hetfl.models.cost import flops_per_sample

    L, d, V, f, layers = 16, 16, 256, 32, 2
    model = TinyLM(vocab_size=V, d_model=d, n_heads=2, d_ff=f, n_layers=layers, context=L)
    linears = layers * L * 2 * (4 * d * d + 2 * d * f)
    attention = layers * 2 * 2 * L * L * d
    assert flops_per_sample(model, (L,), token_input=True) == linears + attention + 2 * L * d * V


# --------------------------------------------------------------------------- pretraining
def test_pretrained_weights_are_deterministic_cached_and_reused(tmp_path):
    cfg = validate(lm_config(tmp_path))
    sizes = dict(vocab_size=256, d_model=16, n_heads=2, d_ff=32, n_layers=2, context=16)
    first, second, elsewhere = TinyLM(**sizes), TinyLM(**sizes), TinyLM(**sizes)
    made = load_or_pretrain(first, cfg.model.pretrain, cfg.data, 0)
    assert not made.cached and made.path.is_file() and made.perplexity < 60  # an untrained model: ~256
    reused = load_or_pretrain(second, cfg.model.pretrain, cfg.data, 0)
    assert reused.cached and reused.path == made.path
    pretrain = cfg.model.pretrain.model_copy(update={"cache_dir": str(tmp_path / "other")})
    assert not load_or_pretrain(elsewhere, pretrain, cfg.data, 0).cached  # trained again, to the same bits
    for a, b, c in zip(first.parameters(), second.parameters(), elsewhere.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    fed = build_federation(cfg)  # the federation starts from the cached base
    assert torch.equal(fed.trainer.initial, torch.cat([p.detach().reshape(-1) for p in first.parameters()]))


# --------------------------------------------------------------------------- fedlora end to end
def test_fedlora_fine_tunes_moving_only_adapters_and_leaves_the_base_untouched(tmp_path, monkeypatch):
    bases = []
    train = FedLoRA.client_train

    def spy(self, trainer, task, data, state, seed):
        result = train(self, trainer, task, data, state, seed)
        bases.append(torch.equal(trainer.flat, trainer.initial))  # the base, bit for bit, after training
        return result

    monkeypatch.setattr(FedLoRA, "client_train", spy)
    summary = run_experiment(validate(lm_config(tmp_path, rank=4, targets=ALL_LINEARS)), tmp_path / "run",
                             show_progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["perplexity"] < lines[0]["perplexity"]
    assert lines[-1]["perplexity"] == pytest.approx(math.exp(lines[-1]["loss"]))
    assert summary["final_perplexity"] == lines[-1]["perplexity"]
    adapter = 4 * 4 * 2 * (4 * (16 + 16) + 2 * (16 + 32))  # float32 x rank 4 x 2 blocks x (q, k, v, o, fc1, fc2)
    tasks = sum(summary["tasks_per_client"])
    assert summary["bytes_down"] == tasks * adapter and summary["bytes_up"] == summary["updates"] * adapter
    assert bases and all(bases)
    doc = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()
    assert not [key for key in [*lines[-1], *summary] if f"`{key}`" not in doc], "define them in docs/metrics.md"


def test_fedlora_heterogeneous_ranks_by_tier_and_flora_keeps_every_client_on_the_servers_model(tmp_path):
    cfg = validate(lm_config(tmp_path, aggregation="flora", ranks={"low": 1, "mid": 2, "high": 4}))
    fed = build_federation(cfg)
    strategy = fed.strategy()
    sim = fed.simulator(strategy)
    ranks, dispatch = {}, sim.dispatch

    def recording(client, **kwargs):
        ranks[client] = kwargs["options"]["rank"]
        return dispatch(client, **kwargs)

    sim.dispatch = recording
    run_rounds(sim, 3)
    tiers = {"low": 1, "mid": 2, "high": 4}
    assert ranks and all(r == tiers[fed.profiles[c].tier.split("/")[0]] for c, r in ranks.items())
    layers = strategy.layers(sim.trainer)
    for c, state in sim.state.client_state.items():  # a client's base + the stacks it has not merged = the server's
        base = state["base"]
        for r, stack in strategy._history[strategy._synced[c]:]:
            base = strategy.merge(layers, base, strategy.unpack(layers, stack, r))
        assert torch.equal(base, sim.params)
    assert not torch.equal(sim.params, sim.trainer.initial)  # the stacks were merged into the base


# --------------------------------------------------------------------------- aggregation by hand
def _update(sim, client, rank, n, factors) -> Update:
    task = Task(task_id=client, client_id=client, version=0, params=sim.params, steps=0, dispatched_at=0.0,
                options={"rank": rank})
    return Update(task=task, params=FedLoRA.pack(factors), n_samples=n, steps=0, loss=0.0, arrived_at=0.0)


def _factors(rank, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rank, 4, generator=g), torch.randn(3, rank, generator=g))]  # logreg 4 -> 3: one layer


def test_flora_aggregate_adds_the_weighted_mean_of_the_products_to_the_model():
    strategy = FedLoRA(aggregation="flora", clients_per_round=2)
    sim = make_simulator(strategy, [8, 8], [profile(0), profile(1)])
    (A1, B1), (A2, B2) = _factors(1, 0)[0], _factors(2, 1)[0]
    new = strategy.aggregate(sim, [_update(sim, 0, 1, 1, [(A1, B1)]), _update(sim, 1, 2, 3, [(A2, B2)])])
    weight = strategy.layers(sim.trainer)[0].weight
    expected = 0.25 * B1 @ A1 + 0.75 * B2 @ A2
    assert torch.allclose((new - sim.params)[weight].reshape(3, 4), expected, atol=1e-6)
    assert torch.equal(new[weight.stop:], sim.params[weight.stop:])  # the bias is not adapted
    assert strategy._history[-1][0] == 3  # the stack's rank: 1 + 2
    down, up = strategy.transfer_bytes(sim, Task(0, 0, 0, sim.params, 0, 0.0, {"stacks": strategy._history[-1][1]},
                                                 {"rank": 2}))
    assert (down, up) == (4 * 3 * (4 + 3), 4 * 2 * (4 + 3))


def test_hetlora_pads_averages_keeps_untrained_components_and_truncates_for_each_client():
    strategy = FedLoRA(aggregation="hetlora", ranks=[1, 2, 3], clients_per_round=2)
    sim = make_simulator(strategy, [8, 8], [profile(0), profile(1)])
    (A_old, B_old), = strategy.unpack(strategy.layers(sim.trainer), sim.params, 3)
    (A1, B1), (A2, B2) = _factors(1, 0)[0], _factors(2, 1)[0]
    new = strategy.aggregate(sim, [_update(sim, 0, 1, 1, [(A1, B1)]), _update(sim, 1, 2, 3, [(A2, B2)])])
    (A, B), = strategy.unpack(strategy.layers(sim.trainer), new, 3)
    assert torch.allclose(A[0], 0.25 * A1[0] + 0.75 * A2[0]) and torch.allclose(B[:, 0], 0.25 * B1[:, 0] + 0.75 * B2[:, 0])
    assert torch.allclose(A[1], 0.75 * A2[1]) and torch.allclose(B[:, 1], 0.75 * B2[:, 1])  # zero-padded client 0
    assert torch.equal(A[2], A_old[2]) and torch.equal(B[:, 2], B_old[:, 2])  # nobody of the round has rank 3
    # a rank-1 client starts from the first component (0 steps: what it sends is what it got)
    task = Task(0, 0, 1, new, 0, 0.0, options={"rank": 1})
    result = strategy.client_train(sim.trainer, task, sim.pool.data(0), {}, seed=0)
    (At, Bt), = strategy.unpack(strategy.layers(sim.trainer), result.params, 1)
    assert torch.equal(At, truncate(A, B, 1)[0]) and torch.equal(Bt, truncate(A, B, 1)[1])
    assert strategy.transfer_bytes(sim, task) == (4 * 1 * 7, 4 * 1 * 7)


def test_ranks_by_speed_give_the_slowest_clients_the_smallest_rank():
    strategy = FedLoRA(ranks=[2, 8])
    profiles = [profile(0, speed=3.0), profile(1, speed=0.5), profile(2, speed=1.0), profile(3, speed=0.2)]
    assert strategy.resolve_ranks(profiles).tolist() == [8, 2, 8, 2]


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("change, key", [
    ({"data": {"dataset": "text", "partition": {"kind": "iid"}}}, "data.partition.kind"),
    ({"data": {"dataset": "text"}, "model": {"name": "mlp"}}, "model.name"),
    ({"data": {"dataset": "digits"}, "model": {"name": "tinylm"}}, "model.name"),
    ({"data": {"dataset": "text"}, "model": {"name": "tinylm", "n_heads": 3}}, "model.n_heads"),
    ({"data": {"dataset": "text", "text": {"styles": ["poetry"]}}, "model": {"name": "tinylm"}}, "data.text.styles"),
    ({"data": {"dataset": "text", "text": {"context": 64, "tokens_per_client": 100}}, "model": {"name": "tinylm"}},
     "data.text.tokens_per_client"),
    ({"model": {"name": "mlp", "pretrained": True}}, "model.pretrained"),
])
def test_bad_lm_configs_are_one_line_naming_the_key(change, key):
    with pytest.raises(ConfigError) as err:
        validate(change)
    message = str(err.value)
    assert key in message and "\n" not in message


@pytest.mark.parametrize("params, key", [
    ({"ranks": {"low": 2}}, "strategy.params.ranks"),  # the devices have mid and high tiers too
    ({"aggregation": "fedavg", "ranks": [2, 4]}, "strategy.params"),
    ({"aggregation": "average"}, "strategy.params.aggregation"),
    ({"targets": ["nothing"]}, "strategy.params.targets"),
])
def test_bad_fedlora_parameters_are_one_line_naming_the_key(tmp_path, params, key):
    raw = lm_config(tmp_path, **params)
    raw["model"]["pretrained"] = False
    with pytest.raises(HetflError) as err:
        build_federation(validate(raw)).strategy()
    assert key in str(err.value) and "\n" not in str(err.value)
