"""The Doctor's own per-epoch history of a user's training loop.

The built-in loop hands the Doctor its :class:`~meaning_transform.training.EpochRecord`s;
in a user's loop the Doctor builds the same records itself from what it sees each step
(the loss terms and total) and what its gradient hooks measured (the total gradient norm
before clipping), so every rule that reads epochs runs with nothing built by hand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from meaning_transform.training import EpochRecord, reports_components, term_values


class EpochHistory:
    """Steps accumulate into the open epoch; :meth:`end_epoch` closes it into a record.

    Args:
        steps_per_epoch: close an epoch automatically after this many steps (None: only
            when :meth:`end_epoch` is called, and at the end for a partly filled one).
    """

    def __init__(self, steps_per_epoch: int | None = None) -> None:
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.steps_per_epoch = steps_per_epoch
        self.records: list[EpochRecord] = []
        self._open()

    def _open(self) -> None:
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}
        self._totals: list[float] = []
        self._floors: dict[str, int] = {}
        self._events: list[str] = []
        self._beta = math.nan

    @property
    def open_steps(self) -> int:
        return len(self._totals)

    def add_step(
        self,
        result: Mapping[str, Any],
        values: Mapping[str, float] | None = None,
        total: float | None = None,
    ) -> None:
        """One step's loss result (the dict form every mtx loss returns); ``values`` and
        ``total``, when the caller has read them: its main terms and total on the host."""
        if values is None or reports_components(result):
            values = term_values(result)  # CombinedLoss reports its components floored
        for name, value in values.items():
            self._sums[name] = self._sums.get(name, 0.0) + value
        self._weights.update({k: float(v) for k, v in result.get("weights", {}).items()})
        self._beta = float(self._weights.get("kl", self._beta))
        self._totals.append(float(result["loss"].detach()) if total is None else total)
        for name in result.get("floors_engaged", ()):
            self._floors[name] = self._floors.get(name, 0) + 1
        self._events.extend(
            e.describe() if hasattr(e, "describe") else str(e) for e in result.get("non_finite", ())
        )

    def due(self) -> bool:
        """Whether the open epoch has reached ``steps_per_epoch`` steps."""
        return self.steps_per_epoch is not None and self.open_steps >= self.steps_per_epoch

    def end_epoch(self, grad_norms: list[float]) -> EpochRecord | None:
        """Close the open epoch (None when it has no step); ``grad_norms`` are the total
        gradient norms the hooks measured in its steps."""
        k = self.open_steps
        if k == 0:
            return None
        raw = {name: total / k for name, total in self._sums.items()}
        weights = {name: self._weights.get(name, 1.0) for name in raw}
        finite_norms = [g for g in grad_norms if math.isfinite(g)]
        skipped = sum(1 for t in self._totals if not math.isfinite(t))
        record = EpochRecord(
            epoch=len(self.records),
            beta=self._beta,
            raw=raw,
            weighted={name: weights[name] * raw[name] for name in raw},
            weights=weights,
            total=sum(self._totals) / k,
            grad_norm=sum(finite_norms) / len(finite_norms) if finite_norms else math.nan,
            grad_norm_max=max(finite_norms) if finite_norms else math.nan,
            steps=k,
            skipped_steps=skipped,
            floors_engaged=self._floors,
            non_finite=tuple(self._events[:5]),
        )
        self.records.append(record)
        self._open()
        return record
