from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meaning_transform.diagnostics import dead_units
from meaning_transform.diagnostics.rules import RunEvidence, dying_relu
from meaning_transform.diagnostics.thresholds import DEAD_RELU


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


# ---- activations however they are called: modules, F.*, torch.*, Tensor.* ----


class FunctionalVAE(nn.Module):
    """pytorch/examples' VAE shape: ``h1 = F.relu(self.fc1(x))``, noise drawn in eval too."""

    def __init__(self, d: int = 6, h: int = 8, z: int = 3) -> None:
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(d, h), nn.Linear(h, z), nn.Linear(h, z)
        self.fc3, self.fc4 = nn.Linear(z, h), nn.Linear(h, d)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h1 = F.relu(self.fc1(x))  # (B, H)
        mu, log_var = self.fc21(h1), self.fc22(h1)  # (B, Z)
        z = mu + torch.randn_like(mu) * (0.5 * log_var).exp()  # (B, Z)
        h3 = F.relu(self.fc3(z))  # (B, H)
        return torch.sigmoid(self.fc4(h3)), mu, log_var


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x))  # (B, C, H, W)
        return torch.relu(self.conv2(h)).mean(dim=(2, 3))  # (B, C)


class OneLayer(nn.Module):
    """fc followed by one activation, given as a function of the layer output."""

    def __init__(self, activation: Callable[[Tensor], Tensor], d: int = 6, h: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(d, h)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.fc(x))


def _no_hooks_or_mode(model: nn.Module) -> bool:
    hooks = any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    return not hooks and torch.overrides._get_current_function_mode_stack() == []


def test_functional_relu_after_dead_linears_fires_the_rule(x):
    torch.manual_seed(0)
    model = FunctionalVAE()
    with torch.no_grad():
        model.fc1.bias.fill_(-10.0)
        model.fc3.bias.fill_(-10.0)
    fractions = dead_units(model, x)
    assert fractions == {"fc1 → F.relu": 1.0, "fc3 → F.relu": 1.0}  # in the order they ran
    findings = dying_relu(RunEvidence(where="run", dead_units=fractions))
    assert [f.code for f in findings] == ["dying-relu"]
    assert findings[0].where == "run:fc1 → F.relu"
    assert _no_hooks_or_mode(model)


def test_functional_relu_healthy_is_silent(x):
    torch.manual_seed(0)
    model = FunctionalVAE()
    fractions = dead_units(model, x)
    assert set(fractions) == {"fc1 → F.relu", "fc3 → F.relu"}
    assert all(f < DEAD_RELU for f in fractions.values())
    assert dying_relu(RunEvidence(where="run", dead_units=fractions)) == []


def test_measuring_leaves_the_random_stream_alone(x):
    torch.manual_seed(0)
    model = FunctionalVAE()  # draws noise in eval mode too
    torch.manual_seed(123)
    dead_units(model, x, batch_size=8)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))


def test_conv_channels_with_torch_relu_fire_and_stay_silent():
    torch.manual_seed(0)
    x = torch.randn(16, 1, 5, 5)
    model = ConvNet()
    healthy = dead_units(model, x)
    assert list(healthy) == ["conv1 → torch.relu", "conv2 → torch.relu"]
    assert all(f < DEAD_RELU for f in healthy.values())
    with torch.no_grad():
        model.conv1.bias.fill_(-10.0)
    dead = dead_units(model, x)
    assert dead["conv1 → torch.relu"] == 1.0
    assert dying_relu(RunEvidence(where="run", dead_units=dead))


def test_a_channel_positive_in_one_pixel_of_one_sample_is_alive():
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.copy_(torch.tensor([0.0, -10.0]))
    x = -torch.ones(4, 1, 3, 3)
    x[2, 0, 1, 2] = 1.0  # channel 0 positive once; channel 1 never
    # units are the 2 channels, not the 2 * 3 * 3 positions
    assert dead_units(nn.Sequential(conv, nn.ReLU()), x) == {"1": 0.5}


@pytest.mark.parametrize(
    "activation, name",
    [
        (lambda t: t.relu(), "fc → Tensor.relu"),
        (lambda t: t.clone().relu_(), "fc → Tensor.relu_"),
        (F.relu_, "fc → F.relu_"),
        (lambda t: F.relu(t, inplace=True), "fc → F.relu"),
        (lambda t: F.leaky_relu(t, 0.1), "fc → F.leaky_relu"),
        (F.relu6, "fc → F.relu6"),
        (F.elu, "fc → F.elu"),
        (nn.LeakyReLU(0.1), "activation"),
        (nn.ReLU6(), "activation"),
        (nn.ELU(), "activation"),
    ],
)
def test_each_relu_family_activation_is_seen(x, activation, name):
    torch.manual_seed(0)
    model = OneLayer(activation)
    with torch.no_grad():
        model.fc.bias[:6] = -10.0  # leaky: negative outputs, never on the positive side
        model.fc.bias[6:] = 10.0
    assert dead_units(model, x) == {name: 6 / 8}
    assert _no_hooks_or_mode(model)


class Named(nn.Module):
    """One nn.ReLU reused, two F.relu after one layer, one on the input, one in a module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 4), nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.block = OneLayer(F.relu, 4, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)  # before any layer: anchored at the model
        h = self.act(self.fc1(x))
        h = self.act(self.fc2(h))
        h = F.relu(self.fc2(h)) + F.relu(h)  # both after fc2
        return self.block(h)


def test_names_say_where_each_activation_was_called(x):
    torch.manual_seed(0)
    assert list(dead_units(Named(), x)) == [
        "<model> → F.relu",
        "act",
        "act#2",
        "fc2 → F.relu",
        "fc2 → F.relu#2",
        "block.fc → F.relu",
    ]


def test_hooks_and_mode_are_gone_after_a_failing_forward():
    model = OneLayer(F.relu)
    with pytest.raises(RuntimeError):
        dead_units(model, torch.randn(4, 5))  # wrong width
    assert _no_hooks_or_mode(model)
    assert model.training


def test_the_mode_is_only_active_during_measurement(x):
    seen: list[bool] = []
    model = OneLayer(lambda t: seen.append(torch._C._is_torch_function_mode_enabled()) or t)
    model(x)
    dead_units(model, x)
    model(x)
    assert seen == [False, True, False]
