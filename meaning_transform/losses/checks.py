"""Finiteness, shape and floor checks shared by every loss.

A loss either raises on bad numbers (the library default) or, with
``on_non_finite="record"``, writes a :class:`NonFiniteEvent` into the
:class:`CheckLog` it was given and carries on. Floors are the same: a floor that
engages is counted in the log, never silent, because a zero-valued loss is
exactly what an ``mtx`` user came to find.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

# Re-exported here, where the losses have always found them; defined once in constants.
from meaning_transform.constants import (  # noqa: F401
    COMPONENT_FLOOR,
    REDUCTIONS,
    TOTAL_FLOOR,
    Reduction,
)

OnNonFinite = Literal["raise", "record"]
# Typed as a tuple of the literals so that ``x in ON_NON_FINITE`` narrows a str for mypy.
ON_NON_FINITE: tuple[OnNonFinite, ...] = ("raise", "record")


class LossInputError(ValueError):
    """Base class for bad inputs to a loss (wrong shape, non-finite values)."""


class NonFiniteLossError(LossInputError):
    """A tensor entering or produced inside a loss holds NaN or Inf."""

    def __init__(self, event: NonFiniteEvent) -> None:
        super().__init__(event.describe())
        self.event = event


class ShapeMismatchError(LossInputError):
    """Two tensors that must agree in shape do not."""


@dataclass(frozen=True)
class NonFiniteEvent:
    """Where NaN/Inf values were found: which tensor, how many, and the first index."""

    tensor: str
    nan_count: int
    inf_count: int
    first_index: tuple[int, ...]

    def describe(self) -> str:
        return (
            f"non-finite values in {self.tensor}: {self.nan_count} NaN, {self.inf_count} Inf, "
            f"first at index {list(self.first_index)}"
        )


@dataclass
class CheckLog:
    """What the checks saw; filled in ``record`` mode, and always for floors.

    ``floor_engagements`` counts, per component name, how often a floor replaced
    the computed value (a cumulative count over the life of the loss object).
    """

    non_finite: list[NonFiniteEvent] = field(default_factory=list)
    floor_engagements: dict[str, int] = field(default_factory=dict)

    def clear(self) -> None:
        self.non_finite.clear()
        self.floor_engagements.clear()


def find_non_finite(name: str, tensor: torch.Tensor) -> NonFiniteEvent | None:
    """Return an event describing NaN/Inf in ``tensor``, or None when it is all finite."""
    bad = ~torch.isfinite(tensor.detach())
    if not bool(bad.any()):
        return None
    nan_count = int(torch.isnan(tensor.detach()).sum())
    first = torch.nonzero(bad, as_tuple=False)[0].tolist() if tensor.dim() > 0 else []
    return NonFiniteEvent(
        tensor=name,
        nan_count=nan_count,
        inf_count=int(bad.sum()) - nan_count,
        first_index=tuple(int(i) for i in first),
    )


def check_finite(
    name: str,
    tensor: torch.Tensor,
    on_non_finite: OnNonFinite = "raise",
    log: CheckLog | None = None,
) -> bool:
    """Check ``tensor`` for NaN/Inf. Returns True when finite.

    In ``raise`` mode a non-finite tensor raises :class:`NonFiniteLossError`
    naming it; in ``record`` mode the event is appended to ``log`` and False returned.
    """
    event = find_non_finite(name, tensor)
    if event is None:
        return True
    if on_non_finite == "raise":
        raise NonFiniteLossError(event)
    if on_non_finite != "record":
        raise ValueError(f"on_non_finite must be 'raise' or 'record', got {on_non_finite!r}")
    if log is not None:
        log.non_finite.append(event)
    return False


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Raise :class:`ShapeMismatchError` unless ``a`` and ``b`` have the same shape."""
    if a.shape != b.shape:
        raise ShapeMismatchError(
            f"expected {name_a} and {name_b} to have the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_2d(name: str, tensor: torch.Tensor) -> None:
    """Raise :class:`ShapeMismatchError` unless ``tensor`` is (B, features)."""
    if tensor.dim() != 2:
        raise ShapeMismatchError(f"expected {name} of shape (B, D), got {tuple(tensor.shape)}")


def check_on_non_finite(on_non_finite: str) -> OnNonFinite:
    """Validate an ``on_non_finite`` argument up front, not at the first NaN."""
    if on_non_finite not in ON_NON_FINITE:
        raise ValueError(f"on_non_finite must be one of {ON_NON_FINITE}, got {on_non_finite!r}")
    return on_non_finite


def check_reduction(reduction: str) -> Reduction:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def apply_floor(value: torch.Tensor, floor: float, name: str, log: CheckLog | None) -> torch.Tensor:
    """Clamp a scalar loss at ``floor`` and count the engagement in ``log``.

    A floored value carries no gradient (clamp's gradient is zero below the
    floor); the count is how a user learns the term was effectively zero.
    """
    engaged = bool(value.detach() < floor)
    if engaged and log is not None:
        log.floor_engagements[name] = log.floor_engagements.get(name, 0) + 1
    return torch.clamp(value, min=floor)


def reduce_per_sample(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    """(B,) per-sample losses -> scalar, by per-sample mean or sum over the batch."""
    return per_sample.mean() if reduction == "mean" else per_sample.sum()
