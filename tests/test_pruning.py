"""Structured pruning of TinyLM, its cost estimates, and their hand-computed sizes."""

import pytest
import torch

from hetfl.models.lora import attach_lora, lora_modules, merge_lora
from hetfl.models.pruning import (
    Importance,
    importance,
    inference_latency,
    kept,
    memory_breakdown,
    memory_bytes,
    param_count,
    prune,
)
from hetfl.models.transformer import TinyLM, lm_loss

V, D, H, DH, F_, LAYERS, P = 11, 16, 4, 4, 24, 2, 8


def tiny(**kw) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(vocab_size=V, d_model=D, n_heads=H, d_ff=F_, n_layers=LAYERS, context=P, **kw)


def block_params(h: int, f: int) -> int:
    return 4 * D + 3 * (D * h * DH + h * DH) + (h * DH * D + D) + (D * f + f) + (f * D + D)


def tokens(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (n, P), generator=torch.Generator().manual_seed(seed))


def test_param_count_by_hand_before_and_after_pruning_half():
    model = tiny()
    full = V * D + P * D + 2 * D + LAYERS * block_params(H, F_)
    assert param_count(model) == full == 4256
    # ratio 0.5 removes floor(0.5 * 4) = 2 heads and floor(0.5 * 24) = 12 channels in every layer
    small = prune(model, 0.5)
    assert [b.attn.n_heads for b in small.blocks] == [2, 2]
    assert [b.ff.fc1.out_features for b in small.blocks] == [12, 12]
    assert param_count(small) == V * D + P * D + 2 * D + LAYERS * block_params(2, 12) == 2392
    out = small(tokens())
    assert out.shape == (3, P, V) and torch.isfinite(out).all()
    assert isinstance(small, TinyLM) and param_count(model) == 4256  # the original is untouched


def test_prune_leaves_the_global_rng_alone_and_checks_the_scores():
    model = attach_lora(tiny(), rank=2)
    state = torch.random.get_rng_state()
    prune(model, 0.5)
    assert torch.equal(torch.random.get_rng_state(), state)
    wrong = Importance(heads=[torch.ones(3), torch.ones(4)], channels=[torch.ones(24), torch.ones(24)])
    with pytest.raises(ValueError, match="scores"):
        prune(tiny(), 0.5, wrong)


def test_kept_counts_floor_the_removals_and_keep_one():
    assert kept(4, 0.5) == 2 and kept(4, 0.3) == 3 and kept(24, 0.3) == 17 and kept(10, 0.7) == 3
    assert kept(4, 0.99) == 1 and kept(4, 0.0) == 4
    with pytest.raises(ValueError, match="ratio"):
        kept(4, 1.0)


def test_ratio_zero_gives_exactly_the_same_logits():
    model = tiny()
    x = tokens()
    same = prune(model, 0.0, importance(model, tokens(seed=1)))
    assert param_count(same) == param_count(model)
    assert torch.equal(same(x), model(x))


def test_pruning_keeps_the_highest_scored_heads_and_channels_in_order():
    model = tiny()
    scores = Importance(
        heads=[torch.tensor([4.0, 1.0, 3.0, 2.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])],
        channels=[torch.arange(24.0), torch.arange(24.0).flip(0)],
    )
    small = prune(model, 0.5, scores)
    q0, q1 = model.blocks[0].attn.q.weight, model.blocks[1].attn.q.weight
    assert torch.equal(small.blocks[0].attn.q.weight, torch.cat([q0[0:4], q0[8:12]]))   # heads 0 and 2
    assert torch.equal(small.blocks[1].attn.q.weight, q1[8:16])                          # heads 2 and 3
    o0 = model.blocks[0].attn.o.weight
    assert torch.equal(small.blocks[0].attn.o.weight, torch.cat([o0[:, 0:4], o0[:, 8:12]], dim=1))
    assert torch.equal(small.blocks[0].ff.fc1.weight, model.blocks[0].ff.fc1.weight[12:])
    assert torch.equal(small.blocks[1].ff.fc2.weight, model.blocks[1].ff.fc2.weight[:, :12])
    assert torch.equal(small.blocks[0].ff.fc2.bias, model.blocks[0].ff.fc2.bias)


def test_removing_dead_heads_and_channels_does_not_change_the_output():
    # zero one head (its q, k, v rows and o columns) and 6 FFN channels per layer: the L2 score of each
    # is 0, so ratio 0.25 (1 of 4 heads, 6 of 24 channels) removes exactly those, and they added nothing
    model = tiny()
    with torch.no_grad():
        for layer, (head, chans) in enumerate([(1, range(0, 6)), (3, range(10, 16))]):
            attn, ff = model.blocks[layer].attn, model.blocks[layer].ff
            rows = slice(head * DH, (head + 1) * DH)
            for lin in (attn.q, attn.k, attn.v):
                lin.weight[rows] = 0
                lin.bias[rows] = 0
            attn.o.weight[:, rows] = 0
            ff.fc1.weight[list(chans)] = 0
            ff.fc1.bias[list(chans)] = 0
            ff.fc2.weight[:, list(chans)] = 0
    scores = importance(model)
    assert scores.heads[0][1] == 0 and scores.heads[1][3] == 0 and (scores.channels[1][10:16] == 0).all()
    small = prune(model, 0.25, scores)
    assert param_count(small) == V * D + P * D + 2 * D + LAYERS * block_params(3, 18)
    x = tokens()
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)


