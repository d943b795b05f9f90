"""Seeded-fault benchmark for mtx's detectors: how often does the Doctor find a known bug?

Every run trains one small VAE (a *family*) on one data set shipped inside scikit-learn
with one *fault* injected as a small patch (a subclass overriding one method, a loss
written slightly differently, one changed hyper-parameter), through the Doctor in a plain
user loop (Adam, batch 64, ``torch.set_num_threads(1)``). Each fault declares the finding
codes it should produce. The tables give, per fault and per finding code: recall (an
expected code fired), precision (fired codes that are expected), the false-alarm rate of
the healthy runs, the detection latency in optimizer steps and the wall time; and the same
tables for a baseline built from what users have today (``baseline.py``: AUTOTRAINER's and
DeepDiagnosis's gradient rules plus ``torch.autograd.detect_anomaly``) on the same runs.

    python benchmarks/faults/run.py            # default grid: all families, 2 data sets, 3 seeds
    python benchmarks/faults/run.py --quick    # a few faults, 2 families, digits, seed 0 (< 60 s)
    python benchmarks/faults/run.py --json results.json --markdown results.md

Detection latency: the Doctor's findings are taken at the end of every epoch (on the first
256 rows, the global RNG saved and restored around it, so the run is the same as without
the checks) and once more at the end of the run (on all rows: the verdict the tables
count). A code's latency is the optimizer step of the first check it fired in (so its
resolution is one epoch: 16 steps on digits, 9 on breast-cancer); a fault's is that of its
first expected code. The Doctor's findings cannot be taken mid-epoch (that closes the
epoch of its history), so mtx's latency is at epoch resolution while the baseline checks
every step (AUTOTRAINER, detect_anomaly) or every epoch (DeepDiagnosis).

The baseline watches the Doctor's run (its rules read the same gradients; the Doctor does
not change the trajectory), and a cell is trained a second time without the Doctor, under
detect_anomaly, only where a loss or gradient went NaN/Inf (``baseline_from_watch``;
``--baseline-retrain`` retrains every cell, to measure what a second training costs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import textwrap
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meaning_transform.diagnostics.doctor import Doctor
from meaning_transform.losses import CombinedLoss
from meaning_transform.model import MeaningVAE

ROOT = Path(__file__).resolve().parents[2]
BATCH, LR, LATENT = 64, 1e-3, 4
LATENCY_ROWS = 256  # rows the per-epoch findings measure latent health and dead units on
INFO_CODES = {"terms-mismatch", "grad-conflict"}  # documented as info: recalled at info too


def _load(name: str, path: Path) -> Any:
    """A module by path (tests/public_vaes.py, baseline.py), without touching sys.path."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


PUBLIC = _load("_bench_public_vaes", ROOT / "tests" / "public_vaes.py")
BASELINE = _load("_bench_fault_baseline", Path(__file__).resolve().parent / "baseline.py")
# ---- data: shipped inside scikit-learn, no download ---------------------------------------


def load_data(name: str, scaling: str) -> Tensor:
    """(N, D) float32: digits (8x8 images, the first 1024 rows) or breast-cancer (30
    features), min-max to [0, 1] ("minmax": BCE and the tanh conv decoder) or standardised
    ("standard": the MSE MLPs; on [0, 1] pixels a unit-variance Gaussian likelihood makes
    collapse the optimum, and the healthy beta-VAE collapsed for real)."""
    from sklearn import datasets  # type: ignore[import-untyped]

    if name == "digits":
        x = torch.tensor(datasets.load_digits().data[:1024], dtype=torch.float32) / 16.0
    elif name == "breast-cancer":
        x = torch.tensor(datasets.load_breast_cancer().data, dtype=torch.float32)
    else:
        raise ValueError(f"unknown data set {name!r}")
    if scaling == "standard":  # constant columns (digits' border pixels) stay 0
        return (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    lo, hi = x.min(0).values, x.max(0).values
    return (x - lo) / (hi - lo).clamp_min(1e-6)


# ---- models ---------------------------------------------------------------------------------


class MLPVAE(nn.Module):
    """A plain MLP VAE with a Gaussian (identity) output; returns a dict with z."""

    def __init__(self, input_dim: int, hidden: int = 64, latent: int = LATENT) -> None:
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden)
        self.fc_mu = nn.Linear(hidden, latent)
        self.fc_logvar = nn.Linear(hidden, latent)
        self.fc3 = nn.Linear(latent, hidden)
        self.fc4 = nn.Linear(hidden, input_dim)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(self.fc1(x))
        return self.fc_mu(h), self.fc_logvar(h)

    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        std = torch.exp(0.5 * logvar)
        return mu + torch.randn_like(std) * std

    def decode(self, z: Tensor) -> Tensor:
        return self.fc4(F.relu(self.fc3(z)))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar)
        return {"reconstruction": self.decode(z), "mu": mu, "log_var": logvar, "z": z}


class PyTorchExamplesVAE(PUBLIC.VAE):  # type: ignore[name-defined]
    """pytorch/examples' VAE, its 64 input features made a parameter (D = 30 too)."""

    def __init__(self, input_dim: int = 64) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.fc1 = nn.Linear(input_dim, 32)
        self.fc4 = nn.Linear(32, input_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x.view(-1, self.input_dim))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def examples_loss(
    recon_x: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, kl_w: float = 1.0
) -> Tensor:
    """pytorch/examples' loss_function (one scalar, summed), for any D and a KL weight."""
    if kl_w == 1.0 and recon_x.shape[1] == 64:
        return PUBLIC.loss_function(recon_x, x, mu, logvar)  # verbatim
    BCE = F.binary_cross_entropy(recon_x, x.view_as(recon_x), reduction="sum")
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return BCE + kl_w * KLD


# ---- families -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    name: str
    recon: str  # "mse" or "bce": the generic faulty losses use it
    reduction: str  # "mean" or "sum": the batch reduction of its own loss
    kl_weight: float  # its own KL weight (beta)
    has_z: bool  # its output carries z
    scaling: str  # how its data is scaled: "minmax" or "standard"
    data: tuple[str, ...]
    build: Callable[[int, int], nn.Module]
    image: bool = False  # takes (B, 1, 8, 8)
    bias_reaches_relu: bool = True  # a first-layer bias of -10 kills its ReLUs (no batch norm)


