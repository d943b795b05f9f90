"""Per-parameter gradient norms over a run, from the snapshots the gradient hooks took."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meaning_transform.diagnostics.gradients import GradientSnapshot


@dataclass(frozen=True)
class ParamNormSummary:
    """One parameter's gradient 2-norm over the captured steps (``None``: never reached)."""

    name: str
    mean_norm: float | None
    max_norm: float | None
    final_norm: float | None  # at the last step that gave it a gradient
    batch_norm_centred: bool  # feeds batch norm: a ~0 gradient is by design


@dataclass(frozen=True)
class GradientSummary:
    hooks_registered: int
    captured_steps: int  # snapshots taken (a step with a non-finite loss has none)
    training_steps: int
    final_total_norm: float | None  # of the last snapshot
    final_first_last_ratio: float | None
    never_reached: tuple[str, ...]  # no gradient in any captured step
    batch_norm_centred: tuple[str, ...]
    parameters: tuple[ParamNormSummary, ...]  # in the order the snapshots list them


def gradient_summary(
    history: Sequence[GradientSnapshot],
    hooks_registered: int,
    training_steps: int,
    batch_norm_centred: Sequence[str] = (),
) -> GradientSummary:
    """Per parameter: mean, max and final gradient 2-norm over the captured steps.

    Args:
        history: one snapshot per captured step, in step order.
        hooks_registered: how many gradient hooks were attached.
        training_steps: the optimizer steps the run made (captured or not).
        batch_norm_centred: names of biases that feed batch norm
            (:func:`~meaning_transform.diagnostics.structure.biases_before_batch_norm`).
    """
    norms: dict[str, list[float]] = {}
    for snap in history:
        for s in snap.params:
            values = norms.setdefault(s.name, [])
            if s.has_grad and s.norm is not None:
                values.append(s.norm)
    centred = tuple(batch_norm_centred)
    final = history[-1] if history else None
    return GradientSummary(
        hooks_registered=hooks_registered,
        captured_steps=len(history),
        training_steps=training_steps,
        final_total_norm=final.total_norm if final else None,
        final_first_last_ratio=final.first_last_ratio if final else None,
        never_reached=tuple(name for name, values in norms.items() if not values),
        batch_norm_centred=centred,
        parameters=tuple(
            ParamNormSummary(
                name=name,
                mean_norm=sum(values) / len(values) if values else None,
                max_norm=max(values) if values else None,
                final_norm=values[-1] if values else None,
                batch_norm_centred=name in centred,
            )
            for name, values in norms.items()
        ),
    )
