"""TinyLM: shapes, causality, the parameter count and perplexity, checked by hand."""

import math

import pytest
import torch
from torch.nn import functional as F

from hetfl.models.transformer import TinyLM, lm_loss, perplexity


def tiny(**kw) -> TinyLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=11, d_model=16, n_heads=4, d_ff=24, n_layers=2, context=8)
    cfg.update(kw)
    return TinyLM(**cfg)


def test_logits_shape_and_finite():
    model = tiny()
    x = torch.randint(0, 11, (3, 8))
    out = model(x)
    assert out.shape == (3, 8, 11)
    assert torch.isfinite(out).all()
    assert list(model.buffers()) == []


def test_causal_a_later_token_does_not_change_earlier_logits():
    model = tiny()
    x = torch.randint(0, 11, (1, 8))
    y = x.clone()
    y[0, 5] = (x[0, 5] + 1) % 11
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_attention_matches_torch_reference():
    model = tiny()
    attn = model.blocks[0].attn
    h = torch.randn(2, 6, 16)
    n, L, hd = 2, 6, attn.n_heads * attn.d_head

    def split(t):
        return t.view(n, L, attn.n_heads, attn.d_head).transpose(1, 2)

    ref = F.scaled_dot_product_attention(split(attn.q(h)), split(attn.k(h)), split(attn.v(h)), is_causal=True)
    ref = attn.o(ref.transpose(1, 2).reshape(n, L, hd))
    torch.testing.assert_close(attn(h), ref, atol=1e-5, rtol=1e-5)


def test_parameter_count_by_hand():
    V, d, H, dh, f, n_layers, P = 11, 16, 4, 4, 24, 2, 8
    per_block = (
        2 * d                      # ln1
        + 3 * (d * H * dh + H * dh)  # q, k, v
        + (H * dh * d + d)         # o
        + 2 * d                    # ln2
        + (d * f + f) + (f * d + d)  # fc1, fc2
    )
    tied = V * d + P * d + n_layers * per_block + 2 * d
    assert per_block == 2 * 16 + 3 * 272 + 272 + 32 + 408 + 400
    assert sum(p.numel() for p in tiny().parameters()) == tied
    assert sum(p.numel() for p in tiny(tie_weights=False).parameters()) == tied + V * d


def test_per_layer_sizes_after_pruning_shape():
    model = tiny(n_heads=[4, 2], d_ff=[24, 5], d_head=4)
    assert [b.attn.n_heads for b in model.blocks] == [4, 2]
    assert [b.ff.fc1.out_features for b in model.blocks] == [24, 5]
    assert model(torch.zeros(2, 3, dtype=torch.long)).shape == (2, 3, 11)


def test_perplexity_of_a_zero_model_is_the_vocabulary_size():
    # every parameter zero -> embeddings, layer norms and logits are all zero -> uniform prediction
    model = tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    tokens = torch.arange(30) % 11
    assert perplexity(model, tokens) == pytest.approx(11.0, rel=1e-6)
    assert lm_loss(model, tokens.view(3, 10)[:, :9]).item() == pytest.approx(math.log(11), rel=1e-6)


def test_perplexity_is_exp_of_the_mean_next_token_loss():
    model = tiny()
    rows = torch.randint(0, 11, (4, 9))  # context 8 -> 8 predictions a row
    logits = model(rows[:, :-1])
    expected = math.exp(F.cross_entropy(logits.reshape(-1, 11), rows[:, 1:].reshape(-1)).item())
    assert perplexity(model, rows) == pytest.approx(expected, rel=1e-5)
    # a 1-D stream is cut into rows of context + 1 tokens; the short tail is dropped
    assert perplexity(model, torch.cat([rows.reshape(-1), torch.tensor([1])])) == pytest.approx(expected, rel=1e-5)


def test_training_lowers_the_loss_on_a_repeating_pattern():
    model = tiny(tie_weights=False)
    data = (torch.arange(9 * 16) % 3).view(16, 9)
    before = perplexity(model, data)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(40):
        opt.zero_grad()
        lm_loss(model, data).backward()
        opt.step()
    assert perplexity(model, data) < min(before, 1.5)


def test_invalid_sizes_and_too_long_inputs_are_refused():
    with pytest.raises(ValueError, match="n_heads"):
        TinyLM(vocab_size=11, d_model=15, n_heads=4, d_ff=8, n_layers=1, context=4)
    with pytest.raises(ValueError, match="activation"):
        TinyLM(vocab_size=11, d_model=16, n_heads=4, d_ff=8, n_layers=1, context=4, activation="tanh")
    with pytest.raises(ValueError, match="context"):
        tiny()(torch.zeros(1, 9, dtype=torch.long))