def _mlp(dim: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MLPVAE(dim)


def _examples(dim: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return PyTorchExamplesVAE(dim)


def _conv(dim: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return PUBLIC.VanillaVAE(in_channels=1, latent_dim=LATENT)


def _mtx(dim: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MeaningVAE(input_dim=dim, latent_dim=LATENT, seed=seed)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "mlp-gauss", "mse", "mean", 1.0, True, "standard", ("digits", "breast-cancer"), _mlp
        ),
        Family(
            "mlp-bernoulli",
            "bce",
            "sum",
            1.0,
            False,
            "minmax",
            ("digits", "breast-cancer"),
            _examples,
        ),
        Family(
            "conv",
            "mse",
            "mean",
            0.005,
            False,
            "minmax",
            ("digits",),
            _conv,
            image=True,
            bias_reaches_relu=False,
        ),
        Family("beta-vae", "mse", "mean", 4.0, True, "standard", ("digits", "breast-cancer"), _mlp),
        Family(
            "mtx",
            "mse",
            "mean",
            0.1,
            True,
            "standard",
            ("digits", "breast-cancer"),
            _mtx,
            bias_reaches_relu=False,
        ),
    )
}


# ---- losses ---------------------------------------------------------------------------------

LossOut = tuple[Any, dict[str, Any]]  # (what the loss returned, Doctor.step keywords)
# (family, model, output, batch, the KL weight applied at this step) -> LossOut
LossFn = Callable[[Family, nn.Module, Any, Tensor, float], LossOut]


def _recon(fam: Family, recon: Tensor, x: Tensor, reduction: str) -> Tensor:
    x = x.view_as(recon)
    per_elem = (
        F.binary_cross_entropy(recon, x, reduction="none")
        if fam.recon == "bce"
        else (recon - x) ** 2
    )
    if fam.name == "conv" and reduction == "mean":
        return per_elem.mean()  # F.mse_loss's mean over elements, as these authors write it
    per_sample = per_elem.flatten(1).sum(1)
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def _kl(mu: Tensor, logvar: Tensor, reduction: str, form: str = "right") -> Tensor:
    """KL(q || N(0, I)) per sample, reduced; ``form`` writes it wrong on purpose:
    ``wrong-sign`` (+0.5 * sum: the loss then rewards a KL far from the prior) or
    ``no-half`` (-sum: twice the KL)."""
    inner = torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)
    scale = {"right": -0.5, "wrong-sign": 0.5, "no-half": -1.0}[form]
    per_sample = scale * inner
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def _bernoulli_kl_by_hand(fam: Family, recon: Tensor, x: Tensor, reduction: str) -> Tensor:
    """The reconstruction written as KL(x || recon) by hand: x * log(x / recon) is
    0 * -inf = NaN at x = 0 (and log of a negative on standardised data)."""
    x = x.view_as(recon)
    per_elem = x * torch.log(x / recon) + (1 - x) * torch.log((1 - x) / (1 - recon))
    per_sample = per_elem.flatten(1).sum(1)
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def _parts(fam: Family, out: Any) -> tuple[Tensor, Tensor, Tensor]:
    if isinstance(out, Mapping):
        return out["reconstruction"], out["mu"], out["log_var"]
    if fam.name == "conv":
        return out[0], out[2], out[3]
    return out[0], out[1], out[2]


def own_loss(fam: Family, model: nn.Module, out: Any, x: Tensor, kl_w: float) -> LossOut:
    """The family's own loss as its authors write it, with KL weight ``kl_w``."""
    recon, mu, logvar = _parts(fam, out)
    if fam.name == "mlp-bernoulli":
        return examples_loss(recon, x, mu, logvar, kl_w=kl_w), {}  # one scalar, nothing named
    if fam.name == "conv":
        vae: Any = model
        loss = vae.loss_function(*out, M_N=kl_w)  # AntixK: detached copies of its terms
        return loss, {
            "weights": {"KLD": -kl_w},
            "reduction": {"Reconstruction_Loss": "mean", "KLD": "mean"},
        }
    if fam.name == "mtx":
        return CombinedLoss(kl_loss_weight=kl_w, semantic_loss_weight=0.0, on_non_finite="record")(
            out, x
        ), {}
    mse = ((recon - x) ** 2).sum(1).mean()  # Gaussian NLL up to a constant: per-sample sum
    kl = _kl(mu, logvar, "mean")
    return {"loss": mse + kl_w * kl, "MSE": mse, "KLD": kl}, {
        "weights": {"KLD": kl_w},
        "reduction": {"MSE": "mean", "KLD": "mean"},
    }


def sqrt_at_zero_loss(fam: Family, model: nn.Module, out: Any, x: Tensor, kl_w: float) -> LossOut:
    """The family's own loss plus a custom term sqrt(|mu - mu.detach()|): its value is 0,
    its derivative infinite, so every gradient through mu is NaN while the loss is finite."""
    loss, kwargs = own_loss(fam, model, out, x, kl_w)
    _, mu, _ = _parts(fam, out)
    penalty = torch.sqrt((mu - mu.detach()).abs()).sum()
    if isinstance(loss, Mapping):
        loss = {**loss, "loss": loss["loss"] + penalty}
    else:
        loss = loss + penalty
    return loss, kwargs


def generic_loss(
    fam: Family,
    out: Any,
    x: Tensor,
    kl_w: float,
    recon_red: str,
    kl_red: str,
    detach: bool = False,
    by_hand: bool = False,
    kl_form: str = "right",
) -> LossOut:
    """The family's loss rewritten as named terms (a user's own variant of it)."""
    recon, mu, logvar = _parts(fam, out)
    rec = (_bernoulli_kl_by_hand if by_hand else _recon)(fam, recon, x, recon_red)
    if detach:
        rec = rec.detach()
    kl = _kl(mu, logvar, kl_red, kl_form)
    return {"loss": rec + kl_w * kl, "recon": rec, "KLD": kl}, {
        "weights": {"KLD": kl_w},
        "reduction": {"recon": recon_red, "KLD": kl_red},
    }


# ---- faults ---------------------------------------------------------------------------------


def _fresh(self: nn.Module, mu: Tensor, logvar: Tensor) -> Tensor:
    std = torch.exp(0.5 * logvar)
    return mu + torch.randn_like(std) * std


def _frozen(self: nn.Module, mu: Tensor, logvar: Tensor) -> Tensor:
    if not self.training:
        return mu
    torch.manual_seed(0)  # "for reproducibility"
    return _fresh(self, mu, logvar)


def _mean_only(self: nn.Module, mu: Tensor, logvar: Tensor) -> Tensor:
    return mu  # z = mu in training too


def _variance_as_sigma(self: nn.Module, mu: Tensor, logvar: Tensor) -> Tensor:
    if not self.training:
        return mu
    std = torch.exp(logvar)  # the variance used as sigma
    return mu + torch.randn_like(std) * std


def _tiny_noise(self: nn.Module, mu: Tensor, logvar: Tensor) -> Tensor:
    if not self.training:
        return mu
    std = torch.exp(0.5 * logvar)
    return mu + 0.01 * torch.randn_like(std) * std  # noise shrunk "for stability"


Patch = Callable[[nn.Module, int], nn.Module]  # (model, input features D) -> model


def _subclass(model: nn.Module, methods: dict[str, Any]) -> nn.Module:
    cls = model.__class__
    model.__class__ = type(f"{cls.__name__}Faulty", (cls,), methods)
    return model


def _patch_reparameterize(fn: Callable[..., Tensor]) -> Patch:
    return lambda model, dim: _subclass(model, {"reparameterize": fn})


def _dead_relus(model: nn.Module, dim: int) -> nn.Module:
    with torch.no_grad():
        fc1: Any = model.fc1
        fc1.bias.fill_(-10.0)
    return model


def _unused_head(model: nn.Module, dim: int) -> nn.Module:
    model.extra_head = nn.Linear(LATENT, LATENT)  # registered, never called
    return model


