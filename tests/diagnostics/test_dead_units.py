import torch

from meaning_transform.diagnostics import dead_units


def test_dead_layer_is_all_dead_and_healthy_layer_is_not(model, x):
    with torch.no_grad():
        model.decoder[0].bias.fill_(-1e4)  # pre-activation of decoder.1 always negative
    model.train()
    model.encoder.eval()  # a deliberately frozen sub-module keeps its mode
    fractions = dead_units(model, x)
    assert set(fractions) == {"encoder.2", "decoder.1"}
    assert fractions["decoder.1"] == 1.0
    assert fractions["encoder.2"] < 0.7
    assert model.training and model.decoder.training and not model.encoder.training
    for module in model.modules():
        assert not module._forward_hooks  # hooks removed


def test_partially_dead_fraction(model, x):
    with torch.no_grad():
        model.decoder[0].bias[:2] = -1e4
        model.decoder[0].bias[2:] = 1e4
    assert dead_units(model, x, batch_size=5)["decoder.1"] == 2 / 8


def test_model_without_relu():
    assert dead_units(torch.nn.Linear(3, 3), torch.randn(4, 3)) == {}
