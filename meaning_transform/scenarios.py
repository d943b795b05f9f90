"""Fault scenarios: inject one known fault into the built-in setup.

``mtx <command> --scenario NAME`` runs the command on a deliberately broken
setup so a user can see what each finding looks like (and the tests can prove
each detector fires on its fault). ``healthy`` is the untouched default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from meaning_transform.model import MeaningVAE, ordered_linear_layers


class _Wrapped(nn.Module):
    """A model whose output dict is post-processed by ``edit(out, x)``."""

    def __init__(self, inner: nn.Module, edit: Callable[[dict, torch.Tensor], dict]) -> None:
        super().__init__()
        self.inner = inner
        self._edit = edit

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._edit(dict(self.inner(x)), x)


class _WithUnused(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        if not isinstance(inner, MeaningVAE):  # scenarios only wrap the built-in model
            raise TypeError(f"expected a MeaningVAE, got {type(inner).__name__}")
        self.inner = inner
        self.unused_head = nn.Linear(inner.latent_dim, inner.latent_dim)  # never called

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.inner(x)


class _LossWrapper(nn.Module):
    """A loss around mtx's CombinedLoss that forwards its attributes, so the training
    loop reads and sets the weights (a β schedule) on the loss inside."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.endswith("_weight") and "inner" in self._modules:
            setattr(self._modules["inner"], name, value)
        else:
            super().__setattr__(name, value)


class _HiddenTerm(_LossWrapper):
    """A loss whose total holds a term its named terms do not show (0.5 x reconstruction
    added to the total only), as a user's loss that returns its total and terms."""

    def forward(self, out: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, Any]:
        result = dict(self.inner(out, x))
        result["loss"] = result["loss"] + 0.5 * result["terms"]["reconstruction"]
        result["total_given"] = True
        return result


class _KlWrongSign(_LossWrapper):
    """The KL written as 0.5 * sum(1 + log_var - mu^2 - exp(log_var)), the leading minus
    dropped: the term is -KL, added with a positive weight, so the loss rewards KL."""

    def forward(self, out: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, Any]:
        result = dict(self.inner(out, x))
        kl = result["terms"]["kl"]
        result["terms"] = {**result["terms"], "kl": -kl}
        result["kl_loss"] = -kl.detach()
        result["loss"] = result["loss"] - 2 * result["weights"]["kl"] * kl
        return result


class _IgnoresBeta(_LossWrapper):
    """A loss that keeps its starting KL weight: setting ``kl_loss_weight`` (the β
    schedule) stores it where the loss never reads it."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "kl_loss_weight":
            nn.Module.__setattr__(self, "ignored_beta", value)
        else:
            super().__setattr__(name, value)

    def forward(self, out: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, Any]:
        return self.inner(out, x)


# rank-nan: the training step (0-based, one loss call per step) at which rank 1's target
# holds a NaN; early, so that even a short run has steps after it
RANK_NAN_STEP = 2

# The collapse-onset scenario's own β: 0.01 for its first steps, so the KL grows, then
# doubled every step to a cap far above any useful β, so it collapses part-way through
# (the built-in setup's KL peaks near 3 nats at step 8 and is gone by step 20).
OVERSHOOT_START, OVERSHOOT_STEPS, OVERSHOOT_RATE, OVERSHOOT_MAX = 0.01, 6, 2.0, 10.0


class _OvershootingBeta(_LossWrapper):
    """A β warm-up that overshoots: the loss applies its own β, held at 0.01 and then
    doubled every step up to 10 (``kl_loss_weight`` reads it). A β schedule that sets
    ``kl_loss_weight`` (anneal-demo) replaces it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__(inner)
        object.__setattr__(self, "calls", 0)  # plain attributes, not module state
        object.__setattr__(self, "scheduled", None)

    @property
    def kl_loss_weight(self) -> float:
        if self.scheduled is not None:  # a β schedule replaces the scenario's own β
            return float(self.scheduled)
        grow = max(0, self.calls - OVERSHOOT_STEPS)
        return min(OVERSHOOT_MAX, OVERSHOOT_START * OVERSHOOT_RATE**grow)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "kl_loss_weight":
            object.__setattr__(self, "scheduled", value)
        super().__setattr__(name, value)

    def forward(self, out: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, Any]:
        result = dict(self.inner(out, x))
        beta, inner_beta = self.kl_loss_weight, result["weights"]["kl"]
        object.__setattr__(self, "calls", self.calls + 1)
        kl = result["terms"]["kl"]
        result["loss"] = result["loss"] + (beta - inner_beta) * kl
        result["weights"] = {**result["weights"], "kl": beta}
        return result