def _over_strong_decoder(model: nn.Module, dim: int) -> nn.Module:
    """The decoder also sees x: recon = decode(z) + skip(x), skip a Linear started at the
    identity (for the Bernoulli decoder inside the sigmoid, at 8x - 4: sigmoid of it is
    ~x on [0, 1] pixels). z is not needed to reconstruct, so the KL term empties it."""
    examples = isinstance(model, PyTorchExamplesVAE)
    model.skip = nn.Linear(dim, dim)
    with torch.no_grad():
        model.skip.weight.copy_(torch.eye(dim) * (8.0 if examples else 1.0))
        model.skip.bias.fill_(-4.0 if examples else 0.0)

    def forward_examples(self: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        flat = x.view(-1, self.input_dim)
        mu, logvar = self.encode(flat)
        z = self.reparameterize(mu, logvar)
        logits = self.fc4(F.relu(self.fc3(z)))
        return torch.sigmoid(logits + self.skip(flat)), mu, logvar

    def forward_other(self: Any, x: Tensor, **kwargs: Any) -> Any:
        out = super(type(self), self).forward(x)
        if isinstance(out, Mapping):
            return {**out, "reconstruction": out["reconstruction"] + self.skip(x)}
        recon = out[0] + self.skip(x.flatten(1)).view_as(out[0])  # AntixK: [recon, x, mu, lv]
        return [recon, *out[1:]]

    return _subclass(model, {"forward": forward_examples if examples else forward_other})


LOG_VAR_SCALE = 100.0
LOG_VAR_HEADS = ("fc_logvar", "fc22", "fc_var", "encoder.fc_log_var")  # per family


def _log_var_head(model: nn.Module) -> nn.Module:
    names = dict(model.named_modules())
    return next(names[n] for n in LOG_VAR_HEADS if n in names)


def _log_var_scaled(model: nn.Module, dim: int) -> nn.Module:
    """The encoder's log_var head scaled by 100 (a forward hook): exp(0.5 * log_var) in
    the reparameterisation and exp(log_var) in the KL overflow float32 (e^88.7). At x60
    the largest log_var at initialisation is ~70 here: huge but finite, and Adam pulls it
    back before it overflows (exploding-grad, not a NaN)."""
    _log_var_head(model).register_forward_hook(lambda m, i, out: out * LOG_VAR_SCALE)
    return model


FIRST_ENCODER_LAYER = {  # the module the deep-stack faults replace, and its output width
    "mlp-gauss": ("fc1", 64),
    "beta-vae": ("fc1", 64),
    "mlp-bernoulli": ("fc1", 32),
    "mtx": ("encoder.layers", 32),
}


def _deep_stack(
    family: str, depth: int, act: Callable[[], nn.Module], init: Callable[[nn.Linear], None]
) -> Patch:
    """Replace the encoder's first layer (or mtx's hidden block) by ``depth`` Linear+act
    layers, 64 wide, initialised by ``init``."""

    def patch(model: nn.Module, dim: int) -> nn.Module:
        path, width = FIRST_ENCODER_LAYER[family]
        widths = [dim] + [64] * (depth - 1) + [width]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            linear = nn.Linear(a, b)
            init(linear)
            layers += [linear, act()]
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, nn.Sequential(*layers))
        return model

    return patch


def _small_init(linear: nn.Linear) -> None:
    nn.init.normal_(linear.weight, std=0.05)  # per layer x0.25 (sigmoid') x ~0.4 (weights)
    nn.init.zeros_(linear.bias)


def _scaled_init(scale: float) -> Callable[[nn.Linear], None]:
    def init(linear: nn.Linear) -> None:
        with torch.no_grad():
            linear.weight.mul_(scale)  # on top of PyTorch's default (Kaiming-uniform) init

    return init


Schedule = Callable[[int], float]  # optimizer step (0-based) -> KL weight
ScheduleFor = Callable[[Family, int], Schedule]  # (family, steps in the run) -> schedule


def _warmup(over: float) -> ScheduleFor:
    """Linear KL warm-up from 0 to the family's weight over ``over`` x the run's steps."""

    def schedule_for(fam: Family, total: int) -> Schedule:
        ramp = max(1.0, over * total)
        return lambda step: fam.kl_weight * min(1.0, step / ramp)

    return schedule_for


def _constant(weight_of: Callable[[Family], float]) -> ScheduleFor:
    return lambda fam, total: lambda step: weight_of(fam)


def _overshoot(weight_of: Callable[[Family], float], start: float, end: float) -> ScheduleFor:
    """The family's own KL weight until ``start`` x the run (the latent learns), then a
    linear rise to ``weight_of(fam)`` by ``end`` x the run, then held."""

    def schedule_for(fam: Family, total: int) -> Schedule:
        a, b = start * total, max(start * total + 1.0, end * total)
        high = weight_of(fam)

        def beta(step: int) -> float:
            share = min(1.0, max(0.0, (step - a) / (b - a)))
            return fam.kl_weight + share * (high - fam.kl_weight)

        return beta

    return schedule_for


def collapse_weight(fam: Family) -> float:
    """The KL weight of the posterior-collapse fault: 50x the family's own weight, at least
    20 (the conv family's 0.005 and mtx's 0.1 times 50 do not collapse in 10 epochs)."""
    return max(50.0 * fam.kl_weight, 20.0)


@dataclass(frozen=True)
class Fault:
    name: str
    doc: str  # what the fault is, one line (the per-fault notes print it)
    expected: frozenset[str]  # any of these codes counts as found; empty: a healthy control
    consequences: frozenset[str] = frozenset()  # codes the fault legitimately causes too
    patch_model: Patch | None = None
    loss: LossFn | None = None  # None: the family's own loss
    lr_scale: float = 1.0
    applies: Callable[[Family], str | None] = lambda fam: None  # a reason to skip, or None
    # the codes the per-code table credits this fault to (None: all of expected; empty:
    # none, for a fault such as lr-x1000 whose symptom may be any of its expected codes)
    primary: frozenset[str] | None = None
    declared: ScheduleFor | None = None  # the beta schedule given to the Doctor
    applied: ScheduleFor | None = None  # the KL weight the loss uses (None: declared or own)


def _needs_relu_bias(fam: Family) -> str | None:
    return None if fam.bias_reaches_relu else "batch norm after the first layer cancels its bias"


def _needs_mlp_encoder(fam: Family) -> str | None:
    if fam.name in FIRST_ENCODER_LAYER:
        return None
    return "a convolutional encoder: the deep-stack faults replace an MLP encoder's first layer"


def _decoder_skip_collapses(fam: Family) -> str | None:
    if fam.name != "mtx":
        return None
    return (
        "the fault does not manifest: MeaningVAE's KL weight 0.1 empties z too slowly "
        "beside its skip path (measured: KL 0.45 nats, 4/4 units active after 10 epochs)"
    )


def _log_var_overflows(fam: Family) -> str | None:
    if fam.name != "mlp-bernoulli":
        return None
    return (
        "the fault does not manifest: pytorch/examples' summed BCE pulls the x100 log_var "
        "back before exp overflows (measured: no NaN/Inf in 6/6 runs, exploding-grad only)"
    )


NONFINITE = frozenset({"nonfinite-loss", "nonfinite-grad"})

