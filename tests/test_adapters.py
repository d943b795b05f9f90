"""The user's model output and loss -> roles, terms and reductions (meaning_transform.adapters).

The two public VAEs in ``public_vaes.py`` (pytorch/examples and AntixK/PyTorch-VAE,
shrunk to 8x8 inputs) are read and bound exactly as their authors wrote them.
"""

from __future__ import annotations

import math
import pickle
from collections import OrderedDict, namedtuple
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from public_vaes import IMAGE_SHAPE, PyTorchExamplesVAE, VanillaVAE, loss_function
from torch import Tensor

from meaning_transform.adapters import (
    PARAMETER_ROLES,
    ROLE_ALIASES,
    InputShapeError,
    LossBindingError,
    LossResult,
    LossResultError,
    OutputRolesError,
    Roles,
    UserLoss,
    measure_reductions,
    output_roles,
    parse_input_shape,
    read_loss_result,
    shape_rows,
)
from meaning_transform.losses import CombinedLoss
from meaning_transform.model import MeaningVAE
from meaning_transform.user_model import UserCodeError

B, D, Z = 8, 64, 4
M_N = 0.25  # AntixK's KL weight (batch size / dataset size in its experiment.py)


@pytest.fixture
def x() -> Tensor:
    return torch.rand(B, D, generator=torch.Generator().manual_seed(0))  # (B, D) in [0, 1]


