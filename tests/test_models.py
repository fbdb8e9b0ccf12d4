"""Model zoo shapes and the cost model (FLOPs per step, bytes per transfer), by hand."""

import pytest
import torch

from hetfl.config import ModelConfig
from hetfl.errors import ConfigError
from hetfl.models import build_model, flops_per_sample, model_bytes
from hetfl.models.cost import training_flops


def test_mlp_flops_and_bytes_by_hand():
    # 64 -> 32 -> 10: forward 2*(64*32 + 32*10) = 4736 FLOPs a sample
    # parameters 64*32 + 32 + 32*10 + 10 = 2410 floats = 9640 bytes
    model = build_model(ModelConfig(name="mlp", hidden=[32]), (64,), 10)
    assert flops_per_sample(model, (64,)) == 2 * (64 * 32 + 32 * 10)
    assert model_bytes(model) == 4 * 2410
    assert training_flops(4736, batch_size=16) == 3 * 4736 * 16


def test_cnn_flops_by_hand_on_8x8_digits():
    # conv 1->4 3x3 pad 1 on 8x8: 2*1*9 per output * 4*8*8 outputs = 4608; pool -> 4x4
    # conv 4->8 on 4x4: 2*4*9 * 8*4*4 = 9216; pool -> 2x2;  linear 8*2*2 -> 10: 2*32*10 = 640
    model = build_model(ModelConfig(name="cnn", channels=[4, 8]), (64,), 10)
    assert flops_per_sample(model, (64,)) == 4608 + 9216 + 640
    assert model(torch.zeros(3, 64)).shape == (3, 10)


def test_cnn_on_color_images_and_logreg_on_tokens():
    cnn = build_model(ModelConfig(name="cnn", channels=[8, 16]), (3, 32, 32), 10)
    assert cnn(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    logreg = build_model(ModelConfig(name="logreg"), (80,), 80, vocab_size=80)
    assert logreg(torch.zeros(2, 80, dtype=torch.long)).shape == (2, 80)
    # one-hot 80 positions x 80 symbols into 80 classes: 2 * 6400 * 80
    assert flops_per_sample(logreg, (80,), token_input=True) == 2 * 6400 * 80


def test_cnn_refuses_inputs_it_cannot_read_as_images():
    with pytest.raises(ConfigError, match="model.name"):
        build_model(ModelConfig(name="cnn"), (10,), 3)
    with pytest.raises(ConfigError, match="model.name"):
        build_model(ModelConfig(name="cnn"), (80,), 80, vocab_size=80)


# --------------------------------------------------------------------------- FLOPs by torch's counter, against the formulas
# flops_per_sample uses torch.utils.flop_counter.FlopCounterMode; these are the hand-written hooks' formulas it
# replaced, written out: 2 * d_in * d_out per linear layer and position, 2 * (C_in / groups) * k_h * k_w per conv
# output, TinyLM's q k^T and attn v (2 * 2 * L^2 * n_heads * d_head per layer) and tied head (2 * L * d * V); bias
# adds, activations, pooling and normalisation are not counted by either.
@pytest.mark.parametrize("hidden", [[32], [48, 24]])
def test_mlp_flops_equal_the_formula(hidden):
    model = build_model(ModelConfig(name="mlp", hidden=hidden), (64,), 10)
    widths = [64, *hidden, 10]
    assert flops_per_sample(model, (64,)) == sum(2 * a * b for a, b in zip(widths, widths[1:]))


@pytest.mark.parametrize("shape, channels, feature_dim", [((64,), [4, 8], None), ((3, 16, 16), [6, 5, 7], 12)])
def test_cnn_flops_equal_the_formula(shape, channels, feature_dim):
    model = build_model(ModelConfig(name="cnn", channels=channels), shape, 10, feature_dim=feature_dim)
    c, h, w = (1, 8, 8) if len(shape) == 1 else shape
    total = 0
    for out in channels:
        total += 2 * c * 3 * 3 * out * h * w  # 3x3 convolution, padding 1: h x w outputs per channel
        if min(h, w) >= 4:
            h, w = h // 2, w // 2  # 2x2 max pooling (not counted)
        c = out
    width = c * h * w
    if feature_dim:
        total += 2 * width * feature_dim
        width = feature_dim
    assert flops_per_sample(model, shape) == total + 2 * width * 10


@pytest.mark.parametrize("d, heads, f, layers, L, V", [(16, 2, 32, 2, 16, 256), (24, 3, 40, 1, 9, 80)])
def test_tinylm_flops_equal_the_formula(d, heads, f, layers, L, V):
    model = build_model(ModelConfig(name="tinylm", d_model=d, n_heads=heads, d_ff=f, n_layers=layers), (L,), V,
                        vocab_size=V)
    linears = layers * L * 2 * (4 * d * d + 2 * d * f)  # q, k, v, o and the two feed-forward layers, per position
    attention = layers * 2 * 2 * L * L * d  # n_heads * d_head = d
    assert flops_per_sample(model, (L,), token_input=True) == linears + attention + 2 * L * d * V


def test_flops_of_a_module_the_hooks_never_knew_and_in_eval_mode():
    # a residual BatchNorm block: only the convolutions and the linear layer count (BatchNorm, the residual add
    # and ReLU are element-wise); the forward runs in eval mode (one sample through BatchNorm in training mode
    # would fail) and the model is left in the mode it was in
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(3)
            self.grouped = torch.nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False)
            self.head = torch.nn.Linear(3 * 5 * 5, 4)

        def forward(self, x):
            h = torch.relu(self.bn(self.conv(x)))
            return self.head((h + self.grouped(h)).flatten(1))

    net = Net()
    assert net.training
    expected = 2 * 2 * 9 * 3 * 25 + 2 * 1 * 9 * 3 * 25 + 2 * 75 * 4
    assert flops_per_sample(net, (2, 5, 5)) == expected
    assert net.training
