import pytest
import torch
from torch import nn

from meaning_transform.model import Decoder, Encoder, MeaningVAE, ordered_linear_layers


def _batch(b: int = 8, d: int = 10, seed: int = 123) -> torch.Tensor:
    return torch.rand(b, d, generator=torch.Generator().manual_seed(seed))


def test_forward_keys_and_shapes():
    out = MeaningVAE(input_dim=10, latent_dim=4)(_batch(8))
    assert set(out) == {"reconstruction", "mu", "log_var", "z"}
    assert out["reconstruction"].shape == (8, 10)
    for key in ("mu", "log_var", "z"):
        assert out[key].shape == (8, 4)


def test_encoder_decoder_shapes():
    mu, log_var = Encoder(10, 3, (16, 8))(_batch(5))
    assert mu.shape == log_var.shape == (5, 3)
    assert Decoder(3, 10, (8, 16))(mu).shape == (5, 10)


def test_sigmoid_output_in_unit_interval():
    model = MeaningVAE(output_activation="sigmoid")
    rec = model(_batch(16) * 50)["reconstruction"]
    assert ((rec > 0) & (rec < 1)).all()


def test_training_noise_is_fresh_on_every_call():
    model = MeaningVAE(seed=0).train()
    x = _batch()
    z1, z2 = model(x)["z"], model(x)["z"]
    assert not torch.allclose(z1, z2)


def test_noise_sequence_reproducible_from_seed():
    x = _batch()
    a, b, c = MeaningVAE(seed=7), MeaningVAE(seed=7), MeaningVAE(seed=8)
    zs_a = [a(x)["z"] for _ in range(3)]
    zs_b = [b(x)["z"] for _ in range(3)]
    zs_c = [c(x)["z"] for _ in range(3)]
    for za, zb, zc in zip(zs_a, zs_b, zs_c, strict=True):
        assert torch.equal(za, zb)
        assert not torch.allclose(za, zc)


def test_noise_does_not_use_global_rng():
    model = MeaningVAE(seed=0)
    state = torch.get_rng_state()
    model(_batch())
    assert torch.equal(state, torch.get_rng_state())


def test_reset_noise_restarts_stream():
    model = MeaningVAE(seed=3)
    x = _batch()
    first = model(x)["z"]
    model(x)
    model.reset_noise()
    assert torch.equal(model(x)["z"], first)
    model.reset_noise(99)
    assert not torch.equal(model(x)["z"], first)


def test_eval_mode_z_equals_mu():
    model = MeaningVAE().eval()
    out = model(_batch())
    assert torch.equal(out["z"], out["mu"])


def test_frozen_noise_repeats_eps():
    model = MeaningVAE(seed=0, noise="frozen")
    x = _batch()
    z1, z2, z3 = (model(x)["z"] for _ in range(3))
    assert torch.equal(z1, z2) and torch.equal(z2, z3)
    assert not torch.equal(z1, model(x)["mu"])  # still noisy, just never fresh


def test_construction_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b = MeaningVAE(seed=5), MeaningVAE(seed=5)
    assert torch.equal(state, torch.get_rng_state())
    c = MeaningVAE(seed=6)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert not torch.equal(a.encoder.fc_mu.weight, c.encoder.fc_mu.weight)


def test_large_input_dim():
    model = MeaningVAE(input_dim=784, latent_dim=16, hidden_dims=(256, 64))
    out = model(torch.rand(4, 784))
    assert out["reconstruction"].shape == (4, 784)
    assert out["z"].shape == (4, 16)


def test_gradients_reach_every_parameter():
    model = MeaningVAE()
    out = model(_batch())
    (out["reconstruction"].sum() + out["log_var"].sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_float64_model_gets_float64_noise():
    model = MeaningVAE().double()
    out = model(_batch().double())
    assert out["z"].dtype == torch.float64


def test_ordered_linear_layers_first_encoder_last_decoder():
    layers = ordered_linear_layers(MeaningVAE(hidden_dims=(64, 32)))
    names = [name for name, _ in layers]
    assert names == [
        "encoder.layers.0.linear",
        "encoder.layers.1.linear",
        "encoder.fc_mu",
        "encoder.fc_log_var",
        "decoder.layers.0.linear",
        "decoder.layers.1.linear",
        "decoder.fc_out",
    ]
    assert all(isinstance(m, nn.Linear) for _, m in layers)
    assert layers[0][1].in_features == 10 and layers[-1][1].out_features == 10


def test_no_batch_norm_option():
    model = MeaningVAE(use_batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    assert model(_batch(1))["z"].shape == (1, 4)  # batch of one works without BN


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"input_dim": 0}, "input_dim"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"hidden_dims": (64, 0)}, "hidden_dims"),
        ({"output_activation": "softmax"}, "output_activation"),
        ({"activation": "swish"}, "activation"),
        ({"noise": "sometimes"}, "noise"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        MeaningVAE(**kwargs)


def test_wrong_input_shape_raises():
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 10\), got \(4, 7\)"):
        MeaningVAE()(torch.rand(4, 7))


def test_scale_fault_modes_reuse_the_fresh_eps_wrongly_scaled():
    x = _batch()
    fresh = MeaningVAE(seed=0)(x)
    eps = (fresh["z"] - fresh["mu"]) * torch.exp(-0.5 * fresh["log_var"])
    variance = MeaningVAE(seed=0, noise="exp_logvar")(x)
    assert torch.allclose(variance["z"], variance["mu"] + torch.exp(variance["log_var"]) * eps)
    scaled = MeaningVAE(seed=0, noise="scaled")(x)
    sigma = torch.exp(0.5 * scaled["log_var"])
    assert torch.allclose(scaled["z"], scaled["mu"] + sigma * 0.01 * eps, atol=1e-6)