@pytest.fixture
def parts() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(reconstruction, mu, log_var, z) for the ``x`` fixture: (B, D), then (B, Z) x3."""
    g = torch.Generator().manual_seed(1)
    return (
        torch.rand(B, D, generator=g),
        torch.randn(B, Z, generator=g),
        torch.randn(B, Z, generator=g),
        torch.randn(B, Z, generator=g),
    )


@pytest.fixture
def examples_vae() -> PyTorchExamplesVAE:
    torch.manual_seed(0)
    return PyTorchExamplesVAE()


@pytest.fixture
def antixk_vae() -> VanillaVAE:
    torch.manual_seed(0)
    return VanillaVAE(in_channels=1, latent_dim=Z)


def _one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


# ---- output roles: mappings ----------------------------------------------------------


def test_a_dict_with_the_canonical_keys_maps_each_role_to_the_very_tensor(x, parts):
    rec, mu, log_var, z = parts
    roles = output_roles({"reconstruction": rec, "mu": mu, "log_var": log_var, "z": z}, x)
    assert roles.reconstruction is rec and roles.mu is mu and roles.log_var is log_var
    assert roles.z is z


@pytest.mark.parametrize("role", ["reconstruction", "mu", "log_var"])
def test_every_alias_names_its_role(x, parts, role):
    canonical = dict(zip(("reconstruction", "mu", "log_var"), parts[:3]))
    for alias in ROLE_ALIASES[role]:
        out = {**{k: v for k, v in canonical.items() if k != role}, alias: canonical[role]}
        assert getattr(output_roles(out, x), role) is canonical[role], alias


def test_the_aliases_are_those_of_the_public_conventions():
    assert set(ROLE_ALIASES["reconstruction"]) >= {
        "reconstruction", "recon", "recon_x", "x_hat", "recons", "x_recon"
    }  # fmt: skip
    assert set(ROLE_ALIASES["mu"]) >= {"mu", "mean", "z_mean"}
    assert set(ROLE_ALIASES["log_var"]) >= {"log_var", "logvar", "z_log_var"}
    assert ROLE_ALIASES["z"] == ("z",)


def test_an_ordered_dict_subclass_like_pythae_model_output_is_a_mapping(x, parts):
    class ModelOutput(OrderedDict):  # pythae's: an OrderedDict with attribute access
        def __getattr__(self, name):
            return self[name]

    rec, mu, log_var, z = parts
    out = ModelOutput(recon_x=rec, z=z, mu=mu, log_var=log_var, loss=torch.tensor(1.0))
    roles = output_roles(out, x)
    assert (roles.reconstruction, roles.mu, roles.log_var, roles.z) == (rec, mu, log_var, z)
    assert roles.reconstruction is rec and roles.z is z


def test_keys_that_name_no_role_are_ignored_and_z_is_optional(x, parts):
    rec, mu, log_var, _ = parts
    out = {"x_hat": rec, "mean": mu, "logvar": log_var, "kl": torch.tensor(0.0), "z": None}
    roles = output_roles(out, x)
    assert roles.z is None
    assert roles.as_dict().keys() == {"reconstruction", "mu", "log_var"}


def test_two_keys_for_one_role_is_an_ambiguity_error(x, parts):
    rec, mu, log_var, _ = parts
    out = {"recon": rec, "x_hat": rec.clone(), "mu": mu, "log_var": log_var}
    with pytest.raises(OutputRolesError) as e:
        output_roles(out, x)
    msg = _one_line(e)
    assert "'recon'" in msg and "'x_hat'" in msg and "reconstruction" in msg
    assert "return a dict with keys reconstruction, mu, log_var[, z]" in msg


def test_two_keys_holding_the_same_tensor_are_not_ambiguous(x, parts):
    rec, mu, log_var, _ = parts
    roles = output_roles({"recon": rec, "reconstruction": rec, "mu": mu, "logvar": log_var}, x)
    assert roles.reconstruction is rec


def test_a_dict_missing_a_role_says_which_and_what_it_holds(x, parts):
    rec, mu, _, _ = parts
    with pytest.raises(OutputRolesError) as e:
        output_roles({"recon": rec, "mu": mu, "sigma": mu.exp()}, x)
    msg = _one_line(e)
    assert "no entry for log_var" in msg
    assert "sigma: (8, 4)" in msg and "recon: (8, 64)" in msg
    assert msg.endswith("return a dict with keys reconstruction, mu, log_var[, z]")


def test_a_role_that_is_not_a_tensor_is_refused(x, parts):
    rec, mu, _, _ = parts
    with pytest.raises(OutputRolesError, match="'log_var' is a list, not a tensor"):
        output_roles({"recon": rec, "mu": mu, "log_var": [1.0]}, x)


def test_a_reconstruction_not_shaped_like_x_is_refused(x, parts):
    _, mu, log_var, _ = parts
    with pytest.raises(OutputRolesError, match=r"reconstruction has shape \(8, 63\)"):
        output_roles({"recon": torch.zeros(B, D - 1), "mu": mu, "log_var": log_var}, x)


def test_mu_and_log_var_of_different_shapes_are_refused(x, parts):
    rec, mu, _, _ = parts
    with pytest.raises(OutputRolesError, match=r"mu \(8, 4\) and log_var \(8, 1\)"):
        output_roles({"recon": rec, "mu": mu, "log_var": torch.zeros(B, 1)}, x)


# ---- output roles: objects -----------------------------------------------------------


@dataclass
class _Output:
    recon_x: Tensor
    mu: Tensor
    log_var: Tensor
    z: Tensor | None = None


def test_a_dataclass_namedtuple_or_namespace_is_read_by_attribute(x, parts):
    rec, mu, log_var, z = parts
    Out = namedtuple("Out", ["mu", "logvar", "x_hat"])  # an order no tuple rule would read
    for out in (
        _Output(rec, mu, log_var, z),
        Out(mu, log_var, rec),
        SimpleNamespace(reconstruction=rec, mean=mu, log_var=log_var, z=z),
    ):
        roles = output_roles(out, x)
        assert roles.reconstruction is rec and roles.mu is mu and roles.log_var is log_var
    assert output_roles(_Output(rec, mu, log_var), x).z is None


def test_a_namedtuple_whose_fields_name_no_role_follows_the_tuple_rule(x, parts):
    rec, mu, log_var, _ = parts
    Out = namedtuple("Out", ["a", "b", "c"])
    roles = output_roles(Out(rec, mu, log_var), x)
    assert roles.reconstruction is rec and roles.mu is mu and roles.log_var is log_var


def test_an_attribute_that_is_a_method_is_not_a_role(x, parts):
    rec, mu, log_var, _ = parts

    class Out:
        def __init__(self):
            self.recon, self.mu, self.log_var = rec, mu, log_var

        def mean(self):  # a method named like an alias of mu: not a second mu
            return 0.0

    assert output_roles(Out(), x).mu is mu


# ---- output roles: tuples and lists --------------------------------------------------


def test_the_pytorch_examples_tuple_recon_mu_logvar(x, examples_vae):
    out = examples_vae(x)
    roles = output_roles(out, x)
    assert isinstance(out, tuple) and len(out) == 3
    assert roles.reconstruction is out[0] and roles.mu is out[1] and roles.log_var is out[2]
    assert roles.z is None


def test_the_antixk_list_recons_input_mu_log_var(x, antixk_vae):
    images = shape_rows(x, IMAGE_SHAPE)  # (B, 1, 8, 8)
    out = antixk_vae(images)
    assert isinstance(out, list) and out[1] is images
    roles = output_roles(out, images)
    assert roles.reconstruction is out[0] and roles.mu is out[2] and roles.log_var is out[3]
    assert roles.reconstruction.shape == images.shape and roles.z is None


def test_the_antixk_input_echo_is_found_by_equality_and_against_flat_data(x, antixk_vae):
    images = shape_rows(x, IMAGE_SHAPE)
    out = antixk_vae(images)
    echoed = [out[0], images.clone(), out[2], out[3]]  # equal to x, not x itself
    assert output_roles(echoed, images).mu is out[2]
    roles = output_roles(out, x)  # the flat (B, D) data the images were made from
    assert roles.reconstruction is out[0] and roles.mu is out[2] and roles.log_var is out[3]


def test_a_four_tuple_with_z_and_a_five_list_with_echo_and_z(x, parts):
    rec, mu, log_var, z = parts
    roles = output_roles((rec, mu, log_var, z), x)
    assert (roles.reconstruction, roles.mu, roles.log_var, roles.z) == (rec, mu, log_var, z)
    assert roles.z is z
    roles = output_roles([rec, x, mu, log_var, z], x)  # AntixK's BetaTCVAE form
    assert roles.mu is mu and roles.log_var is log_var and roles.z is z


@pytest.mark.parametrize("order", [(1, 2, 0), (1, 0, 2), (0, 1, 2)])
def test_the_reconstruction_may_be_anywhere_when_its_shape_tells(x, parts, order):
    rec, mu, log_var, _ = parts
    latents = iter((mu, log_var))
    out = tuple(rec if i == 0 else next(latents) for i in order)
    roles = output_roles(out, x)
    assert roles.reconstruction is rec and roles.mu is mu and roles.log_var is log_var


def test_a_conv_reconstruction_of_flat_data_and_a_flat_one_of_images_are_shaped_like_x(x, parts):
    rec, mu, log_var, _ = parts
    images = shape_rows(x, IMAGE_SHAPE)
    assert output_roles((rec.view(B, *IMAGE_SHAPE), mu, log_var), x).mu is mu
    assert output_roles((rec, mu, log_var), images).reconstruction is rec


def test_a_reconstruction_equal_to_the_input_is_kept_not_dropped_as_an_echo(x, parts):
    _, mu, log_var, _ = parts
    roles = output_roles((x, mu, log_var), x)  # the zero-loss fault: decode returns x
    assert roles.reconstruction is x and roles.mu is mu
    roles = output_roles([x, x, mu, log_var], x)  # AntixK form, same fault
    assert roles.reconstruction is x and roles.mu is mu and roles.z is None


def test_several_candidates_for_the_reconstruction_none_first_is_ambiguous(x, parts):
    rec, mu, _, _ = parts
    with pytest.raises(OutputRolesError) as e:
        output_roles((mu, rec, rec.clone()), x)
    msg = _one_line(e)
    assert "elements [1, 2] are all shaped like the input (8, 64)" in msg
    assert "a tuple of 3 [(8, 4), (8, 64), (8, 64)]" in msg


def test_no_candidate_for_the_reconstruction_lists_the_shapes(x, parts):
    _, mu, log_var, z = parts
    with pytest.raises(OutputRolesError) as e:
        output_roles([mu, log_var, z], x)
    msg = _one_line(e)
    assert "no element is shaped like the input (8, 64)" in msg
    assert "a list of 3 [(8, 4), (8, 4), (8, 4)]" in msg
    assert msg.endswith("return a dict with keys reconstruction, mu, log_var[, z]")


@pytest.mark.parametrize("n", [2, 5])
def test_a_sequence_of_the_wrong_length_is_refused(x, parts, n):
    rec, mu, log_var, z = parts
    out = (rec, mu, log_var, z, z)[:n]
    with pytest.raises(OutputRolesError, match=f"{n} elements; expected"):
        output_roles(out, x)


def test_an_echo_leaving_too_few_elements_says_so(x, parts):
    rec, mu, _, _ = parts
    with pytest.raises(OutputRolesError, match="2 elements besides the input echo at index 1"):
        output_roles([rec, x, mu], x)


def test_a_sequence_element_that_is_not_a_tensor_is_refused(x, parts):
    rec, mu, log_var, _ = parts
    with pytest.raises(OutputRolesError, match="element 2 is a float, not a tensor"):
        output_roles((rec, mu, 0.5, log_var), x)


@pytest.mark.parametrize(
    ("output", "found"),
    [(torch.zeros(B, D), "a tensor (8, 64)"), (None, "a NoneType"), (3, "an int")],
)
def test_an_output_with_no_roles_is_refused_naming_what_it_is(x, output, found):
    with pytest.raises(OutputRolesError) as e:
        output_roles(output, x)
    assert f"got {found};" in _one_line(e)


def test_x_must_be_a_batch(parts):
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        output_roles(parts[:3], torch.zeros(B))


def test_roles_as_dict_feed_mtx_combined_loss_unchanged():
    torch.manual_seed(0)
    model, x10 = MeaningVAE(input_dim=10), torch.rand(B, 10)
    out = model(x10)
    roles = output_roles(out, x10)
    assert roles.reconstruction is out["reconstruction"] and roles.z is out["z"]
    assert list(roles.as_dict()) == ["reconstruction", "mu", "log_var", "z"]
    loss = CombinedLoss()
    assert torch.equal(loss(roles.as_dict(), x10)["loss"], loss(out, x10)["loss"])


def test_roles_are_frozen(x, parts):
    roles = Roles(*parts[:3])
    with pytest.raises(AttributeError):
        roles.mu = parts[3]  # type: ignore[misc]


# ---- input shapes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shape"), [("1,28,28", (1, 28, 28)), (" 3, 8 ,8 ", (3, 8, 8)), ("64", (64,))]
)
def test_parse_input_shape(text, shape):
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["", " ", "1,,28", "a,b", "0,8,8", "-1,8", "1.5,2", "1x28x28"])
def test_parse_input_shape_refuses_bad_text(text):
    with pytest.raises(InputShapeError) as e:
        parse_input_shape(text)
    assert isinstance(e.value, ValueError)
    assert f"got {text!r}" in _one_line(e) and "like 1,28,28" in str(e.value)


def test_shape_rows_reshapes_each_row(x):
    images = shape_rows(x, IMAGE_SHAPE)
    assert images.shape == (B, 1, 8, 8)
    assert torch.equal(images[3, 0, 2], x[3, 16:24])  # row-major: row 2 of image 3


def test_shape_rows_refuses_a_size_that_does_not_match(x):
    with pytest.raises(InputShapeError, match=r"1x7x7 = 49 values per row.*D = 64"):
        shape_rows(x, (1, 7, 7))
    with pytest.raises(InputShapeError, match=r"expected data of shape \(B, D\)"):
        shape_rows(x.view(B, 1, 8, 8), IMAGE_SHAPE)


# ---- binding the user's loss -----------------------------------------------------------


def test_pytorch_examples_loss_binds_by_name_and_gives_its_own_total(x, examples_vae):
    out = examples_vae(x)
    user_loss = UserLoss(loss_function)
    assert user_loss.binding == "names"
    assert dict(user_loss.parameter_roles) == {
        "recon_x": "reconstruction", "x": "input", "mu": "mu", "logvar": "log_var"
    }  # fmt: skip
    result = user_loss(out, x)
    assert torch.equal(result.total, loss_function(out[0], x, out[1], out[2]))
    assert result.terms == {} and result.total_given and result.unexplained == 0.0
    result.total.backward()
    assert examples_vae.fc1.weight.grad is not None and examples_vae.fc1.weight.grad.abs().sum() > 0


def test_a_loss_bound_by_name_reads_any_output_form(x, examples_vae):
    rec, mu, logvar = examples_vae(x)
    expected = loss_function(rec, x, mu, logvar)
    user_loss = UserLoss(loss_function)
    for out in ({"x_hat": rec, "mean": mu, "logvar": logvar}, _Output(rec, mu, logvar)):
        assert torch.equal(user_loss(out, x).total, expected)


def test_antixk_loss_takes_the_output_sequence_and_extra_kwargs(x, antixk_vae):
    images = shape_rows(x, IMAGE_SHAPE)
    out = antixk_vae(images)
    user_loss = UserLoss(antixk_vae.loss_function, extra_kwargs={"M_N": M_N})
    assert user_loss.binding == "args"
    result = user_loss(out, images)
    direct = antixk_vae.loss_function(*out, M_N=M_N)
    assert torch.equal(result.total, direct["loss"]) and result.total is not direct["loss"]
    assert list(result.terms) == ["Reconstruction_Loss", "KLD"]
    assert torch.equal(result.terms["KLD"], direct["KLD"])
    assert result.total_given and result.total.requires_grad
    assert result.detached == ("Reconstruction_Loss", "KLD")  # AntixK .detach()es its terms


def test_antixk_terms_do_not_add_up_with_assumed_weights_and_do_with_its_own(x, antixk_vae):
    images = shape_rows(x, IMAGE_SHAPE)
    out = antixk_vae(images)
    assumed = UserLoss(antixk_vae.loss_function, extra_kwargs={"M_N": M_N})(out, images)
    assert assumed.assumed_weights == ("Reconstruction_Loss", "KLD")
    assert assumed.weights == {"Reconstruction_Loss": 1.0, "KLD": 1.0}
    # loss = recon + M_N * kld, but it returns KLD = -kld: 1 * recon + 1 * KLD misses by
    # (1 + M_N) * kld
    kld = -direct_kld(out)
    assert assumed.unexplained == pytest.approx(abs((1 + M_N) * kld) / assumed.total.item())
    assert assumed.unexplained > 0.01
    own = UserLoss(antixk_vae.loss_function, extra_kwargs={"M_N": M_N}, weights={"KLD": -M_N})(
        out, images
    )
    assert own.unexplained < 1e-6
    assert own.assumed_weights == ("Reconstruction_Loss",) and own.weights["KLD"] == -M_N


def direct_kld(out: list[Tensor]) -> float:
    """AntixK's returned ``KLD`` entry (its negated KL), recomputed."""
    mu, log_var = out[2], out[3]
    kld = torch.mean(-0.5 * torch.sum(1 + log_var - mu**2 - log_var.exp(), dim=1), dim=0)
    return -kld.item()


