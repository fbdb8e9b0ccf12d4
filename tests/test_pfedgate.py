"""pFedGate: the block map, the budget, the gated model and the joint training step by hand, then end to end."""

import copy
import json

import pytest
import torch
from torch.nn import functional as F

from hetfl.config import ModelConfig, StrategyConfig, TrainingConfig, validate
from hetfl.errors import ConfigError
from hetfl.models import build_model
from hetfl.models.zoo import CNN, MLP
from hetfl.strategies import STRATEGIES, PFedGate, Task, Update, build_strategy
from hetfl.strategies.base import ClientData
from hetfl.strategies.pfedgate import block_map, entry_scale, feeds, layer_costs, masked_forward, select_blocks
from hetfl.training import LocalTrainer

from conftest import TINY


def task(params, steps=1):
    return Task(task_id=0, client_id=0, version=0, params=params.clone(), steps=steps, dispatched_at=0.0)


def data(n=12, features=3, classes=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ClientData(0, torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g))


# -- the block map ----------------------------------------------------------------------------------
def test_block_map_of_a_small_mlp_by_hand():
    # MLP(3, [2], 2): flat = [W1 (2x3, row-major), b1 (2), W2 (2x2), b2 (2)]
    # hidden unit o is row o of W1 with b1[o]; with the head dense its 6 entries map to "dense" (block 2)
    blocks = block_map(MLP(3, [2], 2))
    assert blocks.ids.tolist() == [0, 0, 0, 1, 1, 1, 0, 1, 2, 2, 2, 2, 2, 2]
    assert blocks.sizes.tolist() == [4, 4] and blocks.layer.tolist() == [0, 0]
    # gating the head too: class c is row c of W2 with b2[c], a layer of its own
    blocks = block_map(MLP(3, [2], 2), dense_head=False)
    assert blocks.ids.tolist() == [0, 0, 0, 1, 1, 1, 0, 1, 2, 2, 3, 3, 2, 3]
    assert blocks.sizes.tolist() == [4, 4, 3, 3] and blocks.layer.tolist() == [0, 0, 1, 1]


def test_block_map_of_a_small_cnn_by_hand():
    # CNN on 1x2x2 images, 2 channels: conv weight (2, 1, 3, 3) then bias (2); output channel o is
    # weight[o] (9 entries) with bias[o]; the classifier Linear(8, 3) (27 entries) stays dense (block 2)
    blocks = block_map(CNN((1, 2, 2), [2], 3))
    assert blocks.ids.tolist() == [0] * 9 + [1] * 9 + [0, 1] + [2] * 27
    assert blocks.sizes.tolist() == [10, 10]


@pytest.mark.parametrize("name, dense", [("logreg", 64 * 10 + 10), ("mlp", 16 * 10 + 10), ("cnn", 8 * 2 * 2 * 10 + 10)])
@pytest.mark.parametrize("dense_head", [True, False])
def test_block_map_covers_every_entry_exactly_once(name, dense, dense_head):
    model = build_model(ModelConfig(name=name, hidden=[32, 16], channels=[4, 8]), (64,), 10)
    numel = sum(p.numel() for p in model.parameters())
    blocks = block_map(model, dense_head=dense_head)
    assert blocks.ids.shape == (numel,)  # one block id per entry: each entry is in exactly one block
    counts = torch.bincount(blocks.ids, minlength=blocks.n_blocks + 1)
    assert counts[:-1].tolist() == blocks.sizes.tolist()  # the sizes are the entries of each block
    assert int(counts[-1]) == (dense if dense_head else 0)  # the head alone is dense, or nothing
    assert int(blocks.sizes.sum()) + int(counts[-1]) == numel


# -- the budget ---------------------------------------------------------------------------------------
SIZES = torch.tensor([4, 2, 2, 1, 1])
ONE_LAYER = torch.zeros(5, dtype=torch.long)


