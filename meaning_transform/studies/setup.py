"""What every study is built from: the data, the built-in model and the loss.

The run pipeline (:mod:`meaning_transform.studies.pipeline`) puts them together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meaning_transform.data import N_FEATURES, DataError, generate, load_data
from meaning_transform.losses.combined import CombinedLoss
from meaning_transform.model import MeaningVAE
from meaning_transform.scenarios import Scenario
from meaning_transform.studies.report import DataInfo

DEFAULT_SAMPLES = 512

ModelFactory = Callable[[int, int], nn.Module]  # (input_dim, seed) -> model


@dataclass(frozen=True)
class Dataset:
    tensor: torch.Tensor  # (N, D)
    source: str  # "synthetic:<kind>" or the file path
    kind: str  # agent_states, normal, ... or "file"

    @property
    def n_features(self) -> int:
        return int(self.tensor.shape[1])

    @property
    def agent_layout(self) -> bool:
        """Semantic features only make sense on the 10-feature agent-state layout."""
        return self.n_features == N_FEATURES

    def describe(self) -> DataInfo:
        return DataInfo(self.source, self.kind, int(self.tensor.shape[0]), self.n_features)


def get_data(
    path: Path | None,
    kind: str = "agent_states",
    n: int = DEFAULT_SAMPLES,
    seed: int = 0,
    scenario: Scenario | None = None,
) -> Dataset:
    """The user's file when given, else ``n`` synthetic samples of ``kind``."""
    if path is not None:
        tensor = load_data(path)
        if tensor.shape[0] < 2:
            raise DataError(f"{path}: need at least 2 rows to train, got {tensor.shape[0]}")
        data = Dataset(tensor, source=str(path), kind="file")
    else:
        data = Dataset(generate(kind, n, seed=seed), source=f"synthetic:{kind}", kind=kind)
    if scenario is not None and scenario.nan_input:
        data = Dataset(scenario.data(data.tensor), data.source, data.kind)
    return data


def default_model(
    input_dim: int,
    seed: int,
    data: torch.Tensor | None = None,
    scenario: Scenario | None = None,
) -> nn.Module:
    """The built-in VAE. A sigmoid output when every value lies in [0, 1], else linear."""
    in_unit_range = data is not None and bool(((data >= 0) & (data <= 1)).all())
    activation = "sigmoid" if in_unit_range else "none"
    if scenario is not None:
        return scenario.model(input_dim, seed, activation)
    return MeaningVAE(input_dim=input_dim, seed=seed, output_activation=activation)


def build_loss(
    recon: float,
    kl: float,
    semantic: float,
    dataset: Dataset,
    reduction: str = "mean",
    scenario: Scenario | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A CombinedLoss in record mode (a NaN is a finding, not a crash).

    The semantic term needs the agent-state layout; on other data it is switched
    off (weight 0) and the study says so. A scenario may override any argument.
    """
    args: dict[str, Any] = {
        "recon_loss_weight": recon,
        "kl_loss_weight": kl,
        "semantic_loss_weight": semantic if dataset.agent_layout else 0.0,
        "reduction": reduction,
        "on_non_finite": "record",
        **kwargs,
    }
    if scenario is not None:
        args.update(scenario.loss_kwargs)
    loss = CombinedLoss(**args)
    return scenario.loss(loss) if scenario is not None else loss