def test_antixk_loss_without_its_kwarg_is_a_user_code_error_with_a_hint(x, antixk_vae):
    images = shape_rows(x, IMAGE_SHAPE)
    with pytest.raises(UserCodeError) as e:
        UserLoss(antixk_vae.loss_function)(antixk_vae(images), images)
    msg = _one_line(e)
    assert "raised KeyError: 'M_N'" in msg and "extra_kwargs" in msg
    assert "VanillaVAE.loss_function" in msg


def test_a_star_args_loss_given_a_dict_output_says_to_name_parameters(x, parts, antixk_vae):
    out = dict(zip(("recon", "mu", "log_var"), parts[:3]))
    user_loss = UserLoss(antixk_vae.loss_function, extra_kwargs={"M_N": M_N})
    with pytest.raises(LossBindingError, match="takes \\*args.*returned a dict"):
        user_loss(out, x)


def test_the_unbound_method_is_refused_with_the_fix():
    with pytest.raises(LossBindingError, match=r"takes 'self'.*model\.loss_function"):
        UserLoss(VanillaVAE.loss_function)


def test_a_loss_of_output_and_x_gets_the_output_as_returned(x, parts):
    seen = []

    def loss(model_output, batch):
        seen.append((model_output, batch))
        return F.mse_loss(model_output["recon"], batch)

    out = {"recon": parts[0], "whatever": 1}
    user_loss = UserLoss(loss)
    assert user_loss.binding == "output"
    user_loss(out, x)
    assert seen[0][0] is out and seen[0][1] is x


