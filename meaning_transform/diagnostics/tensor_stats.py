"""mean, std, min and max of named tensors, as plain host floats."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor


@dataclass(frozen=True)
class TensorStats:
    """Statistics over every entry of one tensor; ``std`` is the population std."""

    mean: float
    std: float
    min: float
    max: float


def tensor_stats(tensors: Mapping[str, Tensor]) -> Mapping[str, TensorStats]:
    """:class:`TensorStats` of each tensor, in float64 on the CPU, in the given order.

    float64 so that a statistic measures the values, not float32 rounding; one host
    copy for all the tensors.
    """
    if not tensors:
        return MappingProxyType({})
    rows = []
    for t in tensors.values():
        v = t.detach().cpu().to(torch.float64)
        rows.append(torch.stack([v.mean(), v.std(correction=0), v.min(), v.max()]))  # (4,)
    host = torch.stack(rows).tolist()  # (T, 4), the one host copy
    return MappingProxyType(
        {name: TensorStats(*row) for name, row in zip(tensors, host, strict=True)}
    )
