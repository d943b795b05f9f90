"""KL-weight (beta) annealing schedules.

Monotone schedules (linear, sigmoid, exponential) start at exactly ``min_beta``
at epoch 0 and reach exactly ``max_beta`` at epoch ``max_epochs - 1``; later
epochs stay at ``max_beta``. The cyclical schedule follows Fu et al., "Cyclical
Annealing Schedule: A Simple Approach to Mitigating KL Vanishing" (NAACL 2019).
"""

from __future__ import annotations

import math

from meaning_transform.constants import SCHEDULES, ScheduleType

# With min_beta == 0 a geometric schedule cannot start at 0; it runs from
# max_beta * EXPONENTIAL_START_FRACTION instead, and epoch 0 is pinned to 0.
EXPONENTIAL_START_FRACTION = 1e-4


def check_schedule_type(schedule_type: str) -> ScheduleType:
    """Validate a schedule name (one of ``SCHEDULES``) and return it as a ScheduleType."""
    if schedule_type not in SCHEDULES:
        raise ValueError(f"schedule_type must be one of {SCHEDULES}, got {schedule_type!r}")
    return schedule_type


def _validate(
    epoch: int,
    max_epochs: int,
    min_beta: float,
    max_beta: float,
    schedule_type: str,
    cycles: int,
    ratio: float,
    steepness: float,
) -> None:
    check_schedule_type(schedule_type)
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs!r}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch!r}")
    for name, value in (("min_beta", min_beta), ("max_beta", max_beta)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if min_beta > max_beta:
        raise ValueError(f"min_beta must be <= max_beta, got min_beta={min_beta!r} > {max_beta!r}")
    if cycles < 1:
        raise ValueError(f"cycles must be >= 1, got {cycles!r}")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    if not steepness > 0:
        raise ValueError(f"steepness must be > 0, got {steepness!r}")


def _progress(epoch: int, max_epochs: int) -> float:
    """Fraction of training done: 0 at epoch 0, 1 at the last epoch (and after)."""
    if max_epochs == 1:
        return 1.0
    return min(1.0, epoch / (max_epochs - 1))


def _monotone_fraction(t: float, schedule_type: str, steepness: float) -> float:
    """Map progress t in (0, 1) to a fraction of the way from min_beta to max_beta."""
    if schedule_type == "linear":
        return t

    def s(u: float) -> float:
        return 1.0 / (1.0 + math.exp(-steepness * (u - 0.5)))

    # Rescale so that t = 0 and t = 1 land exactly on the ends (the original
    # sigmoid never reached either).
    return (s(t) - s(0.0)) / (s(1.0) - s(0.0))


def beta_annealing(
    epoch: int,
    max_epochs: int,
    min_beta: float = 0.0,
    max_beta: float = 1.0,
    schedule_type: ScheduleType = "linear",
    cycles: int = 4,
    ratio: float = 0.5,
    steepness: float = 10.0,
) -> float:
    """The KL weight beta for ``epoch`` of ``max_epochs``.

    Schedules, with t = epoch / (max_epochs - 1):

    - ``"linear"``: min + (max - min) * t.
    - ``"sigmoid"``: min + (max - min) * (s(t) - s(0)) / (s(1) - s(0)) with
      s(u) = 1 / (1 + exp(-steepness * (u - 0.5))), i.e. a sigmoid rescaled so
      its ends are exact.
    - ``"exponential"``: geometric from min to max, min * (max / min) ** t. With
      min_beta == 0 it runs geometrically from max_beta * 1e-4 instead, and
      epoch 0 still returns exactly 0 (so epoch 1 jumps from 0 to that curve).
    - ``"cyclical"`` (Fu et al. 2019): period = max_epochs / cycles, i = epoch
      mod period, beta = min + (max - min) * min(1, i / (period * ratio)). Equals
      the paper's ``frange_cycle_linear(max_epochs, min, max, cycles, ratio)``
      when max_epochs is a multiple of cycles; e.g. 16 epochs, 4 cycles, ratio
      0.5 -> [0, .5, 1, 1] four times. Epochs past the end keep cycling.

    Monotone schedules return exactly ``min_beta`` at epoch 0 and exactly
    ``max_beta`` at epoch ``max_epochs - 1`` and after. With ``max_epochs == 1``
    the single epoch is the last one and gets ``max_beta`` (training then
    optimises the target objective rather than an unregularised one).

    Args:
        epoch: 0-based epoch, >= 0.
        max_epochs: number of epochs, >= 1.
        min_beta: starting weight, >= 0.
        max_beta: final weight, >= min_beta.
        schedule_type: one of ``SCHEDULES``.
        cycles: cyclical only: number of cycles M, >= 1.
        ratio: cyclical only: fraction R of each cycle spent increasing, in (0, 1].
        steepness: sigmoid only: slope of the sigmoid over t in [0, 1], > 0.

    Shape:
        - output: a Python float.

    Example:
        >>> [beta_annealing(e, 5) for e in range(5)]
        [0.0, 0.25, 0.5, 0.75, 1.0]
        >>> beta_annealing(2, 16, schedule_type="cyclical")
        1.0

    Raises:
        ValueError: naming the bad argument.
    """
    _validate(epoch, max_epochs, min_beta, max_beta, schedule_type, cycles, ratio, steepness)
    span = max_beta - min_beta
    if schedule_type == "cyclical":
        # epoch mod (max_epochs / cycles), computed in integers so it is exact.
        i = (epoch * cycles % max_epochs) / cycles
        period = max_epochs / cycles
        return min_beta + span * min(1.0, i / (period * ratio))
    t = _progress(epoch, max_epochs)
    if t <= 0.0:
        return float(min_beta)
    if t >= 1.0:
        return float(max_beta)
    if schedule_type == "exponential":
        if max_beta == 0.0:
            return 0.0
        start = min_beta if min_beta > 0 else max_beta * EXPONENTIAL_START_FRACTION
        beta = start * (max_beta / start) ** t
    else:
        beta = min_beta + span * _monotone_fraction(t, schedule_type, steepness)
    return min(max(beta, min_beta), max_beta)


def beta_schedule(
    max_epochs: int,
    min_beta: float = 0.0,
    max_beta: float = 1.0,
    schedule_type: ScheduleType = "linear",
    cycles: int = 4,
    ratio: float = 0.5,
    steepness: float = 10.0,
) -> list[float]:
    """Beta for every epoch in ``range(max_epochs)`` (see :func:`beta_annealing`).

    Args:
        max_epochs: number of epochs, >= 1.
        min_beta, max_beta, schedule_type, cycles, ratio, steepness: as for
            :func:`beta_annealing`.

    Shape:
        - output: list of ``max_epochs`` floats.

    Example:
        >>> beta_schedule(8, schedule_type="cyclical", cycles=2)
        [0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0]
    """
    return [
        beta_annealing(e, max_epochs, min_beta, max_beta, schedule_type, cycles, ratio, steepness)
        for e in range(max_epochs)
    ]