def test_mtx_combined_loss_binds_as_output_and_x():
    assert UserLoss(CombinedLoss()).binding == "output"


def test_role_names_win_over_star_args_and_defaults_are_left_alone(x, parts):
    calls = []

    def loss(recon, x, mu, log_var, *args, z=None, beta=2.0, **kwargs):
        calls.append((args, z, beta, kwargs))
        return F.mse_loss(recon, x) + beta * mu.pow(2).mean() + log_var.mean()

    user_loss = UserLoss(loss)
    assert user_loss.binding == "names"
    user_loss(parts[:3], x)
    assert calls[-1] == ((), None, 2.0, {})
    user_loss(parts, x)
    assert calls[-1][1] is parts[3]


def test_keyword_only_role_parameters_bind(x, parts):
    def loss(*, reconstruction, mean, logvar):
        return (reconstruction - 1).abs().sum() + mean.sum() + logvar.sum()

    result = UserLoss(loss)(parts[:3], x)
    rec, mu, log_var, _ = parts
    assert torch.equal(result.total, (rec - 1).abs().sum() + mu.sum() + log_var.sum())


def test_a_required_z_the_output_lacks_is_a_binding_error_at_call(x, parts):
    def loss(recon_x, x, mu, logvar, z):
        return recon_x.sum()

    with pytest.raises(LossBindingError, match="'z' asks for z, but the model output has none"):
        UserLoss(loss)(parts[:3], x)