def test_taylor_score_of_a_head_is_the_sum_of_abs_weight_times_gradient():
    model = tiny()
    x = tokens(4)
    scores = importance(model, x)
    ref = tiny()
    lm_loss(ref, x).backward()
    attn = ref.blocks[0].attn
    rows = slice(2 * DH, 3 * DH)  # head 2 of layer 0
    expected = sum(
        (lin.weight[rows] * lin.weight.grad[rows]).abs().sum() + (lin.bias[rows] * lin.bias.grad[rows]).abs().sum()
        for lin in (attn.q, attn.k, attn.v)
    ) + (attn.o.weight[:, rows] * attn.o.weight.grad[:, rows]).abs().sum()
    torch.testing.assert_close(scores.heads[0][2], expected.detach())
    fc1, fc2 = ref.blocks[1].ff.fc1, ref.blocks[1].ff.fc2
    ch = 5
    expected_ch = ((fc1.weight[ch] * fc1.weight.grad[ch]).abs().sum() + (fc1.bias[ch] * fc1.bias.grad[ch]).abs()
                   + (fc2.weight[:, ch] * fc2.weight.grad[:, ch]).abs().sum())
    torch.testing.assert_close(scores.channels[1][ch], expected_ch.detach())
    assert all(p.grad is None for p in model.parameters())  # scoring leaves the model alone


def test_pruning_with_lora_attached_slices_the_adapters_consistently():
    model = attach_lora(tiny(), rank=2, targets=("q", "v", "o", "fc1", "fc2"))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.B.normal_()
    scores = importance(model, tokens(seed=2))
    small = prune(model, 0.5, scores)
    adapters = lora_modules(small)
    assert sorted(adapters) == sorted(lora_modules(model))
    assert small.blocks[0].attn.q.A.shape == (2, D) and small.blocks[0].attn.q.B.shape == (2 * DH, 2)
    assert small.blocks[0].attn.o.A.shape == (2, 2 * DH) and small.blocks[0].attn.o.B.shape == (D, 2)
    assert small.blocks[0].ff.fc2.A.shape == (2, 12)
    trainable = {n for n, p in small.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    # pruning commutes with merging the adapters into the base weights
    x = tokens()
    with torch.no_grad():
        a = merge_lora(small)(x)
        b = prune(merge_lora(model), 0.5, scores)(x)
        torch.testing.assert_close(small(x), a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_memory_estimate_by_hand():
    # TinyLM above, LoRA rank 2 on q and v, batch 3, context 8, Adam (two states), float32
    model = tiny()
    lora = LAYERS * 2 * 2 * (D + H * DH)  # per layer two adapters of r*(d_in + d_out)
    per_layer = 2 * P * D + 3 * P * H * DH + 2 * H * P * P + P * H * DH + 2 * P * D + 2 * P * F_ + 2 * P * 2
    per_sample = P * D + LAYERS * per_layer + 2 * P * D + P * V
    parts = memory_breakdown(model, rank=2, batch=3, context=8)
    assert parts == {
        "parameters": 4 * 4256, "lora": 4 * lora, "gradients": 4 * lora, "optimizer": 4 * 2 * lora,
        "activations": 4 * 3 * per_sample, "total": 4 * (4256 + 4 * lora + 3 * per_sample),
    }
    assert memory_bytes(model, rank=2, batch=3, context=8) == parts["total"] == 73632
    # with the adapters already attached the estimate is the same (their current rank is ignored)
    assert memory_bytes(attach_lora(tiny(), rank=5), rank=2, batch=3, context=8) == 73632
    assert memory_bytes(model, rank=4, batch=3, context=8) > 73632
    assert memory_bytes(prune(model, 0.5), rank=2, batch=3, context=8) < 73632


def test_inference_latency_is_a_positive_median_and_pruning_does_not_slow_down_much():
    model = TinyLM(vocab_size=256, d_model=32, n_heads=4, d_ff=64, n_layers=2, context=32)
    x = torch.randint(0, 256, (8, 32))
    t_full = inference_latency(model, x, repeats=5)
    t_half = inference_latency(prune(model, 0.5), x, repeats=5)
    assert 0 < t_full < 1.0 and 0 < t_half < 1.0
    with pytest.raises(ValueError, match="repeats"):
        inference_latency(model, x, repeats=0)