FAULTS: dict[str, Fault] = {
    f.name: f
    for f in (
        Fault("healthy", "the family as its authors train it", frozenset()),
        Fault(
            "healthy-warmup",
            "a KL warm-up over the first 30% of the run, declared to the Doctor and applied",
            frozenset(),
            declared=_warmup(0.3),
        ),
        Fault(
            "posterior-collapse",
            "KL weight too high from the start: max(50 x the family's weight, 20)",
            frozenset({"posterior-collapse"}),
            frozenset({"collapse-onset"}),
            applied=_constant(collapse_weight),
        ),
        Fault(
            "over-strong-decoder",
            "the decoder also gets x: recon = decode(z) + skip(x), skip started at identity",
            frozenset({"posterior-collapse"}),
            frozenset({"collapse-onset"}),
            patch_model=_over_strong_decoder,
            applies=_decoder_skip_collapses,
        ),
        Fault(
            "frozen-noise",
            "the noise re-seeded before every draw (torch.manual_seed(0) 'for reproducibility')",
            frozenset({"frozen-noise"}),
            patch_model=_patch_reparameterize(_frozen),
        ),
        Fault(
            "missing-noise",
            "no reparameterisation noise: z = mu in training",
            frozenset({"frozen-noise"}),
            patch_model=_patch_reparameterize(_mean_only),
        ),
        Fault(
            "variance-as-sigma",
            "sigma = exp(logvar), the variance, instead of exp(0.5 * logvar)",
            frozenset({"noise-scale"}),
            patch_model=_patch_reparameterize(_variance_as_sigma),
        ),
        Fault(
            "tiny-noise",
            "the noise scaled by a constant 0.01 'for stability'",
            frozenset({"noise-scale"}),
            patch_model=_patch_reparameterize(_tiny_noise),
        ),
        Fault(
            "detached-recon",
            "the reconstruction term detached: a term with no gradient",
            frozenset({"no-grad-path"}),
            frozenset({"unused-params", "posterior-collapse", "loss-plateau"}),  # decoder starved
            loss=lambda fam, m, out, x, w: generic_loss(
                fam, out, x, w, fam.reduction, fam.reduction, detach=True
            ),
        ),
        Fault(
            "reduction-mismatch",
            "KL vanishing under a sum/mean mismatch: recon summed over the batch, KL averaged",
            frozenset({"batch-dependent-weights"}),
            loss=lambda fam, m, out, x, w: generic_loss(fam, out, x, w, "sum", "mean"),
        ),
        Fault(
            "nan-log0",
            "NaN from log(0): the reconstruction written as x * log(x / recon) by hand",
            NONFINITE,
            primary=frozenset({"nonfinite-loss"}),
            loss=lambda fam, m, out, x, w: generic_loss(
                fam, out, x, w, fam.reduction, fam.reduction, by_hand=True
            ),
        ),
        Fault(
            "exp-overflow",
            "exp overflow: the encoder's log_var x100, so exp(log_var) exceeds float32",
            NONFINITE,
            frozenset({"exploding-grad", "loss-oscillation"}),  # huge before it overflows
            patch_model=_log_var_scaled,
            primary=frozenset({"nonfinite-loss"}),
            applies=_log_var_overflows,
        ),
        Fault(
            "lr-x1000",
            "a learning rate 1000x too high (Adam lr 1.0)",
            frozenset({"loss-oscillation", "exploding-grad"}) | NONFINITE,
            lr_scale=1000.0,
            primary=frozenset(),
        ),
        Fault(
            "sqrt-at-zero",
            "a custom term sqrt(|mu - mu.detach()|): value 0, derivative infinite",
            frozenset({"nonfinite-grad"}),
            loss=sqrt_at_zero_loss,
        ),
        Fault(
            "beta-overshoot",
            "beta raised too far mid-run: the family's weight for half the run, then a rise "
            "to max(50 x it, 20) by 80%: KL grows, then collapses",
            frozenset({"collapse-onset", "posterior-collapse"}),
            primary=frozenset({"collapse-onset"}),
            applied=_overshoot(collapse_weight, 0.5, 0.8),
        ),
        Fault(
            "deep-vanishing",
            "a deep encoder: 8 sigmoid layers, weights N(0, 0.05^2)",
            frozenset({"vanishing-grad"}),
            frozenset({"posterior-collapse", "collapse-onset"}),  # a constant encoder output
            patch_model=None,  # per family: see _family_patch
            applies=_needs_mlp_encoder,
        ),
        Fault(
            "deep-exploding",
            "a deep encoder: 8 linear layers, default init x2.5 (x3 overflows to NaN)",
            frozenset({"exploding-grad"}),
            frozenset({"loss-oscillation"}),
            patch_model=None,  # per family: see _family_patch
            applies=_needs_mlp_encoder,
        ),
        Fault(
            "dying-relu",
            "dead ReLUs: the first layer's bias set to -10",
            frozenset({"dying-relu"}),
            frozenset({"vanishing-grad", "posterior-collapse"}),  # a dead encoder: constant mu
            patch_model=_dead_relus,
            applies=_needs_relu_bias,
        ),
        Fault(
            "unused-params",
            "parameters never used: a registered head that forward never calls",
            frozenset({"unused-params"}),
            patch_model=_unused_head,
        ),
        Fault(
            "beta-never-max",
            "a linear KL warm-up over 100x the run's steps (declared): beta never reaches max",
            frozenset({"beta-schedule"}),
            declared=_warmup(100.0),
        ),
        Fault(
            "beta-not-applied",
            "a warm-up over the whole run declared, but the loss keeps its constant weight",
            frozenset({"beta-schedule"}),
            declared=_warmup(1.0),
            applied=_constant(lambda fam: fam.kl_weight),
        ),
        Fault(
            "kl-wrong-sign",
            "the KL term with the wrong sign (+0.5 * sum(1 + logvar - mu^2 - exp(logvar)))",
            frozenset({"kl-formula"}),
            NONFINITE | {"loss-oscillation", "exploding-grad"},  # the KL runs away
            loss=lambda fam, m, out, x, w: generic_loss(
                fam, out, x, w, fam.reduction, fam.reduction, kl_form="wrong-sign"
            ),
        ),
        Fault(
            "kl-missing-half",
            "the KL term without its 0.5 (-sum(1 + logvar - mu^2 - exp(logvar)))",
            frozenset({"kl-formula"}),
            loss=lambda fam, m, out, x, w: generic_loss(
                fam, out, x, w, fam.reduction, fam.reduction, kl_form="no-half"
            ),
        ),
    )
}


def _family_patch(fault: Fault, fam: Family) -> Patch | None:
    """The fault's model patch for this family (the deep-stack ones depend on it)."""
    if fault.name == "deep-vanishing":
        return _deep_stack(fam.name, 8, nn.Sigmoid, _small_init)
    if fault.name == "deep-exploding":
        return _deep_stack(fam.name, 8, nn.Identity, _scaled_init(2.5))
    return fault.patch_model


# ---- one run --------------------------------------------------------------------------------


@dataclass
class RunResult:
    detector: str  # "mtx" or "baseline"
    family: str
    data: str
    fault: str
    seed: int
    expected: list[str]
    fired: list[str]  # warning/error codes of the verdict (baseline: every alarm raised)
    info: list[str]  # info codes
    not_checked: list[str]
    steps: int
    seconds: float
    error: str | None = None
    found: bool = False
    alarms: list[str] = field(default_factory=list)  # fired codes not expected
    consequences: dict[str, str] = field(default_factory=dict)  # code -> its cause (marked)
    first_step: dict[str, int] = field(default_factory=dict)  # code -> first step it fired
    latency: int | None = None  # first step an expected code fired (None: not found)
    unsupported: str | None = None  # the Doctor does not take this fault's keywords yet
    sources: dict[str, list[str]] = field(default_factory=dict)  # baseline: code -> tools
    retrained: bool = False  # baseline: trained again without the Doctor (see run_one)


@dataclass
class Setup:
    x_all: Tensor
    model: nn.Module
    optimizer: torch.optim.Optimizer
    declared: Schedule | None
    applied: Schedule
    loss: LossFn
    total_steps: int