def test_extra_kwargs_satisfy_a_parameter_that_names_no_role(x, parts):
    def loss(recon_x, x, mu, logvar, beta):
        return F.mse_loss(recon_x, x) + beta * mu.pow(2).sum()

    with pytest.raises(LossBindingError) as e:
        UserLoss(loss)
    assert "cannot bind 'beta'" in _one_line(e)
    result = UserLoss(loss, extra_kwargs={"beta": 0.0})(parts[:3], x)
    assert torch.equal(result.total, F.mse_loss(parts[0], x))


def test_extra_kwargs_the_loss_does_not_take_are_refused():
    with pytest.raises(LossBindingError, match="no parameter 'M_N' given in extra_kwargs"):
        UserLoss(loss_function, extra_kwargs={"M_N": 1.0})


def test_an_unbindable_loss_names_its_parameters():
    def loss(out, labels, scale):
        return out

    with pytest.raises(LossBindingError) as e:
        UserLoss(loss)
    msg = _one_line(e)
    assert "cannot bind 'out', 'labels', 'scale'" in msg
    assert "recon_x, x, mu, logvar" in msg and "*args" in msg and "(output, x)" in msg


def test_two_parameters_naming_one_role_is_an_ambiguity_error():
    with pytest.raises(LossBindingError, match="'input' and 'target' both name the input"):
        UserLoss(F.mse_loss)  # torch's (input, target): input is the prediction there


