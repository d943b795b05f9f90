"""first_last_ratio's first and last layer: forward order from a probe, or registration."""

import pytest
import torch
from _diagnostics_helpers import TinyVAE, loss_terms
from torch import Tensor, nn

from meaning_transform.diagnostics import GradientHooks, GradientMonitor, gradient_snapshot
from meaning_transform.diagnostics.gradients import forward_order
from meaning_transform.model import MeaningVAE


class Reversed(nn.Module):
    """Registers the output layer first: registration order is the opposite of use."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(8, 6)
        self.hidden = nn.Linear(6, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.hidden(x)))  # (B, D)


class ConvVAE(nn.Module):
    """Linear heads registered before the convolutions, as a conv VAE may well do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_mu = nn.Linear(32, 3)
        self.fc_log_var = nn.Linear(32, 3)
        self.fc_dec = nn.Linear(3, 32)
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 8, 3, stride=2, padding=1),
        )  # (B, 1, 8, 8) -> (B, 8, 2, 2)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(8, 4, 2, stride=2),
            nn.ReLU(),
            nn.ConvTranspose2d(4, 1, 2, stride=2),
        )  # (B, 8, 2, 2) -> (B, 1, 8, 8)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.encoder(x).flatten(1)  # (B, 32)
        mu, log_var = self.fc_mu(h), self.fc_log_var(h)  # (B, Z)
        z = mu + torch.randn_like(mu) * (0.5 * log_var).exp()  # (B, Z)
        rec = self.decoder(self.fc_dec(z).view(-1, 8, 2, 2))  # (B, 1, 8, 8)
        return {"reconstruction": rec, "mu": mu, "log_var": log_var}


def _backward(model: nn.Module, x: Tensor) -> None:
    model.zero_grad(set_to_none=True)
    out = model(x)
    rec = out["reconstruction"] if isinstance(out, dict) else out
    ((rec - x) ** 2).sum().backward()


def _backward_tiny(model: TinyVAE, x: Tensor) -> None:
    model.zero_grad(set_to_none=True)
    terms = loss_terms(model(x), x)
    (terms["recon"] + 0.1 * terms["kl"]).backward()


def _grad_norm(layer: nn.Module) -> float:
    return layer.weight.grad.norm().item()


def test_reversed_registration_uses_the_layers_in_forward_order():
    torch.manual_seed(0)
    model, x = Reversed(), torch.randn(16, 6)
    _backward(model, x)
    by_registration = gradient_snapshot(model)
    assert (by_registration.first_layer, by_registration.last_layer) == (
        "out.weight",
        "hidden.weight",
    )
    assert by_registration.layer_order == "registration"
    by_forward = gradient_snapshot(model, example_input=x[:2])
    assert (by_forward.first_layer, by_forward.last_layer) == ("hidden.weight", "out.weight")
    assert by_forward.layer_order == "forward"
    want = _grad_norm(model.hidden) / _grad_norm(model.out)
    assert by_forward.first_last_ratio == pytest.approx(want, rel=1e-6)
    assert by_registration.first_last_ratio == pytest.approx(1 / want, rel=1e-6)


def test_conv_vae_first_conv_to_last_conv_transpose():
    torch.manual_seed(0)
    model, x = ConvVAE(), torch.randn(8, 1, 8, 8)
    assert [type(m).__name__ for m in forward_order(model, x[:1])] == [
        "Conv2d",
        "Conv2d",
        "Linear",
        "Linear",
        "Linear",
        "ConvTranspose2d",
        "ConvTranspose2d",
    ]
    monitor = GradientMonitor(model, example_input=x[:2])
    _backward(model, x)
    snap = monitor.after_backward()
    assert (snap.first_layer, snap.last_layer) == ("encoder.0.weight", "decoder.2.weight")
    want = _grad_norm(model.encoder[0]) / _grad_norm(model.decoder[2])
    assert snap.first_last_ratio == pytest.approx(want, rel=1e-6)
    # registration order over weight-bearing layers (not just Linear) without an input
    plain = GradientMonitor(model).after_backward()
    assert (plain.first_layer, plain.last_layer) == ("fc_mu.weight", "decoder.2.weight")
    assert plain.layer_order == "registration"


