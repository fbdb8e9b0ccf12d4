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
