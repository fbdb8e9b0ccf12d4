"""LoRA adapters and the aggregation arithmetic of HetLoRA and FLoRA, on small hand cases."""

import pytest
import torch
from torch import nn

from hetfl.models.lora import (
    LoRALinear,
    aggregate_flora,
    aggregate_hetlora,
    aggregate_naive,
    adapter_norm,
    attach_lora,
    hetlora_sparsity_weights,
    load_lora_state,
    lora_state,
    merge_into,
    merge_lora,
    pad_rank,
    sparsity_weights,
    truncate,
)
from hetfl.models.transformer import TinyLM
from hetfl.strategies import FedLoRA, Task, Update

from conftest import make_simulator, profile


def tiny() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(vocab_size=11, d_model=16, n_heads=4, d_ff=24, n_layers=2, context=8)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --- the adapter ---------------------------------------------------------------------------------------


def test_lora_linear_starts_as_the_base_layer_and_adds_scaled_BA():
    torch.manual_seed(0)
    base = nn.Linear(3, 2)
    lora = LoRALinear(base, rank=2, alpha=4.0)
    x = torch.randn(5, 3)
    torch.testing.assert_close(lora(x), base(x))  # B = 0 at the start
    assert lora.A.shape == (2, 3) and lora.B.shape == (2, 2) and lora.scaling == 2.0
    assert not base.weight.requires_grad and lora.A.requires_grad and lora.B.requires_grad
    with torch.no_grad():
        lora.A.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        lora.B.copy_(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
    # delta = 2 * B A = [[2,0,0],[0,6,0]]
    torch.testing.assert_close(lora.delta(), torch.tensor([[2.0, 0, 0], [0, 6.0, 0]]))
    torch.testing.assert_close(lora(x), base(x) + x @ lora.delta().T)


def test_attach_lora_targets_names_freezes_the_base_and_keeps_outputs():
    model = tiny()
    x = torch.randint(0, 11, (2, 8))
    before = model(x)
    attach_lora(model, rank=2, targets=("q", "v"))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == ["blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.attn.q", "blocks.1.attn.v"]
    torch.testing.assert_close(model(x), before)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 4 * (2 * 16 + 16 * 2)  # four adapters of A (2x16) and B (16x2)
    with pytest.raises(ValueError, match="targets"):
        attach_lora(tiny(), rank=2, targets=("nope",))


def test_lora_state_round_trip_and_rank_change_on_load():
    model = attach_lora(tiny(), rank=2, targets=("q",))
    state = lora_state(model)
    assert sorted(state) == ["blocks.0.attn.q.A", "blocks.0.attn.q.B", "blocks.1.attn.q.A", "blocks.1.attn.q.B"]
    other = attach_lora(tiny(), rank=2, targets=("q",))
    torch.manual_seed(1)
    new = {k: torch.randn_like(v) for k, v in state.items()}
    load_lora_state(other, new)
    torch.testing.assert_close(lora_state(other), new)
    # a download of another rank replaces the factors (HetLoRA truncation, FLoRA stacks)
    wider = {k: torch.zeros(4, 16) if k.endswith(".A") else torch.zeros(16, 4) for k in state}
    load_lora_state(other, wider)
    assert other.blocks[0].attn.q.rank == 4
    with pytest.raises(KeyError, match="blocks.1.attn.q.A"):
        load_lora_state(other, {k: v for k, v in new.items() if k != "blocks.1.attn.q.A"})


def test_merge_lora_gives_a_plain_model_with_the_same_outputs():
    model = attach_lora(tiny(), rank=2, targets=("q", "v", "fc1"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.B.normal_()
    x = torch.randint(0, 11, (2, 8))
    with torch.no_grad():
        before = model(x)
        merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(x), before, atol=1e-5, rtol=1e-5)


def test_merge_into_adds_the_delta_to_the_weight():
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(2))
    merge_into(lin, torch.tensor([[0.0, 1.0], [2.0, 0.0]]))
    torch.testing.assert_close(lin.weight.data, torch.tensor([[1.0, 1.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        merge_into(lin, torch.zeros(3, 2))


# --- aggregation arithmetic ----------------------------------------------------------------------------


def test_pad_and_truncate_by_hand():
    A, B = t([[1, 2]]), t([[3], [4]])  # rank 1, d_in 2, d_out 2
    A3, B3 = pad_rank(A, B, 3)
    assert torch.equal(A3, t([[1, 2], [0, 0], [0, 0]])) and torch.equal(B3, t([[3, 0, 0], [4, 0, 0]]))
    assert torch.equal(B3 @ A3, B @ A)  # zero padding does not change the product
    A1, B1 = truncate(A3, B3, 1)
    assert torch.equal(A1, A) and torch.equal(B1, B)


def test_hetlora_pads_averages_and_the_product_has_cross_terms():
    # client 1 rank 1, client 2 rank 2, p = (0.5, 0.5), d_in = d_out = 2
    A1, B1 = t([[1, 0]]), t([[1], [0]])
    A2, B2 = t([[0, 1], [1, 1]]), t([[0, 1], [2, 0]])
    A, B = aggregate_hetlora([A1, A2], [B1, B2], [1.0, 1.0])
    assert torch.equal(A, t([[0.5, 0.5], [0.5, 0.5]]))
    assert torch.equal(B, t([[0.5, 0.5], [1.0, 0.0]]))
    # the global product (sum p B~)(sum p A~) is not sum p B A ...
    exact = 0.5 * B1 @ A1 + 0.5 * B2 @ A2
    assert torch.equal(exact, t([[1.0, 0.5], [0.0, 1.0]]))
    assert torch.equal(B @ A, t([[0.5, 0.5], [0.5, 0.5]]))
    # ... and client 1 downloads the first rank-one component only
    Ad, Bd = truncate(A, B, 1)
    assert torch.equal(Bd @ Ad, t([[0.25, 0.25], [0.5, 0.5]]))
    # a larger global rank only adds zero rows / columns
    A4, B4 = aggregate_hetlora([A1, A2], [B1, B2], [1.0, 1.0], rank=4)
    assert torch.equal(A4[:2], A) and torch.equal(A4[2:], torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="rank"):
        aggregate_hetlora([A1, A2], [B1, B2], [1.0, 1.0], rank=1)


def test_hetlora_sparsity_weights_follow_the_frobenius_norm_of_BA():
    A1, B1 = t([[3, 0]]), t([[1], [0]])  # ||B A||_F = 3
    A2, B2 = t([[0, 1]]), t([[1], [0]])  # ||B A||_F = 1
    w = hetlora_sparsity_weights([A1, A2], [B1, B2])
    torch.testing.assert_close(w, t([0.75, 0.25]))


def test_flora_stacking_is_exactly_the_weighted_sum_of_products_for_ranks_1_2_4():
    g = torch.Generator().manual_seed(0)
    d_in, d_out, ranks, p = 5, 3, [1, 2, 4], torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    As = [torch.randn(r, d_in, generator=g, dtype=torch.float64) for r in ranks]
    Bs = [torch.randn(d_out, r, generator=g, dtype=torch.float64) for r in ranks]
    A, B = aggregate_flora(As, Bs, p)
    assert A.shape == (7, d_in) and B.shape == (d_out, 7)
    exact = sum(pk * Bk @ Ak for pk, Ak, Bk in zip(p, As, Bs))
    torch.testing.assert_close(B @ A, exact, atol=1e-12, rtol=1e-12)
    # the stacked B blocks are the clients' B unscaled; the A blocks are scaled by p_k
    assert torch.equal(B[:, 1:3], Bs[1]) and torch.allclose(A[1:3], 0.3 * As[1])
    # weights are normalised: raw sample counts give the same stack
    A_n, B_n = aggregate_flora(As, Bs, [2.0, 3.0, 5.0])
    torch.testing.assert_close(B_n @ A_n, exact, atol=1e-12, rtol=1e-12)


def test_naive_factor_averaging_is_not_the_average_update_hand_example():
    # two rank-1 clients with 1x1 factors, p = (1/2, 1/2):
    #   sum p B A = (1*1 + 0*0) / 2 = 1/2,   (sum p B)(sum p A) = (1/2)(1/2) = 1/4
    As, Bs = [t([[1.0]]), t([[0.0]])], [t([[1.0]]), t([[0.0]])]
    A, B = aggregate_naive(As, Bs, [0.5, 0.5])
    assert (B @ A).item() == 0.25
    A_f, B_f = aggregate_flora(As, Bs, [0.5, 0.5])
    assert (B_f @ A_f).item() == 0.5
    with pytest.raises(ValueError, match="rank"):
        aggregate_naive([t([[1.0]]), t([[1.0], [1.0]])], [t([[1.0]]), t([[1.0, 1.0]])], [0.5, 0.5])


def test_flora_round_merged_into_the_base_model_equals_the_average_update():
    # two clients with different ranks tune q; the server stacks and every client merges the product
    torch.manual_seed(0)
    x = torch.randint(0, 11, (2, 8))
    clients = []
    for r in (1, 3):
        m = attach_lora(tiny(), rank=r, targets=("q",))
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, LoRALinear):
                    mod.B.normal_()
        clients.append(lora_state(m))
    p = [0.25, 0.75]
    base = tiny()
    for name in ("blocks.0.attn.q", "blocks.1.attn.q"):
        A, B = aggregate_flora([c[name + ".A"] for c in clients], [c[name + ".B"] for c in clients], p)
        merge_into(base.get_submodule(name), B @ A)
    expected = tiny()
    for name in ("blocks.0.attn.q", "blocks.1.attn.q"):
        delta = sum(pk * c[name + ".B"] @ c[name + ".A"] for pk, c in zip(p, clients))
        merge_into(expected.get_submodule(name), delta)
    torch.testing.assert_close(base(x), expected(x))


def test_aggregators_refuse_mismatched_inputs():
    A, B = torch.zeros(1, 2), torch.zeros(2, 1)
    with pytest.raises(ValueError, match="weights"):
        aggregate_flora([A, A], [B, B], [1.0])
    with pytest.raises(ValueError, match="rank"):
        aggregate_flora([A], [torch.zeros(2, 2)], [1.0])
    with pytest.raises(ValueError, match="positive"):
        aggregate_hetlora([A, A], [B, B], [0.0, 0.0])


# --- the fedlora strategy: FLoRA's downloads, HetLoRA's sparsity weights -------------------------------


def _server(sim, params):
    """What FedLoRA's server half reads: the reference trainer, the current params, the device profiles."""
    from types import SimpleNamespace

    return SimpleNamespace(trainer=sim.trainer, params=params, profiles=[profile(c) for c in range(3)])


def _arrival(client: int, rank: int, n: int, factors) -> "Update":
    task = Task(task_id=client, client_id=client, version=0, params=torch.zeros(0), steps=0, dispatched_at=0.0,
                options={"rank": rank})
    return Update(task=task, params=FedLoRA.pack(factors), n_samples=n, steps=0, loss=0.0, arrived_at=0.0)


def test_flora_downloads_per_layer_the_smaller_of_the_stacks_and_the_dense_weight():
    strategy = FedLoRA(aggregation="flora", clients_per_round=1)
    sim = make_simulator(strategy, [8, 8, 8], [profile(c) for c in range(3)])
    layer, = strategy.layers(sim.trainer)
    assert (layer.d_out, layer.d_in) == (3, 4)  # logreg: one 3 x 4 weight = 12 numbers; a rank of stack: 3 + 4 = 7
    g = torch.Generator().manual_seed(0)
    params = sim.params
    for round_, expected in ((1, {"stacks": 7}), (2, {"dense": 12})):  # missed ranks 1: 7 < 12; 2: 14 > 12
        factors = [(torch.randn(1, 4, generator=g), torch.randn(3, 1, generator=g))]
        params = strategy.aggregate(_server(sim, params), [_arrival(0, 1, 8, factors)])  # a rank-1 round
        server = _server(sim, params)
        plan = strategy.configure(server, 2)  # client 2 took part in no round: it has missed `round_` stacks
        assert plan["options"]["stack_ranks"] == [1] * round_
        assert {k: v.numel() for k, v in plan["payload"].items()} == expected
        task = Task(9, 2, round_, params, 0, 0.0, plan["payload"], plan["options"])
        assert strategy.transfer_bytes(server, task) == (4 * sum(expected.values()), 4 * 4 * 7)  # up: its rank-4 adapters
        state: dict = {}
        strategy.client_train(sim.trainer, task, sim.pool.data(2), state, seed=0)
        assert torch.equal(state["base"], params)  # either way it holds the server's model, bit for bit
    assert torch.equal(plan["payload"]["dense"], params[layer.weight])
    assert FedLoRA.dense_layers([layer], 0) == [] and FedLoRA.dense_layers([layer], 1) == []
    assert FedLoRA.dense_layers([layer], 2) == [0]


def test_hetlora_norm_weighting_weights_clients_by_the_frobenius_norm_of_their_update():
    strategy = FedLoRA(aggregation="hetlora", ranks=[1, 2], weighting="norm", clients_per_round=2)
    sim = make_simulator(strategy, [8, 8], [profile(0), profile(1)])
    A1, B1 = torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[3.0], [0], [0]])  # B1 A1: one entry 3, norm 3
    A2 = torch.tensor([[0.0, 1, 0, 0], [0, 0, 1, 0]])
    B2 = torch.tensor([[0.0, 0], [0, 0], [1, 0]])  # B2 A2: one entry 1, norm 1
    updates = [_arrival(0, 1, 1, [(A1, B1)]), _arrival(1, 2, 3, [(A2, B2)])]  # samples 1 : 3, norms 3 : 1
    (A, B), = strategy.unpack(strategy.layers(sim.trainer), strategy.aggregate(_server(sim, sim.params), updates), 2)
    torch.testing.assert_close(A, torch.tensor([[0.75, 0.25, 0, 0], [0, 0, 0.25, 0]]))  # p = 3/4, 1/4
    torch.testing.assert_close(B, torch.tensor([[2.25, 0], [0, 0], [0.25, 0]]))
    samples = FedLoRA(aggregation="hetlora", ranks=[1, 2], clients_per_round=2)
    (A, B), = samples.unpack(samples.layers(sim.trainer), samples.aggregate(_server(sim, sim.params), updates), 2)
    torch.testing.assert_close(A[0], torch.tensor([0.25, 0.75, 0, 0]))  # by samples: p = 1/4, 3/4


def test_sparsity_weights_take_one_norm_over_all_of_a_clients_layers():
    one = [(t([[3, 0]]), t([[1], [0]])), (t([[0, 4]]), t([[1], [0]]))]  # layer norms 3 and 4: sqrt(9 + 16) = 5
    other = [(t([[0, 0]]), t([[1], [0]])), (t([[5, 0]]), t([[3], [0]]))]  # 0 and 15: 15
    torch.testing.assert_close(adapter_norm(one), torch.tensor(5.0, dtype=torch.float64))
    torch.testing.assert_close(sparsity_weights([one, other]), t([0.25, 0.75]))
    zero = [(t([[1, 0]]), t([[0], [0]]))]  # B = 0: no change yet, equal weights
    torch.testing.assert_close(sparsity_weights([zero, zero]), t([0.5, 0.5]))


def test_norm_weighting_is_only_for_hetlora_and_says_which_key():
    from hetfl.config import validate
    from hetfl.errors import ConfigError
    from hetfl.strategies import build_strategy

    cfg = validate({"data": {"dataset": "text"}, "model": {"name": "tinylm"},
                    "strategy": {"name": "fedlora", "params": {"aggregation": "flora", "weighting": "norm"}}})
    with pytest.raises(ConfigError) as err:
        build_strategy(cfg.strategy, cfg.training, cfg.model)
    assert "weighting" in str(err.value) and "\n" not in str(err.value)