def setup(fam: Family, data_name: str, fault: Fault, seed: int, epochs: int) -> Setup:
    torch.manual_seed(seed)
    x_all = load_data(data_name, fam.scaling)
    if fam.image:
        x_all = x_all.view(-1, 1, 8, 8)
    dim = int(x_all[0].numel())
    model = fam.build(dim, seed)
    patch = _family_patch(fault, fam)
    if patch is not None:
        model = patch(model, dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR * fault.lr_scale)
    total = epochs * math.ceil(x_all.shape[0] / BATCH)
    declared = fault.declared(fam, total) if fault.declared else None
    if fault.applied is not None:
        applied = fault.applied(fam, total)
    elif declared is not None:
        applied = declared
    else:
        applied = _constant(lambda f: f.kl_weight)(fam, total)
    return Setup(x_all, model, optimizer, declared, applied, fault.loss or own_loss, total)


def batches(s: Setup, fam: Family, seed: int, epochs: int) -> Iterator[tuple[int, bool, Tensor]]:
    """(epoch, last batch of the epoch?, batch): the same order for mtx and the baseline."""
    shuffle = torch.Generator().manual_seed(seed)
    n = s.x_all.shape[0]
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=shuffle)
        for i in range(0, n, BATCH):
            yield epoch, i + BATCH >= n, s.x_all[perm[i : i + BATCH]]


def _total(loss: Any) -> Tensor:
    return loss["loss"] if isinstance(loss, Mapping) else loss


def _severe(found: Sequence[Any]) -> list[str]:
    return sorted({f.code for f in found if f.severity in ("warning", "error")})


@contextmanager
def _same_rng() -> Iterator[None]:
    """The global RNG as it was: a model that samples in eval mode (MLPVAE, VanillaVAE)
    draws from it when the findings measure latent health."""
    state = torch.random.get_rng_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _finish(
    r: RunResult, fault: Fault, hit: set[str], first_step: dict[str, int], steps: int
) -> RunResult:
    for code in r.fired:
        first_step.setdefault(code, steps)
    r.first_step = dict(sorted(first_step.items()))
    r.found = bool(hit & fault.expected)
    r.alarms = sorted(set(r.fired) - fault.expected)
    lat = [first_step[c] for c in fault.expected if c in first_step and c in hit]
    r.latency = min(lat) if r.found and lat else None
    return r


def run_one(
    fam: Family,
    data_name: str,
    fault: Fault,
    seed: int,
    epochs: int,
    latency_every: int = 1,
    watch: Any = None,
) -> RunResult:
    """One run through the Doctor; findings every ``latency_every`` epochs (0: only at the
    end) for the latency, and the end-of-run verdict. ``watch``: a
    :class:`~baseline.BaselineMonitor` that reads the same gradients (passive)."""
    s = setup(fam, data_name, fault, seed, epochs)
    model = s.model
    if watch is not None:
        watch.attach(model, s.x_all[:BATCH])
    result = RunResult(
        "mtx", fam.name, data_name, fault.name, seed, sorted(fault.expected), [], [], [], 0, 0.0
    )
    kwargs: dict[str, Any] = {}
    if s.declared is not None:
        kwargs = {"beta_schedule": s.declared, "beta_max": fam.kl_weight}
    start = time.perf_counter()
    try:
        doctor = Doctor(model, where=f"{fam.name}/{fault.name}", **kwargs)
    except TypeError as exc:
        if not kwargs:
            raise
        result.unsupported = f"not supported yet: Doctor(beta_schedule=, beta_max=): {exc}"
        return result
    steps = 0
    first_step: dict[str, int] = {}
    info: list[str] = []
    error = check_error = None
    checks = latency_every > 0
    try:
        with doctor:
            try:
                for epoch, last, xb in batches(s, fam, seed, epochs):
                    model.train()
                    s.optimizer.zero_grad()
                    out = model(xb)
                    loss, kw = s.loss(fam, model, out, xb, s.applied(steps))
                    doctor.step(out, loss, xb, **kw)  # z in it when the family has one
                    _total(loss).backward()
                    if watch is not None:
                        watch.after_backward(steps + 1, _total(loss))
                    s.optimizer.step()
                    steps += 1
                    if not last:
                        continue
                    doctor.epoch_end()
                    if watch is not None:
                        watch.epoch_end(steps)
                    due = checks and (epoch + 1) % latency_every == 0
                    if due and epoch < epochs - 1:  # the last epoch's check is the verdict
                        try:
                            with _same_rng():
                                seen = doctor.findings(
                                    data=s.x_all[:LATENCY_ROWS], batch_size=BATCH
                                )
                        except Exception as exc:  # mtx misbehaved: no more checks, go on
                            check_error = f"mtx raised at step {steps}'s check: {exc!r}"
                            checks = False
                            continue
                        for code in _severe(seen):
                            first_step.setdefault(code, steps)
            except Exception as exc:  # the user's loop crashed (e.g. BCE on a NaN output):
                error = f"training raised {type(exc).__name__}: {exc}"  # judge what was seen
        found = doctor.findings(data=s.x_all, batch_size=BATCH)
        result.fired = _severe(found)
        info = sorted({f.code for f in found if f.severity == "info"})
        result.not_checked = sorted({n.code for n in found.not_checked})
        result.consequences = {
            f.code: f.consequence_of for f in found if getattr(f, "consequence_of", "")
        }
    except Exception as exc:  # mtx misbehaved: recorded, reported
        error = f"mtx raised {type(exc).__name__}: {exc}"
    result.info, result.error, result.steps = info, error or check_error, steps
    result.seconds = time.perf_counter() - start
    hit = set(result.fired) | (set(info) & INFO_CODES)
    return _finish(result, fault, hit, first_step, steps)


def run_baseline_one(
    fam: Family, data_name: str, fault: Fault, seed: int, epochs: int
) -> RunResult:
    """The same run without the Doctor, watched by what users have today (baseline.py)."""
    s = setup(fam, data_name, fault, seed, epochs)
    model = s.model
    result = RunResult(
        "baseline",
        fam.name,
        data_name,
        fault.name,
        seed,
        sorted(fault.expected),
        [],
        [],
        [],
        0,
        0.0,
    )
    start = time.perf_counter()
    monitor = BASELINE.BaselineMonitor()
    monitor.attach(model, s.x_all[:BATCH])
    steps = 0
    try:
        for _epoch, last, xb in batches(s, fam, seed, epochs):
            model.train()
            s.optimizer.zero_grad()
            out = model(xb)
            loss, _kw = s.loss(fam, model, out, xb, s.applied(steps))
            with monitor.backward_guard(steps + 1):
                _total(loss).backward()
            monitor.after_backward(steps + 1, _total(loss))
            s.optimizer.step()
            steps += 1
            if last:
                monitor.epoch_end(steps)
    except BASELINE.AnomalyStop as exc:
        result.error = f"detect_anomaly stopped the run: {exc}"
    except Exception as exc:  # the user's loop crashed: the baseline saw what it saw
        result.error = f"training raised {type(exc).__name__}: {exc}"
    result.steps = steps
    result.seconds = time.perf_counter() - start
    result.fired = sorted(monitor.fired)
    result.sources = {c: sorted(t) for c, t in sorted(monitor.sources.items())}
    result.retrained = True
    return _finish(result, fault, set(result.fired), dict(monitor.fired), steps)