class _RankNan(_LossWrapper):
    """On one rank of a distributed run, at one training step, the loss is given a
    target with a NaN: that rank's reconstruction term (and loss) is NaN, the others'
    are finite, and DDP's all-reduce spreads the NaN gradient to every rank."""

    def __init__(self, inner: nn.Module, rank: int = 1, step: int = RANK_NAN_STEP) -> None:
        super().__init__(inner)
        object.__setattr__(self, "calls", 0)  # plain attributes, not module state
        object.__setattr__(self, "fault", (rank, step))

    def forward(self, out: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, Any]:
        rank, step = self.fault
        calls = self.calls
        object.__setattr__(self, "calls", calls + 1)
        if calls == step and _this_rank() == rank:
            x = x.clone()
            x[0, 0] = float("nan")
        return self.inner(out, x)


def _this_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _TargetLeak(_LossWrapper):
    """A loss fed the model's own reconstruction as the target (a classic wiring bug)."""

    def forward(self, out: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, Any]:
        return self.inner(out, out["reconstruction"].detach())


def _scale_linear(model: nn.Module, factor: float) -> None:
    with torch.no_grad():
        for _, layer in ordered_linear_layers(model):
            layer.weight.mul_(factor)


def _dead_biases(model: nn.Module) -> None:
    with torch.no_grad():
        for name, layer in ordered_linear_layers(model):
            if ".layers." in name:
                layer.bias.fill_(-10.0)


def _sqrt_at_zero(out: dict, x: torch.Tensor) -> dict:
    mu = out["mu"]
    out["compression_loss"] = torch.sqrt((mu - mu.detach()).abs()).sum()  # value 0, grad NaN
    return out


def _drop_z(out: dict, x: torch.Tensor) -> dict:
    out.pop("z")  # a user's model that returns no z: the Doctor cannot recover eps
    return out


def _opposing_term(out: dict, x: torch.Tensor) -> dict:
    out["compression_loss"] = -0.5 * ((out["reconstruction"] - x) ** 2).sum(1).mean()
    return out


@dataclass(frozen=True)
class DeclaredSchedule:
    """A β warm-up the run declares to the Doctor: linear from 0 to ``beta_max`` over
    the first ``warmup`` share of the steps, then constant."""

    warmup: float = 0.5
    beta_max: float = 1.0

    def over(self, steps: int) -> Callable[[int], float]:
        """β at each step of a run of ``steps`` optimizer steps."""
        ramp = max(1.0, self.warmup * steps)
        return lambda step: self.beta_max * min(1.0, step / ramp)


@dataclass(frozen=True)
class RankFault:
    """A fault of a distributed run (``--nproc N``), on one rank or in the DDP wrapper.

    ``perturb``: the parameter (qualified name) nudged by ``+delta`` in one entry on
    ``rank``, in place, right after DDP's initial broadcast, so that replica stays
    different. ``broadcast_buffers``: DDP's own flag; False leaves each rank's batch-norm
    running statistics to drift apart.
    """

    rank: int = 1
    perturb: str | None = None
    delta: float = 1e-3
    broadcast_buffers: bool = True

    def after_broadcast(self, model: nn.Module, rank: int) -> None:
        """Apply the fault to this rank's replica (the module DDP wraps)."""
        if self.perturb is None or rank != self.rank:
            return
        weight = dict(model.named_parameters())[self.perturb]
        with torch.no_grad():
            weight.view(-1)[0] += self.delta