def test_a_loss_without_a_signature_is_refused():
    with pytest.raises(LossBindingError, match="cannot read its signature"):
        UserLoss(max)


def test_the_parameter_names_include_the_brief_and_design_names():
    assert {"recon_x", "recons", "reconstruction", "recon", "x_hat"} <= set(
        PARAMETER_ROLES["reconstruction"]
    )
    assert {"x", "input", "inputs", "target", "x_original", "data"} <= set(PARAMETER_ROLES["input"])
    assert "x_reconstructed" in PARAMETER_ROLES["reconstruction"]  # DESIGN's forward names


def test_an_exception_in_the_loss_is_a_user_code_error(x, parts):
    def loss(recon_x, x, mu, logvar):
        raise RuntimeError("shapes\nsecond line")

    with pytest.raises(UserCodeError) as e:
        UserLoss(loss, name="losses.py:loss")(parts[:3], x)
    assert _one_line(e) == "loss losses.py:loss raised RuntimeError: shapes"
    assert isinstance(e.value.__cause__, RuntimeError)


def test_a_user_loss_pickles(x, parts):
    user_loss = pickle.loads(pickle.dumps(UserLoss(loss_function, weights={})))
    assert user_loss.binding == "names" and user_loss.weights == {}


# ---- what the loss returns -----------------------------------------------------------


def _t(value: float, grad: bool = True) -> Tensor:
    return torch.tensor(value, requires_grad=grad)


def test_one_scalar_is_the_total_itself():
    total = _t(3.0)
    result = read_loss_result(total)
    assert result.total is total and result.terms == {} and result.weights == {}
    assert result.total_given and result.detached == () and result.unexplained == 0.0


def test_a_one_element_tensor_counts_as_a_scalar():
    result = read_loss_result(torch.tensor([2.5]))
    assert result.total.shape == () and result.total.item() == 2.5


def test_a_dict_with_loss_gives_the_total_and_the_rest_as_terms():
    recon, kl = _t(2.0), _t(1.0)
    result = read_loss_result({"loss": recon + 0.5 * kl, "recon": recon, "kl": kl}, {"kl": 0.5})
    assert list(result.terms) == ["recon", "kl"] and result.terms["kl"] is kl
    assert result.weights == {"recon": 1.0, "kl": 0.5} and result.assumed_weights == ("recon",)
    assert result.total_given and result.unexplained == 0.0


def test_the_sum_check_fires_when_terms_do_not_add_up():
    recon, kl = _t(2.0), _t(1.0)
    result = read_loss_result({"loss": recon + 0.5 * kl, "recon": recon, "kl": kl})
    assert result.unexplained == pytest.approx(0.5 / 2.5)  # |2.5 - 3| / 2.5


def test_a_dict_without_loss_sums_its_weighted_terms_differentiably():
    recon, kl = _t(2.0), _t(4.0)
    result = read_loss_result({"recon": recon, "kl": kl}, {"kl": 0.25})
    assert not result.total_given and result.total.item() == 3.0
    assert result.unexplained == 0.0
    result.total.backward()
    assert recon.grad.item() == 1.0 and kl.grad.item() == 0.25


