"""Building blocks every command's study uses: data, model, loss, records -> rows.

A *study* is the compute behind one command: it trains, measures and returns a
plain, JSON-ready dict. The CLI only parses options and renders that dict.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meaning_transform.data import N_FEATURES, DataError, generate, load_data
from meaning_transform.diagnostics.doctor import Doctor
from meaning_transform.diagnostics.findings import Finding
from meaning_transform.diagnostics.rules import evaluate
from meaning_transform.losses import CombinedLoss
from meaning_transform.model import MeaningVAE
from meaning_transform.scenarios import Scenario
from meaning_transform.training import COMPONENTS, EpochRecord, TrainConfig, TrainResult, train

DEFAULT_SAMPLES = 512
ZERO_VALUE = 1e-8  # a component at or below this is "zero-valued" (the original floor)

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

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "n_samples": int(self.tensor.shape[0]),
            "n_features": self.n_features,
        }


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


def scenario_train_config(config: TrainConfig, scenario: Scenario | None) -> TrainConfig:
    """The scenario's learning rate, if it sets one."""
    if scenario is None or scenario.lr is None:
        return config
    return replace(config, lr=scenario.lr)


@dataclass(frozen=True)
class Diagnosed:
    """A training run with the Doctor attached: records, findings, attribution summary."""

    result: TrainResult
    findings: list[Finding]
    attribution: dict[str, Any]
    latent: dict[str, Any] | None


ATTRIBUTIONS_PER_RUN = 20  # per-term gradients cost one backward per term: sample steps


def diagnose_training(
    where: str,
    model: nn.Module,
    loss_fn: nn.Module,
    data: torch.Tensor,
    config: TrainConfig,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    callbacks: tuple[object, ...] = (),
) -> Diagnosed:
    """Train with the Doctor attached and return what it found."""
    n = data.shape[0]
    batch = n if config.batch_size is None else min(config.batch_size, n)
    steps = config.epochs * math.ceil(n / batch)
    doctor = Doctor(model, where=where, attribute_every=max(1, steps // ATTRIBUTIONS_PER_RUN))
    with doctor:
        result = train(model, loss_fn, data, config, callbacks=(doctor, *callbacks),
                       on_epoch=on_epoch)
    evidence = doctor.evidence(result.records, data=data, batch_size=result.batch_size)
    return Diagnosed(
        result=result,
        findings=evaluate(evidence),
        attribution=doctor.summary(),
        latent=evidence.latent.as_dict() if evidence.latent is not None else None,
    )


def component_rows(record: EpochRecord) -> dict[str, dict[str, Any]]:
    """Per component: raw, weight, weighted, share of the total, and flags.

    Flags: ``non-finite`` (NaN/Inf), ``floored`` (the 1e-8 floor replaced the
    value in at least one step), ``zero`` (at or below 1e-8 while its weight is
    on), ``off`` (weight 0: not part of this configuration).
    """
    total_weighted = sum(
        abs(record.weighted[c]) for c in COMPONENTS if math.isfinite(record.weighted[c])
    )
    rows: dict[str, dict[str, Any]] = {}
    for name in COMPONENTS:
        raw, weight, weighted = record.raw[name], record.weights[name], record.weighted[name]
        if name == "compression" and raw == 0.0:
            continue  # the model has no compression term
        flags: list[str] = []
        if weight == 0.0:
            flags.append("off")
        elif not math.isfinite(raw):
            flags.append("non-finite")
        else:
            if record.floors_engaged.get(name, 0):
                flags.append("floored")
            if raw <= ZERO_VALUE:
                flags.append("zero")
        share = (
            abs(weighted) / total_weighted
            if total_weighted > 0 and math.isfinite(weighted)
            else math.nan
        )
        rows[name] = {
            "raw": raw,
            "weight": weight,
            "weighted": weighted,
            "share": share,
            "flags": flags,
        }
    return rows


def epoch_row(record: EpochRecord) -> dict[str, Any]:
    """One epoch as it appears in JSON."""
    total_flags: list[str] = []
    if not math.isfinite(record.total):
        total_flags.append("non-finite")
    if record.floors_engaged.get("total", 0):
        total_flags.append("floored")
    return {
        "epoch": record.epoch,
        "beta": record.beta,
        "components": component_rows(record),
        "total": record.total,
        "total_flags": total_flags,
        "grad_norm": record.grad_norm,
        "grad_norm_max": record.grad_norm_max,
        "steps": record.steps,
        "skipped_steps": record.skipped_steps,
        "non_finite": list(record.non_finite),
    }


def report_epochs(epochs: int, every: int) -> list[int]:
    """Which epochs get a table: every ``every`` epochs, and always the first and last.

    ``every`` 0 picks a step giving about five tables.
    """
    step = every if every > 0 else max(1, math.ceil(epochs / 5))
    chosen = set(range(0, epochs, step)) | {0, epochs - 1}
    return sorted(chosen)
