"""Parameter inspection of a model: shape, statistics and flags for real problems only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

from meaning_transform.diagnostics.thresholds import HUGE_PARAMETER

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class ParameterStats:
    """One parameter. Statistics are over its finite entries; ``None`` when it has none."""

    name: str
    role: str  # weight, bias, norm_weight or norm_bias
    shape: tuple[int, ...]
    numel: int
    mean: float | None
    std: float | None  # population standard deviation
    min: float | None
    max: float | None
    nan: int
    inf: int
    flags: tuple[str, ...]  # non-finite, identical, huge


def parameter_roles(model: nn.Module) -> Mapping[str, str]:
    """Parameter name -> ``weight``, ``bias``, ``norm_weight`` or ``norm_bias``."""
    roles: dict[str, str] = {}
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, _NORM_TYPES)
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if is_norm:
                roles[full] = "norm_bias" if name == "bias" else "norm_weight"
            else:
                roles[full] = "bias" if name == "bias" else "weight"
    return MappingProxyType(roles)


def inspect_parameters(model: nn.Module) -> tuple[ParameterStats, ...]:
    """Shape and statistics of every parameter, in registration order, with flags.

    Statistics are over the finite entries (so one NaN does not hide the rest). Flags:

    - ``non-finite``: any NaN or Inf entry.
    - ``identical``: a weight matrix (2-D or more, not a bias or normalisation
      parameter) whose entries are all equal: every unit gets the same gradient,
      so the units can never become different.
    - ``huge``: some finite entry with magnitude above ``HUGE_PARAMETER`` (1e3).

    Not flagged, because they are how layers are meant to start: a bias at zero,
    a batch-norm scale at one and shift at zero.

    Reduced on the parameters' device, one host copy for the whole model.
    """
    named = list(model.named_parameters())
    if not named:
        return ()
    roles = parameter_roles(model)
    rows = []
    for _, p in named:
        w = p.detach().to(torch.float64 if p.dtype == torch.float64 else torch.float32)
        if w.numel() == 0:
            rows.append(w.new_zeros(7))  # no entries: nothing to measure or flag
            continue
        finite = torch.isfinite(w)
        safe = torch.where(finite, w, torch.zeros_like(w))
        count = finite.sum()
        mean = safe.sum() / count
        var = torch.where(finite, (w - mean) ** 2, torch.zeros_like(w)).sum() / count
        rows.append(
            torch.stack(
                [
                    mean,
                    var.sqrt(),
                    torch.where(finite, w, torch.full_like(w, float("inf"))).min(),
                    torch.where(finite, w, torch.full_like(w, -float("inf"))).max(),
                    torch.isnan(w).sum().to(w.dtype),
                    torch.isinf(w).sum().to(w.dtype),
                    safe.abs().max(),
                ]
            )
        )  # (7,)
    device = rows[0].device
    dtype = torch.float64 if any(r.dtype == torch.float64 for r in rows) else torch.float32
    host = torch.stack([r.to(device=device, dtype=dtype) for r in rows]).cpu().tolist()  # (P, 7)
    return tuple(
        _stats(name, p, roles.get(name, "weight"), row)
        for (name, p), row in zip(named, host, strict=True)
    )


def _stats(name: str, p: nn.Parameter, role: str, row: list[float]) -> ParameterStats:
    mean, std, lo, hi, nan, inf, abs_max = row
    any_finite = int(nan) + int(inf) < p.numel()
    flags: list[str] = []
    if nan or inf:
        flags.append("non-finite")
    if role == "weight" and p.dim() >= 2 and p.numel() > 1 and any_finite and std == 0.0:
        flags.append("identical")
    if any_finite and abs_max > HUGE_PARAMETER:
        flags.append("huge")
    return ParameterStats(
        name=name,
        role=role,
        shape=tuple(p.shape),
        numel=p.numel(),
        mean=mean if any_finite else None,
        std=std if any_finite else None,
        min=lo if any_finite else None,
        max=hi if any_finite else None,
        nan=int(nan),
        inf=int(inf),
        flags=tuple(flags),
    )