def test_selection_keeps_the_highest_gates_that_fit_the_budget():
    gates = torch.tensor([0.9, 0.8, 0.3, 0.7, 0.1])  # order by gate: blocks 0, 1, 3, 2, 4
    # capacity 5 (half of 10): block 0 (size 4, used 4); block 1 (2) would make 6 > 5, skipped;
    # block 3 (1) fits, used 5; blocks 2 (2) and 4 (1) do not fit any more
    assert select_blocks(gates, SIZES, ONE_LAYER, 5.0).tolist() == [True, False, False, True, False]
    # capacity 6: blocks 0 and 1 (4 + 2) fill it
    assert select_blocks(gates, SIZES, ONE_LAYER, 6.0).tolist() == [True, True, False, False, False]
    assert select_blocks(gates, SIZES, ONE_LAYER, 10.0).all()  # the whole model
    # ties go to the lower index: of three equal gates and room for two blocks of 2, blocks 1 and 2
    tied = torch.tensor([0.1, 0.5, 0.5, 0.5, 0.1])
    kept = select_blocks(tied, torch.tensor([2, 2, 2, 2, 2]), ONE_LAYER, 4.0)
    assert kept.tolist() == [False, True, True, False, False]


def test_selection_first_keeps_the_best_block_of_every_layer():
    gates = torch.tensor([0.9, 0.8, 0.7, 0.2, 0.1])
    # one layer, capacity 6: blocks 0 and 1 (4 + 2), the second layer's blocks 3 and 4 would be cut off
    assert select_blocks(gates, SIZES, ONE_LAYER, 6.0).tolist() == [True, True, False, False, False]
    # blocks 3 and 4 a layer of their own: block 0 (4) and block 3 (1) first, used 5; then block 1 (2) and
    # block 2 (2) would make 7, skipped; block 4 (1) fits, used 6
    two_layers = torch.tensor([0, 0, 0, 1, 1])
    assert select_blocks(gates, SIZES, two_layers, 6.0).tolist() == [True, False, False, True, True]


def test_a_budget_below_one_unit_per_layer_is_refused():
    # MLP(3, [2], 2), dense head: two blocks of 4; sparsity 0.25 keeps 2 entries, less than one block
    trainer = LocalTrainer(MLP(3, [2], 2), TrainingConfig())
    with pytest.raises(ConfigError, match="sparsity"):
        PFedGate(sparsity=0.25).client_train(trainer, task(trainer.flat), data(), {}, seed=0)


# -- the gated model ----------------------------------------------------------------------------------
def test_masked_model_is_the_model_with_rows_scaled_and_zeroed():
    torch.manual_seed(0)
    model = MLP(3, [4], 2)
    blocks = block_map(model)
    gates, keep = torch.tensor([0.5, 0.2, 0.9, 0.7]), torch.tensor([False, True, False, True])
    x = torch.randn(5, 3)  # (with this seed, hidden units 1 and 3 are the ones active on x)
    by_hand = copy.deepcopy(model)  # hidden units 0 and 2 removed, 1 and 3 scaled by their gates
    with torch.no_grad():
        for unit, factor in enumerate([0.0, 0.2, 0.0, 0.7]):
            by_hand.net[0].weight[unit] *= factor
            by_hand.net[0].bias[unit] *= factor
    assert torch.allclose(masked_forward(model, entry_scale(gates, keep, blocks), x), by_hand(x), atol=1e-6)
    # gradients reach the gates of the kept blocks (not the dropped ones) and the model's parameters
    gates.requires_grad_(True)
    masked_forward(model, entry_scale(gates, keep, blocks), x).sum().backward()
    assert (gates.grad[keep] != 0).all() and (gates.grad[~keep] == 0).all()
    assert model.net[0].weight.grad is not None and (model.net[0].weight.grad[0] == 0).all()


def test_masked_cnn_is_the_cnn_with_channels_scaled_and_zeroed():
    torch.manual_seed(0)
    model = CNN((1, 4, 4), [3], 2)
    gates, keep = torch.tensor([0.3, 0.6, 0.8]), torch.tensor([True, False, True])
    x = torch.randn(2, 16)
    by_hand = copy.deepcopy(model)
    with torch.no_grad():
        for channel, factor in enumerate([0.3, 0.0, 0.8]):
            by_hand.features[0].weight[channel] *= factor
            by_hand.features[0].bias[channel] *= factor
    out = masked_forward(model, entry_scale(gates, keep, block_map(model)), x)
    assert torch.allclose(out, by_hand(x), atol=1e-6)


# -- the client: the joint step -----------------------------------------------------------------------
def small_trainer(lr=0.1, batch_size=64, **kw):
    torch.manual_seed(0)
    return LocalTrainer(MLP(3, [4], 2), TrainingConfig(lr=lr, batch_size=batch_size, local_steps=1, **kw))


