"""The one small training loop every command uses.

It trains a VAE-like model (``forward(x)`` returns a dict with ``reconstruction``,
``mu``, ``log_var``) with a :class:`~meaning_transform.losses.CombinedLoss` and
returns plain per-epoch records: every raw and weighted loss component, the
total, β, and the total gradient norm before clipping. Anything that wants to
look closer (gradient monitors, attribution) plugs in as a step callback.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from meaning_transform.constants import DEVICES
from meaning_transform.losses.annealing import SCHEDULES, beta_annealing, check_schedule_type
from meaning_transform.optim import Adam

_RESULT_KEYS = {
    "reconstruction": "reconstruction_loss",
    "kl": "kl_loss",
    "semantic": "semantic_loss",
    "compression": "compression_loss",
}


# The loss attribute holding each weighted component's weight. ``train`` takes any
# nn.Module (the fault scenarios wrap a CombinedLoss and forward these attributes), and
# nn.Module types attributes it does not declare as Tensor | Module, so the weights are
# read and set by name.
_WEIGHT_ATTRIBUTES = {
    "reconstruction": "recon_loss_weight",
    "kl": "kl_loss_weight",
    "semantic": "semantic_loss_weight",
}


def loss_weights(loss_fn: nn.Module) -> dict[str, float]:
    """The weights a CombinedLoss (or a wrapper forwarding them) is using, by component."""
    return {name: float(getattr(loss_fn, attr)) for name, attr in _WEIGHT_ATTRIBUTES.items()}


class DeviceError(ValueError):
    """The requested device is unknown or not available on this machine."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then falls back to cpu; others must be available."""
    if name not in DEVICES:
        raise DeviceError(f"unknown device {name!r}; expected one of {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name == "cuda" and not cuda:
        raise DeviceError("device 'cuda' requested but CUDA is not available (try --device auto)")
    if name == "mps" and not mps:
        raise DeviceError("device 'mps' requested but MPS is not available (try --device auto)")
    return torch.device(name)


@dataclass(frozen=True)
class BetaSchedule:
    """β annealing for the KL weight; see :func:`~meaning_transform.losses.beta_annealing`."""

    schedule_type: str = "linear"
    min_beta: float = 0.0
    max_beta: float = 1.0
    cycles: int = 4
    ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.schedule_type not in SCHEDULES:
            raise ValueError(
                f"schedule_type must be one of {', '.join(SCHEDULES)}, got {self.schedule_type!r}"
            )

    def beta(self, epoch: int, max_epochs: int) -> float:
        return beta_annealing(
            epoch,
            max_epochs,
            min_beta=self.min_beta,
            max_beta=self.max_beta,
            # the field is a plain str (checked in __post_init__): narrow it to ScheduleType
            schedule_type=check_schedule_type(self.schedule_type),
            cycles=self.cycles,
            ratio=self.ratio,
        )


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int | None = None  # None: full batch, one step per epoch
    lr: float = 1e-3
    clip_grad_norm: float | None = None  # None: no clipping (the norm is still measured)
    schedule: BetaSchedule | None = None  # None: the loss's own kl_loss_weight throughout
    device: str = "cpu"
    seed: int = 0  # shuffling order; the model owns its own noise generator

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be positive, got {self.clip_grad_norm}")


@dataclass
class StepContext:
    """What a step callback sees. Tensors are live (on the training device)."""

    epoch: int
    step: int  # global step, from 0
    model: nn.Module
    batch: torch.Tensor  # (B, D)
    output: dict[str, torch.Tensor]
    loss: dict[str, Any]  # the CombinedLoss result
    grad_norm: float = math.nan  # total norm before clipping, set after backward


class Optimizer(Protocol):
    """What :func:`train` needs of an optimizer (``torch.optim`` ones qualify)."""

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def step(self) -> Any: ...


class StepCallback(Protocol):
    """Optional hooks; a callback may define any of the three methods.

    ``before_backward`` sees the live graph (per-term gradients can be taken there);
    ``after_backward`` sees the gradients before clipping and the update;
    ``after_step`` runs after the optimizer step (or after a skipped one).
    """

    def before_backward(self, ctx: StepContext) -> None: ...

    def after_backward(self, ctx: StepContext) -> None: ...

    def after_step(self, ctx: StepContext) -> None: ...


@dataclass(frozen=True)
class EpochRecord:
    """One epoch, averaged over its steps. Plain floats only."""

    epoch: int
    beta: float  # the KL weight in force this epoch
    raw: dict[str, float]  # unweighted component values
    weighted: dict[str, float]  # weight x raw
    weights: dict[str, float]
    total: float
    grad_norm: float  # mean over steps of the total gradient norm before clipping
    grad_norm_max: float
    steps: int
    skipped_steps: int  # steps whose loss or gradient was non-finite (no update made)
    floors_engaged: dict[str, int]  # component -> steps in which its floor engaged
    non_finite: tuple[str, ...]  # descriptions of non-finite events, first few


@dataclass(frozen=True)
class TrainResult:
    records: tuple[EpochRecord, ...]
    reduction: dict[str, str]
    n_samples: int
    batch_size: int
    device: str
    steps: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches; a last batch of one sample joins the one before it,
    because batch norm cannot normalise a single sample in training mode."""
    return _cut(torch.randperm(n, generator=generator), batch_size)


def _cut(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``order`` in batches of ``batch_size``; a last batch of one joins the one before."""
    batches = list(order.split(batch_size))
    if len(batches) > 1 and batches[-1].numel() == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def reports_components(result: Mapping[str, Any]) -> bool:
    """Whether a loss result is a CombinedLoss one, reporting its floored components."""
    return all(key in result for key in _RESULT_KEYS.values())


def term_values(result: Mapping[str, Any]) -> dict[str, float]:
    """The unweighted value of each main term of one step's loss result, on the host.

    A :class:`~meaning_transform.losses.CombinedLoss` result gives its components as
    reported (after the 1e-8 floor); any other (the user's loss through
    :class:`~meaning_transform.adapters.LossStep`) gives its terms under its own names.
    Sub-terms (``"semantic/role"``) are attribution's business, not the epoch's.
    """
    if reports_components(result):
        return {name: float(result[key]) for name, key in _RESULT_KEYS.items()}
    terms = {n: t for n, t in result.get("terms", {}).items() if "/" not in n}
    if not terms:
        return {}
    host = torch.stack([t.detach().double().reshape(()) for t in terms.values()]).tolist()
    return dict(zip(terms, host, strict=True))


def _beta(loss_fn: nn.Module, weights: Mapping[str, float]) -> float:
    """The KL weight in force: the loss's own attribute when it has one."""
    value = getattr(loss_fn, _WEIGHT_ATTRIBUTES["kl"], None)
    if isinstance(value, (int, float)):
        return float(value)
    return weights.get("kl", math.nan)


def train(
    model: nn.Module,
    loss_fn: nn.Module,
    data: torch.Tensor,
    config: TrainConfig,
    callbacks: Sequence[object] = (),
    on_epoch: Callable[[EpochRecord], None] | None = None,
    optimizer: Optimizer | None = None,
    sampler: Any = None,
) -> TrainResult:
    """Train ``model`` on ``data`` (N, D) and return per-epoch records.

    The loss should be a CombinedLoss; in this loop it runs in whatever
    ``on_non_finite`` mode it was built with (commands use ``record`` so a NaN
    becomes a finding rather than a crash). A step whose loss or gradient is
    non-finite makes no parameter update and is counted in ``skipped_steps``.
    Without ``optimizer`` it uses :class:`meaning_transform.optim.Adam` (``torch.optim.Adam``'s
    arithmetic without its 1 s import of ``torch._dynamo``); any ``torch.optim`` optimizer
    works too.

    ``sampler``: a distributed run's (a ``DistributedSampler`` over ``data``): each
    epoch it is told the epoch (``set_epoch``) and this rank's indices, in its order, are
    cut into batches of ``config.batch_size``. Every rank then runs the backward on every
    step, a non-finite loss included, because DDP's all-reduce needs every rank in it; the
    all-reduced gradient is then non-finite on every rank, and every rank skips the update.
    """
    device = resolve_device(config.device)
    model.to(device)
    loss_fn.to(device)
    data = data.to(device)
    n = data.shape[0] if sampler is None else len(sampler)  # this rank's share
    batch_size = n if config.batch_size is None else min(config.batch_size, n)
    if optimizer is None:
        optimizer = Adam(model.parameters(), lr=config.lr)
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = config.clip_grad_norm if config.clip_grad_norm is not None else math.inf
    shuffle = torch.Generator().manual_seed(config.seed)
    records: list[EpochRecord] = []
    step = 0
    model.train()
    for epoch in range(config.epochs):
        if config.schedule is not None:
            setattr(loss_fn, _WEIGHT_ATTRIBUTES["kl"], config.schedule.beta(epoch, config.epochs))
        sums: dict[str, float] = {}
        total_sum, norms, skipped = 0.0, [], 0
        floors: dict[str, int] = {}
        events: list[str] = []
        indices: list[torch.Tensor | None]
        if sampler is not None:
            sampler.set_epoch(epoch)
            indices = [*_cut(torch.tensor(list(sampler), dtype=torch.long), batch_size)]
        else:
            indices = [*_batches(n, batch_size, shuffle)] if batch_size < n else [None]
        for idx in indices:
            batch = data if idx is None else data[idx.to(device)]  # (B, D)
            output = model(batch)
            result = loss_fn(output, batch)
            ctx = StepContext(epoch, step, model, batch, output, result)
            for name in result.get("floors_engaged", ()):
                floors[name] = floors.get(name, 0) + 1
            events.extend(e.describe() for e in result.get("non_finite", ()))
            optimizer.zero_grad(set_to_none=True)
            loss = result["loss"]
            finite_loss = bool(torch.isfinite(loss.detach()))
            for cb in callbacks:
                if hasattr(cb, "before_backward"):
                    cb.before_backward(ctx)
            if finite_loss or sampler is not None:
                loss.backward()
                grad_norm = float(nn.utils.clip_grad_norm_(params, max_norm=max_norm))
            else:
                grad_norm = math.nan
            ctx.grad_norm = grad_norm
            for cb in callbacks:
                if hasattr(cb, "after_backward"):
                    cb.after_backward(ctx)
            if finite_loss and math.isfinite(grad_norm):
                optimizer.step()
            else:
                skipped += 1
            for cb in callbacks:
                if hasattr(cb, "after_step"):
                    cb.after_step(ctx)
            for name, value in term_values(result).items():
                sums[name] = sums.get(name, 0.0) + value
            total_sum += float(loss.detach())
            norms.append(grad_norm)
            step += 1
        k = len(indices)
        raw = {name: total / k for name, total in sums.items()}
        weights = {name: float(result.get("weights", {}).get(name, 1.0)) for name in raw}
        finite_norms = [g for g in norms if math.isfinite(g)]
        record = EpochRecord(
            epoch=epoch,
            beta=_beta(loss_fn, weights),
            raw=raw,
            weighted={name: weights[name] * raw[name] for name in raw},
            weights=weights,
            total=total_sum / k,
            grad_norm=sum(finite_norms) / len(finite_norms) if finite_norms else math.nan,
            grad_norm_max=max(finite_norms) if finite_norms else math.nan,
            steps=k,
            skipped_steps=skipped,
            floors_engaged=floors,
            non_finite=tuple(events[:5]),
        )
        records.append(record)
        if on_epoch is not None:
            on_epoch(record)
    reduction = dict(result.get("reduction", {})) if records else {}
    return TrainResult(
        records=tuple(records),
        reduction=reduction,
        n_samples=n,
        batch_size=batch_size,
        device=str(device),
        steps=step,
    )