def test_probe_does_not_perturb_training():
    torch.manual_seed(0)
    model, x = ConvVAE(), torch.randn(8, 1, 8, 8)  # draws noise in eval mode too
    model.train()
    model.decoder.eval()  # a deliberately frozen sub-module keeps its mode
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(5)
    GradientMonitor(model, example_input=x)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))  # the random stream is where it was
    assert model.training and model.encoder.training and not model.decoder.training
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())


def test_frozen_and_unused_layers_are_skipped(model, x):
    # TinyVAE registers an `unused` Linear last: registration order ends there, without grad
    _backward_tiny(model, x)
    assert gradient_snapshot(model).last_layer == "unused.weight"
    snap = gradient_snapshot(model, example_input=x[:4])
    assert (snap.first_layer, snap.last_layer) == ("encoder.0.weight", "decoder.2.weight")
    assert snap.first_last_ratio is not None
    model.encoder[0].weight.requires_grad_(False)
    _backward_tiny(model, x)
    assert gradient_snapshot(model, example_input=x[:4]).first_layer == "mu.weight"


def test_hooks_take_an_example_input_now_or_later(model, x):
    with GradientHooks(model) as hooks:
        _backward_tiny(model, x)
        hooks.set_example_input(x[:4])  # e.g. on the Doctor's first step
        _backward_tiny(model, x)
    with GradientHooks(model, example_input=x[:4]) as given:
        _backward_tiny(model, x)
    first, second = hooks.history
    assert (first.layer_order, first.last_layer) == ("registration", "unused.weight")
    assert (second.layer_order, second.last_layer) == ("forward", "decoder.2.weight")
    assert given.history[0].as_dict()["layer_order"] == "forward"
    assert given.history[0].first_last_ratio == pytest.approx(second.first_last_ratio, rel=1e-6)


def test_monitor_set_example_input_none_goes_back_to_registration(model, x):
    monitor = GradientMonitor(model, example_input=x[:4])
    _backward_tiny(model, x)
    assert monitor.after_backward().layer_order == "forward"
    monitor.after_step()
    monitor.set_example_input(None)
    _backward_tiny(model, x)
    assert monitor.after_backward().layer_order == "registration"


def test_meaning_vae_registration_order_is_its_forward_order():
    model = MeaningVAE(input_dim=10, latent_dim=4, seed=0)
    x = torch.rand(32, 10, generator=torch.Generator().manual_seed(0))
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert list(forward_order(model, x[:2])) == linear
    out = model(x)
    ((out["reconstruction"] - x) ** 2).sum().backward()
    by_registration = gradient_snapshot(model)
    by_forward = gradient_snapshot(model, example_input=x[:2])
    assert by_forward.first_layer == by_registration.first_layer == "encoder.layers.0.linear.weight"
    assert by_forward.last_layer == by_registration.last_layer == "decoder.fc_out.weight"
    assert by_forward.first_last_ratio == by_registration.first_last_ratio
    assert by_forward.first_last_ratio is not None


def test_probe_between_forward_and_backward_leaves_the_graph_alone(model, x):
    # what the Doctor does on its first step: the loss is built, backward has not run yet
    model.train()
    with GradientHooks(model) as hooks:
        model.zero_grad(set_to_none=True)
        terms = loss_terms(model(x), x)
        running_mean = model.encoder[1].running_mean.clone()
        hooks.set_example_input(x[:4])
        assert torch.equal(model.encoder[1].running_mean, running_mean)  # eval-mode probe
        (terms["recon"] + 0.1 * terms["kl"]).backward()
    direct = gradient_snapshot(model, example_input=x[:4])
    (recorded,) = hooks.history
    assert recorded.layer_order == "forward" and recorded.last_layer == "decoder.2.weight"
    assert recorded.total_norm == pytest.approx(direct.total_norm, rel=1e-6)