def baseline_from_watch(
    watch: Any, mtx: RunResult, fault: Fault, epochs: int, retrain: bool
) -> RunResult:
    """The baseline's result for a cell from the monitor that watched the Doctor's run.

    The Doctor does not change the run (its extra passes fork the RNG; the trajectory is
    the one a plain loop takes), so AUTOTRAINER's and DeepDiagnosis's alarms are read on
    it. detect_anomaly cannot watch passively (it raises inside backward and stops the
    run): where the run saw a non-finite loss or gradient (or ``retrain``), the cell is
    trained again without the Doctor under detect_anomaly, as a user's run, and that run's
    alarms are the baseline's. Where everything stayed finite, detect_anomaly (which raises
    on a NaN in backward) had nothing to raise on.
    """
    fam = FAMILIES[mtx.family]
    if retrain or watch.saw_nonfinite:
        return run_baseline_one(fam, mtx.data, fault, mtx.seed, epochs)
    r = RunResult(
        "baseline",
        mtx.family,
        mtx.data,
        mtx.fault,
        mtx.seed,
        list(mtx.expected),
        sorted(watch.fired),
        [],
        [],
        mtx.steps,
        watch.seconds,
        error=mtx.error if mtx.error and mtx.error.startswith("training raised") else None,
    )
    r.sources = {c: sorted(t) for c, t in sorted(watch.sources.items())}
    return _finish(r, fault, set(r.fired), dict(watch.fired), mtx.steps)


# ---- the grid -------------------------------------------------------------------------------

QUICK_FAULTS = (
    "healthy",
    "frozen-noise",
    "nan-log0",
    "dying-relu",
    "detached-recon",
    "unused-params",
)


@dataclass(frozen=True)
class Grid:
    families: tuple[str, ...]
    data: tuple[str, ...]
    faults: tuple[str, ...]
    seeds: tuple[int, ...]
    epochs: int


DEFAULT = Grid(tuple(FAMILIES), ("digits", "breast-cancer"), tuple(FAULTS), (0, 1, 2), 10)
QUICK = Grid(("mlp-gauss", "mlp-bernoulli"), ("digits",), QUICK_FAULTS, (0,), 4)


def cells(grid: Grid) -> tuple[list[tuple[Family, str, Fault, int]], list[str]]:
    """The runs of the grid, and a line per combination skipped (with why)."""
    runs: list[tuple[Family, str, Fault, int]] = []
    skips: list[str] = []
    for fname in grid.families:
        fam = FAMILIES[fname]
        for data in grid.data:
            if data not in fam.data:
                skips.append(f"{fam.name} × {data}: the family takes 8×8 images only")
                continue
            for fault_name in grid.faults:
                fault = FAULTS[fault_name]
                why = fault.applies(fam)
                if why:
                    skips.append(f"{fam.name} × {data} × {fault.name}: {why}")
                    continue
                runs.extend((fam, data, fault, s) for s in grid.seeds)
    return runs, sorted(set(skips))


@dataclass
class GridResult:
    mtx: list[RunResult]
    baseline: list[RunResult]
    skips: list[str]
    seconds: dict[str, float]  # wall time of the mtx runs and of the baseline runs


def run_grid(
    grid: Grid,
    progress: bool = False,
    baseline: bool = True,
    latency_every: int = 1,
    retrain: bool = False,
) -> GridResult:
    """Every cell through the Doctor, with the baseline watching (``baseline_from_watch``;
    ``retrain``: the baseline trains every cell again without the Doctor instead)."""
    torch.set_num_threads(1)
    runs, skips = cells(grid)
    out = GridResult([], [], skips, {"mtx": 0.0, "baseline": 0.0})
    for i, (fam, data, fault, seed) in enumerate(runs):
        watch = BASELINE.BaselineMonitor() if baseline else None
        start = time.perf_counter()
        out.mtx.append(run_one(fam, data, fault, seed, grid.epochs, latency_every, watch))
        elapsed = time.perf_counter() - start
        out.seconds["mtx"] += elapsed - (watch.seconds if watch is not None else 0.0)
        out.mtx[-1].seconds -= watch.seconds if watch is not None else 0.0
        if watch is not None:
            start = time.perf_counter()
            out.baseline.append(
                baseline_from_watch(watch, out.mtx[-1], fault, grid.epochs, retrain)
            )
            out.seconds["baseline"] += watch.seconds + time.perf_counter() - start
        if progress:
            r = out.mtx[-1]
            b = f" | baseline {out.baseline[-1].fired or '–'}" if baseline else ""
            print(
                f"[{i + 1}/{len(runs)}] {fam.name} {data} {fault.name} s{seed}: "
                f"{r.fired or '–'} {r.seconds:.1f}s{b}",
                file=sys.stderr,
                flush=True,
            )
    return out


# ---- tables ---------------------------------------------------------------------------------