@dataclass(frozen=True)
class Scenario:
    name: str
    findings: tuple[str, ...]  # the finding codes it demonstrates (none for healthy)
    description: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # MeaningVAE overrides
    loss_kwargs: dict[str, Any] = field(default_factory=dict)  # CombinedLoss overrides
    lr: float | None = None
    prepare: Callable[[nn.Module], nn.Module | None] | None = None  # edit/wrap the model
    wrap_loss: Callable[[nn.Module], nn.Module] | None = None
    nan_input: bool = False
    # a β schedule the run declares to the Doctor (anneal-demo declares its own instead)
    declared_beta: DeclaredSchedule | None = None
    # the fault is the loss's own KL weight, which a β schedule (anneal-demo) replaces
    beta_fault: bool = False
    # processes the fault needs (2: a distributed fault, shown with --nproc 2 or more)
    min_nproc: int = 1
    rank_fault: RankFault | None = None  # the distributed fault, if any

    def data(self, x: torch.Tensor) -> torch.Tensor:
        if not self.nan_input:
            return x
        x = x.clone()
        # one bad value: row 5, column 2 (agent states' health) when the data has them
        x[min(5, x.shape[0] - 1), min(2, x.shape[1] - 1)] = float("nan")
        return x

    def model(self, input_dim: int, seed: int, output_activation: str) -> nn.Module:
        kwargs = {"output_activation": output_activation, **self.model_kwargs}
        model: nn.Module = MeaningVAE(input_dim=input_dim, seed=seed, **kwargs)
        if self.prepare is not None:
            model = self.prepare(model) or model
        return model

    def loss(self, loss: nn.Module) -> nn.Module:
        return self.wrap_loss(loss) if self.wrap_loss is not None else loss