def test_a_dict_entry_equal_to_the_sum_of_the_others_is_the_total():
    recon, kl = _t(2.0), _t(1.0)
    result = read_loss_result({"recon": recon, "kl": kl, "total": recon + kl})
    assert result.total_given and list(result.terms) == ["recon", "kl"]
    assert result.total.item() == 3.0
    two = read_loss_result({"a": _t(1.0), "b": _t(1.0)})  # each is "the sum" of the other
    assert not two.total_given and list(two.terms) == ["a", "b"]


def test_non_tensor_dict_entries_are_ignored_and_listed():
    result = read_loss_result({"loss": _t(1.0), "kl": _t(1.0), "epoch": 3, "parts": {"a": 1.0}})
    assert list(result.terms) == ["kl"] and result.ignored == ("epoch", "parts")


def test_a_tuple_whose_first_is_the_sum_of_the_rest():
    a, b = _t(1.0), _t(2.0)
    result = read_loss_result((a + b, a, b))
    assert result.total_given and list(result.terms) == ["term_1", "term_2"]
    assert result.terms["term_1"] is a and result.unexplained == 0.0


def test_a_list_that_is_not_total_first_is_all_terms():
    a, b = _t(1.0), _t(2.0)
    result = read_loss_result([a, b])
    assert not result.total_given and list(result.terms) == ["term_0", "term_1"]
    assert result.total.item() == 3.0


def test_detached_terms_are_reported():
    recon, kl = _t(2.0), _t(1.0)
    result = read_loss_result({"loss": recon + kl, "recon": recon.detach(), "kl": kl})
    assert result.detached == ("recon",)


def test_nan_is_carried_not_raised():
    result = read_loss_result({"loss": _t(float("nan")), "kl": _t(1.0)})
    assert torch.isnan(result.total) and result.unexplained != result.unexplained


@pytest.mark.parametrize(
    ("returned", "says"),
    [
        (1.5, "returned a float: expected a scalar tensor, a dict of them or a tuple of them"),
        (None, "returned a NoneType"),
        (torch.zeros(B), "total has shape (8,), expected a scalar tensor (reduce it"),
        ({"epoch": 1}, "a dict with no tensor in it"),
        ({"loss": _t(1.0), "kl": torch.zeros(2, 2)}, "kl has shape (2, 2)"),
        ((_t(1.0), 2.0), "element 1 is not a tensor"),
        ((), "an empty sequence"),
    ],
)
def test_what_is_not_a_loss_is_a_loss_result_error(returned, says):
    with pytest.raises(LossResultError) as e:
        read_loss_result(returned, name="my_loss")
    msg = _one_line(e)
    assert msg.startswith("loss my_loss returned ") and says in msg


def test_weights_for_a_term_the_loss_does_not_return_are_refused():
    with pytest.raises(LossResultError, match="weights name 'kld'.*its terms: 'kl'"):
        read_loss_result({"loss": _t(1.0), "kl": _t(1.0)}, {"kld": 2.0})


def test_loss_result_build_is_the_one_constructor_and_is_frozen():
    recon, kl = _t(2.0), _t(1.0)
    result = LossResult.build({"recon": recon, "kl": kl}, total=recon + 0.1 * kl,
                              weights={"recon": 1.0, "kl": 0.1})  # fmt: skip
    assert result.assumed_weights == () and result.unexplained < 1e-7
    with pytest.raises(TypeError):
        result.terms["x"] = kl  # type: ignore[index]
    with pytest.raises(AttributeError):
        result.total = kl  # type: ignore[misc]


# ---- reductions by measurement -------------------------------------------------------


def test_pytorch_examples_summed_bce_plus_kld_is_a_sum(x, examples_vae):
    out = examples_vae(x)
    assert measure_reductions(UserLoss(loss_function), out, x) == {"total": "sum"}


def test_a_mean_mse_is_a_mean(x, parts):
    def loss(recon_x, x):
        return F.mse_loss(recon_x, x)

    assert measure_reductions(UserLoss(loss), parts[:3], x) == {"total": "mean"}


def test_a_summed_term_and_an_averaged_one_are_told_apart(x, parts):
    def loss(recon_x, x, mu, logvar):
        recon = F.mse_loss(recon_x, x, reduction="sum")
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean()
        return {"recon": recon, "kl": kl}

    got = measure_reductions(UserLoss(loss), parts[:3], x)
    assert got == {"total": "unknown", "recon": "sum", "kl": "mean"}


