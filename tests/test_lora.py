"""LoRA adapters and the aggregation arithmetic of HetLoRA and FLoRA, on small hand cases."""

import pytest
import torch
from torch import nn

from hetfl.models.lora import (
    LoRALinear,
    aggregate_flora,
    aggregate_hetlora,
    aggregate_naive,
    attach_lora,
    hetlora_sparsity_weights,
    load_lora_state,
    lora_state,
    merge_into,
    merge_lora,
    pad_rank,
    truncate,
)
from hetfl.models.transformer import TinyLM


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