@dataclass
class Section:
    """One results table: rendered as text (``detail`` columns moved to a list below the
    table, ``wrap`` columns wrapped, so lines stay within ~100 columns) or as Markdown."""

    title: str
    intro: str
    headers: tuple[str, ...]
    rows: Sequence[Sequence[str]]
    detail: tuple[str, ...] = ()  # columns listed below the table in text
    wrap: dict[str, int] = field(default_factory=dict)  # column -> width in text
    notes: list[str] = field(default_factory=list)  # lines after the table


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain-text table; a cell with newlines spans several lines."""
    cells_ = [[str(c).split("\n") for c in r] for r in rows]
    widths = [
        max([len(h)] + [len(line) for r in cells_ for line in r[i]]) for i, h in enumerate(headers)
    ]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)).rstrip()

    out = [line(headers), "  ".join("─" * w for w in widths)]
    for r in cells_:
        for k in range(max(len(c) for c in r)):
            out.append(line([c[k] if k < len(c) else "" for c in r]))
    return "\n".join(out)


def render_text(sec: Section) -> str:
    keep = [i for i, h in enumerate(sec.headers) if h not in sec.detail]
    width = {sec.headers.index(h): w for h, w in sec.wrap.items() if h in sec.headers}
    rows = [
        tuple(
            "\n".join(textwrap.wrap(r[i], width[i], break_on_hyphens=False) or [""])
            if i in width
            else r[i]
            for i in keep
        )
        for r in sec.rows
    ]
    parts = [sec.title + (f". {sec.intro}" if sec.intro else "")]
    parts[0] = "\n".join(textwrap.wrap(parts[0], 96))
    parts.append(table([sec.headers[i] for i in keep], rows))
    details = []
    for r in sec.rows:
        items = [
            f"{h}: {r[i]}"
            for i, h in enumerate(sec.headers)
            if h in sec.detail and r[i] not in ("", "–")
        ]
        if items:
            details.append(
                textwrap.fill(
                    f"{r[0]}: " + "; ".join(items),
                    96,
                    initial_indent="  ",
                    subsequent_indent="      ",
                    break_on_hyphens=False,
                )
            )
    if details:
        parts.append("\n".join(details))
    if sec.notes:
        parts.append("\n".join(sec.notes))
    return "\n\n".join(parts)


def render_markdown(sec: Section) -> str:
    def esc(v: str) -> str:
        return v.replace("|", "\\|").replace("\n", " ")

    out = [f"#### {sec.title}", ""]
    if sec.intro:
        out += [sec.intro, ""]
    out.append("| " + " | ".join(sec.headers) + " |")
    out.append("|" + "|".join("---" for _ in sec.headers) + "|")
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in sec.rows]
    if sec.notes:
        out += [""] + [f"- {esc(n.strip())}" for n in sec.notes]
    return "\n".join(out)


def _pct(a: int, b: int) -> str:
    return f"{a}/{b} ({100 * a / b:.0f}%)" if b else "–"


def _median(values: Sequence[int]) -> str:
    return f"{statistics.median(values):g}" if values else "–"


def _counts(codes: Sequence[str]) -> str:
    return " ".join(f"{c}×{n}" for c, n in Counter(codes).most_common()) or "–"


def _judged(rs: Sequence[RunResult]) -> list[RunResult]:
    return [r for r in rs if not r.unsupported]


def _by_fault(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    by: dict[str, list[RunResult]] = defaultdict(list)
    for r in results:
        by[r.fault].append(r)
    return dict(by)


def _is_control(name: str) -> bool:
    return not FAULTS[name].expected


@dataclass
class Summary:
    recall: tuple[int, int]
    precision: tuple[int, int]
    precision_cons: tuple[int, int]
    false_alarms: tuple[int, int]
    covered: tuple[int, int]
    latencies: list[int]
    seconds: float
    runs: int


def summarise(results: Sequence[RunResult], seconds: float) -> Summary:
    faulty = [r for r in _judged(results) if not _is_control(r.fault)]
    healthy = [r for r in _judged(results) if _is_control(r.fault)]
    tp = sum(len(set(r.fired) & set(r.expected)) for r in faulty)
    cons = sum(
        len(set(r.fired) & (FAULTS[r.fault].expected | FAULTS[r.fault].consequences))
        for r in faulty
    )
    fired = sum(len(r.fired) for r in _judged(results))
    by = _by_fault(faulty)
    covered = sum(1 for rs in by.values() if rs and sum(r.found for r in rs) / len(rs) >= 0.95)
    return Summary(
        recall=(sum(r.found for r in faulty), len(faulty)),
        precision=(tp, fired),
        precision_cons=(cons, fired),
        false_alarms=(sum(1 for r in healthy if r.fired), len(healthy)),
        covered=(covered, len(by)),
        latencies=[r.latency for r in faulty if r.latency is not None],
        seconds=seconds,
        runs=len(results),
    )


def overall_line(name: str, s: Summary) -> str:
    return (
        f"Overall ({name}): recall {_pct(*s.recall)}, precision {_pct(*s.precision)} "
        f"(+consequences {_pct(*s.precision_cons)}), false alarms on healthy runs "
        f"{_pct(*s.false_alarms)}, faults covered (recall ≥ 0.95) {s.covered[0]}/{s.covered[1]}, "
        f"median latency {_median(s.latencies)} steps, wall time {s.seconds:.0f} s "
        f"({s.seconds / max(s.runs, 1):.2f} s/run)"
    )


PER_FAULT_HEADERS = (
    "fault",
    "recall",
    "precision",
    "+consequences",
    "latency",
    "steps",
    "s/run",
    "expected",
    "also fired (unexpected)",
    "marked consequences",
    "not checked",
)


def per_fault_section(name: str, results: Sequence[RunResult]) -> Section:
    rows = []
    for fault_name, rs in _by_fault(results).items():
        if _is_control(fault_name):
            continue
        fault = FAULTS[fault_name]
        judged = _judged(rs)
        if not judged:
            rows.append((fault_name, "n/s", "–", "–", "–", "–", "–", "–", "–", "–", "–"))
            continue
        tp = sum(len(set(r.fired) & fault.expected) for r in judged)
        tpc = sum(len(set(r.fired) & (fault.expected | fault.consequences)) for r in judged)
        fired = sum(len(r.fired) for r in judged)
        unchecked = sum(
            1 for r in judged if not r.found and set(r.not_checked) & fault.expected and not r.error
        )
        cons = [f"{c}←{cause}" for r in judged for c, cause in r.consequences.items()]
        n_s = len(rs) - len(judged)
        rows.append(
            (
                fault_name,
                _pct(sum(r.found for r in judged), len(judged)) + (f" +{n_s} n/s" if n_s else ""),
                _pct(tp, fired),
                _pct(tpc, fired),
                _median([r.latency for r in judged if r.latency is not None]),
                f"{sum(r.steps for r in judged) / len(judged):.0f}",
                f"{sum(r.seconds for r in judged) / len(judged):.2f}",
                ", ".join(sorted(fault.expected)),
                _counts([c for r in judged for c in r.alarms]),
                _counts(cons),
                f"{unchecked} runs" if unchecked else "–",
            )
        )
    return Section(
        f"Per fault ({name})",
        "recall: an expected code fired at warning/error (info for info codes); precision: "
        "fired warning/error codes that are expected / all fired; +consequences also counts "
        "the codes the fault legitimately causes; latency: median first step an expected code "
        "fired (runs that found it); steps: steps trained; n/s: not supported yet. "
        "A run whose training raised is judged on the steps before the crash.",
        PER_FAULT_HEADERS,
        rows,
        detail=PER_FAULT_HEADERS[7:],
    )


PER_CODE_HEADERS = (
    "code",
    "expected by",
    "recall",
    "precision",
    "latency",
    "fired on healthy",
)


def _reported(r: RunResult, code: str) -> bool:
    """The code fired, or was marked a consequence of another code the fault expects."""
    return code in r.fired or r.consequences.get(code, "") in r.expected


def per_code_section(name: str, results: Sequence[RunResult]) -> Section:
    judged = _judged(results)
    healthy = [r for r in judged if _is_control(r.fault)]
    expecting: dict[str, list[str]] = defaultdict(list)
    for fname in dict.fromkeys(r.fault for r in judged):
        fault = FAULTS[fname]
        for code in sorted(fault.expected if fault.primary is None else fault.primary):
            expecting[code].append(fname)
    codes = list(expecting) + sorted({c for r in judged for c in r.fired} - set(expecting))
    rows = []
    for code in sorted(codes):
        faults = expecting.get(code, [])
        runs = [r for r in judged if r.fault in faults]
        fired = [r for r in judged if code in r.fired]
        right = [r for r in fired if code in r.expected]
        rows.append(
            (
                code,
                ", ".join(faults) or "–",
                _pct(sum(_reported(r, code) for r in runs), len(runs)),
                _pct(len(right), len(fired)),
                _median([r.first_step[code] for r in right if code in r.first_step]),
                _pct(sum(code in r.fired for r in healthy), len(healthy)),
            )
        )
    return Section(
        f"Per finding code ({name})",
        "recall: runs of the faults that expect the code where it was reported: fired "
        "(warning/error), or marked as the consequence of another code the fault expects "
        "(a NaN loss makes NaN gradients: nonfinite-grad follows nonfinite-loss); "
        "precision: runs where it fired and was expected / runs where it fired (healthy "
        "included); latency: median first step it fired, where expected.",
        PER_CODE_HEADERS,
        rows,
        wrap={"expected by": 18},
    )


def family_section(name: str, results: Sequence[RunResult]) -> Section:
    fams = list(dict.fromkeys(r.family for r in results))
    rows = []
    for fault_name, rs in _by_fault(results).items():
        if _is_control(fault_name):
            continue
        row = [fault_name]
        for fam in fams:
            fr = [r for r in rs if r.family == fam]
            jr = _judged(fr)
            row.append(f"{sum(r.found for r in jr)}/{len(jr)}" if jr else ("n/s" if fr else "skip"))
        rows.append(tuple(row))
    return Section(f"Recall by family ({name})", "", ("fault", *fams), rows)


def healthy_section(name: str, results: Sequence[RunResult]) -> Section:
    healthy = [r for r in _judged(results) if _is_control(r.fault)]
    rows = []
    for fam in dict.fromkeys(r.family for r in healthy):
        for fault_name in dict.fromkeys(r.fault for r in healthy):
            fr = [r for r in healthy if r.family == fam and r.fault == fault_name]
            if fr:
                rows.append(
                    (
                        fam,
                        fault_name,
                        _pct(sum(1 for r in fr if r.fired), len(fr)),
                        _counts([c for r in fr for c in r.fired]),
                    )
                )
    alarmed = sum(1 for r in healthy if r.fired)
    return Section(
        f"Healthy runs ({name})",
        f"false-alarm rate {_pct(alarmed, len(healthy))} (any warning or error); codes: "
        + _counts([c for r in healthy for c in r.fired]),
        ("family", "control", "false alarms", "codes"),
        rows,
    )


def comparison_sections(
    mtx: Sequence[RunResult], base: Sequence[RunResult], seconds: Mapping[str, float]
) -> list[Section]:
    a, b = summarise(mtx, seconds["mtx"]), summarise(base, seconds["baseline"])
    rows = [
        ("recall", _pct(*a.recall), _pct(*b.recall)),
        ("precision", _pct(*a.precision), _pct(*b.precision)),
        ("false-alarm rate (healthy runs)", _pct(*a.false_alarms), _pct(*b.false_alarms)),
        (
            "faults covered (recall ≥ 0.95)",
            f"{a.covered[0]}/{a.covered[1]}",
            f"{b.covered[0]}/{b.covered[1]}",
        ),
        ("median latency (steps)", _median(a.latencies), _median(b.latencies)),
        ("wall time (s)", f"{a.seconds:.0f}", f"{b.seconds:.0f}"),
        ("s/run", f"{a.seconds / max(a.runs, 1):.2f}", f"{b.seconds / max(b.runs, 1):.2f}"),
    ]
    summary = Section(
        "mtx vs baseline",
        "the baseline: AUTOTRAINER's and DeepDiagnosis's gradient rules and "
        "torch.autograd.detect_anomaly (baseline.py), on the same runs",
        ("metric", "mtx", "baseline"),
        rows,
    )
    bm, bb = _by_fault(mtx), _by_fault(base)
    per = []
    for fault_name, rs in bm.items():
        if _is_control(fault_name):
            continue
        jr, br = _judged(rs), bb.get(fault_name, [])
        per.append(
            (
                fault_name,
                _pct(sum(r.found for r in jr), len(jr)) if jr else "n/s",
                _pct(sum(r.found for r in br), len(br)),
                _median([r.latency for r in jr if r.latency is not None]),
                _median([r.latency for r in br if r.latency is not None]),
                _counts([c for r in br for c in r.fired]),
            )
        )
    by_fault = Section(
        "mtx vs baseline, per fault",
        "recall and median latency (steps); baseline fired: its codes over the fault's runs",
        ("fault", "mtx recall", "baseline recall", "mtx lat.", "base lat.", "baseline fired"),
        per,
        wrap={"baseline fired": 30},
    )
    return [summary, by_fault]


def sections(grid: GridResult) -> list[Section]:
    out = [
        per_fault_section("mtx", grid.mtx),
        per_code_section("mtx", grid.mtx),
        family_section("mtx", grid.mtx),
        healthy_section("mtx", grid.mtx),
    ]
    if grid.baseline:
        out += [
            per_fault_section("baseline", grid.baseline),
            per_code_section("baseline", grid.baseline),
            healthy_section("baseline", grid.baseline),
            *comparison_sections(grid.mtx, grid.baseline, grid.seconds),
        ]
    return out


def _run_lines(title: str, rs: Sequence[RunResult], what: Callable[[RunResult], str]) -> str:
    return (
        title
        + "\n\n"
        + "\n".join(f"  {r.family} × {r.data} × {r.fault} seed {r.seed}: {what(r)}" for r in rs)
    )


def report(grid: GridResult) -> str:
    lines = [overall_line("mtx", summarise(grid.mtx, grid.seconds["mtx"]))]
    if grid.baseline:
        lines.append(overall_line("baseline", summarise(grid.baseline, grid.seconds["baseline"])))
    parts = [textwrap.fill(line, 96, subsequent_indent="  ") for line in lines]
    parts += [render_text(s) for s in sections(grid)]
    results = grid.mtx
    misses = [r for r in results if r.expected and not r.found and not r.unsupported]
    alarms = [r for r in results if r.alarms]
    errors = [r for r in results if r.error]
    unsupported = [r for r in results if r.unsupported]
    if misses:
        parts.append(
            _run_lines(
                "Misses (mtx)",
                misses,
                lambda r: (
                    f"fired {r.fired or '–'}"
                    + (
                        ", expected code not checked"
                        if set(r.not_checked) & set(r.expected)
                        else ""
                    )
                ),
            )
        )
    if alarms:
        parts.append(
            _run_lines("Unexpected warning/error codes (mtx)", alarms, lambda r: str(r.alarms))
        )
    if errors:
        parts.append(_run_lines("Runs that raised (mtx)", errors, lambda r: str(r.error)))
    if unsupported:
        parts.append(
            _run_lines("Not supported yet (mtx)", unsupported, lambda r: str(r.unsupported))
        )
    return "\n\n".join(parts)


def markdown(grid: GridResult, command: str) -> str:
    parts = [
        f"Reproduce: `{command}`",
        overall_line("mtx", summarise(grid.mtx, grid.seconds["mtx"])),
    ]
    if grid.baseline:
        parts.append(overall_line("baseline", summarise(grid.baseline, grid.seconds["baseline"])))
    parts += [render_markdown(s) for s in sections(grid)]
    return "\n\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small grid (< 60 s)")
    parser.add_argument("--json", type=Path, help="save the raw per-run results here")
    parser.add_argument("--markdown", type=Path, help="save the results tables as Markdown")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline")
    parser.add_argument(
        "--baseline-retrain",
        action="store_true",
        help="train every cell again without the Doctor for the baseline (default: only "
        "the cells that saw a NaN/Inf, for detect_anomaly; see baseline_from_watch)",
    )
    parser.add_argument(
        "--latency-every",
        type=int,
        default=1,
        metavar="K",
        help="findings every K epochs for the latency (0: only at the end; default 1)",
    )
    parser.add_argument("--progress", action="store_true", help="one line per run on stderr")
    args = parser.parse_args(argv)
    grid = QUICK if args.quick else DEFAULT
    start = time.perf_counter()
    result = run_grid(
        grid,
        progress=args.progress,
        baseline=not args.no_baseline,
        latency_every=args.latency_every,
        retrain=args.baseline_retrain,
    )
    total = time.perf_counter() - start
    header = (
        f"mtx fault benchmark ({'quick' if args.quick else 'default'} grid): "
        f"{len(result.mtx)} runs, families {', '.join(grid.families)}; "
        f"data {', '.join(grid.data)}; seeds {list(grid.seeds)}; {grid.epochs} epochs, "
        f"batch {BATCH}, Adam lr {LR}, 1 thread\n"
        f"Latency: findings every {args.latency_every} epoch(s) on {LATENCY_ROWS} rows "
        "(0: end only) and at the end; baseline: "
        + (
            ("every cell trained again" if args.baseline_retrain else "watching the same runs")
            if result.baseline
            else "skipped"
        )
    )
    skipped = "Skipped combinations\n\n" + ("\n".join(f"  {s}" for s in result.skips) or "  none")
    text = "\n\n".join([header, report(result), skipped, f"Total time: {total:.1f} s"])
    print(text)
    command = "python benchmarks/faults/run.py" + (" --quick" if args.quick else "")
    if args.markdown:
        args.markdown.write_text(markdown(result, command))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "grid": asdict(grid),
                    "seconds": total,
                    "seconds_by_detector": result.seconds,
                    "skips": result.skips,
                    "runs": [asdict(r) for r in result.mtx],
                    "baseline_runs": [asdict(r) for r in result.baseline],
                },
                indent=1,
            )
        )
    return text


if __name__ == "__main__":
    main()