def test_antixk_is_all_means_and_its_echo_stays_the_input(x, antixk_vae):
    images = shape_rows(x, IMAGE_SHAPE)
    out = antixk_vae(images)
    user_loss = UserLoss(antixk_vae.loss_function, extra_kwargs={"M_N": M_N})
    got = measure_reductions(user_loss, out, images)
    assert got == {"total": "mean", "Reconstruction_Loss": "mean", "KLD": "mean"}


def test_measuring_uses_at_most_16_rows_without_grad_or_visible_rng(parts):
    x40 = torch.rand(40, D)
    out = (torch.rand(40, D), torch.randn(40, Z), torch.randn(40, Z))
    seen = []

    def loss(recon_x, x, mu, logvar):
        seen.append((len(x), torch.is_grad_enabled(), recon_x.shape[0]))
        return (recon_x - x).pow(2).sum() + 0 * torch.randn(()).abs()  # consumes RNG

    state = torch.get_rng_state()
    assert measure_reductions(UserLoss(loss), out, x40) == {"total": "sum"}
    assert torch.equal(torch.get_rng_state(), state)
    assert seen == [(16, False, 16), (32, False, 32)]


def test_every_output_structure_is_rebuilt_and_non_batch_tensors_kept(x, parts):
    rec, mu, log_var, z = parts
    kept = torch.tensor(0.5)

    def loss(recon_x, x, mu, logvar):
        return (recon_x - x).abs().sum() + mu.pow(2).sum()

    Out = namedtuple("Out", ["recon", "mu", "log_var"])
    for out in (
        {"recon": rec, "mu": mu, "logvar": log_var, "compression_loss": kept},
        _Output(rec, mu, log_var, z),
        SimpleNamespace(recon=rec, mu=mu, log_var=log_var),
        Out(rec, mu, log_var),
        [rec, x, mu, log_var],
    ):
        assert measure_reductions(UserLoss(loss), out, x) == {"total": "sum"}, type(out)

    seen = []

    def loss_out(output, batch):
        seen.append(output["compression_loss"])
        return output["recon"].sum()

    measure_reductions(UserLoss(loss_out), {"recon": rec, "compression_loss": kept}, x)
    assert seen == [kept, kept] and seen[0] is kept


def test_a_zero_or_nan_term_is_unknown(x, parts):
    def loss(recon_x, x):
        return {"zero": recon_x.sum() * 0, "nan": recon_x.sum() * float("nan"), "s": x.sum()}

    got = measure_reductions(UserLoss(loss), parts[:3], x)
    assert got == {"total": "unknown", "zero": "unknown", "nan": "unknown", "s": "sum"}


def test_a_term_named_total_does_not_hide_the_total(x, parts):
    def loss(recon_x, x):
        return {"loss": recon_x.mean(), "total": x.sum()}

    got = measure_reductions(UserLoss(loss), parts[:3], x)
    assert got == {"total": "mean", "total (term)": "sum"}


# ---- whole runs: both public models train through UserLoss ------------------------------


def test_both_public_models_train_through_their_own_losses(x, examples_vae, antixk_vae):
    images = shape_rows(x, IMAGE_SHAPE)
    runs = [
        (examples_vae, UserLoss(loss_function), x),
        (antixk_vae, UserLoss(antixk_vae.loss_function, extra_kwargs={"M_N": M_N}), images),
    ]
    for model, user_loss, batch in runs:
        losses = []
        for _ in range(15):  # plain SGD by hand: torch.optim's first import costs seconds
            model.zero_grad()
            result = user_loss(model(batch), batch)
            result.total.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 1e-3 * p.grad.sign()
            losses.append(result.total.item())
        assert losses[-1] < losses[0], type(model).__name__


def test_measure_false_leaves_unexplained_unmeasured_only_for_a_given_total():
    recon, kl = torch.tensor(2.0), torch.tensor(0.5)
    given = {"loss": recon + kl + 1.0, "recon": recon, "kl": kl}  # 1.0 unexplained
    measured = read_loss_result(given)
    assert measured.unexplained == pytest.approx(1.0 / 3.5)
    skipped = read_loss_result(given, measure=False)
    assert math.isnan(skipped.unexplained)
    assert torch.equal(skipped.total, measured.total) and skipped.terms == measured.terms
    summed = read_loss_result({"recon": recon, "kl": kl}, measure=False)  # total computed
    assert summed.unexplained == 0.0 and not summed.total_given