def test_one_step_trains_the_kept_blocks_and_the_gate_and_keeps_the_gate():
    # sparsity 0.5 of 4 hidden units: 2 kept; one full-batch SGD step, so w1 = w0 - lr * m ⊙ grad_v L(v) at
    # v = w0 ⊙ m (chain rule through the gated weights), which a plain trainer computes on v
    trainer, d, strategy = small_trainer(), data(), PFedGate(sparsity=0.5)
    w0, blocks = trainer.flat.clone(), block_map(trainer.model)
    gate = strategy.gate(blocks, d, {}, seed=3)  # the gate the first task starts from
    gates = gate(d.x).detach()
    keep = select_blocks(gates, blocks.sizes, blocks.layer, 0.5 * 16)
    m = entry_scale(gates, keep, blocks)
    state = {}
    result = strategy.client_train(trainer, task(w0), d, state, seed=3)

    plain = small_trainer()
    plain.flat.copy_(w0 * m)
    plain.grad.zero_()
    F.cross_entropy(plain.model(d.x), d.y).backward()
    assert torch.allclose(result.params, w0 - 0.1 * m * plain.grad, atol=1e-6)
    dropped = m == 0
    assert int(keep.sum()) == 2 and torch.equal(result.params[dropped], w0[dropped])  # no gradient, no change
    assert not torch.equal(result.params[~dropped], w0[~dropped])
    assert result.stats["pfedgate_density"] == 0.5 and result.steps == 1
    # the gate moved and stays on the client
    assert set(state) == {"gate"}
    assert any(not torch.equal(state["gate"][k], v) for k, v in gate.state_dict().items())
    again = strategy.client_train(trainer, task(w0), d, {"gate": state["gate"]}, seed=3)
    assert not torch.equal(again.params, result.params)  # the next task starts from the trained gate


def test_with_every_gate_at_one_and_no_budget_a_task_is_plain_local_training():
    # sigmoid(0 * z + 50) = 1 in float32: the gated model is the dense one, so the step is LocalTrainer's
    trainer, d = small_trainer(batch_size=4, momentum=0.9), data()
    w0, strategy, state = trainer.flat.clone(), PFedGate(sparsity=1.0), {}
    strategy.client_train(trainer, task(w0), d, state, seed=0)  # any gate, to get the state's layout
    state["gate"]["scale"].zero_()
    state["gate"]["shift"].fill_(50.0)
    result = strategy.client_train(trainer, task(w0, steps=6), d, state, seed=7)
    plain = trainer.train(w0, d.x, d.y, steps=6, seed=7)
    assert torch.allclose(result.params, plain.params, atol=1e-6)


def test_personal_params_keeps_the_budget_and_leaves_state_alone():
    torch.manual_seed(0)
    trainer = LocalTrainer(MLP(6, [10, 10], 3), TrainingConfig(lr=0.1, batch_size=8))
    blocks = block_map(trainer.model)
    gated = blocks.ids < blocks.n_blocks
    d = data(n=30, features=6, classes=3)
    for sparsity in (0.3, 0.5, 0.8):
        strategy, state = PFedGate(sparsity=sparsity), {}
        assert strategy.personal_params(trainer, trainer.flat.clone(), d, state, 0) is None  # never trained
        w = strategy.client_train(trainer, task(trainer.flat.clone(), steps=5), d, state, seed=1).params
        kept = {k: v.clone() for k, v in state["gate"].items()}
        personal = strategy.personal_params(trainer, w, d, state, 0)
        kept_entries = int((personal[gated] != 0).sum())
        assert 0 < kept_entries <= sparsity * int(gated.sum())
        assert torch.equal(personal[~gated], w[~gated])  # the dense head is the global one
        assert all(torch.equal(state["gate"][k], kept[k]) for k in kept)
        # the personal model is w ⊙ m for the gate's output on all of the client's data
        gates = strategy.gate(blocks, d, state, 0)(d.x).detach()
        keep = select_blocks(gates, blocks.sizes, blocks.layer, sparsity * float(blocks.sizes.sum()))
        assert torch.allclose(personal, w * entry_scale(gates, keep, blocks))