_DEEP = {"use_batch_norm": False, "hidden_dims": (64, 64, 64, 64, 32)}

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("healthy", (), "the built-in setup, untouched"),
        Scenario(
            "nan-input",
            ("nonfinite-input", "nonfinite-loss"),
            "one NaN in the training data",
            nan_input=True,
        ),
        Scenario(
            "nan-grad",
            ("nonfinite-grad",),
            "a custom term sqrt(|mu - mu|): value 0, derivative infinite",
            prepare=lambda m: _Wrapped(m, _sqrt_at_zero),
        ),
        Scenario(
            "zero-loss",
            ("zero-loss",),
            "the loss is given the reconstruction itself as the target",
            wrap_loss=_TargetLeak,
        ),
        Scenario(
            "posterior-collapse",
            ("posterior-collapse",),
            "a KL weight of 30 from the first epoch, no annealing",
            loss_kwargs={"kl_loss_weight": 30.0},
            lr=1e-2,
        ),
        Scenario(
            "frozen-noise",
            ("frozen-noise",),
            "the original bug: the noise generator is reseeded on every call",
            model_kwargs={"noise": "frozen"},
        ),
        Scenario(
            "frozen-no-z",
            ("frozen-noise",),
            "the same bug in a model whose output has no z: two passes of one batch match",
            model_kwargs={"noise": "frozen"},
            prepare=lambda m: _Wrapped(m, _drop_z),
        ),
        Scenario(
            "noise-scale",
            ("noise-scale",),
            "sigma = exp(log_var): the variance used as the standard deviation",
            model_kwargs={"noise": "exp_logvar"},
        ),
        Scenario(
            "tiny-noise",
            ("noise-scale",),
            'eps multiplied by 0.01 (noise shrunk "for stability")',
            model_kwargs={"noise": "scaled"},
        ),
        Scenario(
            "no-grad-path",
            ("no-grad-path",),
            "the original semantic loss: hard thresholds and argmax (is_alive, role, threatened)",
            loss_kwargs={"semantic_mode": "hard"},
        ),
        Scenario(
            "vanishing-grad",
            ("vanishing-grad",),
            "a deep tanh MLP, no batch norm, weights scaled by 0.05",
            model_kwargs={**_DEEP, "activation": "tanh"},
            prepare=lambda m: _scale_linear(m, 0.05),
        ),
        Scenario(
            "exploding-grad",
            ("exploding-grad",),
            "a deep ReLU MLP, no batch norm, weights scaled by 4",
            model_kwargs=_DEEP,
            prepare=lambda m: _scale_linear(m, 4.0),
        ),
        Scenario(
            "dying-relu",
            ("dying-relu",),
            "hidden-layer biases set to -10 (no batch norm): most ReLUs never fire",
            model_kwargs={"use_batch_norm": False},
            prepare=_dead_biases,
        ),
        Scenario(
            "unused-params",
            ("unused-params",),
            "the model registers a head it never calls",
            prepare=_WithUnused,
        ),
        Scenario("loss-plateau", ("loss-plateau",), "a learning rate of 1e-7", lr=1e-7),
        Scenario("loss-oscillation", ("loss-oscillation",), "a learning rate of 1.0", lr=1.0),
        Scenario(
            "imbalance",
            ("scale-imbalance", "grad-dominance"),
            "a KL weight of 1e-5: KL is noise in the total and its gradient",
            loss_kwargs={"kl_loss_weight": 1e-5},
        ),
        Scenario(
            "conflict",
            ("grad-conflict",),
            "an extra term that rewards reconstruction error (cos = -1 with it)",
            prepare=lambda m: _Wrapped(m, _opposing_term),
        ),
        Scenario(
            "hidden-term",
            ("terms-mismatch",),
            "the total holds 0.5 x reconstruction that the named terms do not show",
            wrap_loss=_HiddenTerm,
        ),
        Scenario(
            "legacy-reduction",
            ("batch-dependent-weights",),
            "the original reductions: reconstruction and KL summed, semantic averaged",
            loss_kwargs={"reduction": "sum", "semantic_reduction": "mean"},
        ),
        Scenario(
            "kl-wrong-sign",
            ("kl-formula",),
            "the KL written 0.5 * sum(1 + log_var - mu^2 - exp(log_var)), minus dropped: "
            "the loss rewards KL",
            wrap_loss=_KlWrongSign,
        ),
        Scenario(
            "beta-ignored",
            ("beta-schedule",),
            "a β warm-up 0 -> 1 over half the run is declared, but the loss keeps its "
            "starting KL weight (the schedule is set where the loss never reads it)",
            wrap_loss=_IgnoresBeta,
            declared_beta=DeclaredSchedule(warmup=0.5, beta_max=1.0),
        ),
        Scenario(
            "collapse-onset",
            ("collapse-onset",),
            "β held at 0.01 for 6 steps while the KL grows, then doubled every step to 10: "
            "the KL collapses part-way through",
            wrap_loss=_OvershootingBeta,
            lr=1e-2,
            beta_fault=True,
        ),
        Scenario(
            "rank-nan",
            ("rank-nonfinite",),
            f"rank 1's loss is given a target with a NaN at step {RANK_NAN_STEP} "
            "(needs --nproc 2 or more)",
            wrap_loss=_RankNan,
            min_nproc=2,
        ),
        Scenario(
            "rank-desync",
            ("rank-desync",),
            "rank 1's decoder.fc_out.weight nudged by 1e-3 in place after DDP's broadcast "
            "(needs --nproc 2 or more)",
            min_nproc=2,
            rank_fault=RankFault(rank=1, perturb="decoder.fc_out.weight"),
        ),
        Scenario(
            "unsynced-bn",
            ("rank-buffer-desync",),
            "DDP(broadcast_buffers=False): each rank's batch-norm running statistics drift "
            "apart (needs --nproc 2 or more)",
            min_nproc=2,
            rank_fault=RankFault(broadcast_buffers=False),
        ),
        Scenario(
            "original",
            ("no-grad-path", "frozen-noise", "batch-dependent-weights"),
            "the original system all at once: hard semantic features, noise reseeded every "
            "call, reconstruction and KL summed but semantic averaged",
            model_kwargs={"noise": "frozen"},
            loss_kwargs={"semantic_mode": "hard", "reduction": "sum", "semantic_reduction": "mean"},
        ),
    )
}


def get_scenario(name: str) -> Scenario:
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; expected one of {', '.join(SCENARIOS)}")
    return SCENARIOS[name]