# -- the server ---------------------------------------------------------------------------------------
def test_server_averages_the_dense_models_and_reports_the_density():
    def update(params, n, density):
        return Update(task=task(torch.zeros(2)), params=torch.tensor(params), n_samples=n, steps=1, loss=0.0,
                      arrived_at=0.0, stats={"pfedgate_density": density})

    strategy = PFedGate()
    assert strategy.metrics() == {}
    new = strategy.aggregate(None, [update([1.0, 2.0], 1, 0.5), update([5.0, 6.0], 3, 0.25)])
    assert torch.equal(new, torch.tensor([4.0, 5.0]))  # 0.25 * first + 0.75 * second
    assert strategy.metrics() == {"pfedgate_density": 0.375}


def test_parameters_are_checked():
    assert STRATEGIES["pfedgate"] is PFedGate and PFedGate.personalised
    for bad in ({"sparsity": 0.0}, {"sparsity": 1.5}, {"gate_lr": 0.0}, {"gate_clip": -1.0}, {"charge": "half"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            build_strategy(StrategyConfig(name="pfedgate", params=bad))
    assert build_strategy(StrategyConfig(name="pfedgate", params={"sparsity": 0.3})).sparsity == 0.3
    assert build_strategy(StrategyConfig(name="pfedgate", params={"charge": "dense"})).charge == "dense"
    with pytest.raises(ConfigError, match="mlp or cnn"):
        PFedGate().check_model("logreg")
    PFedGate(dense_head=False).check_model("logreg")
    PFedGate().check_model("cnn")


def test_logreg_with_a_dense_head_trains_as_fedavg():
    torch.manual_seed(0)
    trainer = LocalTrainer(build_model(ModelConfig(name="logreg"), (3,), 2), TrainingConfig(lr=0.1, batch_size=4))
    d, w0 = data(), trainer.flat.clone()
    state = {}
    result = PFedGate().client_train(trainer, task(w0, steps=3), d, state, seed=0)
    assert torch.allclose(result.params, trainer.train(w0, d.x, d.y, steps=3, seed=0).params)
    assert state == {} and PFedGate().personal_params(trainer, w0, d, state, 0) is None


# -- end to end ---------------------------------------------------------------------------------------
def skewed(name, rounds=10, **params):
    raw = json.loads(json.dumps(TINY))
    raw["rounds"] = rounds
    raw["data"] = {"dataset": "digits", "n_clients": 10, "partition": {"kind": "dirichlet", "alpha": 0.1}}
    raw["model"] = {"name": "mlp", "hidden": [32]}
    raw["training"] = {"lr": 0.05, "batch_size": 16, "local_steps": 10}
    raw["strategy"] = {"name": name, "clients_per_round": 5, "params": params}
    return validate(raw)


def test_pfedgate_runs_deterministically_and_reports_personal_accuracy(tmp_path):
    # digits over 10 clients, Dirichlet(0.1) label skew, 10 rounds of 5 clients, sparsity 0.5.
    # Measured (seeds 0, 1, 2), personal_acc_mean of pFedGate vs FedAvg's client_acc_mean (global model):
    #   gate_shift 2, gate_lr 1: 0.75, 0.86, 0.78 vs 0.79, 0.89, 0.73
    #     (after 15 rounds: 0.89, 0.95, 0.92 vs 0.88, 0.90, 0.86)
    #   the authors' gate_shift 0, gate_lr 0.1: 0.42, 0.59, 0.45 (15 rounds: 0.57, 0.66, 0.56), below FedAvg here
    from hetfl.engine.run import run_experiment

    records = {}
    for run, name, params in (("a", "pfedgate", {"gate_shift": 2.0, "gate_lr": 1.0}),
                              ("b", "pfedgate", {"gate_shift": 2.0, "gate_lr": 1.0}), ("fedavg", "fedavg", {})):
        run_experiment(skewed(name, **params), tmp_path / run, show_progress=False)
        records[run] = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    timeless = [[{k: v for k, v in r.items() if k != "wall_time_s"} for r in records[run]] for run in "ab"]
    assert timeless[0] == timeless[1]  # same seed, same run
    last = records["a"][-1]
    assert last["personal_models"] == 10  # after 10 rounds of 5, every client uses its own sparse model
    assert 0 < last["pfedgate_density"] <= 0.5
    assert last["personal_acc_mean"] > 0.6, last  # chance is 0.1
    assert records["fedavg"][-1]["client_acc_mean"] > 0.6  # the comparison the note above reports


# -- what a task costs --------------------------------------------------------------------------------
# MLP 4 -> 6 -> 5 -> 3 with a dense head: 6 + 5 = 11 blocks. Forward FLOPs of one sample, 2 per multiply-add as
# torch's FlopCounterMode counts them: 2*4*6 = 48, 2*6*5 = 60, head 2*5*3 = 30, dense 138; the gate
# Linear(4, 11): 2*4*11 = 88.
def mlp_4_6_5_3():
    torch.manual_seed(0)
    return MLP(4, [6, 5], 3)


def test_layer_costs_of_a_small_mlp_by_hand():
    model, rng = mlp_4_6_5_3().train(), torch.get_rng_state()
    costs = layer_costs(model, (4,))
    assert model.training and torch.equal(torch.get_rng_state(), rng)  # the model's mode and torch's stream kept
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # no hook left behind
    assert costs.flops == (48.0, 60.0, 30.0) and costs.rest == 0.0 and costs.gate == 88.0 and costs.dense == 138.0
    assert costs.out == (0, 1, -1)  # gated layers 0 and 1; the head's outputs are dense
    assert costs.feed == (-1, 0, 1)  # the input; layer 0's units; layer 1's units
    # 3 of 6 and 2 of 5 units kept: a dense MLP 4 -> 3 -> 2 -> 3, 2 * (4*3 + 3*2 + 2*3) = 48
    assert costs.forward([0.5, 0.4]) == pytest.approx(48.0, abs=1e-12)
    assert costs.forward([1.0, 1.0]) == 138.0
    # gating the head too: its rows are a third gated layer (blocks 11..13), and the gate has 14 outputs
    gated_head = layer_costs(mlp_4_6_5_3(), (4,), dense_head=False)
    assert gated_head.out == (0, 1, 2) and gated_head.gate == 2 * 4 * 14
    assert gated_head.forward([0.5, 0.4, 2 / 3]) == pytest.approx(2 * (4 * 3 + 3 * 2 + 2 * 2), abs=1e-12)


def test_layer_costs_of_a_small_cnn_by_hand():
    # CNN on 1x4x4 images, channels 2 then 3: conv 1 (4x4 out, then pooled to 2x2): 2 * 1*9 per output element,
    # 2*16 elements: 576; conv 2 on 2x2 (no pooling below 4): 2 * 2*9 * 3*4 = 432; the head Linear(3*2*2, 2): 48.
    # A channel of conv 2 is 4 inputs of the flattened head: the head's input share is conv 2's kept share
    costs = layer_costs(CNN((1, 4, 4), [2, 3], 2), (16,))
    assert costs.flops == (576.0, 432.0, 48.0) and costs.out == (0, 1, -1) and costs.feed == (-1, 0, 1)
    assert costs.gate == 2 * 16 * 5
    # 1 of 2 and 1 of 3 channels: 576/2 + 432 * 1/3 * 1/2 + 48/3 = 288 + 72 + 16
    assert costs.forward([0.5, 1 / 3]) == pytest.approx(376.0)


def test_a_layer_fed_through_a_residual_sum_or_a_sigmoid_is_charged_all_its_inputs():
    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(self.a(x)) + x  # a removed unit of a leaves x in b's input
            return self.head(torch.sigmoid(self.b(h)))  # sigmoid(0) = 0.5: still an input of the head

    costs = layer_costs(Residual(), (4,))
    assert costs.out == (0, 1, -1) and costs.feed == (-1, -1, -1)
    assert costs.forward([0.5, 0.5]) == 2 * 4 * 2 + 2 * 4 * 2 + 2 * 4 * 2  # outputs only: 16 + 16 + the head's 32
    model = Residual()
    assert not feeds(model, torch.rand(1, 4), model.a, model.b) and not feeds(model, torch.rand(1, 4), model.b, model.head)


class PricingServer:
    """What task_flops asks of the engine: the reference trainer and the dense price of a step."""

    def __init__(self, trainer, step):
        self.trainer, self.step = trainer, step

    def step_flops(self, client_id):
        return self.step


def test_task_flops_charge_the_kept_sub_model_and_the_gate_by_hand():
    trainer = LocalTrainer(mlp_4_6_5_3(), TrainingConfig(batch_size=2))
    server = PricingServer(trainer, 3 * 2 * 138)  # training_flops: 3 x forward x batch 2 = 828 a dense step
    strategy = PFedGate(sparsity=0.5)
    # the first task: the budget on every gated layer, 3 of 6 and 2.5 of 5 units:
    # 48/2 + 60 * 1/2 * 1/2 + 30/2 = 54, plus the gate's 88; 4 steps of 3 * 2 * (54 + 88) = 852
    assert strategy.task_flops(server, task(trainer.flat, steps=4)) == 4 * 852
    # the client reported keeping 3 of 6 and 2 of 5 units: 4 steps of 3 * 2 * (48 + 88) = 816 against 828
    update = Update(task=task(trainer.flat), params=trainer.flat, n_samples=1, steps=1, loss=0.0, arrived_at=0.0,
                    stats={"pfedgate_density": 0.5, "pfedgate_kept_0": 0.5, "pfedgate_kept_1": 0.4})
    strategy.on_update(server, update)  # not part of a round: only the shares are kept
    assert strategy.task_flops(server, task(trainer.flat, steps=4)) == pytest.approx(4 * 816, rel=1e-12)
    assert PFedGate(sparsity=0.5, charge="dense").task_flops(server, task(trainer.flat, steps=4)) == 4 * 828
    # a model with nothing to gate (logreg, dense head) trains as FedAvg and costs what FedAvg's task does
    logreg = LocalTrainer(build_model(ModelConfig(name="logreg"), (4,), 3), TrainingConfig(batch_size=2))
    assert strategy.task_flops(PricingServer(logreg, 30.0), task(logreg.flat, steps=4)) == 120.0


def test_a_task_reports_each_layers_kept_share_averaged_over_its_steps():
    trainer, d = LocalTrainer(mlp_4_6_5_3(), TrainingConfig(lr=0.1, batch_size=64)), data(features=4, classes=3)
    strategy, blocks = PFedGate(sparsity=0.5), block_map(trainer.model)
    gates = strategy.gate(blocks, d, {}, seed=3)(d.x).detach()  # one full-batch step: this gate, this kept set
    keep = select_blocks(gates, blocks.sizes, blocks.layer, 0.5 * float(blocks.sizes.sum()))
    stats = strategy.client_train(trainer, task(trainer.flat), d, {}, seed=3).stats
    by_hand = [float(keep[:6].sum()) / 6, float(keep[6:].sum()) / 5]  # blocks 0-5: layer 0, 6-10: layer 1
    assert [stats["pfedgate_kept_0"], stats["pfedgate_kept_1"]] == pytest.approx(by_hand, abs=1e-12)
    assert stats["pfedgate_density"] == pytest.approx((by_hand[0] * 6 * 5 + by_hand[1] * 5 * 7) / (6 * 5 + 5 * 7))


def test_the_simulated_compute_time_and_train_flops_follow_the_sparse_charge():
    # one client on a device of 1 FLOP/s with a free network: a round lasts its task's FLOPs in seconds
    from hetfl.engine.simulator import ClientPool, Simulator

    from conftest import blobs, profile, run_rounds

    def simulate(charge):
        x, y = blobs(8, features=4)
        trainer = LocalTrainer(mlp_4_6_5_3(), TrainingConfig(lr=0.1, batch_size=2, local_steps=3))
        sim = Simulator(strategy=PFedGate(sparsity=0.5, charge=charge, clients_per_round=1), trainer=trainer,
                        pool=ClientPool(x, y, [torch.arange(8)]), profiles=[profile(0, flops=1.0, bw=1e15)],
                        flops_per_step=3 * 2 * 138, seed=0)
        times, flops = [], []
        run_rounds(sim, 2, observe=lambda s: (times.append(s.now), flops.append(s.counters.trained_flops)))
        return sim, times, flops

    dense, times, flops = simulate("dense")
    assert times == pytest.approx([3 * 828, 6 * 828], abs=1e-6) and flops == [3 * 828, 6 * 828]
    sparse, times, flops = simulate("sparse")
    first = 3 * 3 * 2 * (54 + 88)  # the first task: sparsity 0.5 on every layer (see the test above)
    kept = sparse.strategy._kept[0]  # the shares the first task reported price the second
    second = 3 * 3 * 2 * (layer_costs(mlp_4_6_5_3(), (4,)).forward(kept) + 88)
    assert times == pytest.approx([first, first + second], abs=1e-6)
    assert flops == pytest.approx([first, first + second], rel=1e-12)
    assert torch.equal(sparse.params, dense.params)  # what is charged changes the clock, not the training
